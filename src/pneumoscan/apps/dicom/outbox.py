"""Sending results on: a queue on disk and one sender, to a PACS node (C-STORE) or a DICOMweb server (STOW-RS).

Results are written to the outbox before anything is sent, and leave it only once the
destination said it stored them, so a PACS that is down, restarted or slow loses nothing:
the sender retries with a growing pause (up to ``retry_max_seconds``), taking the results in
the order they were made (several runs of them at once, each in its own association), and
the node goes on receiving and scoring meanwhile. A retry after a
lost answer sends the same objects with the same SOP Instance UIDs (see
:mod:`pneumoscan.apps.dicom.results`), which a PACS stores once.

Layout: ``outbox/<entry>/{report,heatmap}.dcm``, each entry made in a temporary folder and
renamed into place whole; ``outbox/refused/<entry>/`` keeps what the destination refused
for good (a DICOM failure status, not a connection problem) with the reason beside it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from pneumoscan.errors import ConfigurationError, DeliveryError, DestinationRefused
from pneumoscan.files import write_atomically

log = logging.getLogger("pneumoscan.dicom")

#: An entry's files in sending order; the presentation state only when the model marked regions.
ENTRY_FILES = ("report.dcm", "heatmap.dcm", "presentation.dcm")
#: Entries sent in one association (C-STORE) or in a row (STOW-RS) before the outbox is looked at again.
BATCH = 16
REFUSED_DIR = "refused"


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM node that accepts C-STORE: ``AE_TITLE@host:port``."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "PNEUMOSCAN"
    timeout: float = 30.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port} (C-STORE)"

    def send(self, datasets: Sequence[Dataset]) -> None:
        outcome = self.send_batches([datasets])[0]
        if outcome is not None:
            raise outcome

    def send_batches(self, batches: Sequence[Sequence[Dataset]]) -> list[DestinationRefused | None]:
        """Several entries' objects in one association (one handshake, not one per study); a refusal per entry."""
        from pynetdicom import AE
        from pynetdicom.sop_class import (
            ComprehensiveSRStorage,
            GrayscaleSoftcopyPresentationStateStorage,
            SecondaryCaptureImageStorage,
        )

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        from pydicom.uid import (
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            JPEGBaseline8Bit,
        )

        ae.add_requested_context(ComprehensiveSRStorage)
        ae.add_requested_context(GrayscaleSoftcopyPresentationStateStorage)
        ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
        ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        association = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not association.is_established:
            raise DeliveryError(f"{self} did not accept an association")
        # pynetdicom leaves Nagle's algorithm on: each C-STORE's last segment then waited for the peer's delayed ACK
        # (Orthanc on loopback, 2026-12-07: 4.6 studies/s on one association with it, 7.4 without)
        association.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        outcomes: list[DestinationRefused | None] = []
        try:
            for datasets in batches:
                outcomes.append(None)
                for dataset in datasets:
                    status = association.send_c_store(dataset)
                    if not status:  # no answer: the association was aborted or timed out
                        raise DeliveryError(f"{self} gave no answer to C-STORE")
                    code = int(status.Status)
                    if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # success, or a warning (stored, with a remark)
                        outcomes[-1] = DestinationRefused(f"{self} refused {dataset.SOPClassUID.name} with status 0x{code:04X}")
                        break
        finally:
            association.release()
        return outcomes


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server's base URL (QIDO/WADO/STOW root), e.g. ``http://pacs:8042/dicom-web``."""

    url: str
    timeout: float = 30.0

    def __str__(self) -> str:
        return f"{self.url} (STOW-RS)"

    def send(self, datasets: Sequence[Dataset]) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url, timeout=self.timeout)
        try:
            client.store_instances(list(datasets))
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (408, 429) or status >= 500:
                raise DeliveryError(f"{self} answered HTTP {status}") from exc
            raise DestinationRefused(f"{self} refused the results: HTTP {status}") from exc
        except requests.exceptions.RequestException as exc:
            raise DeliveryError(f"{self} cannot be reached ({type(exc).__name__})") from exc

    def send_batches(self, batches: Sequence[Sequence[Dataset]]) -> list[DestinationRefused | None]:
        outcomes: list[DestinationRefused | None] = []
        for datasets in batches:
            try:
                self.send(datasets)
                outcomes.append(None)
            except DestinationRefused as exc:
                outcomes.append(exc)
        return outcomes


Destination = CStoreDestination | StowDestination
DESTINATION_FORM = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def parse_destination(text: str, calling_ae_title: str = "PNEUMOSCAN") -> Destination:
    """``AE_TITLE@host:port`` for C-STORE, ``http(s)://…`` for STOW-RS."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        return StowDestination(text.rstrip("/"))
    match = DESTINATION_FORM.match(text)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigurationError(
            f"the destination {text!r} is neither AE_TITLE@host:port (C-STORE, e.g. ORTHANC@pacs.local:4242) "
            "nor a DICOMweb URL (STOW-RS, e.g. http://pacs.local:8042/dicom-web)"
        )
    return CStoreDestination(match["aet"].strip(), match["host"].strip("[]"), int(match["port"]), calling_ae_title)


class Outbox:
    """Result objects waiting on disk for their destination."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._changed = threading.Condition()

    def put(self, entry: str, datasets: Sequence[Dataset], wake: bool = True) -> Path:
        """Keep ``datasets`` under ``entry``; an entry of the same name (the same results, made again) is replaced.

        ``wake=False`` for a put in another process, whose sender is not this object's: the caller wakes its own.
        """
        staging = self.folder / f".{entry}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        if not 0 < len(datasets) <= len(ENTRY_FILES):
            raise ValueError(f"an outbox entry holds 1 to {len(ENTRY_FILES)} results, not {len(datasets)}")
        for name, dataset in zip(ENTRY_FILES, datasets):
            write_atomically(staging / name, lambda path, d=dataset: d.save_as(path, enforce_file_format=True))
        target = self.folder / entry
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        if wake:
            self.wake()
        return target

    def pending(self) -> list[Path]:
        """Entries in the order they were made (oldest first); one delivered while they are listed is left out."""
        entries = []
        for path in self.folder.iterdir():
            if path.name.startswith(".") or path.name == REFUSED_DIR:
                continue
            try:
                made = path.stat()
            except FileNotFoundError:  # the sender delivered it in the meantime
                continue
            if stat.S_ISDIR(made.st_mode):
                entries.append((made.st_mtime_ns, path.name, path))
        return [path for *_, path in sorted(entries)]

    def refused(self) -> list[Path]:
        folder = self.folder / REFUSED_DIR
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def wait(self, timeout: float) -> None:
        """Until something is put (or :meth:`wake` is called), at most ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    @staticmethod
    def read(entry: Path) -> list[Dataset]:
        return [dcmread(entry / name) for name in ENTRY_FILES if (entry / name).is_file()]

    def done(self, entry: Path) -> None:
        shutil.rmtree(entry)

    def refuse(self, entry: Path, reason: str) -> None:
        target = self.folder / REFUSED_DIR / entry.name
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(entry, target)
        (target / "reason.txt").write_text(reason + "\n")


class Sender(threading.Thread):
    """Empties the outbox into the destination, oldest first; waits and retries while the destination is away.

    ``associations`` runs of up to ``BATCH`` entries go at once, each in an association (or a row of STOW-RS requests)
    of its own: a PACS stores an instance in tens of milliseconds, most of it waiting on its disk, so one connection
    at a time left both ends idle (Orthanc on loopback: 7.4 studies/s on one association, 28.7 on four).
    """

    def __init__(self, outbox: Outbox, destination: Destination, *, on_delivered: Callable[[str], None] | None = None,
                 on_refused: Callable[[str, str], None] | None = None, retry_max_seconds: float = 30.0,
                 associations: int = 1):  # fmt: skip
        super().__init__(name="pneumoscan-sender", daemon=True)
        self.outbox, self.destination = outbox, destination
        self.on_delivered, self.on_refused = on_delivered, on_refused
        self.retry_max_seconds = retry_max_seconds
        self.associations = max(1, associations)
        self.stopping = threading.Event()
        self.delivered = 0
        self.last_error: str | None = None

    def stop(self) -> None:
        self.stopping.set()
        with self.outbox._changed:
            self.outbox._changed.notify_all()

    def run(self) -> None:
        pause = 1.0
        while not self.stopping.is_set():
            entries = self.outbox.pending()
            if not entries:
                self.outbox.wait(timeout=5.0)
                continue
            try:
                self.deliver(entries[: BATCH * self.associations])
                pause = 1.0
            except DeliveryError as exc:
                if self.last_error != str(exc):
                    log.warning("results wait in the outbox (%d): %s; retrying every %.0f s at most",
                                len(entries), exc, self.retry_max_seconds)  # fmt: skip
                self.last_error = str(exc)
                self.stopping.wait(pause)
                pause = min(pause * 2, self.retry_max_seconds)
            except Exception:  # a bug of ours must not stop the sender: the entries stay, and are tried again later
                log.exception("results could not be sent; they stay in the outbox")
                self.stopping.wait(pause)
                pause = min(pause * 2, self.retry_max_seconds)

    def deliver(self, entries: list[Path]) -> None:
        """Send ``entries`` in up to ``associations`` runs at once; a run that fails leaves its entries for the next try
        and the others are settled all the same."""
        readable, batches = [], []
        for entry in entries:
            try:
                batches.append(self.outbox.read(entry))
                readable.append(entry)
            except Exception as exc:  # noqa: BLE001 - a damaged entry is kept aside; the others go on
                self._refuse(entry, f"unreadable: {type(exc).__name__}: {exc}")
        runs = [(readable[i : i + BATCH], batches[i : i + BATCH]) for i in range(0, len(readable), BATCH)]
        failure: Exception | None = None
        with ThreadPoolExecutor(max(1, len(runs)), thread_name_prefix="pneumoscan-send") as pool:
            sending = [pool.submit(self.destination.send_batches, run_batches) for _, run_batches in runs]
            for (run_entries, _), sent in zip(runs, sending, strict=True):
                try:
                    self._settle(run_entries, sent.result())
                except Exception as exc:  # noqa: BLE001 - the first failure is raised once every run is settled
                    failure = failure or exc
        if failure is not None:
            raise failure
        if self.last_error is not None:
            log.info("%s is back: results delivered again", self.destination)
            self.last_error = None

    def _settle(self, entries: list[Path], outcomes: list[DestinationRefused | None]) -> None:
        for entry, refusal in zip(entries, outcomes, strict=True):
            if refusal is not None:
                self._refuse(entry, str(refusal))
                continue
            if self.on_delivered:  # recorded first: a crash in between re-sends the entry, which the PACS keeps once
                self.on_delivered(entry.name)
            self.outbox.done(entry)
            self.delivered += 1

    def _refuse(self, entry: Path, reason: str) -> None:
        log.error("results %s kept in %s: %s", entry.name, self.outbox.folder / REFUSED_DIR, reason)
        self.outbox.refuse(entry, reason)
        if self.on_refused:
            self.on_refused(entry.name, reason)

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.outbox.pending():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
