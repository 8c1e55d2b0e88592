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


@pytest.fixture(scope="session")
def small_data_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dataset of links to real images: whole patients, both classes, both splits."""
    from pneumoscan.data import list_records

    root = tmp_path_factory.mktemp("small_data")
    per_class = {"train": 48, "test": 12}
    for split, n in per_class.items():
        for record_class in ("NORMAL", "PNEUMONIA"):
            (root / split / record_class).mkdir(parents=True)
        chosen: dict[str, int] = {}
        for record in list_records(data_root, split):
            if chosen.get(record.class_name, 0) < n:
                chosen[record.class_name] = chosen.get(record.class_name, 0) + 1
                (root / split / record.class_name / record.path.name).symlink_to(record.path)
    return root


@pytest.fixture(scope="session")
def smoke_checkpoint(small_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real EfficientNet-Lite0 checkpoint from a few training steps."""
    from pneumoscan.config import DataConfig, TrainConfig
    from pneumoscan.training import fit

    out = tmp_path_factory.mktemp("smoke_run")
    data = DataConfig(root=small_data_root, batch_size=8, num_workers=0)
    return fit(data, TrainConfig(epochs=1, limit_train_batches=3, out=out), command="pneumoscan train (test fixture)")


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The model pneumoscan ships in models/ (committed, with its card)."""
    from pneumoscan.config import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model_card.json").is_file():
        pytest.fail(f"the shipped model is missing at {DEFAULT_MODEL_DIR}")
    return DEFAULT_MODEL_DIR
