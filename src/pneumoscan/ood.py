"""The out-of-distribution gate: does an image look like what the model was validated on?

A classifier answers confidently on anything, a holiday photo or a CT slice
included. The gate measures how far an image's pooled features (the
``embedding`` output of the ONNX graph, what the classifier head sees) lie from
those of the training X-rays: the squared Mahalanobis distance under a
Ledoit-Wolf covariance fitted on the training split. Its threshold keeps a set
share (99 %) of the *validation* images, so it flags what is unlike a frontal
pediatric chest X-ray without rejecting ordinary ones.

Applying it needs NumPy only; fitting needs scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

GATE_FILE = "ood_gate.npz"
DEFAULT_KEEP = 0.99
WARNING = "This does not look like a frontal chest X-ray of a child; the result is not reliable."


@dataclass
class OodGate:
    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C) inverse covariance
    threshold: float  # largest in-distribution score
    keep: float  # share of validation images the threshold keeps

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row from the training mean."""
        centered = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1) - self.mean
        return np.sum((centered @ self.precision) * centered, axis=1)

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.threshold

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / GATE_FILE
        np.savez_compressed(
            path,
            mean=self.mean.astype(np.float32),
            precision=self.precision.astype(np.float32),
            threshold=np.float64(self.threshold),
            keep=np.float64(self.keep),
        )
        return path

    @classmethod
    def load(cls, model_dir: Path) -> OodGate | None:
        path = Path(model_dir) / GATE_FILE
        if not path.is_file():
            return None
        with np.load(path) as data:
            return cls(
                data["mean"].astype(np.float64),
                data["precision"].astype(np.float64),
                float(data["threshold"]),
                float(data["keep"]),
            )


def fit_gate(train_embeddings: np.ndarray, val_embeddings: np.ndarray, keep: float = DEFAULT_KEEP) -> OodGate:
    """Fit mean and shrunk covariance on training features; set the threshold on validation."""
    from sklearn.covariance import LedoitWolf

    estimator = LedoitWolf().fit(np.asarray(train_embeddings, dtype=np.float64))
    gate = OodGate(estimator.location_, estimator.precision_, threshold=np.inf, keep=keep)
    val_scores = gate.score(val_embeddings)
    gate.threshold = float(np.quantile(val_scores, keep, method="higher"))
    return gate
