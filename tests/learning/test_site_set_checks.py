"""What ``calibrate`` and ``site-protocol`` refuse in a site set (issue 27): repeats, two labels, odd labels, huge files,
and an ``--out`` that already holds a model.

Before issue 27 one normal and one pneumonia film listed 60 times each passed the 50-per-class minimum
and set a threshold ("n=120, patients=120, sensitivity 1.000, specificity 1.000"); a file labelled
both ways passed with a warning; a 300,000-row CSV of one file ran on at 861 MB; a dotless ı or a
trailing no-break space in a label was accepted; and ``--out`` overwrote another model's folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pneumoscan.apps import cli
from pneumoscan.errors import ConfigurationError, LabelsFileError, TooFewSiteCases
from pneumoscan.learning.data import list_records, read_labels_file
from pneumoscan.learning.site_calibration import calibrate, each_study_once


@pytest.fixture(scope="module")
def two_films(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    records = list_records(data_root, "train")
    for record in (next(r for r in records if r.label == 0), next(r for r in records if r.label == 1)):
        shutil.copy(record.path, folder / f"{record.class_name.lower()}.jpeg")
    return folder


def write_labels(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "labels.csv"
    path.write_text("path,label\n" + "".join(f"{name},{label}\n" for name, label in rows), encoding="utf-8")
    return path


def test_one_normal_and_one_pneumonia_listed_60_times_are_two_studies_not_120(two_films: Path, shipped_model: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    labels = write_labels(two_films, [("normal.jpeg", "NORMAL"), ("pneumonia.jpeg", "PNEUMONIA")] * 60)
    with pytest.raises(TooFewSiteCases, match="1 normal of the 50 needed|1 pneumonia of the 50 needed"):
        calibrate(shipped_model, [labels], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_same_bytes_under_another_name_count_once(two_films: Path) -> None:
    shutil.copy(two_films / "normal.jpeg", two_films / "normal-copy.jpeg")
    labels = write_labels(two_films, [("normal.jpeg", "NORMAL"), ("normal-copy.jpeg", "NORMAL"), ("pneumonia.jpeg", "PNEUMONIA")])
    kept = each_study_once(read_labels_file(labels))
    assert [r.path.name for r in kept] == ["normal.jpeg", "pneumonia.jpeg"]


def test_one_image_with_two_labels_is_refused_naming_both_lines(two_films: Path, shipped_model: Path, tmp_path: Path) -> None:
    shutil.copy(two_films / "pneumonia.jpeg", two_films / "pneumonia-again.jpeg")
    labels = write_labels(two_films, [("normal.jpeg", "NORMAL"), ("pneumonia.jpeg", "PNEUMONIA"),
                                      ("pneumonia-again.jpeg", "NORMAL")])  # fmt: skip
    with pytest.raises(LabelsFileError, match=r"pneumonia.jpeg \(line 3\) and .*pneumonia-again.jpeg \(line 4\) are the same image"):
        calibrate(shipped_model, [labels], tmp_path / "out", progress=False)


def test_a_labels_file_past_the_row_limit_is_refused_before_it_is_read_to_its_end(two_films: Path, shipped_model: Path,
                                                                                   tmp_path: Path) -> None:  # fmt: skip
    labels = write_labels(two_films, [("normal.jpeg", "NORMAL")] * 300_000)
    with pytest.raises(LabelsFileError, match="more than 100,000 images"):
        calibrate(shipped_model, [labels], tmp_path / "out", progress=False)


@pytest.mark.parametrize("label", ["PNEUMONıA", "PNEUMONIA\u00a0", "ＰＮＥＵＭＯＮＩＡ", "NORMAL\u200b"])
def test_labels_that_only_look_right_are_refused_by_the_character(two_films: Path, label: str) -> None:
    labels = write_labels(two_films, [("pneumonia.jpeg", label)])
    with pytest.raises(LabelsFileError, match=r"line 2: label .* holds U\+"):
        read_labels_file(labels)


def test_plain_labels_in_any_case_with_spaces_still_read(two_films: Path) -> None:
    labels = write_labels(two_films, [("normal.jpeg", " normal "), ("pneumonia.jpeg", "Pneumonia")])
    assert [r.label for r in read_labels_file(labels)] == [0, 1]


def test_out_never_overwrites_a_model_folder(two_films: Path, shipped_model: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    other = tmp_path / "other-model"
    shutil.copytree(shipped_model, other, ignore=shutil.ignore_patterns("evaluation", "site-protocol"))
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    labels = write_labels(two_films, [("normal.jpeg", "NORMAL"), ("pneumonia.jpeg", "PNEUMONIA")])
    with pytest.raises(ConfigurationError, match="already holds a model"):
        calibrate(shipped_model, [labels], other, progress=False)
    code = cli.main(["calibrate", "--model", str(shipped_model), "--data", str(labels), "--out", str(other)])
    assert code == 2 and "already holds a model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    assert json.loads((other / "model_card.json").read_text())["name"] == json.loads((shipped_model / "model_card.json").read_text())["name"]
