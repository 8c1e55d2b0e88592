from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscan.errors import DatasetNotFoundError, UnknownPatientIdError
from pneumoscan.learning.data import (
    Record,
    check_root,
    class_counts,
    class_weights,
    file_list_checksum,
    list_records,
    patient_id,
    split_by_patient,
    subtype_of,
)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person123_bacteria_4.jpeg", "person123"),
        ("person1_virus_7_2.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0117-0001-0002.jpeg", "IM-0117"),
        ("NORMAL2-IM-0666-0001.jpeg", "NORMAL2-IM-0666"),
        ("NORMAL2-IM-1345-0001-0002.jpeg", "NORMAL2-IM-1345"),
        ("train/PNEUMONIA/person9_bacteria_40.jpeg", "person9"),
    ],
)
def test_patient_id_from_file_name(name: str, patient: str) -> None:
    assert patient_id(name) == patient


def test_unknown_file_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownPatientIdError, match="person123_bacteria_4"):
        patient_id("scan.jpeg")


def test_subtype_from_file_name() -> None:
    assert subtype_of("person1_virus_3.jpeg", 1) == "virus"
    assert subtype_of("person1_bacteria_3.jpeg", 1) == "bacteria"
    assert subtype_of("IM-0001-0001.jpeg", 0) == "normal"


def test_class_counts_match_the_dataset_readme(data_root: Path) -> None:
    assert class_counts(list_records(data_root, "train")) == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert class_counts(list_records(data_root, "test")) == {"NORMAL": 234, "PNEUMONIA": 390}


def test_split_shares_no_patient_and_holds_about_ten_percent(data_root: Path) -> None:
    records = list_records(data_root, "train")
    train, val = split_by_patient(records, val_fraction=0.10, seed=42)
    train_patients, val_patients = {r.patient for r in train}, {r.patient for r in val}
    assert not train_patients & val_patients
    assert len(train) + len(val) == len(records)
    share = len(val_patients) / (len(train_patients) + len(val_patients))
    assert 0.09 <= share <= 0.11
    for label in (0, 1):  # stratified: each class keeps about 10 % of its patients
        all_p = {r.patient for r in records if r.label == label}
        val_p = {r.patient for r in val if r.label == label}
        assert 0.09 <= len(val_p) / len(all_p) <= 0.11


def test_split_is_reproducible_and_seeded(data_root: Path) -> None:
    records = list_records(data_root, "train")
    first = [r.path for r in split_by_patient(records, seed=1)[1]]
    again = [r.path for r in split_by_patient(records, seed=1)[1]]
    other = [r.path for r in split_by_patient(records, seed=2)[1]]
    assert first == again
    assert set(first) != set(other)


def test_validation_order_mixes_classes_early(data_root: Path) -> None:
    _, val = split_by_patient(list_records(data_root, "train"))
    assert {r.label for r in val[:32]} == {0, 1}


def test_class_weights_balance_the_loss() -> None:
    records = [Record(Path(f"{i}.jpeg"), 0, f"p{i}", "normal") for i in range(1)] + [
        Record(Path(f"x{i}.jpeg"), 1, f"q{i}", "bacteria") for i in range(3)
    ]
    weights = class_weights(records)
    assert weights == pytest.approx([2.0, 2.0 / 3.0])
    # each class then carries the same total weight
    assert weights[0] * 1 == pytest.approx(weights[1] * 3)


def test_file_list_checksum_changes_with_the_files(data_root: Path) -> None:
    records = list_records(data_root, "train")
    assert file_list_checksum(records, data_root) == file_list_checksum(list(reversed(records)), data_root)
    assert file_list_checksum(records[1:], data_root) != file_list_checksum(records, data_root)


def test_missing_dataset_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="--data or PNEUMOSCAN_DATA"):
        check_root(tmp_path)
