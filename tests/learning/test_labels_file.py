"""Datasets from a labels file and from NIH's Data_Entry_2017 CSV: readers, errors that name the row, splits."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.errors import ConfigurationError, LabelsFileError
from pneumoscan.learning.data import (
    dataset_kind,
    dataset_split,
    read_labels_file,
    read_nih_entries,
    records_of,
    view_balancing_weights,
)


def make_images(folder: Path, names: list[str], size: int = 64) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture()
def labelled(tmp_path: Path) -> Path:
    """60 patients, one or two images each, both labels and both views, adults and children."""
    rows = []
    for p in range(60):
        for k in range(1 + p % 2):
            name = f"images/p{p:03d}_{k}.png"
            rows.append([name, "PNEUMONIA" if p % 3 == 0 else "normal", f"P{p:03d}", 30 + p if p % 5 else 7, "F", "AP" if p % 4 else "PA"])
    make_images(tmp_path, [r[0] for r in rows])
    write_csv(tmp_path / "labels.csv", ["path", "label", "patient_id", "age", "sex", "view"], rows)
    return tmp_path


def test_labels_file_reads_every_column(labelled: Path) -> None:
    records = read_labels_file(labelled / "labels.csv")
    assert len(records) == 90 and {r.label for r in records} == {0, 1}
    first = records[0]
    assert first.patient == "P000" and first.view == "PA" and first.age == 7 and first.population == "child"
    assert records[2].population == "adult" and first.relative.endswith("/images/p000_0.png")
    assert dataset_kind(labelled) == "labels" and dataset_kind(labelled / "labels.csv") == "labels"


def test_a_dataset_without_test_part_is_split_by_patient_three_ways(labelled: Path) -> None:
    parts = {s: dataset_split(labelled, s, seed=7) for s in ("train", "val", "test")}
    patients = {s: {r.patient for r in recs} for s, recs in parts.items()}
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"] and not patients["train"] & patients["val"]
    assert sum(len(v) for v in parts.values()) == 90
    assert 10 <= len(patients["test"]) <= 14 and 4 <= len(patients["val"]) <= 8  # 20 % and 10 % of 60 patients
    assert all({r.label for r in recs} == {0, 1} for recs in parts.values())  # stratified
    assert [r.path for r in dataset_split(labelled, "test", seed=7)] == [r.path for r in parts["test"]]  # seeded
    assert {r.patient for r in dataset_split(labelled, "test", seed=8)} != patients["test"]


def test_each_dataset_is_split_on_its_own(labelled: Path, small_data_root: Path) -> None:
    both = records_of([small_data_root, labelled], "test", seed=7)
    assert Counter(r.dataset for r in both) == {small_data_root.name: 24, labelled.name: len(dataset_split(labelled, "test", 7))}
    # adding a dataset changes nothing of the other's split
    assert [r.path for r in records_of([labelled], "val", 7)] == [r.path for r in records_of([small_data_root, labelled], "val", 7) if r.dataset == labelled.name]


def test_a_dataset_can_have_its_own_validation_share_and_keeps_its_test_patients(labelled: Path, small_data_root: Path) -> None:
    sources = [small_data_root, labelled]
    shares = {"default": 0.10, labelled.name: 0.30}
    val = {r.patient for r in records_of(sources, "val", 7, shares) if r.dataset == labelled.name}
    old_val = {r.patient for r in records_of(sources, "val", 7, 0.10) if r.dataset == labelled.name}
    assert 16 <= len(val) <= 20 and old_val < val  # 30 % of 60 patients; the 10 % part is inside the larger one
    assert [r.path for r in records_of(sources, "test", 7, shares)] == [r.path for r in records_of(sources, "test", 7, 0.10)]
    assert [r.path for r in records_of([small_data_root], "val", 7, shares)] == [r.path for r in records_of([small_data_root], "val", 7)]
    with pytest.raises(ConfigurationError, match="no share for dataset"):
        records_of(sources, "val", 7, {labelled.name: 0.30})


@pytest.mark.parametrize(("given", "parsed"), [("0.15", 0.15), ("0.10,rsna_adult=0.20", {"default": 0.10, "rsna_adult": 0.20})])
def test_the_validation_share_flag_takes_one_share_or_one_per_dataset(given: str, parsed: object) -> None:
    from pneumoscan.apps.cli.training import val_fraction_arg

    assert val_fraction_arg(given) == parsed


@pytest.mark.parametrize("setting", ["val_fraction = 1.5", "val_fraction = { rsna_adult = 0.2 }", 'val_fraction = "a lot"'])
def test_a_bad_validation_share_in_a_settings_file_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 setting: str) -> None:
    from pneumoscan.apps.cli import main

    (tmp_path / "run.toml").write_text(f"[data]\n{setting}\n")
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "val_fraction" in capsys.readouterr().err


def test_a_split_column_is_obeyed_and_must_keep_patients_whole(tmp_path: Path) -> None:
    make_images(tmp_path, [f"{i}.png" for i in range(8)])
    rows = [[f"{i}.png", "NORMAL" if i % 2 else "PNEUMONIA", f"P{i}", "test" if i < 2 else "train"] for i in range(8)]
    write_csv(tmp_path / "labels.csv", ["path", "label", "patient_id", "split"], rows)
    assert {r.patient for r in dataset_split(tmp_path, "test")} == {"P0", "P1"}
    assert len(dataset_split(tmp_path, "val")) >= 1  # no val rows: validation comes from train, by patient
    rows[5][2] = "P0"
    write_csv(tmp_path / "bad.csv", ["path", "label", "patient_id", "split"], rows)
    with pytest.raises(LabelsFileError, match="P0"):
        dataset_split(tmp_path / "bad.csv", "test")


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["file", "label"], ["0.png", "NORMAL"], "missing column.*path"),
        (["path", "label"], ["0.png", "COVID"], "line 2: label 'COVID' is neither NORMAL nor PNEUMONIA"),
        (["path", "label"], ["missing.png", "NORMAL"], "line 2: no image at 'missing.png'"),
        (["path", "label"], ["../outside.png", "NORMAL"], "line 2: path '../outside.png' leaves the dataset folder"),
        (["path", "label"], ["/etc/passwd", "NORMAL"], "line 2: path '/etc/passwd' leaves the dataset folder"),
        (["path", "label", "split"], ["0.png", "NORMAL", "holdout"], "line 2: split 'holdout' is not one of train, val, test"),
        (["path", "label", "age"], ["0.png", "NORMAL", "old"], "line 2: age 'old' is not a number of years"),
        (["path", "label"], ["", "NORMAL"], "line 2: the path is empty"),
    ],
)
def test_bad_labels_files_name_the_row(tmp_path: Path, header: list[str], row: list[str], message: str) -> None:
    make_images(tmp_path, ["0.png"])
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    write_csv(tmp_path / "labels.csv", header, [row])
    with pytest.raises(LabelsFileError, match=message):
        read_labels_file(tmp_path / "labels.csv")


def test_the_cli_reports_a_bad_labels_file_as_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pneumoscan.apps.cli import main

    make_images(tmp_path, ["0.png"])
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["0.png", "NORMAL"], ["1.png", "NORMAL"]])
    assert main(["train", "--data", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "run")]) == 2
    assert "labels.csv, line 3: no image at '1.png'" in capsys.readouterr().err


def test_nih_data_entry_reader(tmp_path: Path) -> None:
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
              "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    rows = [
        ["00000001_000.png", "No Finding", 0, 1, 58, "M", "PA", 1024, 1024, 0.14, 0.14],
        ["00000001_001.png", "Infiltration|Pneumonia", 1, 1, 58, "M", "AP", 1024, 1024, 0.14, 0.14],
        ["00000002_000.png", "Cardiomegaly", 0, 2, 81, "F", "PA", 1024, 1024, 0.14, 0.14],  # neither: left out
        ["00000003_000.png", "Pneumonia", 0, 3, 12, "F", "AP", 1024, 1024, 0.14, 0.14],
    ]
    make_images(tmp_path, ["images_001/images/00000001_000.png", "images_001/images/00000001_001.png",
                           "images_002/images/00000002_000.png", "images_002/images/00000003_000.png"])  # fmt: skip
    csv_path = write_csv(tmp_path / "Data_Entry_2017_v2020.csv", header, rows)
    assert dataset_kind(csv_path) == "nih"
    records = read_nih_entries(csv_path)
    assert [(r.path.name, r.label, r.patient, r.view, r.population) for r in records] == [
        ("00000001_000.png", 0, "1", "PA", "adult"),
        ("00000001_001.png", 1, "1", "AP", "adult"),
        ("00000003_000.png", 1, "3", "AP", "child"),
    ]
    (tmp_path / "images_002/images/00000003_000.png").unlink()
    with pytest.raises(LabelsFileError, match="line 5: no image '00000003_000.png'"):
        read_nih_entries(csv_path)


def test_view_balancing_makes_view_independent_of_label(labelled: Path) -> None:
    records = read_labels_file(labelled / "labels.csv")
    weights = np.asarray(view_balancing_weights(records))
    labels = np.asarray([r.label for r in records])
    ap = np.asarray([r.view == "AP" for r in records])
    share = [weights[(labels == y) & ap].sum() / weights[labels == y].sum() for y in (0, 1)]
    assert share[0] == pytest.approx(share[1]) and share[0] == pytest.approx(ap.mean())
    assert [weights[labels == y].sum() for y in (0, 1)] == pytest.approx([(labels == y).sum() for y in (0, 1)])


def test_the_adult_set_matches_its_readme(adult_root: Path) -> None:
    parts = {s: dataset_split(adult_root, s) for s in ("train", "val", "test")}
    everything = [r for recs in parts.values() for r in recs]
    assert Counter(r.class_name for r in everything) == {"NORMAL": 893, "PNEUMONIA": 776}
    assert len({r.patient for r in everything}) == 1404 and {r.population for r in everything} == {"adult"}
    share = len({r.patient for r in parts["test"]}) / 1404
    assert 0.19 <= share <= 0.21
