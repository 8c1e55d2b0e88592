from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


@pytest.mark.parametrize("dim, blocks", [(37, 8), (64, 1), (1280, 8)])
def test_the_upper_block_rows_give_the_full_products_distance_reading_about_half_the_matrix(dim: int, blocks: int) -> None:
    from pneumoscan.running.ood import mahalanobis, upper_block_rows

    rng = np.random.default_rng(dim)
    factor = rng.normal(size=(dim, dim))
    precision = factor @ factor.T / dim + np.eye(dim)  # symmetric positive definite, like a Ledoit-Wolf precision
    mean = rng.normal(size=dim).astype(np.float32)
    x = rng.normal(size=(5, dim)).astype(np.float32)
    centered = x.astype(np.float64) - mean
    full = np.einsum("ij,jk,ik->i", centered, precision, centered)
    rows = upper_block_rows(precision, blocks)
    assert np.allclose(mahalanobis(x, mean, rows), full, rtol=1e-5)
    read = sum(row.size for _, _, row in rows) / precision.size
    assert read == 1.0 if blocks == 1 else read < 0.6
