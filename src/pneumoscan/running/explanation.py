"""Showing where the model looked: heat-map overlays (NumPy and Pillow only).

The heat map itself is computed inside the ONNX graph (see
:class:`pneumoscan.learning.export.LogitAndHeatmap`); this module only draws it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pneumoscan.running.regions import Region

# The "jet" colour map as piecewise-linear control points (position, r, g, b).
_JET = np.array(
    [
        [0.00, 0.0, 0.0, 0.5],
        [0.11, 0.0, 0.0, 1.0],
        [0.34, 0.0, 1.0, 1.0],
        [0.50, 0.5, 1.0, 0.5],
        [0.65, 1.0, 1.0, 0.0],
        [0.89, 1.0, 0.0, 0.0],
        [1.00, 0.5, 0.0, 0.0],
    ]
)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the jet colour map."""
    values = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    rgb = [np.interp(values, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)]
    return (np.stack(rgb, axis=-1) * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The X-ray with the heat map alpha-blended on top, at the X-ray's size.

    Blending is weighted by the map itself too, so cold regions keep the
    original grey and only where the model looked is coloured. Both inputs are
    8-bit after resizing, so the blend is a table of 65,536 colours looked up per
    pixel by ``grey << 8 | heat``: the same numbers as blending pixel by pixel, at a
    1024² film's size ~40× faster (one flat ``take`` is ~4× faster than indexing the
    256×256 table with two arrays; the DICOM node draws one per study).
    """
    gray = image.convert("L")
    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(gray.size, Image.Resampling.BILINEAR)
    index = (np.asarray(gray).astype(np.uint16) << 8) | np.asarray(heat)
    return Image.fromarray(np.take(blend_table(alpha).reshape(256 * 256, 3), index, axis=0))


@functools.lru_cache(maxsize=4)
def blend_table(alpha: float) -> np.ndarray:
    """``table[grey, heat]``: the RGB of a grey level under a heat level (float32 arithmetic, rounded)."""
    heat_values = np.arange(256, dtype=np.float32) / 255.0
    weight = (alpha * (0.3 + 0.7 * heat_values))[None, :, None]
    base = np.repeat(np.arange(256, dtype=np.float32)[:, None, None], 3, axis=2)
    blended = base * (1 - weight) + colorize(heat_values).astype(np.float32)[None, :, :] * weight
    return blended.round().astype(np.uint8)


#: The colour regions are drawn in: a green that the jet colours of the heat map do not use.
REGION_COLOUR = (57, 255, 20)


def draw_regions(picture: Image.Image, regions: Sequence[Region], scale: float = 1.0) -> Image.Image:
    """Each region's box and score on ``picture`` (in place); ``scale`` maps the regions' pixels to the picture's."""
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(picture.size) / 200))
    for region in regions:
        x0, y0 = region.x * scale, region.y * scale
        x1, y1 = (region.x + region.width) * scale, (region.y + region.height) * scale
        draw.rectangle((x0, y0, x1, y1), outline=REGION_COLOUR, width=line)
        draw.text((x0 + line + 2, y0 + line + 1), f"{region.score:.2f}", fill=REGION_COLOUR)
    return picture


def side_by_side(image: Image.Image, heatmap: np.ndarray, caption: str = "", regions: Sequence[Region] = ()) -> Image.Image:
    """Original (with the regions) on the left, overlay on the right, and an optional caption strip."""
    original = draw_regions(image.convert("RGB"), regions)
    blended = overlay(image, heatmap)
    strip = 22 if caption else 0
    canvas = Image.new("RGB", (original.width * 2, original.height + strip), "white")
    canvas.paste(original, (0, strip))
    canvas.paste(blended, (original.width, strip))
    if caption:
        ImageDraw.Draw(canvas).text((6, 5), caption, fill=(0, 0, 0))
    return canvas


def save_side_by_side(image: Image.Image, heatmap: np.ndarray, path: Path, caption: str = "", regions: Sequence[Region] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(image, heatmap, caption, regions).save(path)
    return path
