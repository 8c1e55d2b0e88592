"""The dataset on disk: which images there are, whose they are, and how they split.

Everything here is plain Python (no PyTorch), so evaluation and reports can use
it too. The torch side of data loading lives in :mod:`pneumoscan.datamodule`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pneumoscan.config import CLASS_NAMES, IMAGE_SUFFIXES, SPLITS
from pneumoscan.errors import DatasetNotFoundError, UnknownPatientIdError

# person123_bacteria_4 / person1_virus_7_2 -> person123
_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_", re.IGNORECASE)
# IM-0115-0001, IM-0115-0001-0002, NORMAL2-IM-0666-0001 -> IM-0115 / NORMAL2-IM-0666
_IM = re.compile(r"^((?:NORMAL\d+-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    """One image of the dataset and what is known about it from its path."""

    path: Path
    label: int  # index into CLASS_NAMES: 1 = pneumonia
    patient: str
    subtype: str  # "normal", "bacteria" or "virus"

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def patient_id(filename: str) -> str:
    """The patient a file belongs to, from the dataset's naming scheme.

    Several images of one child exist; splits must keep them together or the
    validation figures leak.
    """
    stem = Path(filename).name
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    raise UnknownPatientIdError(
        f"cannot tell the patient of {filename!r}: expected names like "
        "'person123_bacteria_4.jpeg', 'IM-0115-0001.jpeg' or 'NORMAL2-IM-0666-0001.jpeg'"
    )


def subtype_of(filename: str, label: int) -> str:
    """``normal``, ``bacteria`` or ``virus``: the pneumonia type is in the file name."""
    if label == 0:
        return "normal"
    match = _PERSON.match(Path(filename).name)
    return match.group(2).lower() if match else "unknown"


def check_root(root: Path) -> Path:
    """Fail early, with the fix, when the data root is not the expected layout."""
    root = Path(root).expanduser()
    missing = [f"{s}/{c}" for s in SPLITS for c in CLASS_NAMES if not (root / s / c).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"no chest X-ray dataset at {root} (missing: {', '.join(missing)}). "
            "Point --data or PNEUMOSCAN_DATA at a folder with "
            "{train,test}/{NORMAL,PNEUMONIA}/*.jpeg"
        )
    return root


def list_records(root: Path, split: str) -> list[Record]:
    """Every image of ``split`` (``train`` or ``test``), sorted by path for determinism."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    root = check_root(root)
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for path in sorted((root / split / class_name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                records.append(
                    Record(path, label, patient_id(path.name), subtype_of(path.name, label))
                )
    return records


def split_by_patient(
    records: list[Record], val_fraction: float = 0.10, seed: int = 42
) -> tuple[list[Record], list[Record]]:
    """Split into (train, validation) by patient, stratified by class, reproducibly.

    About ``val_fraction`` of the patients of each class go to validation, so no
    child has images on both sides. The validation list comes back in a seeded
    shuffled order so that any first few batches hold both classes.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), not {val_fraction}")
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in sorted({r.label for r in records}):
        patients = sorted({r.patient for r in records if r.label == label})
        rng.shuffle(patients)
        n_val = max(1, round(len(patients) * val_fraction))
        val_patients.update(patients[:n_val])
    train = [r for r in records if r.patient not in val_patients]
    val = [r for r in records if r.patient in val_patients]
    rng.shuffle(val)
    return train, val


def class_counts(records: list[Record]) -> dict[str, int]:
    """Images per class name, every class present even at zero."""
    counts = Counter(r.class_name for r in records)
    return {name: counts.get(name, 0) for name in CLASS_NAMES}


def class_weights(records: list[Record]) -> list[float]:
    """Loss weight per class, ``n / (k · n_c)``: rare classes weigh more.

    This is the balancing the Keras seed projects use (scikit-learn's
    ``class_weight='balanced'``); it keeps the 3:1 pneumonia majority from
    drowning out the normal class.
    """
    counts = class_counts(records)
    n, k = sum(counts.values()), len(CLASS_NAMES)
    if any(c == 0 for c in counts.values()):
        raise ValueError(f"every class needs at least one image to weigh it: {counts}")
    return [n / (k * counts[name]) for name in CLASS_NAMES]


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (model files, images, the gate)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_list_checksum(records: list[Record], root: Path) -> str:
    """sha256 of the sorted relative paths: names *which* files were used, cheaply."""
    digest = hashlib.sha256()
    for rel in sorted(r.path.relative_to(root).as_posix() for r in records):
        digest.update(rel.encode() + b"\n")
    return digest.hexdigest()
