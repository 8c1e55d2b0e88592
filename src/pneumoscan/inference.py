"""Running an exported model with ONNX Runtime, without PyTorch.

A model folder holds ``model.onnx`` and ``model_card.json``; the card carries
everything fitted to the model (temperature, threshold, input contract), so a
prediction here is exactly what evaluation measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscan.calibration import calibrated_probability
from pneumoscan.config import DEFAULT_MODEL_DIR
from pneumoscan.errors import ModelNotFoundError
from pneumoscan.preprocessing import preprocess_file

MODEL_FILE = "model.onnx"
CARD_FILE = "model_card.json"


def read_card(model_dir: Path) -> dict:
    """The model card of an exported model folder."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"no exported model at {model_dir} (missing {CARD_FILE}); "
            "export one with 'pneumoscan export CHECKPOINT --out DIR' or pass --model"
        )
    return json.loads(path.read_text())


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class OnnxModel:
    """An exported pneumoscan model: logits and calibrated probabilities for image files."""

    def __init__(self, model_dir: Path | str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        self.card = read_card(self.model_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.image_size = int(self.card["input"]["size"])

    @property
    def temperature(self) -> float:
        return float(self.card["calibration"]["temperature"])

    @property
    def threshold(self) -> float:
        return float(self.card["operating_point"]["threshold"])

    def logits_of_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Raw pneumonia logits of preprocessed inputs ``N×3×H×W``."""
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        return self.session.run(["logit"], feed)[0].reshape(-1)

    def logits(self, paths: Sequence[Path], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = []
        for chunk in tqdm(list(batched(paths, batch_size)), desc="scoring", unit="batch", disable=not progress):
            out.append(self.logits_of_arrays(np.stack([preprocess_file(p, self.image_size) for p in chunk])))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def probabilities(self, paths: Sequence[Path], batch_size: int = 32) -> np.ndarray:
        """Calibrated probabilities of pneumonia, the numbers a user is shown."""
        return calibrated_probability(self.logits(paths, batch_size), self.temperature)
