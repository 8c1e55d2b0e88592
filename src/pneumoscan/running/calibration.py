"""Calibrated probabilities and the operating point, both fitted on validation only.

Temperature scaling divides the logit by one number fitted to minimise the
negative log-likelihood on the patient-level validation split; it changes no
ranking (AUROC stays), only how much a probability can be trusted. The
threshold is then picked on the calibrated validation probabilities by a named
policy, so the figure a clinician reads and the decision agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pneumoscan.errors import ConfigurationError

POLICIES = ("sensitivity", "youden")
DEFAULT_POLICY = "sensitivity"
DEFAULT_TARGET_SENSITIVITY = 0.98
#: How the sensitivity policy reads the pneumonias' (1 − target) quantile. "order-statistic" takes the
#: ⌈target·n⌉-th highest score: with 72 pneumonias, the second least certain film alone sets it.
#: "harrell-davis" weighs every pneumonia's logit by a beta kernel centred there, so the point moves
#: 10–26 % less between resamples of the validation part (docs/ablations.md, rule 6).
ESTIMATORS = ("harrell-davis", "order-statistic")
DEFAULT_ESTIMATOR = "harrell-davis"
ECE_BINS = 15


def sigmoid(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # overflow-free logistic


def logit(probabilities: np.ndarray) -> np.ndarray:
    """The inverse of :func:`sigmoid`, finite for probabilities of exactly 0 or 1 (clipped at 1e-12)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p)


def calibrated_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The probability pneumoscan shows: ``sigmoid(logit / T)``."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


def binary_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``sigmoid(logit / T)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.float64)
    # log(1 + e^z) - y·z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``labels`` (searched in log T)."""
    from scipy.optimize import minimize_scalar  # fitting only: inference needs no SciPy

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ConfigurationError("fitting a temperature needs validation images of both classes")
    result = minimize_scalar(
        lambda log_t: binary_nll(logits, labels, math.exp(log_t)), bounds=(-4.0, 4.0), method="bounded"
    )
    return float(math.exp(result.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of P(pneumonia): the image-weighted gap between mean probability and
    observed pneumonia rate over ``bins`` equal-width probability bins."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap += members.mean() * abs(p[members].mean() - y[members].mean())
    return float(gap)


def reliability_curve(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: mean probability, observed rate and count (for plots)."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    return [
        {"mean_probability": float(p[index == b].mean()), "observed_rate": float(y[index == b].mean()), "count": int((index == b).sum())}
        for b in range(bins)
        if (index == b).any()
    ]


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold on the calibrated probability and how it was chosen."""

    threshold: float
    policy: str
    target: float | None
    name: str
    estimator: str | None = None  # for the sensitivity policy: how the quantile was read (see ESTIMATORS)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def threshold_for_sensitivity(
    probabilities: np.ndarray, labels: np.ndarray, target: float, estimator: str = DEFAULT_ESTIMATOR
) -> float:
    """The threshold at which ``target`` of these pneumonias score at or above it.

    A higher threshold raises specificity, so the point is read at the pneumonias'
    (1 − target) quantile: with "order-statistic", the highest threshold whose
    sensitivity on these images is at least ``target``; with "harrell-davis", the
    smoother estimate of that quantile in logits (see :data:`ESTIMATORS`).
    """
    if not 0.0 < target <= 1.0:
        raise ConfigurationError(f"target sensitivity must lie in (0, 1], not {target}")
    if estimator not in ESTIMATORS:
        raise ConfigurationError(f"unknown threshold estimator {estimator!r}: use one of {ESTIMATORS}")
    positives = np.sort(np.asarray(probabilities, dtype=np.float64)[np.asarray(labels) == 1])[::-1]
    if positives.size == 0:
        raise ConfigurationError("choosing a sensitivity threshold needs pneumonia images")
    if estimator == "order-statistic" or target == 1.0 or positives.size == 1:
        needed = math.ceil(target * positives.size - 1e-9)
        return float(positives[needed - 1])
    return harrell_davis_threshold(positives, target)


def harrell_davis_threshold(positive_probabilities: np.ndarray, target: float) -> float:
    """The Harrell–Davis estimate of the pneumonias' (1 − target) quantile, read in logits
    (where temperature scaling is linear) and returned as a probability."""
    from scipy.stats.mstats import hdquantiles  # fitting only: inference needs no SciPy

    quantile = float(np.asarray(hdquantiles(logit(positive_probabilities), prob=[1.0 - target]))[0])
    return float(sigmoid(np.asarray(quantile)))


def threshold_youden(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises sensitivity + specificity − 1 (Youden's J)."""
    from sklearn.metrics import (
        roc_curve,  # fitting only: inference needs no scikit-learn
    )

    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    finite = np.isfinite(thresholds)
    best = np.argmax((tpr - fpr)[finite])
    return float(thresholds[finite][best])


def choose_operating_point(
    probabilities: np.ndarray,
    labels: np.ndarray,
    policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    estimator: str = DEFAULT_ESTIMATOR,
) -> OperatingPoint:
    """Pick the threshold by ``policy`` on *validation* probabilities."""
    if policy == "sensitivity":
        threshold = threshold_for_sensitivity(probabilities, labels, target, estimator)
        return OperatingPoint(threshold, policy, target, f"{target:.0%} sensitivity on validation", estimator)
    if policy == "youden":
        return OperatingPoint(threshold_youden(probabilities, labels), policy, None, "Youden's J on validation")
    raise ConfigurationError(f"unknown operating-point policy {policy!r}: use one of {POLICIES}")
