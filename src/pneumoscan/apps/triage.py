"""``pneumoscan triage``: a folder of studies in, a ranked worklist and a visual report out.

Triage puts the likely-abnormal studies at the top of a reader's list. A run
writes three files into its output folder, and keeps them current while it works
so that nothing already scored is lost when a run stops:

- ``worklist.csv``: one row per input, highest calibrated probability first;
- ``report.html``: one self-contained page (thumbnails and heat maps embedded);
- ``summary.json``: counts, timings, the model and its operating point.

Runs resume (inputs already in the worklist with the same content are skipped)
and split: ``--shard K/N`` takes a stable part of the inputs, and
:func:`merge` joins shard folders into one worklist and report.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import platform
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import pneumoscan
from pneumoscan.apps.predict import (
    failure_message,
    files_in_folder,
    guarded,
    score_each,
)
from pneumoscan.apps.readings import match_findings
from pneumoscan.apps.report import render_report
from pneumoscan.errors import ConfigurationError, NotARadiograph, UnsupportedFormat
from pneumoscan.files import write_atomically
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.inputs.preprocessing import preprocess
from pneumoscan.running.drift import Observation, drift_figures
from pneumoscan.running.explanation import draw_regions, overlay
from pneumoscan.running.inference import Predictor, batched
from pneumoscan.running.performance import ReadAnswer, live_performance
from pneumoscan.running.regions import Region

WORKLIST_FILE = "worklist.csv"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIZE = 128
PROBABILITY_DECIMALS = 6  # as the worklist keeps it; ranks compare it so
#: Inputs decoded per step (the next step decodes while this one is scored): bounds memory.
CHUNK = 128
#: The worklist is rewritten at least this often during a run: an interruption loses at most this much work.
CHECKPOINT_SECONDS = 15.0

SCORED, SKIPPED, FAILED = "scored", "skipped", "error"


@dataclass
class Row:
    """One input of a triage run; the columns of ``worklist.csv`` in order."""

    rank: int | None = None
    path: str = ""
    probability: float | None = None
    label: str | None = None
    in_distribution: bool | None = None
    ood_score: float | None = None
    population: str | None = None  # child or adult: whose operating point decided
    threshold: float | None = None  # that population's threshold
    population_source: str | None = None  # the image, the DICOM PatientAge, or the model's only population
    population_note: str | None = None  # the image and the DICOM age disagree
    regions: str | None = None  # JSON list of {x, y, width, height, score} in the file's pixels (flagged studies only)
    error: str | None = None
    status: str = SCORED  # scored | skipped (not an image pneumoscan reads) | error (an image that failed)
    format: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sha256: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.path, self.sha256

    @property
    def thumbnail_name(self) -> str:
        return f"{self.sha256[:32]}.jpg"


COLUMNS = [f.name for f in fields(Row)]


@dataclass(frozen=True)
class Shard:
    """The K-th (1-based) of N disjoint parts of the inputs, by a stable hash of each path."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigurationError(f"--shard must look like K/N (for example 2/8), not {text!r}") from None
        if not 1 <= index <= count:
            raise ConfigurationError(f"--shard {text}: K must be between 1 and N")
        return cls(index, count)

    def holds(self, path: str) -> bool:
        # sha256 of the path text, not Python's hash(): the same on every machine and every run
        return int(hashlib.sha256(path.encode()).hexdigest()[:16], 16) % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class Decoded:
    """What the decoding workers hand to the model: a tensor, a thumbnail, or the reason there is none."""

    row: Row
    tensor: np.ndarray | None = None
    image: Image.Image | None = field(default=None, repr=False)
    age_years: float | None = field(default=None, repr=False)  # DICOM PatientAge: routes the study, never written down
    size: tuple[int, int] | None = None  # the film's width and height: its regions are in these pixels


# --------------------------------------------------------------------------- inputs


def discover(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (recursively, hidden entries aside) and glob patterns, each file once, in a stable order.

    Folder contents are not filtered by name: DICOM files often have no
    extension, and the loader tells images from the rest by their content.
    """
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates: Iterable[Path] = files_in_folder(path)
        elif path.exists() or not glob.has_magic(str(item)):
            candidates = [path]  # a missing file still gets a row that says so
        else:
            candidates = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not candidates:
                raise ConfigurationError(f"the pattern {item!r} matches no file")
        for candidate in candidates:
            found.setdefault(candidate.as_posix(), candidate)
    return list(found.values())


def decode(path: Path, image_size: int, predictor: Predictor) -> Decoded:
    """Read, hash and decode one input; never raises for a bad file (its row says why), nor for a bug of ours."""
    row = Row(path=path.as_posix())
    outcome = guarded(lambda: _decode(row, path, image_size, predictor))
    if isinstance(outcome, BaseException):
        row.status, row.error = FAILED, failure_message(outcome)
        return Decoded(row)
    return outcome


def _decode(row: Row, path: Path, image_size: int, predictor: Predictor) -> Decoded:
    data = path.read_bytes()
    row.sha256 = hashlib.sha256(data).hexdigest()
    try:
        loaded = load_xray(data, predictor.limits)
    except (UnsupportedFormat, NotARadiograph) as exc:
        row.status, row.error = SKIPPED, str(exc)
        return Decoded(row)
    row.format = loaded.format
    row.study_instance_uid = _str_or_none(loaded.info.get("StudyInstanceUID"))
    row.series_instance_uid = _str_or_none(loaded.info.get("SeriesInstanceUID"))
    image = loaded.image
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_SIZE * 2, THUMBNAIL_SIZE * 2))  # cheap now; the overlay is drawn from this
    return Decoded(row, preprocess(image, image_size, predictor.intensity), thumbnail, loaded.age_years, image.size)


def _str_or_none(value: object) -> str | None:
    return None if value in (None, "") else str(value)


# --------------------------------------------------------------------------- worklist


#: A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP): such text is written
#: behind a ``'``, which spreadsheets show as text; a leading ``'`` is itself escaped, so reading back is exact.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
#: The columns that hold text (names, messages, UIDs); numbers are written by pneumoscan and never escaped.
TEXT_COLUMNS = ("path", "label", "error", "status", "format", "study_instance_uid", "series_instance_uid")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def spreadsheet_safe(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def from_spreadsheet_safe(text: str) -> str:
    return text.removeprefix("'")


def read_worklist(folder: Path) -> list[Row]:
    """The rows of a worklist written by an earlier (or interrupted) run; none if there is no worklist yet."""
    path = Path(folder) / WORKLIST_FILE
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ConfigurationError(f"{path} is not a pneumoscan worklist (no column {sorted(missing)[0]!r}); choose another --out")
        return [_row_from_csv(record, path, line) for line, record in enumerate(reader, start=2)]


def _row_from_csv(record: dict[str, str], path: Path, line: int) -> Row:
    """One worklist row; its ``sha256`` names a thumbnail file, so anything but a digest is refused."""

    def optional(name: str) -> str | None:
        return from_spreadsheet_safe(record[name]) or None

    def optional_new(name: str) -> str | None:  # columns a worklist from before populations does not have
        return from_spreadsheet_safe(record.get(name) or "") or None

    if record["sha256"] and not SHA256_HEX.fullmatch(record["sha256"]):
        raise ConfigurationError(f"{path}, line {line}: the sha256 column holds {record['sha256'][:80]!r}, not a SHA-256 "
                                 "digest; the worklist was altered: score the studies again into a new --out")  # fmt: skip

    return Row(
        rank=int(record["rank"]) if record["rank"] else None,
        path=from_spreadsheet_safe(record["path"]),
        probability=float(record["probability"]) if record["probability"] else None,
        label=optional("label"),
        in_distribution={"True": True, "False": False}.get(record["in_distribution"]),
        ood_score=float(record["ood_score"]) if record["ood_score"] else None,
        population=optional_new("population"),
        threshold=float(record["threshold"]) if record.get("threshold") else None,
        population_source=optional_new("population_source"),
        population_note=optional_new("population_note"),
        regions=optional_new("regions"),
        error=optional("error"),
        status=from_spreadsheet_safe(record["status"]),
        format=optional("format"),
        study_instance_uid=optional("study_instance_uid"),
        series_instance_uid=optional("series_instance_uid"),
        sha256=record["sha256"],
    )


def rank(rows: Iterable[Row]) -> list[Row]:
    """Highest probability first; inputs that could not be scored follow, by path. Ranks count from 1.

    The probability is compared as the worklist writes it (``PROBABILITY_DECIMALS``), so that a run ranked in
    memory and the same rows read back from worklists (``merge``, a resumed run) rank alike: a confident model
    gives many films 1.000000, and those are ordered by path.
    """
    ordered = sorted(rows, key=lambda r: (r.probability is None, -round(r.probability or 0.0, PROBABILITY_DECIMALS), r.path))
    for position, row in enumerate(ordered, start=1):
        row.rank = position
    return ordered


def write_worklist(folder: Path, rows: list[Row]) -> Path:
    """Write atomically: a reader (or a resumed run) never sees half a file."""
    path = Path(folder) / WORKLIST_FILE
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        values["probability"] = None if row.probability is None else f"{row.probability:.{PROBABILITY_DECIMALS}f}"
        values["ood_score"] = None if row.ood_score is None else f"{row.ood_score:.2f}"
        for name in TEXT_COLUMNS:
            values[name] = None if values[name] is None else spreadsheet_safe(str(values[name]))
        writer.writerow({k: "" if v is None else v for k, v in values.items()})
    write_atomically(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------- running


@dataclass
class Timings:
    seconds: float = 0.0
    scored: int = 0

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0


def triage(
    inputs: Sequence[str | Path],
    out: Path,
    predictor: Predictor | None = None,
    *,
    workers: int = 2,
    batch_size: int = 32,
    shard: Shard | None = None,
    report: bool = True,
    progress: bool = True,
    pull_failures: Sequence = (),  # type: ignore[type-arg]
    findings: list[tuple[int, str, str]] | None = None,
) -> dict:
    """Score every input not already in ``out``'s worklist; write worklist, report and summary; return the summary.

    ``findings`` (:func:`pneumoscan.apps.readings.read_findings`): radiologists' findings of some studies; the
    summary and report then say the sensitivity and specificity they show.

    ``pull_failures`` (pull mode's :class:`~pneumoscan.apps.dicom.pull.Failure` s) become error rows, in place of
    the previous run's: what could not be fetched then and was fetched now is no longer an error.
    """
    predictor = predictor or Predictor.load()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / THUMBNAIL_DIR).mkdir(exist_ok=True)
    files = discover(inputs)
    if shard:
        files = [f for f in files if shard.holds(f.as_posix())]
    done = {row.path: row for row in read_worklist(out) if not row.path.startswith(PULL_FAILURE_PREFIX)}
    started = time.perf_counter()
    timings = Timings()
    rows = dict(done) | {row.path: row for row in map(pull_failure_row, pull_failures)}
    pending = [f for f in files if not _already_done(f, done.get(f.as_posix()))]
    bar = tqdm(total=len(pending), unit="image", desc="triage", disable=not progress, smoothing=0.1)
    last_checkpoint = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        for decoded in _decode_ahead(pool, pending, predictor):
            drawing = [pool.submit(save_thumbnails, *job) for job in score(predictor, decoded, batch_size, out / THUMBNAIL_DIR, bar)]
            for future in drawing:
                future.exception()  # a thumbnail that cannot be drawn costs its picture in the report, not the run
            bar.update(sum(item.tensor is None for item in decoded))
            for item in decoded:
                rows[item.row.path] = item.row
            timings.scored += sum(item.row.status == SCORED for item in decoded)
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                write_worklist(out, rank(rows.values()))
                last_checkpoint = time.monotonic()
    bar.close()
    timings.seconds = time.perf_counter() - started
    ordered = rank(rows.values())
    write_worklist(out, ordered)
    summary = summarise(ordered, predictor_description(predictor), timings, shard=shard,
                        resumed=len(files) - len(pending), inputs=len(files), findings=findings)  # fmt: skip
    write_atomically(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if report:
        write_report(out, ordered, summary)
    return summary


#: The "path" of a worklist row for what pull mode could not fetch: where it is on the PACS.
PULL_FAILURE_PREFIX = "dicomweb:"


def pull_failure_row(failure) -> Row:  # type: ignore[no-untyped-def]
    return Row(path=f"{PULL_FAILURE_PREFIX}{failure.where}", status=FAILED, error=failure.reason, format="dicom",
               study_instance_uid=failure.study_uid, series_instance_uid=failure.series_uid)  # fmt: skip


def _already_done(path: Path, previous: Row | None) -> bool:
    """Skip an input whose path and content are in the worklist already; a changed or unreadable file is tried again."""
    if previous is None or not previous.sha256:
        return False
    try:
        return previous.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False


def _decode_ahead(pool: ThreadPoolExecutor, files: list[Path], predictor: Predictor) -> Iterator[list[Decoded]]:
    """Chunks of decoded inputs; the workers decode the next chunk while the model scores this one."""
    chunks = list(batched(files, CHUNK))
    submit = lambda chunk: [pool.submit(decode, path, predictor.image_size, predictor) for path in chunk]
    upcoming = submit(chunks[0]) if chunks else []
    for index in range(len(chunks)):
        current, upcoming = upcoming, submit(chunks[index + 1]) if index + 1 < len(chunks) else []
        yield [future.result() for future in current]


def score(predictor: Predictor, decoded: list[Decoded], batch_size: int, thumbnails: Path,
          bar: tqdm | None = None) -> list[tuple[Image.Image, np.ndarray, Path, list[Region], float]]:  # fmt: skip
    """Batched forward passes for the decodable inputs; fills their rows and returns the thumbnails to draw.

    A batch that fails is scored again one input at a time, so only the input at fault gets an error row.
    """
    ready = [item for item in decoded if item.tensor is not None]
    drawings = []
    for chunk in batched(ready, batch_size):
        outcomes = score_each(predictor, [item.tensor for item in chunk], heatmap=True, ages=[item.age_years for item in chunk],
                              sizes=[item.size for item in chunk])  # fmt: skip
        for item, prediction in zip(chunk, outcomes):
            row = item.row
            if isinstance(prediction, BaseException):
                row.status, row.error = FAILED, failure_message(prediction, "scoring")
                continue
            row.probability, row.label = prediction.probability, prediction.label
            row.in_distribution, row.ood_score = prediction.in_distribution, prediction.ood_score
            row.population, row.threshold = prediction.population, prediction.threshold
            row.population_source, row.population_note = prediction.population_source, prediction.population_note
            row.regions = json.dumps([r.to_dict() for r in prediction.regions], separators=(",", ":"))
            scale = item.image.width / item.size[0] if item.size else 1.0
            drawings.append((item.image, prediction.heatmap, thumbnails / row.thumbnail_name, prediction.regions, scale))
        if bar is not None:
            bar.update(len(chunk))
    return drawings


def save_thumbnails(image: Image.Image, heatmap: np.ndarray, path: Path, regions: Sequence[Region] = (), scale: float = 1.0) -> None:
    """The X-ray (with its regions) and its heat-map overlay side by side, small: the report embeds one per study.

    ``scale`` maps the regions' pixels (the film's) to ``image``'s.
    """
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    pair = Image.new("RGB", (small.width * 2, small.height))
    pair.paste(draw_regions(small.convert("RGB"), regions, scale * small.width / image.width), (0, 0))
    pair.paste(overlay(small, heatmap), (small.width, 0))
    pair.save(path, format="JPEG", quality=80, subsampling=0)  # full-resolution colour: the thin region boxes stay green


def predictor_description(predictor: Predictor) -> dict:
    """The model and every operating point it may use, one per population."""
    return {
        "name": predictor.card.get("name"),
        "folder": Path(predictor.model_dir).name,
        "precision": predictor.precision,
        "threshold": predictor.threshold,
        "operating_point": predictor.operating_point,
        "temperature": predictor.temperature,
        "operating_points": {
            population: {"threshold": s.threshold, "name": s.operating_point, "temperature": s.temperature, "in_force": s.in_force,
                         "target_sensitivity": s.target_sensitivity}
            for population, s in predictor.populations.items()
        },
        "drift_reference": predictor.card.get("drift_reference"),
    }


def run_drift(scored: list[Row], reference: dict | None) -> dict:
    """The whole run against the card's reference: do these studies look like those the operating point was set on?"""
    observations = [Observation(r.population, r.probability, r.ood_score) for r in scored if r.probability is not None]
    return drift_figures(observations, reference)


def read_performance(rows: list[Row], model: dict, findings: list[tuple[int, str, str]]) -> dict:
    """Sensitivity, specificity, PPV and NPV of the run's answers against radiologists' findings, computed as the
    service's live performance is (:mod:`pneumoscan.running.performance`); findings matching no study are listed."""
    matched, unmatched = match_findings(findings, [r.path for r in rows if r.status == SCORED])
    points = model.get("operating_points") or {}
    answers = [ReadAnswer(r.population, points.get(r.population or "", {}).get("name", model.get("operating_point", "")),
                          points.get(r.population or "", {}).get("in_force"), r.label == "PNEUMONIA",
                          r.in_distribution is not False, matched[r.path])
               for r in rows if r.status == SCORED and r.path in matched]  # fmt: skip
    in_force = {p: (v["name"], v.get("in_force"), v.get("target_sensitivity")) for p, v in points.items()}
    return {"read": len(answers), "unmatched": unmatched, **live_performance(answers, in_force)}


def summarise(rows: list[Row], model: dict, timings: Timings, *, shard: Shard | None = None,
              resumed: int = 0, inputs: int | None = None, findings: list[tuple[int, str, str]] | None = None) -> dict:  # fmt: skip
    """Counts by outcome, the model and its operating point, drift, timings (and, given radiologists' findings by
    worklist path, the performance they show): what ``summary.json`` holds."""
    reference = model.get("drift_reference")
    scored = [r for r in rows if r.status == SCORED]
    validated = [r for r in scored if r.in_distribution is not False]  # a flagged study is no verdict either way
    labels = {label: sum(r.label == label for r in validated) for label in ("PNEUMONIA", "NORMAL")}
    return {
        "pneumoscan_version": pneumoscan.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "inputs": len(rows) if inputs is None else inputs,
        "rows": len(rows),
        "scored": len(scored),
        "labels": labels,
        "out_of_distribution": sum(r.in_distribution is False for r in scored),
        "not_validated": sum(r.in_distribution is False for r in scored),
        "populations": {p: sum(r.population == p for r in scored) for p in sorted({r.population for r in scored if r.population})},
        "skipped": sum(r.status == SKIPPED for r in rows),
        "errors": sum(r.status == FAILED for r in rows),
        "shard": str(shard) if shard else None,
        "resumed_from_worklist": resumed,
        "drift": run_drift(scored, reference),
        "performance": read_performance(rows, model, findings) if findings else None,
        "timing": {
            "seconds": round(timings.seconds, 3),
            "scored_this_run": timings.scored,
            "images_per_second": round(timings.images_per_second, 2),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        },
    }


# --------------------------------------------------------------------------- merging shards


def merge(folders: Sequence[Path], out: Path, report: bool = True) -> dict:
    """Join the worklists of shard folders (or of any runs) into one worklist, report and summary."""
    rows: dict[tuple[str, str], Row] = {}
    models: list[dict] = []
    timings = Timings()
    out = Path(out)
    (out / THUMBNAIL_DIR).mkdir(parents=True, exist_ok=True)
    for folder in folders:
        folder = Path(folder)
        if not (folder / WORKLIST_FILE).is_file():
            raise ConfigurationError(f"{folder} holds no {WORKLIST_FILE}: is it a triage output folder?")
        summary_path = folder / SUMMARY_FILE
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            models.append(summary["model"])
            timings.seconds += summary["timing"]["seconds"]
            timings.scored += summary["timing"]["scored_this_run"]
        for row in read_worklist(folder):
            rows[row.key] = row
            thumbnail = folder / THUMBNAIL_DIR / row.thumbnail_name
            target = out / THUMBNAIL_DIR / row.thumbnail_name
            if row.status == SCORED and thumbnail.is_file() and thumbnail.resolve() != target.resolve():
                target.write_bytes(thumbnail.read_bytes())
    if any(_model_identity(m) != _model_identity(models[0]) for m in models[1:]):
        raise ConfigurationError("the folders were scored by different models or operating points; merge runs of one model only")
    ordered = rank(rows.values())
    write_worklist(out, ordered)
    summary = summarise(ordered, models[0] if models else {}, timings)
    summary["merged_from"] = [Path(f).as_posix() for f in folders]
    write_atomically(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if report:
        write_report(out, ordered, summary)
    return summary


def _model_identity(model: dict) -> tuple:
    return model.get("name"), model.get("precision"), model.get("threshold")


# --------------------------------------------------------------------------- report


def write_report(out: Path, rows: list[Row], summary: dict) -> Path:
    """``report.html``; the page's code lives in :mod:`pneumoscan.apps.report`."""
    path = Path(out) / REPORT_FILE
    write_atomically(path, render_report(rows, summary, Path(out) / THUMBNAIL_DIR))
    return path


__all__ = ["Row", "Shard", "discover", "merge", "rank", "read_worklist", "triage", "write_worklist"]
