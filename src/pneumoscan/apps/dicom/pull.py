"""Pull mode, for sites whose PACS cannot push: ``pneumoscan triage --dicomweb URL --since DATE``.

It asks the PACS (QIDO-RS) for the CR and DX series of studies dated ``--since`` or later,
retrieves the instances it does not have yet (WADO-RS) into ``<out>/dicomweb/`` (study /
series / instance), and the usual triage scores them, resuming as it always does. With
``--store-results`` each scored instance's structured report and heat map go back to the
PACS (STOW-RS), once: ``<out>/dicomweb/stored.json`` remembers what was stored, and the
result UIDs are fixed by instance and model, so a re-run that stores again still leaves
one copy.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from tqdm import tqdm

from pneumoscan.apps.dicom.outbox import StowDestination
from pneumoscan.apps.dicom.results import ModelIdentity, build_results
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
UID_TEXT = re.compile(r"^[0-9.]{1,64}$")


@dataclass
class Pulled:
    """What a pull found and fetched."""

    series: int = 0
    instances: int = 0
    fetched: int = 0
    files: list[Path] = field(default_factory=list)


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


def client_of(url: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"--dicomweb {url!r} is not a DICOMweb URL: give its root, e.g. http://pacs:8042/dicom-web")
    return DICOMwebClient(url.rstrip("/"), timeout=timeout)


def safe_uid(value: object) -> str:
    """A UID as a file name: digits and dots only, or the PACS sent something else and it is not used as a path."""
    text = str(value)
    if not UID_TEXT.match(text):
        raise PacsUnavailable(f"the PACS answered with a UID that is not one ({text[:40]!r})")
    return text


def pull(url: str, since: date, out: Path, modalities: Sequence[str] = MODALITIES, progress: bool = True) -> Pulled:
    """Fetch the CR/DX instances of studies dated ``since`` or later that ``out`` does not have yet."""
    import requests

    client = client_of(url)
    folder = Path(out) / PULL_DIR
    found = Pulled()
    try:
        series = [s for modality in modalities for s in client.search_for_series(
            search_filters={"Modality": modality, "StudyDate": f"{since:%Y%m%d}-"}, get_remaining=True)]  # fmt: skip
        found.series = len(series)
        for entry in tqdm(series, unit="series", desc="pull", disable=not progress):
            study, series_uid = safe_uid(entry["0020000D"]["Value"][0]), safe_uid(entry["0020000E"]["Value"][0])
            target = folder / study / series_uid
            instances = client.search_for_instances(study, series_uid, get_remaining=True)
            for instance in instances:
                sop = safe_uid(instance["00080018"]["Value"][0])
                path = target / f"{sop}.dcm"
                found.instances += 1
                found.files.append(path)
                if path.is_file():
                    continue
                dataset = client.retrieve_instance(study, series_uid, sop)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(path, lambda p, d=dataset: d.save_as(p, enforce_file_format=True))
                found.fetched += 1
    except requests.exceptions.RequestException as exc:
        raise PacsUnavailable(f"the DICOMweb server at {url} did not answer ({type(exc).__name__}: {str(exc)[:200]}); "
                              "check the URL and that the PACS is up, then run the same command again: what was "
                              "fetched is kept") from exc  # fmt: skip
    return found


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
