from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan.running.ood import OodGate, fit_gate


def test_gate_keeps_its_share_of_validation_and_rejects_far_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.5, 3.0, 16))
    train = rng.multivariate_normal(np.zeros(16), cov, 2000)
    val = rng.multivariate_normal(np.zeros(16), cov, 500)
    gate = fit_gate(train, val, keep=0.99)
    assert np.mean(gate.in_distribution(gate.score(val))) >= 0.99
    fresh = rng.multivariate_normal(np.zeros(16), cov, 1000)
    assert np.mean(gate.in_distribution(gate.score(fresh))) > 0.95
    far = rng.multivariate_normal(np.full(16, 4.0), cov, 100)
    assert not gate.in_distribution(gate.score(far)).any()
    # a shift along a low-variance direction is caught although it is small in Euclidean terms
    narrow = np.zeros((1, 16))
    narrow[0, 0] = 6.0  # 8.5 standard deviations along the narrowest axis, 6 units from the mean
    assert not gate.in_distribution(gate.score(narrow))[0]

    gate.save(tmp_path)
    again = OodGate.load(tmp_path)
    assert again is not None and again.threshold == gate.threshold
    np.testing.assert_allclose(again.score(far), gate.score(far), rtol=1e-4)
    assert OodGate.load(tmp_path / "nowhere") is None
