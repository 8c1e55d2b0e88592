"""The out-of-distribution gate: does an image look like what the model was validated on?

A classifier answers confidently on anything, a holiday photo or a CT slice
included. The gate measures how far an image's pooled features (the
``embedding`` output of the ONNX graph, what the classifier head sees) lie from
those of the training X-rays: the squared Mahalanobis distance under a
Ledoit-Wolf covariance fitted on the training split. Its threshold keeps a set
share (99 %) of the *validation* images, so it flags what is unlike a frontal
pediatric chest X-ray without rejecting ordinary ones.

Applying it needs NumPy (and threadpoolctl) only; fitting needs scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

GATE_FILE = "ood_gate.npz"
DEFAULT_KEEP = 0.99
WARNING = (
    "Not validated for this image: it does not look like the frontal chest X-rays this model was validated on; "
    "the probability is shown for reference only."
)


def gate_file(population: str | None = None) -> str:
    """``ood_gate.npz`` for a model of one population, ``ood_gate.<population>.npz`` for each of several."""
    return GATE_FILE if population is None else f"ood_gate.{population}.npz"


@cache
def _blas_controller():  # building one inspects every loaded library: do it once
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


#: Block rows the precision matrix is kept in (:func:`upper_block_rows`): 8 read 56 % of the full matrix.
GATE_BLOCKS = 8


def upper_block_rows(precision: np.ndarray, blocks: int = GATE_BLOCKS) -> tuple[tuple[int, int, np.ndarray], ...]:
    """The symmetric precision matrix as its block rows from the diagonal on, ``(start, stop, [P_II, 2 P_IJ for J > I])``,
    float32.

    A 1280-feature gate's product reads its 6.5 MB matrix from memory for every image (twice with the direction gate),
    since the model's weights push it out of the cache in between: about a millisecond an image, the largest cost
    after the model's own (``benchmarks/bench_inference.py --stages``). By symmetry ``cᵀPc = Σ_I c_Iᵀ (P_II c_I +
    2 Σ_{J>I} P_IJ c_J)``, so the blocks below the diagonal need not be read: 8 block rows are 56 % of the bytes. The
    browser's gate reads the upper triangle the same way (``static/device.js``).
    """
    precision = np.asarray(precision, dtype=np.float32)
    edges = np.linspace(0, len(precision), blocks + 1).astype(int)
    rows = []
    for start, stop in zip(edges[:-1], edges[1:]):
        row = np.array(precision[start:stop, start:], dtype=np.float32)
        row[:, stop - start :] *= 2
        rows.append((int(start), int(stop), row))
    return tuple(rows)


def mahalanobis(embeddings: np.ndarray, mean: np.ndarray, block_rows: tuple[tuple[int, int, np.ndarray], ...]) -> np.ndarray:
    """Squared Mahalanobis distance of each row (float32 products, BLAS on one thread; see :meth:`OodGate.score`), from
    the precision's :func:`upper_block_rows`."""
    centered = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1) - mean
    total = np.zeros(len(centered), dtype=np.float64)
    with _blas_controller().limit(limits=1, user_api="blas"):
        for start, stop, row in block_rows:
            total += np.sum((centered[:, start:stop] @ row) * centered[:, start:], axis=1, dtype=np.float64)
    return total


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class OodGate:
    """One Mahalanobis gate, or two (with ``l2_*``): on the features and on their direction alone.

    The second looks at the features scaled to unit length, so it judges *what*
    the image shows regardless of how strongly. After histogram equalisation some
    photos land near the X-rays in the first sense but not in the second, and the
    other way round (measured on the non-X-ray probes, docs/ablations.md). With
    both, the score is the larger of the two distances, each divided by its own
    threshold, so 1.0 is the border.
    """

    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C) inverse covariance
    threshold: float  # largest in-distribution distance (of the first gate)
    keep: float  # share of validation images each threshold keeps
    l2_mean: np.ndarray | None = None
    l2_precision: np.ndarray | None = None
    l2_threshold: float | None = None
    _stats: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # float32 and the upper block rows (upper_block_rows) cut the memory read per image; fitting and applying use the
        # same arithmetic
        self._stats = (np.asarray(self.mean, np.float32), upper_block_rows(self.precision))
        self._l2_stats = None if self.l2_mean is None else (np.asarray(self.l2_mean, np.float32), upper_block_rows(self.l2_precision))

    @property
    def two_stage(self) -> bool:
        return self.l2_mean is not None

    @property
    def cutoff(self) -> float:
        """The score above which an image is flagged."""
        return 1.0 if self.two_stage else float(self.threshold)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row from the training mean.

        BLAS runs on one thread here: its worker threads would otherwise keep
        spinning after this small product and slow ONNX Runtime's next forward
        pass by half (measured: 8 ms → 26 ms at two threads).
        """
        return mahalanobis(embeddings, *self._stats)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """The out-of-distribution score: the distance, or for two gates the larger of the two distance/threshold ratios."""
        raw = self.distances(embeddings)
        if self._l2_stats is None:
            return raw
        direction = mahalanobis(unit_rows(embeddings), *self._l2_stats)
        return np.maximum(raw / self.threshold, direction / float(self.l2_threshold))

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.cutoff

    def save(self, model_dir: Path, population: str | None = None) -> Path:
        path = Path(model_dir) / gate_file(population)
        arrays = dict(mean=self.mean.astype(np.float32), precision=self.precision.astype(np.float32),
                      threshold=np.float64(self.threshold), keep=np.float64(self.keep))  # fmt: skip
        if self.two_stage:
            arrays.update(l2_mean=np.asarray(self.l2_mean, np.float32), l2_precision=np.asarray(self.l2_precision, np.float32),
                          l2_threshold=np.float64(self.l2_threshold))  # fmt: skip
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, model_dir: Path, population: str | None = None) -> OodGate | None:
        path = Path(model_dir) / gate_file(population)
        if not path.is_file():
            return None
        with np.load(path) as data:
            two = "l2_mean" in data.files
            return cls(
                data["mean"].astype(np.float64),
                data["precision"].astype(np.float64),
                float(data["threshold"]),
                float(data["keep"]),
                data["l2_mean"].astype(np.float64) if two else None,
                data["l2_precision"].astype(np.float64) if two else None,
                float(data["l2_threshold"]) if two else None,
            )


def fit_gate(train_embeddings: np.ndarray, val_embeddings: np.ndarray, keep: float = DEFAULT_KEEP, two_stage: bool = False) -> OodGate:
    """Fit mean and shrunk covariance on training features; set each threshold at the ``keep`` quantile of validation."""
    from sklearn.covariance import LedoitWolf

    estimator = LedoitWolf().fit(np.asarray(train_embeddings, dtype=np.float64))
    gate = OodGate(estimator.location_, estimator.precision_, threshold=np.inf, keep=keep)
    gate.threshold = float(np.quantile(gate.distances(val_embeddings), keep, method="higher"))
    if not two_stage:
        return gate
    # fitted in float32, the arithmetic the gate is applied in (the embeddings come from ONNX Runtime as float32)
    direction = LedoitWolf().fit(unit_rows(train_embeddings).astype(np.float32))
    l2_distances = mahalanobis(unit_rows(val_embeddings), np.asarray(direction.location_, np.float32),
                               upper_block_rows(direction.precision_))  # fmt: skip
    return OodGate(gate.mean, gate.precision, gate.threshold, keep, direction.location_, direction.precision_,
                   float(np.quantile(l2_distances, keep, method="higher")))  # fmt: skip
