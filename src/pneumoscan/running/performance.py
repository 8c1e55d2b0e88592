"""Live performance: sensitivity, specificity, PPV and NPV of the answers radiologists have since read.

Each prediction counts once, with the reading in force (its latest); ``cannot_tell`` readings and answers
"not validated for this image" confirm nothing and are counted apart. Figures are grouped by population
and operating point (a site calibration starts a new group), with Wilson 95 % intervals
(``scipy.stats.binomtest``), so that a handful of readings shows as the wide interval it is.

A warning is raised for the operating point in force when what the readings show is incompatible with the
sensitivity it promises: the Wilson interval's upper end below the target, or more missed pneumonias than a
one-sided binomial test at 5 % allows of that many pneumonias.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy.stats import binom, binomtest

CONFIDENCE = 0.95
#: The one-sided level at which missed pneumonias are "more than the target allows".
MISS_TEST_LEVEL = 0.05


@dataclass(frozen=True)
class ReadAnswer:
    """One answered study and the reading in force for it."""

    population: str | None
    operating_point: str
    operating_point_source: str | None
    answered_pneumonia: bool  # what pneumoscan said (its label)
    validated: bool  # False: "not validated for this image", no decision
    finding: str  # pneumonia | no_pneumonia | cannot_tell


def proportion(k: int, n: int) -> dict:
    """k of n with its Wilson interval; value and interval None when n is 0."""
    if n == 0:
        return {"k": 0, "n": 0, "value": None, "low": None, "high": None}
    interval = binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"k": k, "n": n, "value": k / n, "low": float(interval.low), "high": float(interval.high)}


def allowed_misses(pneumonias: int, target: float) -> int:
    """The most missed pneumonias of ``pneumonias`` that a point keeping ``target`` sensitivity makes in 95 % of windows."""
    return int(binom.ppf(1 - MISS_TEST_LEVEL, pneumonias, 1 - target)) if pneumonias else 0


def group_figures(answers: list[ReadAnswer], target: float | None) -> dict:
    decided = [a for a in answers if a.validated and a.finding != "cannot_tell"]
    tp = sum(a.answered_pneumonia and a.finding == "pneumonia" for a in decided)
    fn = sum(not a.answered_pneumonia and a.finding == "pneumonia" for a in decided)
    tn = sum(not a.answered_pneumonia and a.finding == "no_pneumonia" for a in decided)
    fp = sum(a.answered_pneumonia and a.finding == "no_pneumonia" for a in decided)
    sensitivity = proportion(tp, tp + fn)
    figures = {
        "n": len(decided), "counts": {"true_positive": tp, "false_negative": fn, "true_negative": tn, "false_positive": fp},
        "cannot_tell": sum(a.finding == "cannot_tell" for a in answers),
        "not_validated": sum(not a.validated and a.finding != "cannot_tell" for a in answers),
        "sensitivity": sensitivity, "specificity": proportion(tn, tn + fp),
        "ppv": proportion(tp, tp + fp), "npv": proportion(tn, tn + fn),
        "target_sensitivity": target, "allowed_misses": None, "warning": False, "message": None,
    }  # fmt: skip
    if target is not None and tp + fn:
        allowed = allowed_misses(tp + fn, target)
        figures["allowed_misses"] = allowed
        reasons = []
        if sensitivity["high"] < target:
            reasons.append(f"the sensitivity's 95 % interval ({sensitivity['low']:.1%}–{sensitivity['high']:.1%}) lies below "
                           f"the {target:.0%} it promises")  # fmt: skip
        if fn > allowed:
            reasons.append(f"{fn} of {tp + fn} read pneumonias were missed, more than the {allowed} a {target:.0%} point allows")
        if reasons:
            figures["warning"] = True
            figures["message"] = "; ".join(reasons)
    return figures


def live_performance(answers: Iterable[ReadAnswer], in_force: Mapping[str, tuple[str, str, float | None]]) -> dict:
    """Figures per population and operating point. ``in_force``: population → (operating point, source, target) now
    answering; only its group is checked against the target (earlier points' groups are history)."""
    groups: dict[tuple, list[ReadAnswer]] = {}
    for answer in answers:
        groups.setdefault((answer.population, answer.operating_point, answer.operating_point_source), []).append(answer)
    entries = []
    for (population, point, source), members in sorted(groups.items(), key=lambda item: tuple(str(k) for k in item[0])):
        current = in_force.get(population or "")
        is_current = current is not None and (point, source) == current[:2]
        entry = {"population": population, "operating_point": point, "operating_point_source": source, "in_force": is_current,
                 **group_figures(members, current[2] if is_current else None)}  # fmt: skip
        entries.append(entry)
    warnings = [f"{e['population']} ({e['operating_point']}): {e['message']}" for e in entries if e["warning"]]
    return {"groups": entries, "warning": bool(warnings), "message": "; ".join(warnings) or None}
