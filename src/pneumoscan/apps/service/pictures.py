"""The X-ray and heat map of recent predictions, in memory only, drawn as PNG when first asked for."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

from pneumoscan.running.explanation import overlay

#: Pictures are kept (in memory) at most this many pixels on their long side: enough for a screen.
PICTURE_MAX_SIDE = 1024


class PictureCache:
    """The X-ray and heat map of recent predictions, in memory only (they show the patient's image), bounded in bytes.

    PNGs are drawn on the first request for them, off the event loop, then
    kept: an API client that never asks for the picture costs no encoding.
    The oldest predictions leave first once the pictures and PNGs held pass ``max_bytes``.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[Image.Image, np.ndarray]] = OrderedDict()
        self.drawn: dict[tuple[str, str], bytes] = {}
        self.costs: dict[str, int] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def put(self, prediction_id: str, image: Image.Image, heatmap: np.ndarray) -> None:
        if max(image.size) > PICTURE_MAX_SIDE:
            image = image.copy()
            image.thumbnail((PICTURE_MAX_SIDE, PICTURE_MAX_SIDE))
        heatmap = heatmap.astype(np.float16)
        with self.lock:
            self.items[prediction_id] = (image, heatmap)
            self.charge(prediction_id, image.width * image.height * len(image.getbands()) + heatmap.nbytes)
            self.evict()

    def charge(self, prediction_id: str, cost: int) -> None:
        self.costs[prediction_id] = self.costs.get(prediction_id, 0) + cost
        self.bytes += cost

    def evict(self) -> None:
        while self.bytes > self.max_bytes and self.items:
            gone, _ = self.items.popitem(last=False)
            self.bytes -= self.costs.pop(gone, 0)
            self.drawn.pop((gone, "heatmap"), None)
            self.drawn.pop((gone, "image"), None)

    def png(self, prediction_id: str, picture: str) -> bytes | None:
        """``heatmap``: the overlay; ``image``: the X-ray as read. None once the prediction has left the cache."""
        with self.lock:
            entry, png = self.items.get(prediction_id), self.drawn.get((prediction_id, picture))
        if entry is None or picture not in ("heatmap", "image"):
            return None
        if png is None:
            image, heatmap = entry
            png = png_bytes(overlay(image, heatmap.astype(np.float32)) if picture == "heatmap" else image)
            with self.lock:
                if prediction_id in self.items and (prediction_id, picture) not in self.drawn:
                    self.drawn[(prediction_id, picture)] = png
                    self.charge(prediction_id, len(png))
                    self.evict()
        return png


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
