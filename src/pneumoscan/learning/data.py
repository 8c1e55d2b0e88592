"""The dataset on disk: which images there are, whose they are, and how they split.

Everything here is plain Python (no PyTorch), so evaluation and reports can use
it too. The torch side of data loading lives in :mod:`pneumoscan.learning.datamodule`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pneumoscan.files import sha256_file
from pneumoscan.config import (
    CLASS_NAMES,
    IMAGE_SUFFIXES,
    SPLITS,
    TEST_FRACTION,
    ValFraction,
    portable_path,
    val_fraction_for,
)
from pneumoscan.errors import (
    DatasetNotFoundError,
    LabelsFileError,
    UnknownPatientIdError,
)
from pneumoscan.running.population import population_of_age

log = logging.getLogger(__name__)

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
    subtype: str  # "normal", "bacteria" or "virus" (Kermany's names), else "normal"/"pneumonia"
    view: str | None = None  # "AP", "PA", ... when the dataset says
    age: float | None = None  # years
    sex: str | None = None
    population: str | None = None  # "child" or "adult"
    dataset: str = ""  # the dataset's name (its folder), for per-dataset figures
    root: Path | None = None  # the dataset folder ``path`` is relative to
    split: str | None = None  # a labels file's own split column, if it has one
    line: int | None = field(default=None, compare=False)  # the labels file's line that listed it, to name in an error

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]

    @property
    def relative(self) -> str:
        """The path as the dataset names it: relative to its folder, with the folder's name in front."""
        if self.root is None:
            return self.path.as_posix()
        return f"{self.root.name}/{self.path.relative_to(self.root).as_posix()}"


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
    """Every image of ``split`` (``train`` or ``test``), sorted by path for determinism.

    The folder layout is Kermany's pediatric set: its images are children's.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    root = check_root(root)
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for path in sorted((root / split / class_name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                records.append(
                    Record(path, label, patient_id(path.name), subtype_of(path.name, label),
                           population="child", dataset=root.name, root=root)
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


def file_list_checksum(records: list[Record], root: Path | None = None) -> str:
    """sha256 of the sorted relative paths: names *which* files were used, cheaply.

    Paths are relative to ``root`` when given, else each record's own dataset name and path.
    """
    digest = hashlib.sha256()
    for rel in sorted(r.path.relative_to(root).as_posix() if root else r.relative for r in records):
        digest.update(rel.encode() + b"\n")
    return digest.hexdigest()


def content_checksum(records: list[Record], with_labels: bool = False) -> str:
    """sha256 over sorted lines '<dataset>/<relative path> [<label> ]<file sha256>': identifies the data itself
    (and, ``with_labels``, what it was labelled: a site set's threshold depends on both)."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.relative):
        label = f"{record.class_name} " if with_labels else ""
        digest.update(f"{record.relative} {label}{sha256_file(record.path)}\n".encode())
    return digest.hexdigest()


# --- datasets from a labels file -----------------------------------------------------------

LABELS_FILE = "labels.csv"
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "split", "age", "sex", "view")
LABEL_SPLITS = ("train", "val", "test")
#: NIH ChestX-ray14's own index: ``Data_Entry_2017.csv`` / ``Data_Entry_2017_v2020.csv``.
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def dataset_kind(source: Path) -> str:
    """``folder`` (Kermany's layout), ``labels`` (a CSV of path,label,...) or ``nih`` (Data_Entry_2017*.csv)."""
    source = Path(source).expanduser()
    if source.is_dir():
        if (source / "train").is_dir() or not (source / LABELS_FILE).is_file():
            return "folder"
        source = source / LABELS_FILE
    if not source.is_file():
        raise DatasetNotFoundError(
            f"no dataset at {source}: give a folder with {{train,test}}/{{NORMAL,PNEUMONIA}}/*.jpeg, "
            "a folder with labels.csv, or a labels CSV file (path,label[,patient_id,split,age,sex,view])"
        )
    with open(source, newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    return "nih" if all(column in header for column in NIH_COLUMNS) else "labels"


def labels_file_of(source: Path) -> Path:
    source = Path(source).expanduser()
    return source / LABELS_FILE if source.is_dir() else source


def _row_error(csv_path: Path, line: int, message: str) -> LabelsFileError:
    return LabelsFileError(f"{csv_path.name}, line {line}: {message}")


def image_inside(root: Path, relative: str, csv_path: Path, line: int) -> Path:
    """The image a row names, which must exist and lie inside the dataset folder."""
    if not relative.strip():
        raise _row_error(csv_path, line, "the path is empty")
    candidate = Path(relative.strip())
    if candidate.is_absolute() or ".." in candidate.parts:
        raise _row_error(csv_path, line, f"path {relative!r} leaves the dataset folder; give it relative to {root.name}/")
    path = root / candidate  # a symbolic link inside the folder is the owner's choice and is followed
    if not path.is_file():
        raise _row_error(csv_path, line, f"no image at {relative!r} (looked in {root.name}/)")
    return path


def parse_label(value: str, csv_path: Path, line: int) -> int:
    """NORMAL or PNEUMONIA, in any case, after Unicode normalisation (NFC); any other character is refused by name.

    ``str.upper`` alone would take a Turkish dotless ı for an I, and ``strip`` a no-break space for a
    space: a label that only looks right is a sign of a file edited by hand, and is refused.
    """
    name = unicodedata.normalize("NFC", value).strip(" \t")
    odd = next((c for c in name if not (c.isascii() and c.isalpha())), None)  # before upper(): "ı".upper() is "I"
    name = name.upper()
    if odd is not None:
        label_name = unicodedata.name(odd, "an unnamed character")
        raise _row_error(csv_path, line, f"label {value!r} holds U+{ord(odd):04X} ({label_name}); write "
                                         f"{' or '.join(CLASS_NAMES)} in plain letters")  # fmt: skip
    if name not in CLASS_NAMES:
        raise _row_error(csv_path, line, f"label {value!r} is neither {' nor '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name)


def parse_age(value: str | None, csv_path: Path, line: int) -> float | None:
    """Years as a number; DICOM-style ``045Y``/``006M`` are understood too."""
    if value is None or not value.strip():
        return None
    from pneumoscan.inputs.imaging import age_in_years  # the one parser of DICOM ages

    age = age_in_years(value)
    if age is None:
        raise _row_error(csv_path, line, f"age {value!r} is not a number of years")
    return age


def read_labels_file(source: Path, max_rows: int | None = None) -> list[Record]:
    """Records of a labels CSV: ``path,label`` and optionally ``patient_id,split,age,sex,view``.

    Paths are relative to the CSV's folder. Every problem names its line, so a
    file of thousands of rows can be fixed without guessing. Past ``max_rows`` rows the
    file is refused without reading further.
    """
    csv_path = labels_file_of(source)
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise LabelsFileError(
                f"{csv_path.name}: missing column(s) {', '.join(missing)}; a labels file needs "
                f"{','.join(REQUIRED_COLUMNS)} and may have {','.join(OPTIONAL_COLUMNS)} (found: {','.join(columns) or 'nothing'})"
            )
        if "patient_id" not in columns:
            log.warning("%s has no patient_id column: each image counts as its own patient in the split", csv_path)
        records = []
        for line, row in enumerate(reader, start=2):
            if max_rows is not None and len(records) >= max_rows:
                raise LabelsFileError(f"{csv_path.name} lists more than {max_rows:,} images, the most one run takes; "
                                      "split it into several files")  # fmt: skip
            records.append(labels_row(row, root, csv_path, line))
    if not records:
        raise LabelsFileError(f"{csv_path.name} lists no images")
    return records


def labels_row(row: dict[str, str | None], root: Path, csv_path: Path, line: int) -> Record:
    if None in row:
        raise _row_error(csv_path, line, "has more cells than the header has columns")
    path = image_inside(root, row["path"] or "", csv_path, line)
    label = parse_label(row["label"] or "", csv_path, line)
    split = (row.get("split") or "").strip().lower() or None
    if split is not None and split not in LABEL_SPLITS:
        raise _row_error(csv_path, line, f"split {row['split']!r} is not one of {', '.join(LABEL_SPLITS)}")
    age = parse_age(row.get("age"), csv_path, line)
    view = (row.get("view") or "").strip().upper() or None
    record = Record(
        path, label, (row.get("patient_id") or "").strip() or f"image:{row['path']}", CLASS_NAMES[label].lower(),
        view=view, age=age, sex=(row.get("sex") or "").strip().upper() or None, population=population_of_age(age),
        dataset=root.name, root=root, split=split, line=line,
    )
    return record


def nih_image_index(root: Path) -> dict[str, Path]:
    """Where each NIH image lies: ``images/`` or the ``images_NNN/images/`` folders of the download."""
    return {path.name: path for path in sorted(root.rglob("*.png"))}


def read_nih_entries(source: Path) -> list[Record]:
    """Records of NIH ChestX-ray14's ``Data_Entry_2017*.csv`` for pneumonia.

    NORMAL is ``No Finding``; PNEUMONIA a finding list that contains
    ``Pneumonia``; every other row (other findings only) is left out, as it is
    neither. The patient is ``Patient ID``, the view ``View Position``.
    """
    csv_path = labels_file_of(source)
    root = csv_path.parent
    index = nih_image_index(root)
    records = []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            findings = {f.strip() for f in (row.get("Finding Labels") or "").split("|")}
            if findings == {"No Finding"}:
                label = 0
            elif "Pneumonia" in findings:
                label = 1
            else:
                continue
            name = (row.get("Image Index") or "").strip()
            if name not in index:
                raise _row_error(csv_path, line, f"no image {name!r} under {root.name}/ (looked in every subfolder)")
            age = parse_age(row.get("Patient Age"), csv_path, line)
            records.append(Record(
                index[name], label, (row.get("Patient ID") or "").strip() or f"image:{name}", CLASS_NAMES[label].lower(),
                view=(row.get("View Position") or "").strip().upper() or None, age=age,
                sex=(row.get("Patient Gender") or "").strip().upper() or None, population=population_of_age(age),
                dataset=root.name, root=root,
            ))
    if not records:
        raise LabelsFileError(f"{csv_path.name}: no row is 'No Finding' or lists 'Pneumonia'")
    return records


def shuffled_patients_by_label(records: list[Record], rng: random.Random) -> dict[int, list[str]]:
    """Each patient once, under 1 if any of their images shows pneumonia (else 0), in a seeded order per label:
    what every by-patient split here draws from, so a patient with images under both labels stays whole."""
    by_patient: dict[str, int] = {}
    for record in records:
        by_patient[record.patient] = max(by_patient.get(record.patient, 0), record.label)
    shuffled: dict[int, list[str]] = {}
    for label in (0, 1):
        shuffled[label] = sorted(p for p, y in by_patient.items() if y == label)
        rng.shuffle(shuffled[label])
    return shuffled


def split_three_ways(
    records: list[Record], seed: int, val_fraction: float, test_fraction: float = TEST_FRACTION
) -> dict[str, list[Record]]:
    """Train/validation/test by patient for a dataset that has no test part of its own.

    Patients are stratified by whether any of their images shows pneumonia, so
    a patient with images under both labels stays whole. Seeded: the same seed
    gives the same test patients on every machine.
    """
    rng = random.Random(f"{seed}:three-way")
    assigned: dict[str, str] = {}
    for patients in shuffled_patients_by_label(records, rng).values():
        n_test, n_val = round(len(patients) * test_fraction), round(len(patients) * val_fraction)
        for i, patient in enumerate(patients):
            assigned[patient] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    parts: dict[str, list[Record]] = {s: [r for r in records if assigned[r.patient] == s] for s in LABEL_SPLITS}
    rng.shuffle(parts["val"])
    return parts


def split_in_halves(records: list[Record], seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Two halves by patient, stratified by whether a patient has any pneumonia image, seeded.

    The site-calibration protocol fits on one half and measures on the other; a
    patient on both sides would let the fit see the images it is measured on.
    """
    first: set[str] = set()
    for patients in shuffled_patients_by_label(records, random.Random(f"{seed}:halves")).values():
        first.update(patients[: len(patients) // 2])
    return [r for r in records if r.patient in first], [r for r in records if r.patient not in first]


def class_folder_records(root: Path) -> list[Record]:
    """``root/{NORMAL,PNEUMONIA}/*``: how a site most simply hands over labelled studies.

    Kermany-style names give the patient; any other name counts as its own patient.
    """
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for path in sorted((root / class_name).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                try:
                    patient = patient_id(path.name)
                except UnknownPatientIdError:
                    patient = f"image:{path.relative_to(root).as_posix()}"
                records.append(Record(path, label, patient, class_name.lower(), dataset=root.name, root=root))
    return records


def site_records(sources: list[Path], split: str = "all", seed: int = 42, val_fraction: ValFraction = 0.10,
                 max_rows: int | None = None) -> list[Record]:  # fmt: skip
    """A site's labelled studies: every image of each source (``split="all"``), or one of its parts.

    A source is what ``--data`` takes, or a folder with ``NORMAL/`` and ``PNEUMONIA/`` directly.
    More than ``max_rows`` studies in all are refused (a labels file's, before it is read to its end).
    """
    records: list[Record] = []
    for source in sources:
        source = Path(source).expanduser().resolve()
        if source.is_dir() and all((source / c).is_dir() for c in CLASS_NAMES) and not (source / "train").is_dir():
            if split != "all":
                raise DatasetNotFoundError(f"{source} has no parts (it is a NORMAL/PNEUMONIA folder): use --split all")
            records += class_folder_records(source)
        elif split == "all":
            kind = dataset_kind(source)
            if kind == "folder":
                records += list_records(source, "train") + list_records(source, "test")
            else:
                records += read_labels_file(source, max_rows) if kind == "labels" else read_nih_entries(source)
        else:
            records += dataset_split(source, split, seed, val_fraction)
        if max_rows is not None and len(records) > max_rows:
            raise LabelsFileError(f"the site set holds more than {max_rows:,} studies, the most one run takes")
    if not records:
        raise DatasetNotFoundError(f"no images in {', '.join(str(s) for s in sources)}")
    return records


@lru_cache(maxsize=16)
def _dataset_parts(source: Path, seed: int, val_fraction: float) -> dict[str, tuple[Record, ...]]:
    kind = dataset_kind(source)
    if kind == "folder":
        train, val = split_by_patient(list_records(source, "train"), val_fraction, seed)
        parts = {"train": train, "val": val, "test": list_records(source, "test")}
    else:
        records = read_labels_file(source) if kind == "labels" else read_nih_entries(source)
        if any(r.split for r in records):
            unsplit = [r.path.name for r in records if not r.split]
            if unsplit:
                raise LabelsFileError(f"{labels_file_of(source).name}: the split column is empty for {unsplit[0]} and "
                                      f"{len(unsplit) - 1} more; give every row a split or none")
            parts = {s: [r for r in records if r.split == s] for s in LABEL_SPLITS}
            if not parts["val"]:  # a file that names train and test only: validation comes from train, by patient
                parts["train"], parts["val"] = split_by_patient(parts["train"], val_fraction, seed)
            leaked = {r.patient for r in parts["test"]} & {r.patient for r in parts["train"] + parts["val"]}
            if leaked:
                raise LabelsFileError(
                    f"{labels_file_of(source).name}: patient(s) {', '.join(sorted(leaked)[:5])} have images in test and in "
                    "train or val; a split column must keep each patient on one side"
                )
        else:
            parts = split_three_ways(records, seed, val_fraction)
    return {split: tuple(records) for split, records in parts.items()}


def dataset_name(source: Path) -> str:
    """The name a dataset goes by in cards and in a per-dataset ``val_fraction``: its folder's."""
    source = Path(source).expanduser().resolve()
    return source.name if dataset_kind(source) == "folder" else labels_file_of(source).parent.name


def dataset_split(source: Path, split: str, seed: int = 42, val_fraction: ValFraction = 0.10) -> list[Record]:
    """The ``train``, ``val`` or ``test`` part of one dataset (folder or labels file), each split by patient on its own.

    A dataset that has no test part of its own draws its test patients before its validation patients, so a
    larger validation share changes which patients train, never which ones test.
    """
    if split not in LABEL_SPLITS:
        raise ValueError(f"split must be one of {LABEL_SPLITS}, not {split!r}")
    source = Path(source).expanduser().resolve()
    return list(_dataset_parts(source, seed, val_fraction_for(val_fraction, dataset_name(source)))[split])


def records_of(sources: list[Path], split: str, seed: int = 42, val_fraction: ValFraction = 0.10) -> list[Record]:
    """One split over several datasets, each split on its own."""
    return [record for source in sources for record in dataset_split(source, split, seed, val_fraction)]


def view_balancing_weights(records: list[Record]) -> list[float]:
    """Sampling weights that make view independent of label within each dataset.

    In the adult set 76 % of pneumonias are AP bedside films and 81 % of normals
    PA: a model can learn "AP means pneumonia". Weighting each image by
    ``P(view) / P(view | label)`` of its dataset gives every label the same view
    mix in what the model sees, while each label keeps its total weight. Images
    without a view weigh 1.
    """
    cells = Counter((r.dataset, r.label, r.view) for r in records if r.view)
    labels = Counter((r.dataset, r.label) for r in records if r.view)
    views = Counter((r.dataset, r.view) for r in records if r.view)
    totals = Counter(r.dataset for r in records if r.view)
    weights = []
    for r in records:
        if not r.view:
            weights.append(1.0)
            continue
        p_view = views[(r.dataset, r.view)] / totals[r.dataset]
        p_view_given_label = cells[(r.dataset, r.label, r.view)] / labels[(r.dataset, r.label)]
        weights.append(p_view / p_view_given_label)
    return weights


def dataset_summary(source: Path, seed: int, val_fraction: ValFraction) -> dict[str, object]:
    """What a run and a card record about one dataset: kind, checksum, counts per class and split, test patients."""
    source = Path(source).expanduser().resolve()
    kind, name = dataset_kind(source), dataset_name(source)
    parts = {s: dataset_split(source, s, seed, val_fraction) for s in LABEL_SPLITS}
    val_fraction = val_fraction_for(val_fraction, name)
    summary: dict[str, object] = {
        "name": name,
        "kind": kind,
        "source": portable_path(source),
        "counts": {s: class_counts(r) for s, r in parts.items()},
        "patients": {s: len({r.patient for r in recs}) for s, recs in parts.items()},
        "populations": dict(Counter(str(r.population) for recs in parts.values() for r in recs)),
        "split": ("train/ and test/ folders; validation by patient from train/" if kind == "folder" else
                  f"by patient_id, seed {seed}: {TEST_FRACTION:.0%} test, {val_fraction:.0%} validation (or the file's split column)"),
        "test_patients_sha256": hashlib.sha256("\n".join(sorted({r.patient for r in parts["test"]})).encode()).hexdigest(),
    }
    if kind != "folder":
        summary["labels_file_sha256"] = sha256_file(labels_file_of(source))
    views = Counter((r.view, r.class_name) for recs in parts.values() for r in recs if r.view)
    if views:
        summary["views"] = {f"{v} {c}": n for (v, c), n in sorted(views.items())}
    return summary
