"""Drift: do the studies scored lately still look like those the operating point was set on?

A threshold keeps its stated sensitivity only on studies like the ones it was
fitted on. The card stores, per population, the distributions of the calibrated
probability and of the out-of-distribution score on those studies (the validation
parts at export, the site set after ``pneumoscan calibrate``) and the population
mix. Recent predictions are compared with them by the population stability index
(PSI) on bins at the reference's quintiles: PSI = Σ (a − e)·ln(a / e) over the bins,
a and e the recent and the reference shares. 0.1 is usually read as a moderate and
0.25 as a significant shift. Five bins, not the customary ten: with no shift, PSI
is about (bins − 1)·(1/n + 1/N) from sampling alone (n recent, N reference), so on
windows of a few hundred predictions ten bins raised false alarms in replays of the
validation images (14 % against 1.5 %, ``benchmarks/drift_results.md``). Only numbers the audit log keeps anyway (probability,
out-of-distribution score, population) enter it; nothing of an image.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

PSI_BINS = 5
#: PSI at which the warning is raised: the usual "significant shift" (docs/site-calibration.md).
DRIFT_THRESHOLD = 0.25
#: Predictions of a population needed before its indicators are judged: fewer give a PSI that is mostly noise.
MIN_PREDICTIONS = 100
DEFAULT_WINDOW = 500
INDICATORS = ("probability", "ood_score")
INDICATOR_WORDS = {"probability": "the calibrated probability", "ood_score": "the out-of-distribution score", "mix": "the mix of children and adults"}
POPULATION_WORDS = {"child": "children", "adult": "adults"}
METHOD = (
    f"population stability index, Σ (a − e)·ln(a / e) over {PSI_BINS} bins at the reference's quantiles (a: recent share, "
    "e: reference share; half a count added to every recent bin); per population for the calibrated probability and "
    f"the out-of-distribution score, and for the population mix; warning at PSI ≥ {DRIFT_THRESHOLD} once a population "
    f"has {MIN_PREDICTIONS} predictions in the window"
)


@dataclass(frozen=True)
class Observation:
    """What drift reads of one prediction: all of it is in the audit log already."""

    population: str | None
    probability: float
    ood_score: float | None = None


def quantile_edges(values: np.ndarray, bins: int = PSI_BINS) -> list[float]:
    """Inner bin edges at the quantiles of ``values`` (ties merged): each bin holds about 1/bins of the reference."""
    edges = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return [float(e) for e in np.unique(edges)]


def bin_counts(values: Iterable[float], edges: Sequence[float]) -> np.ndarray:
    """Counts in the bins (-inf, e1], (e1, e2], …, (ek, inf)."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(list(values), dtype=np.float64), side="left")
    return np.bincount(index, minlength=len(edges) + 1)


def distribution(values: np.ndarray, bins: int = PSI_BINS) -> dict[str, object]:
    """A reference distribution as the card stores it: bin edges, the share in each bin, how many values."""
    values = np.asarray(values, dtype=np.float64)
    edges = quantile_edges(values, bins)
    counts = bin_counts(values, edges)
    return {"n": int(values.size), "edges": edges, "shares": [float(c) for c in counts / max(1, values.size)]}


def psi(counts: np.ndarray, reference_shares: Sequence[float]) -> float:
    """PSI of recent ``counts`` against reference shares; empty bins are smoothed rather than infinite."""
    counts = np.asarray(counts, dtype=np.float64)
    recent = (counts + 0.5) / (counts.sum() + 0.5 * counts.size)
    expected = np.maximum(np.asarray(reference_shares, dtype=np.float64), 1e-4)
    expected = expected / expected.sum()
    return float(np.sum((recent - expected) * np.log(recent / expected)))


def build_reference(observations: Sequence[Observation], source: str) -> dict[str, object]:
    """The card's ``drift_reference``: per population the two distributions, and the population mix."""
    populations = sorted({o.population for o in observations if o.population})
    reference: dict[str, object] = {"source": source, "method": METHOD, "n": len(observations), "populations": {}}
    for population in populations:
        mine = [o for o in observations if o.population == population]
        scores = [o.ood_score for o in mine if o.ood_score is not None]
        reference["populations"][population] = {  # type: ignore[index]
            "n": len(mine),
            "probability": distribution(np.asarray([o.probability for o in mine])),
            "ood_score": distribution(np.asarray(scores)) if scores else None,
        }
    reference["mix"] = {p: sum(o.population == p for o in observations) / max(1, len(observations)) for p in populations}
    return reference


def drift_figures(
    observations: Sequence[Observation],
    reference: dict | None,
    threshold: float = DRIFT_THRESHOLD,
    min_predictions: int = MIN_PREDICTIONS,
) -> dict[str, object]:
    """Each indicator's PSI over ``observations``, whether it passes ``threshold``, and the warning in plain words."""
    figures: dict[str, object] = {"n": len(observations), "threshold": threshold, "min_predictions": min_predictions,
                                  "method": METHOD, "indicators": [], "warning": False, "message": None}  # fmt: skip
    if not reference:
        figures.update(available=False, reference=None,
                       reason="the model card holds no reference distributions: export the model again or calibrate it")  # fmt: skip
        return figures
    figures.update(available=True, reference=reference.get("source"))
    indicators: list[dict[str, object]] = []
    for population, entry in reference["populations"].items():
        mine = [o for o in observations if o.population == population]
        for name in INDICATORS:
            dist = entry.get(name)
            if not dist:
                continue
            values = [getattr(o, name) for o in mine if getattr(o, name) is not None]
            value = psi(bin_counts(values, dist["edges"]), dist["shares"]) if values else None
            indicators.append(judge(name, population, value, len(values), threshold, min_predictions))
    mix = reference.get("mix") or {}
    if len(mix) > 1:
        names = list(mix)
        counts = np.asarray([sum(o.population == p for o in observations) for p in names])
        indicators.append(judge("mix", None, psi(counts, [mix[p] for p in names]) if len(observations) else None,
                                len(observations), threshold, min_predictions))  # fmt: skip
        figures["mix"] = {"reference": mix, "recent": {p: float(c / max(1, len(observations))) for p, c in zip(names, counts)}}
    figures["indicators"] = indicators
    drifted = [i for i in indicators if i["drifted"]]
    figures["warning"] = bool(drifted)
    figures["message"] = warning_message(drifted, reference.get("source"), figures.get("mix")) if drifted else None
    return figures


def judge(name: str, population: str | None, value: float | None, n: int, threshold: float, min_predictions: int) -> dict[str, object]:
    judged = value is not None and n >= min_predictions
    return {"name": name, "population": population, "n": n, "psi": None if value is None else round(float(value), 4),
            "judged": judged, "drifted": bool(judged and value >= threshold)}  # fmt: skip


def warning_message(drifted: list[dict], source: str | None, mix: dict | None = None) -> str:
    """What the page and the report say: which figure moved, and what to do.

    A shift of the probability or of the gate's score puts the threshold in doubt; a shift of the
    mix alone does not (each population keeps its own threshold), and is said so.
    """
    reference = source or "its reference"
    scores = [i for i in drifted if i["name"] != "mix"]
    parts = [
        f"{INDICATOR_WORDS[i['name']]} of {POPULATION_WORDS.get(i['population'], i['population'])} (PSI {i['psi']:.2f} over {i['n']} studies)"
        for i in scores
    ]
    text = ""
    if scores:
        text = (f"Recent studies do not look like those the operating point was set on ({reference}): " + "; ".join(parts)
                + ". The threshold may no longer give its stated sensitivity. Check it on labelled local studies "
                "(pneumoscan calibrate) before relying on the decisions.")  # fmt: skip
    if any(i["name"] == "mix" for i in drifted):
        shares = ""
        if mix:
            shares = " (" + ", ".join(f"{POPULATION_WORDS.get(p, p)} {mix['recent'][p]:.0%} now, {mix['reference'][p]:.0%} then"
                                      for p in mix["reference"]) + ")"  # fmt: skip
        text += (" " if text else "") + (
            f"Recent studies are another mix of children and adults than {reference}{shares}. Each population keeps "
            "its own threshold, so the mix alone does not change a decision; if this is the site's usual mix, calibrate "
            "on its own studies (pneumoscan calibrate) so that drift is watched against them."
        )
    return text


class DriftMonitor:
    """The last ``window`` predictions of a running service, judged against the card's reference; thread-safe."""

    def __init__(self, reference: dict | None, window: int = DEFAULT_WINDOW, threshold: float = DRIFT_THRESHOLD,
                 min_predictions: int = MIN_PREDICTIONS):  # fmt: skip
        self.reference = reference
        self.window = window
        self.threshold = threshold
        self.min_predictions = min_predictions
        self.recent: deque[Observation] = deque(maxlen=window)
        self.lock = threading.Lock()

    def add(self, observation: Observation) -> None:
        with self.lock:
            self.recent.append(observation)

    def figures(self) -> dict[str, object]:
        with self.lock:
            observations = list(self.recent)
        figures = drift_figures(observations, self.reference, self.threshold, self.min_predictions)
        figures["window"] = self.window
        return figures
