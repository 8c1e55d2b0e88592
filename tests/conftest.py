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
    from pneumoscan.learning.data import list_records

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
    from pneumoscan.learning.training import fit

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


ADULT_DATA_RELATIVE = Path("..") / "shared" / "data" / "rsna_adult"


@pytest.fixture(scope="session")
def adult_root() -> Path:
    """The adult set (RSNA labels on NIH films) beside the child set, or ADULT_DATA_ROOT."""
    import os

    from pneumoscan.config import PROJECT_ROOT

    root = Path(os.environ.get("PNEUMOSCAN_ADULT_DATA", PROJECT_ROOT / ADULT_DATA_RELATIVE)).resolve()
    if not (root / "labels.csv").is_file():
        pytest.fail(f"adult dataset not found at {root}: set PNEUMOSCAN_ADULT_DATA or put it at ../shared/data/rsna_adult")
    return root


@pytest.fixture(scope="session")
def small_adult_root(adult_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labels-file dataset of real adult films (links): 24 of each label × view cell, one image per patient."""
    import csv

    root = tmp_path_factory.mktemp("small_adult")
    (root / "images").mkdir()
    taken: dict[tuple[str, str], int] = {}
    patients: set[str] = set()
    with open(adult_root / "labels.csv", newline="") as handle, open(root / "labels.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "patient_id", "age", "sex", "view"])
        for row in csv.DictReader(handle):
            cell = (row["label"], row["view"])
            if taken.get(cell, 0) >= 24 or row["patient_id"] in patients:
                continue
            taken[cell] = taken.get(cell, 0) + 1
            patients.add(row["patient_id"])
            name = Path(row["path"]).name
            (root / "images" / name).symlink_to(adult_root / row["path"])
            writer.writerow([f"images/{name}", row["label"], row["patient_id"], row["age"], row["sex"], row["view"]])
    return root


@pytest.fixture(scope="session")
def two_population_checkpoint(small_data_root: Path, small_adult_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Lite0 checkpoint from a few steps on children and adults (equalised, view-balanced)."""
    from pneumoscan.config import DataConfig, TrainConfig
    from pneumoscan.learning.training import fit

    out = tmp_path_factory.mktemp("two_population_run")
    data = DataConfig(root=(small_data_root, small_adult_root), batch_size=8, num_workers=0, intensity="equalize", balance_views=True)
    return fit(data, TrainConfig(epochs=1, limit_train_batches=3, out=out), command="pneumoscan train (two-population test fixture)")


@pytest.fixture(scope="session")
def two_population_model(two_population_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That checkpoint exported: per-population temperature, threshold and gate, and the population classifier."""
    from pneumoscan.learning.export import export

    out = tmp_path_factory.mktemp("two_population_model") / "model"
    export(two_population_checkpoint, out, name="two-population-smoke")
    return out



def population_entries(card: dict) -> dict[str, dict]:
    """A card's fitted settings and figures per population (see :func:`pneumoscan.running.inference.card_populations`)."""
    from pneumoscan.running.inference import card_populations

    return card_populations(card)


def site_folder(data_root: Path, folder: Path, normal: int, pneumonia: int, start: int = 0) -> Path:
    """A site's NORMAL/PNEUMONIA folder of links to real Kermany train/ images (whole patients, evenly spread)."""
    from pneumoscan.learning.data import list_records

    records = list_records(data_root, "train")
    for class_name, n in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        of_class = [r for r in records if r.class_name == class_name]
        step = max(1, len(of_class) // max(1, n))
        for record in of_class[start::step][:n]:
            (folder / class_name / record.path.name).symlink_to(record.path)
    return folder


@pytest.fixture(scope="session")
def site_model(shipped_model: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model calibrated on a made-up site set of 60 normal and 60 pneumonia children (train/ images)."""
    from pneumoscan.learning.site_calibration import calibrate

    site = site_folder(data_root, tmp_path_factory.mktemp("site_set"), 60, 60)
    out = tmp_path_factory.mktemp("models") / "pneumoscan-v2-site"
    calibrate(shipped_model, [site], out, population="child", today="2026-11-20", resamples=200, progress=False,
              command="pneumoscan calibrate (test fixture)")  # fmt: skip
    return out


def card_sources(card: dict, data_root: Path, adult_root: Path) -> list[Path]:
    """A card's datasets where this machine has them (PNEUMOSCAN_DATA / PNEUMOSCAN_ADULT_DATA, else ../shared)."""
    where = {"chest_xray": data_root, "rsna_adult": adult_root}
    return [where[d["name"]] for d in card.get("data", {}).get("datasets", [])] or [data_root]
