"""Pull mode, for sites whose PACS cannot push: ``pneumoscan triage --dicomweb URL --since DATE``.

It asks the PACS (QIDO-RS) for the CR and DX series of studies dated ``--since`` or later,
retrieves the instances it does not have yet (WADO-RS) into ``<out>/dicomweb/`` (study /
series / instance), and the usual triage scores them, resuming as it always does. With
``--store-results`` each scored instance's structured report and heat map go back to the
PACS (STOW-RS), once: ``<out>/dicomweb/stored.json`` remembers what was stored, and the
result UIDs are fixed by instance and model, so a re-run that stores again still leaves
one copy.

The PACS may be broken or hostile, and the pull must end all the same, in bounded memory
(:class:`pneumoscan.config.PullLimits`): searches are paged up to a maximum count, every answer
is read a chunk at a time up to a byte limit and within a deadline for the whole request,
UIDs are checked before they name a file, and whatever goes wrong with one series or instance
(a malformed entry, HTML instead of DICOM, a part over the limit, a request that never ends) is
that item's failure, with its reason, while the rest goes on. Only a PACS that cannot be
reached at all (its first search fails) stops the pull, with exit code 3.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from tqdm import tqdm

from pneumoscan.apps.dicom.outbox import StowDestination
from pneumoscan.apps.dicom.results import ModelIdentity, build_results
from pneumoscan.config import PullLimits
from pneumoscan.errors import (
    ConfigurationError,
    DeliveryError,
    DestinationRefused,
    InputError,
    PacsUnavailable,
)
from pneumoscan.files import write_atomically
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.running.inference import Predictor

log = logging.getLogger("pneumoscan.dicom")

PULL_DIR = "dicomweb"
LEDGER = "stored.json"
MODALITIES = ("CR", "DX")
#: A DICOM UID (PS3.5 9.1): digits in components separated by single dots, at most 64 characters (leading zeros, which
#: some modalities write, are let through: harmless in a file name).
UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


class PullFailure(Exception):
    """One series or instance that could not be searched or fetched; its reason goes in the worklist."""


class Unreachable(PullFailure):
    """The request timed out, broke off or found no server: counts towards the PACS being down."""


@dataclass
class Failure:
    """What could not be pulled, and why: one row of the worklist."""

    where: str  # study/series[/instance] as the PACS named them (UIDs checked, or a placeholder)
    reason: str
    study_uid: str | None = None
    series_uid: str | None = None


@dataclass
class Pulled:
    """What a pull found and fetched, and what it could not."""

    series: int = 0
    instances: int = 0
    fetched: int = 0
    files: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def parse_since(text: str) -> date:
    """``YYYY-MM-DD``, ``YYYYMMDD`` or ``today``."""
    if text.strip().lower() == "today":
        return date.today()
    for form in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text.strip(), form).date()
        except ValueError:
            continue
    raise ConfigurationError(f"--since {text!r} is not a date: give YYYY-MM-DD (the studies' date, as the PACS has it) or 'today'")


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"--dicomweb {url!r} is not a DICOMweb URL: give its root, e.g. http://pacs:8042/dicom-web")
    return url.rstrip("/")


def safe_uid(value: object) -> str:
    """A UID as the PACS gave it, if it is one (then it is safe as a file name); PullFailure otherwise."""
    text = value if isinstance(value, str) else ""
    if not (0 < len(text) <= 64 and UID_TEXT.fullmatch(text)):
        raise PullFailure(f"the PACS gave a UID that is not one ({str(value)[:40]!r})")
    return text


def uid_of(entry: object, tag: str, name: str) -> str:
    """The UID under ``tag`` of one QIDO result (DICOM JSON), or PullFailure naming what is missing."""
    try:
        value = entry[tag]["Value"][0]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise PullFailure(f"a search result of the PACS has no {name}") from None
    return safe_uid(value)


class DicomwebReader:
    """QIDO-RS and WADO-RS reads, each bounded in bytes and in time, whatever the server does."""

    def __init__(self, url: str, limits: PullLimits):
        import requests

        self.url = check_url(url)
        self.limits = limits
        self.session = requests.Session()
        self.session.headers["Accept-Encoding"] = "identity"  # a compressed answer could inflate past what was counted
        self.failures_in_a_row = 0

    @property
    def down(self) -> bool:
        """Too many requests in a row timed out or broke off: the PACS is taken to be down for the rest of this run."""
        return self.failures_in_a_row >= self.limits.failures_in_a_row

    def get(self, path: str, accept: str, max_bytes: int, params: dict | None = None) -> tuple[str, bytes]:
        """The answer's content type and body; PullFailure when it is not 200, too large, or too slow."""
        import requests
        import urllib3

        deadline = time.monotonic() + self.limits.request_seconds
        read_timeout = max(1.0, min(10.0, self.limits.request_seconds))
        try:
            with self.session.get(f"{self.url}{path}", params=params, headers={"Accept": accept}, stream=True,
                                  timeout=(min(5.0, self.limits.request_seconds), read_timeout)) as response:  # fmt: skip
                if response.status_code == 204:  # a search that found nothing, as several PACS answer it
                    self.failures_in_a_row = 0
                    return "", b""
                if response.status_code != 200:
                    self.failures_in_a_row = 0  # it answered
                    raise PullFailure(f"the PACS answered HTTP {response.status_code}")
                body = bytearray()
                while chunk := response.raw.read1(1 << 16):
                    body += chunk
                    if len(body) > max_bytes:
                        self.failures_in_a_row = 0
                        raise PullFailure(f"the PACS's answer is larger than the limit of {max_bytes // 2**20} MB; not read further")
                    if time.monotonic() > deadline:
                        raise requests.exceptions.Timeout(f"not finished after {self.limits.request_seconds:.0f} s")
                content_type = response.headers.get("Content-Type", "")
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:  # the body is read from urllib3
            self.failures_in_a_row += 1
            raise Unreachable(f"the PACS did not answer in time or broke off ({type(exc).__name__}: {str(exc)[:120]})") from exc
        except OSError as exc:  # a connection reset while reading the body
            self.failures_in_a_row += 1
            raise Unreachable(f"the connection to the PACS broke off ({type(exc).__name__})") from exc
        self.failures_in_a_row = 0
        return content_type, bytes(body)

    def search(self, path: str, filters: dict[str, str], cap: int) -> list[object]:
        """A QIDO-RS search, a page at a time, up to ``cap`` results (stopping too when a page brings nothing new)."""
        results: list[object] = []
        seen: set[str] = set()
        while len(results) < cap:
            limit = min(self.limits.page_size, cap - len(results))
            content_type, body = self.get(path, "application/dicom+json", self.limits.max_query_bytes,
                                          {**filters, "limit": str(limit), "offset": str(len(results))})  # fmt: skip
            if not body.strip():  # 204 No Content, or a 200 with nothing in it
                break
            try:
                page = json.loads(body)
            except ValueError:
                raise PullFailure(f"the PACS answered a search with {content_type or 'no content type'}, not DICOM JSON") from None
            if not isinstance(page, list):
                raise PullFailure("the PACS answered a search with JSON that is not a list of results")
            fresh = [entry for entry in page if json.dumps(entry, sort_keys=True) not in seen]
            if not fresh:  # the server ignores the offset and sends the same page again
                break
            seen.update(json.dumps(entry, sort_keys=True) for entry in fresh)
            results += fresh[: cap - len(results)]
            if len(page) < limit:
                break
        return results

    def retrieve(self, study: str, series: str, sop: str) -> bytes:
        """One instance by WADO-RS, as the bytes of a DICOM file; PullFailure for anything else."""
        content_type, body = self.get(f"/studies/{study}/series/{series}/instances/{sop}", WADO_ACCEPT,
                                      self.limits.max_instance_bytes + 2**20)  # the multipart envelope  # fmt: skip
        data = first_part(content_type, body) if content_type.lower().startswith("multipart/") else body
        if not content_type.lower().startswith(("multipart/related", "application/dicom")):
            raise PullFailure(f"the PACS answered {content_type.split(';')[0] or 'without a content type'}, not DICOM")
        if len(data) > self.limits.max_instance_bytes:
            raise PullFailure(f"the instance is larger than the limit of {self.limits.max_instance_bytes // 2**20} MB")
        if not (len(data) > 132 and data[128:132] == b"DICM"):
            raise PullFailure("the PACS answered bytes that are not a DICOM file")
        return data


def first_part(content_type: str, body: bytes) -> bytes:
    """The body of the first part of a multipart/related answer (WADO-RS sends one instance per part).

    Found with ``bytes.find`` between the boundaries: one copy of the part, where the ``email``
    module would hold the whole answer as text several times over.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not match:
        raise PullFailure("the PACS's multipart answer names no boundary")
    delimiter = b"--" + match.group(1).strip().encode("latin-1", "replace")
    start = body.find(delimiter)
    headers_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    if headers_end < 0:
        raise PullFailure("the PACS's multipart answer has no part in it")
    end = body.find(b"\r\n" + delimiter, headers_end + 4)
    if end < 0:
        raise PullFailure("the PACS's multipart answer is cut off before its part ends")
    return body[headers_end + 4 : end]


def pull(url: str, since: date, out: Path, modalities: Sequence[str] = MODALITIES, progress: bool = True,
         limits: PullLimits | None = None) -> Pulled:  # fmt: skip
    """Fetch the CR/DX instances of studies dated ``since`` or later that ``out`` does not have yet.

    Raises :class:`PacsUnavailable` only when the PACS cannot be reached at all; everything else
    that goes wrong is one of ``Pulled.failures``.
    """
    limits = limits or PullLimits()
    reader = DicomwebReader(url, limits)
    folder = Path(out) / PULL_DIR
    found = Pulled()
    series = []
    for modality in modalities:
        try:
            series += reader.search("/series", {"Modality": modality, "StudyDate": f"{since:%Y%m%d}-"},
                                    limits.max_series - len(series))  # fmt: skip
        except PullFailure as exc:
            raise PacsUnavailable(f"the DICOMweb server at {url} cannot be searched: {exc}; check the URL and that the PACS "
                                  "is up, then run the same command again: what was fetched is kept") from exc  # fmt: skip
    found.series = len(series)
    seen: set[tuple[str, str]] = set()
    bar = tqdm(series, unit="series", desc="pull", disable=not progress)
    for index, entry in enumerate(bar, start=1):
        try:
            study, series_uid = uid_of(entry, STUDY_UID, "StudyInstanceUID"), uid_of(entry, SERIES_UID, "SeriesInstanceUID")
        except PullFailure as exc:
            found.failures.append(Failure(f"series search result {index}", str(exc)))
            continue
        if (study, series_uid) in seen:  # listed by two searches (a server that ignores the Modality filter)
            continue
        seen.add((study, series_uid))
        if reader.down or found.instances >= limits.max_instances:
            found.failures.append(Failure(f"{study}/{series_uid}", not_fetched_reason(reader), study, series_uid))
            continue
        try:
            instances = reader.search(f"/studies/{study}/series/{series_uid}/instances", {},
                                      limits.max_instances - found.instances)  # fmt: skip
        except PullFailure as exc:
            found.failures.append(Failure(f"{study}/{series_uid}", f"its instances cannot be listed: {exc}", study, series_uid))
            continue
        for number, instance in enumerate(instances, start=1):
            fetch_one(reader, folder, study, series_uid, instance, found, number)
    bar.close()
    if found.failures:
        log.warning("pull: %d series or instances could not be fetched (see the worklist's errors)", len(found.failures))
    return found


def not_fetched_reason(reader: DicomwebReader) -> str:
    limits = reader.limits
    if reader.down:
        return (f"not fetched: {limits.failures_in_a_row} requests in a row to the PACS timed out or broke off; "
                "run the same command again later")  # fmt: skip
    return f"not fetched: more than {limits.max_instances} instances since the date given; run again with a later --since"


def fetch_one(reader: DicomwebReader, folder: Path, study: str, series: str, instance: object, found: Pulled,
              number: int = 1) -> None:  # fmt: skip
    """One instance into ``folder`` (unless it is there already), or a failure with its reason."""
    where = f"{study}/{series}"
    try:
        sop = uid_of(instance, SOP_UID, "SOPInstanceUID")
    except PullFailure as exc:
        found.failures.append(Failure(f"{where}/instance search result {number}", str(exc), study, series))
        return
    path = folder / study / series / f"{sop}.dcm"
    found.instances += 1
    if path.is_file():
        found.files.append(path)
        return
    if reader.down:
        found.failures.append(Failure(f"{where}/{sop}", not_fetched_reason(reader), study, series))
        return
    try:
        data = reader.retrieve(study, series, sop)
    except PullFailure as exc:
        found.failures.append(Failure(f"{where}/{sop}", f"not fetched: {exc}", study, series))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
    found.files.append(path)
    found.fetched += 1


def read_ledger(out: Path) -> dict[str, str]:
    path = Path(out) / PULL_DIR / LEDGER
    return json.loads(path.read_text()) if path.is_file() else {}


def store_results(url: str, out: Path, rows: Sequence, predictor: Predictor, progress: bool = True) -> dict[str, int]:  # type: ignore[type-arg]
    """Send the results of the worklist's scored DICOM rows under ``out/dicomweb`` that are not stored yet."""
    from pydicom import dcmread

    folder = (Path(out) / PULL_DIR).resolve()
    destination = StowDestination(url.rstrip("/"))
    model = ModelIdentity.of_predictor(predictor)
    ledger = read_ledger(out)
    counts = {"stored": 0, "already": 0, "failed": 0}
    todo = [row for row in rows if row.status == "scored" and row.format == "dicom" and Path(row.path).resolve().is_relative_to(folder)]
    for row in tqdm(todo, unit="study", desc="store", disable=not progress):
        key = f"{row.sha256} {model.sha256}"
        if key in ledger:
            counts["already"] += 1
            continue
        try:
            data = Path(row.path).read_bytes()
            loaded = load_xray(data, predictor.limits)
            prediction = predictor.predict_loaded(loaded, heatmap=True)
            results = build_results(dcmread(row.path, stop_before_pixels=True), loaded.image, prediction, model)
            destination.send(list(results))
        except (DeliveryError, DestinationRefused, InputError, OSError) as exc:
            log.warning("results of %s not stored: %s", row.path, exc)
            counts["failed"] += 1
            continue
        ledger[key] = str(results.report.SOPInstanceUID)
        write_atomically(folder / LEDGER, json.dumps(ledger, indent=1) + "\n")
        counts["stored"] += 1
    return counts
