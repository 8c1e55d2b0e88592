"""Drift: PSI against the card's reference, on known shifted and unshifted inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.running.drift import (
    DRIFT_THRESHOLD,
    PSI_BINS,
    DriftMonitor,
    Observation,
    bin_counts,
    build_reference,
    distribution,
    drift_figures,
    psi,
)


def observations(rng: np.random.Generator, n: int, shift: float = 0.0, adults: float = 0.25) -> list[Observation]:
    populations = np.where(rng.random(n) < adults, "adult", "child")
    probabilities = 1 / (1 + np.exp(-(rng.normal(0, 2, n) + shift)))
    scores = rng.gamma(4, 0.1, n)
    return [Observation(str(p), float(q), float(s)) for p, q, s in zip(populations, probabilities, scores)]


@pytest.fixture(scope="module")
def reference() -> dict:
    return build_reference(observations(np.random.default_rng(0), 4000), "validation parts")


def test_quantiles_give_even_bins_and_psi_is_zero_on_the_reference_itself() -> None:
    values = np.random.default_rng(3).normal(size=10_000)
    dist = distribution(values)
    assert len(dist["edges"]) == PSI_BINS - 1 and np.allclose(dist["shares"], 1 / PSI_BINS, atol=0.001)
    assert psi(bin_counts(values, dist["edges"]), dist["shares"]) < 0.001
    assert psi(bin_counts(values + 1.0, dist["edges"]), dist["shares"]) > 0.5


def test_a_shifted_probability_raises_the_warning_in_plain_words(reference: dict) -> None:
    figures = drift_figures(observations(np.random.default_rng(1), 500, shift=2.0), reference)
    drifted = {(i["name"], i["population"]) for i in figures["indicators"] if i["drifted"]}
    assert ("probability", "child") in drifted and ("ood_score", "child") not in drifted
    assert figures["warning"] and "the calibrated probability of children" in figures["message"]
    assert "pneumoscan calibrate" in figures["message"]


def test_a_shifted_gate_score_and_population_mix_are_seen(reference: dict) -> None:
    rng = np.random.default_rng(2)
    far = [Observation(o.population, o.probability, o.ood_score * 3) for o in observations(rng, 500)]
    assert {(i["name"], i["population"]) for i in drift_figures(far, reference)["indicators"] if i["drifted"]} >= {("ood_score", "child")}
    only_children = observations(rng, 500, adults=0.0)
    mix = drift_figures(only_children, reference)
    assert next(i for i in mix["indicators"] if i["name"] == "mix")["drifted"] and mix["mix"]["recent"]["child"] == 1.0


def test_unshifted_windows_rarely_warn(reference: dict) -> None:
    """The false alarm rate over 300 windows of 500 predictions drawn like the reference: at most 1 %."""
    rng = np.random.default_rng(4)
    alarms = sum(drift_figures(observations(rng, 500), reference)["warning"] for _ in range(300))
    assert alarms <= 3


def test_too_few_predictions_are_not_judged(reference: dict) -> None:
    figures = drift_figures(observations(np.random.default_rng(5), 60, shift=3.0), reference)
    assert not figures["warning"] and not any(i["judged"] for i in figures["indicators"])
    assert all(i["psi"] is not None for i in figures["indicators"] if i["n"])


def test_the_monitor_keeps_only_its_window_and_says_when_it_has_no_reference(reference: dict) -> None:
    monitor = DriftMonitor(reference, window=200, min_predictions=100)
    for o in observations(np.random.default_rng(6), 1000, shift=3.0):
        monitor.add(o)
    for o in observations(np.random.default_rng(7), 200):  # the shift has left the window
        monitor.add(o)
    figures = monitor.figures()
    assert figures["n"] == 200 and figures["window"] == 200 and not figures["warning"]
    assert DriftMonitor(None).figures()["available"] is False


def test_the_shipped_card_holds_a_validation_reference(shipped_model: Path) -> None:
    reference = json.loads((shipped_model / "model_card.json").read_text())["drift_reference"]
    assert reference["source"].startswith("validation parts")
    for population in ("child", "adult"):
        entry = reference["populations"][population]
        for name in ("probability", "ood_score"):
            assert len(entry[name]["edges"]) == PSI_BINS - 1 and sum(entry[name]["shares"]) == pytest.approx(1.0)
    assert sum(reference["mix"].values()) == pytest.approx(1.0) and DRIFT_THRESHOLD == 0.25


def test_a_mix_shift_alone_is_said_as_such(reference: dict) -> None:
    figures = drift_figures(observations(np.random.default_rng(8), 500, adults=0.0), reference)
    assert [i["name"] for i in figures["indicators"] if i["drifted"]] == ["mix"]
    assert "another mix of children and adults" in figures["message"] and "children 100% now" in figures["message"]
    assert "may no longer give its stated sensitivity" not in figures["message"]
