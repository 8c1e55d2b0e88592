"""Radiologists' readings: what a valid reading is, and readings exported from a RIS imported as one transaction.

A reading says what the radiologist found on the study pneumoscan answered (``pneumonia``, ``no_pneumonia`` or
``cannot_tell``), who read it (a reader id of the site: never a patient field) and when. It is keyed by the
prediction's id or, for a study that came through the DICOM node, by its SOP Instance UID, matched through the
sha256 the node stored (the UID itself is never kept). Free-text comments go to the ``readings`` table only.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from pneumoscan.apps.audit import FINDINGS, AuditLog, reading_row, uid_digest
from pneumoscan.errors import DatabaseUnavailableError, ReadingsFileError
from pneumoscan.running.inference import card_populations

#: A reader id: letters, digits and ``. _ @ -``, as a RIS or a directory names its users.
READER_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
MAX_COMMENT_CHARS = 2000
#: What a RIS export may call each finding (case, spaces, '_' and '-' do not matter).
FINDING_ALIASES = {
    "pneumonia": "pneumonia", "yes": "pneumonia", "positive": "pneumonia",
    "no pneumonia": "no_pneumonia", "no": "no_pneumonia", "negative": "no_pneumonia", "normal": "no_pneumonia",
    "cannot tell": "cannot_tell", "indeterminate": "cannot_tell", "equivocal": "cannot_tell",
}  # fmt: skip
KEY_COLUMNS = ("prediction_id", "sop_instance_uid")
COLUMNS = (*KEY_COLUMNS, "finding", "reader", "read_at", "comment")


def finding_of(value: str) -> str:
    """The stored finding of what a file or a form says; ValueError names the accepted values."""
    found = FINDING_ALIASES.get(" ".join(value.lower().replace("_", " ").replace("-", " ").split()))
    if found is None:
        raise ValueError(f"finding {value!r} is none of {', '.join(FINDINGS)}")
    return found


def reader_of(value: str) -> str:
    reader = value.strip()
    if not re.fullmatch(READER_PATTERN, reader):
        raise ValueError(f"reader {value!r} is not a reader id (1–64 letters, digits, '.', '_', '@' or '-')")
    return reader


def read_at_of(value: str) -> datetime | None:
    """An ISO 8601 time; a time without a zone is taken as UTC. Empty: the time of the import."""
    if not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"read_at {value!r} is not an ISO 8601 time (e.g. 2026-12-01T09:30:00Z)") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment > datetime.now(UTC):
        raise ValueError(f"read_at {value!r} lies in the future")
    return moment


def comment_of(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > MAX_COMMENT_CHARS:
        raise ValueError(f"the comment has {len(value)} characters; at most {MAX_COMMENT_CHARS}")
    return value.strip()


@dataclass(frozen=True)
class ImportSummary:
    rows: int
    by_finding: dict[str, int]
    by_key: dict[str, int]  # how many rows were matched by prediction id and by SOP Instance UID


def import_readings(path: Path, audit: AuditLog) -> ImportSummary:
    """Every row of ``path`` checked and matched, then all stored in one transaction; any bad row stores nothing.

    The error names every bad row (up to 20) with its line, so a file is fixed in one pass.
    """
    problems, keys = parse_rows(Path(path))
    try:
        return store(path, audit, problems, keys)
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(f"the audit database cannot be read or written ({type(exc).__name__}); nothing of "
                                       f"{Path(path).name} was imported: run the import again once the database is up") from None


def store(path: Path, audit: AuditLog, problems: list[tuple[int, str]], keys: list[tuple[int, str, str, dict]]) -> ImportSummary:
    by_uid = audit.predictions_of_instances({uid_digest(uid) for _, kind, uid, _ in keys if kind == "sop_instance_uid"})
    known = audit.existing_predictions({key for _, kind, key, _ in keys if kind == "prediction_id"})
    resolved = []
    for line, kind, key, row in keys:
        prediction_id = by_uid.get(uid_digest(key)) if kind == "sop_instance_uid" else (key if key in known else None)
        if prediction_id is None:
            what = "no study the DICOM node scored has SOP Instance UID" if kind == "sop_instance_uid" else "no prediction has id"
            problems.append((line, f"{what} {key!r}"))
        else:
            resolved.append(reading_row(prediction_id, source="import", **row))
    if problems:
        problems.sort()
        shown = "; ".join(f"line {line}: {message}" for line, message in problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ReadingsFileError(f"{Path(path).name}: {len(problems)} bad row(s), nothing was imported: {shown}{more}")
    audit.record_readings(resolved)
    by_finding = {f: sum(1 for r in resolved if r["finding"] == f) for f in FINDINGS}
    by_key = {k: sum(1 for _, kind, _, _ in keys if kind == k) for k in KEY_COLUMNS}
    return ImportSummary(len(resolved), by_finding, by_key)


def parse_rows(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str, str, dict]]]:
    """(problems, keyed rows): each row's line, key column, key and checked values, or its line and problem."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in ("finding", "reader") if c not in header]
            if missing or not any(k in header for k in KEY_COLUMNS):
                raise ReadingsFileError(
                    f"{path.name}: the header must name finding, reader and prediction_id or sop_instance_uid "
                    f"(optional: read_at, comment); it has {', '.join(header) or 'nothing'}")
            unknown = [h for h in header if h not in COLUMNS]
            if unknown:
                raise ReadingsFileError(f"{path.name}: unknown column(s) {', '.join(unknown)}; the columns are {', '.join(COLUMNS)}")
            problems, keyed = [], []
            for line, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "") for k, v in raw.items() if k is not None}
                try:
                    keyed.append((line, *key_of(row), {
                        "finding": finding_of(row.get("finding", "")), "reader": reader_of(row.get("reader", "")),
                        "read_at": read_at_of(row.get("read_at", "")), "comment": comment_of(row.get("comment"))}))
                except ValueError as exc:
                    problems.append((line, str(exc)))
    except FileNotFoundError:
        raise ReadingsFileError(f"no readings file at {path}") from None
    except UnicodeDecodeError:
        raise ReadingsFileError(f"{path.name} is not a UTF-8 text file (a CSV of readings)") from None
    except csv.Error as exc:
        raise ReadingsFileError(f"{path.name} is not a readable CSV file ({exc})") from None
    if not keyed and not problems:
        raise ReadingsFileError(f"{path.name} holds no readings")
    return problems, keyed


def key_of(row: dict) -> tuple[str, str]:
    given = [(k, row.get(k, "").strip()) for k in KEY_COLUMNS if row.get(k, "").strip()]
    if len(given) != 1:
        raise ValueError("give exactly one of prediction_id and sop_instance_uid")
    return given[0]


# --------------------------------------------------------------------------- findings for a triage run


def read_findings(path: Path) -> list[tuple[int, str, str]]:
    """(line, study path, finding) of a CSV with the columns ``path`` and ``finding``, checked before a run starts."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or []]
            if "path" not in header or "finding" not in header:
                raise ReadingsFileError(f"{path.name}: the header must name path and finding; it has {', '.join(header) or 'nothing'}")
            found, problems = [], []
            for line, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                try:
                    if not row.get("path"):
                        raise ValueError("the path is empty")
                    found.append((line, row["path"], finding_of(row.get("finding", ""))))
                except ValueError as exc:
                    problems.append(f"line {line}: {exc}")
    except FileNotFoundError:
        raise ReadingsFileError(f"no readings file at {path}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReadingsFileError(f"{path.name} is not a readable UTF-8 CSV file ({type(exc).__name__})") from None
    if problems:
        raise ReadingsFileError(f"{path.name}: {len(problems)} bad row(s): {'; '.join(problems[:20])}")
    return found


def match_findings(findings: list[tuple[int, str, str]], paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """Worklist path → finding, matching a file's path exactly, else by its end (``NORMAL/x.jpeg`` or the file
    name) when that names one study only; and the lines that match none or several, in words."""
    by_path = {Path(p).as_posix(): p for p in paths}
    matched, unmatched = {}, []
    for line, given, finding in findings:
        given = Path(given).as_posix()
        candidates = [by_path[given]] if given in by_path else [p for q, p in by_path.items() if q.endswith("/" + given)]
        if len(candidates) == 1:
            matched[candidates[0]] = finding
        else:
            unmatched.append(f"line {line}: {given!r} {'names no study of the run' if not candidates else 'names several studies'}")
    return matched, unmatched


# --------------------------------------------------------------------------- a site's operating point from its readings

#: A stored probability of exactly 0 or 1 (a logit past float64's reach) is read back at this logit.
MAX_LOGIT = 36.0


def temperature_in_force(predictor, population: str, source: str | None) -> float | None:  # type: ignore[no-untyped-def]
    """The temperature that turned a stored answer's logit into its probability: the validation one, or the site
    calibration's now in force; None for an answer of an earlier site point (its temperature is not kept)."""
    settings = predictor.populations.get(population)
    if settings is None:
        return None
    if source == settings.in_force:
        return settings.temperature
    if source in (None, "validation"):
        entry = card_populations(predictor.card).get(population, {})
        return float(entry.get("validation_operating_point", entry).get("calibration", {}).get("temperature", settings.temperature))
    return None


def each_upload_once(rows: list[dict]) -> tuple[list[dict], Counter]:
    """The same bytes posted twice count once, as ``calibrate`` counts a file listed twice once; read both ways, they
    have no label and are left out (a site set's file labelled both ways is refused)."""
    findings: dict[str, set[str]] = {}
    for row in rows:
        findings.setdefault(row["upload_sha256"], set()).add(row["finding"])
    kept, seen, skipped = [], set(), Counter()
    for row in rows:
        digest = row["upload_sha256"]
        if len(findings[digest]) > 1:
            skipped["the same image read both ways"] += 1
        elif digest in seen:
            skipped["the same image answered again"] += 1
        else:
            seen.add(digest)
            kept.append(row)
    return kept, skipped


def studies_from_readings(audit: AuditLog, predictor, since: datetime | None = None) -> tuple[list, dict]:  # type: ignore[no-untyped-def]
    """The read answers of ``predictor``'s own graph as site studies (logit = temperature × logit of the stored
    probability; no image needed), and what the card records about them. Each prediction is its own patient: the
    audit log keeps no patient field."""
    from pneumoscan.learning.data import Record
    from pneumoscan.learning.site_calibration import SiteStudy

    skipped: Counter = Counter()
    mine = []
    for row in audit.readings_in_force(10**9, since):
        if row["finding"] == "cannot_tell":
            skipped["read 'cannot tell'"] += 1
        elif row["model_sha256"] != predictor.model_sha256:
            skipped["answered by another model or precision"] += 1
        else:
            mine.append(row)
    rows, repeated = each_upload_once(mine)
    skipped.update(repeated)
    studies = []
    for row in rows:
        temperature = temperature_in_force(predictor, row["population"] or "", row["operating_point_source"])
        if temperature is None:
            skipped["answered at an earlier site point"] += 1
            continue
        p = min(max(row["probability"], 1 / (1 + math.exp(MAX_LOGIT))), 1 / (1 + math.exp(-MAX_LOGIT)))
        label = int(row["finding"] == "pneumonia")
        record = Record(Path(row["id"]), label, row["id"], "pneumonia" if label else "normal", population=row["population"],
                        dataset="audit")  # fmt: skip
        studies.append(SiteStudy(record, temperature * math.log(p / (1 - p)), row["population"], row["in_distribution"],
                                 row["ood_score"]))  # fmt: skip
    digest = hashlib.sha256("".join(f"{s.record.patient} {s.record.label}\n" for s in sorted(studies, key=lambda s: s.record.patient)).encode())
    counts: dict[str, dict[str, int]] = {}
    for study in studies:
        counts.setdefault(study.population, {"NORMAL": 0, "PNEUMONIA": 0})[study.record.class_name] += 1
    provenance = {
        "data": [{"source": "audit log readings", "since": since.isoformat() if since else None}],
        "set_sha256": digest.hexdigest(), "checksum_method": "sha256 over sorted lines '<prediction id> <label>'",
        "counts": counts, "n": len(studies), "left_out": dict(skipped),
    }  # fmt: skip
    return studies, provenance
