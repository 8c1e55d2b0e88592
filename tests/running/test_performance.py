"""Live performance from readings: counts, Wilson intervals and the warning, against independent computations."""

from __future__ import annotations

import math

import pytest

from pneumoscan.running.performance import ReadAnswer, allowed_misses, live_performance, proportion


def wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 5), (3, 10), (97, 100), (50, 50)])
def test_the_interval_is_wilsons(k: int, n: int) -> None:
    figures = proportion(k, n)
    assert (figures["low"], figures["high"]) == pytest.approx(wilson_by_hand(k, n), abs=1e-9)
    assert figures["value"] == k / n
    assert proportion(0, 0)["value"] is None


def answers(population: str, tp: int, fn: int, tn: int, fp: int, point: str = "98% sensitivity on validation",
            source: str = "validation") -> list[ReadAnswer]:  # fmt: skip
    made = []
    for count, said, found in ((tp, True, "pneumonia"), (fn, False, "pneumonia"), (tn, False, "no_pneumonia"), (fp, True, "no_pneumonia")):
        made += [ReadAnswer(population, point, source, said, True, found) for _ in range(count)]
    return made


IN_FORCE = {"child": ("98% sensitivity on validation", "validation", 0.98), "adult": ("98% sensitivity on validation", "validation", 0.98)}


def test_counts_and_figures_per_population_and_point() -> None:
    read = answers("child", 45, 1, 30, 10) + answers("adult", 20, 0, 5, 5)
    read += [ReadAnswer("child", "98% sensitivity on validation", "validation", True, True, "cannot_tell"),
             ReadAnswer("child", "98% sensitivity on validation", "validation", True, False, "no_pneumonia")]
    read += answers("child", 5, 0, 5, 0, source="site calibration of 2026-11-01")
    groups = {(g["population"], g["operating_point_source"]): g for g in live_performance(read, IN_FORCE)["groups"]}
    child = groups[("child", "validation")]
    assert child["counts"] == {"true_positive": 45, "false_negative": 1, "true_negative": 30, "false_positive": 10}
    assert child["n"] == 86 and child["cannot_tell"] == 1 and child["not_validated"] == 1
    assert child["sensitivity"]["value"] == 45 / 46 and child["specificity"]["value"] == 30 / 40
    assert child["ppv"]["value"] == 45 / 55 and child["npv"]["value"] == 30 / 31
    assert child["in_force"] and not child["warning"]
    old = groups[("child", "site calibration of 2026-11-01")]
    assert not old["in_force"] and old["target_sensitivity"] is None and old["n"] == 10


def test_a_point_that_misses_too_many_pneumonias_warns() -> None:
    assert allowed_misses(100, 0.98) == 5  # P(X <= 5 | 100, 0.02) = 0.985 >= 0.95 > P(X <= 4) = 0.949
    fine = live_performance(answers("adult", 96, 4, 50, 50), IN_FORCE)
    assert not fine["warning"]
    short = live_performance(answers("adult", 94, 6, 50, 50), IN_FORCE)
    assert short["warning"] and "6 of 100 read pneumonias were missed, more than the 5" in short["message"]
    low = live_performance(answers("adult", 80, 20, 50, 50), IN_FORCE)["groups"][0]
    assert low["sensitivity"]["high"] < 0.98 and "lies below the 98%" in low["message"]
    history = live_performance(answers("adult", 80, 20, 50, 50, source="site calibration of 2026-01-01"), IN_FORCE)
    assert not history["warning"]  # an earlier point's group is history, not a warning
