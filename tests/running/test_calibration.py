from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.errors import ConfigurationError
from pneumoscan.running.calibration import (
    binary_nll,
    calibrated_probability,
    choose_operating_point,
    expected_calibration_error,
    fit_temperature,
    threshold_for_sensitivity,
    threshold_youden,
)


def test_sensitivity_policy_picks_the_highest_threshold_that_meets_the_target() -> None:
    # ten positives with scores 0.1 .. 1.0; negatives below and among them
    positives = np.linspace(0.1, 1.0, 10)
    negatives = np.array([0.05, 0.15, 0.35, 0.95])
    scores = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(10), np.zeros(4)])
    assert threshold_for_sensitivity(scores, labels, 0.8, "order-statistic") == pytest.approx(0.3)  # keeps 8 of 10
    assert threshold_for_sensitivity(scores, labels, 0.81, "order-statistic") == pytest.approx(0.2)  # 9 of 10 needed
    assert threshold_for_sensitivity(scores, labels, 1.0, "order-statistic") == pytest.approx(0.1)
    for target in (0.5, 0.8, 0.9, 0.98):
        t = threshold_for_sensitivity(scores, labels, target, "order-statistic")
        assert np.mean(positives >= t) >= target
        assert np.mean(positives >= t + 1e-9) < target  # any higher threshold misses the target


def test_the_harrell_davis_point_moves_less_between_samples_than_the_order_statistic() -> None:
    # 72 pneumonias, as in the adult validation part; their logits normal, so the true 2 % quantile is known
    rng = np.random.default_rng(0)
    true_quantile = 1.0 + 1.5 * -2.053749  # N(1, 1.5) at 0.02
    points = {"order-statistic": [], "harrell-davis": []}
    for _ in range(300):
        logits = rng.normal(1.0, 1.5, 72)
        probabilities = 1 / (1 + np.exp(-logits))
        for estimator, found in points.items():
            p = threshold_for_sensitivity(probabilities, np.ones(72), 0.98, estimator)
            found.append(np.log(p / (1 - p)))
    smooth, order = np.asarray(points["harrell-davis"]), np.asarray(points["order-statistic"])
    assert np.std(smooth) < np.std(order)
    # and it sits nearer the true quantile: the second least certain of 72 lies above it, so delivers < 98 %
    assert abs(smooth.mean() - true_quantile) < abs(order.mean() - true_quantile)
    assert np.sqrt(np.mean((smooth - true_quantile) ** 2)) < np.sqrt(np.mean((order - true_quantile) ** 2))


def test_the_harrell_davis_point_lies_among_the_least_certain_pneumonias() -> None:
    positives = np.linspace(0.05, 0.95, 100)
    scores = np.concatenate([positives, [0.01, 0.5, 0.99]])
    labels = np.concatenate([np.ones(100), np.zeros(3)])
    t = threshold_for_sensitivity(scores, labels, 0.98)
    assert positives[0] < t < positives[5]  # near the 2nd-3rd least certain, not set by any one of them
    assert threshold_for_sensitivity(scores, labels, 1.0) == pytest.approx(positives[0])  # all must be found
    assert threshold_for_sensitivity(scores, labels, 0.5) > threshold_for_sensitivity(scores, labels, 0.98)
    point = choose_operating_point(scores, labels)
    assert point.estimator == "harrell-davis" and point.to_dict()["estimator"] == "harrell-davis"
    with pytest.raises(ConfigurationError, match="estimator"):
        threshold_for_sensitivity(scores, labels, 0.98, "median")


def test_youden_policy_maximises_sensitivity_plus_specificity() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = threshold_youden(scores, labels)
    assert t == pytest.approx(0.7)  # sens 0.75, spec 1.0 -> J = 0.75, the best available
    point = choose_operating_point(scores, labels, policy="youden")
    assert point.policy == "youden" and point.threshold == pytest.approx(0.7)


def test_operating_point_is_named_and_unknown_policies_are_refused() -> None:
    scores, labels = np.array([0.2, 0.8]), np.array([0, 1])
    point = choose_operating_point(scores, labels, "sensitivity", 0.98)
    assert point.name == "98% sensitivity on validation" and point.target == 0.98
    with pytest.raises(ConfigurationError):
        choose_operating_point(scores, labels, "accuracy")


def test_temperature_scaling_lowers_the_nll_of_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    true_logits = (labels * 2 - 1) * 1.0 + rng.normal(0, 1.5, 2000)
    overconfident = true_logits * 4.0
    t = fit_temperature(overconfident, labels)
    assert binary_nll(overconfident, labels, t) < binary_nll(overconfident, labels) - 0.1
    assert 2.5 < t < 6.0
    # ranking is untouched
    assert np.array_equal(np.argsort(calibrated_probability(overconfident, t)), np.argsort(overconfident))


def test_expected_calibration_error_on_known_cases() -> None:
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == pytest.approx(0.0)
    # all at 0.9 but only half positive: gap 0.4
    assert expected_calibration_error(np.full(10, 0.9), np.array([1, 0] * 5)) == pytest.approx(0.4)
    # two bins, 0.2 (rate 0) and 0.8 (rate 1): gap 0.2 each
    assert expected_calibration_error(np.array([0.2, 0.2, 0.8, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.2)
