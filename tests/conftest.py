"""Shared fixtures: the real dataset from ../shared (or PNEUMOSCAN_DATA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscan.config import default_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not (root / "train" / "NORMAL").is_dir():
        pytest.fail(f"dataset not found at {root}: set PNEUMOSCAN_DATA or put it at ../shared/data/chest_xray")
    return root
