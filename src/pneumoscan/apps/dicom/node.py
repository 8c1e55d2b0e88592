"""``pneumoscan dicom-node``: a DICOM Storage SCP that scores the X-rays a modality or a PACS sends it.

Each received instance is written to disk as it arrives, a chunk at a time and within a byte
limit (:mod:`pneumoscan.apps.dicom.receiving`), synced and moved whole into a spool folder, and
only then acknowledged (C-STORE success), so an instance the sender was told is stored survives a
crash of the node: at start, whatever is left in the spool is processed; an instance whose scoring
failed for a reason of ours (the audit log away, a full disk) is tried again, with a growing pause. Scoring workers
take instances from the spool; each goes through the same loader, gate, population and
model as an upload (:func:`pneumoscan.inputs.imaging.load_xray`,
:class:`pneumoscan.running.inference.Predictor`) and ends as exactly one audit row
(``dicom_instances``): *scored* (with its ``predictions`` row, as an upload's), *refused*
(CT, lateral, not a chest, undecodable: the loader's reason, and no result object), or
*duplicate* (this model already scored that SOP Instance UID with the same pixels). A refusal
answers nothing: a later instance with the same UID is judged on its own. Results go to the
outbox (:mod:`pneumoscan.apps.dicom.outbox`) and on to the destination. Instances processed at
once share model calls and audit commits (:mod:`pneumoscan.running.batching`); their results are
built in worker processes (:mod:`pneumoscan.apps.dicom.result_workers`); each instance still leaves
the spool only once its own row is on disk.

The audit log keeps no patient field, as for uploads: the SOP Instance UID is stored as
its sha256, which is enough to find duplicates and to look a study up by its UID.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pneumoscan.apps.audit import AuditLog, connect, now, prediction_row, started_row, uid_digest
from pneumoscan.apps.dicom.outbox import (
    Destination,
    Outbox,
    Sender,
    parse_destination,
)
from pneumoscan.apps.dicom.receiving import Receipts, guarded_server_class, receive_chunked_into
from pneumoscan.apps.dicom.result_workers import ResultWorkers
from pneumoscan.apps.dicom.results import ModelIdentity, image_digest
from pneumoscan.apps.settings import DicomNodeSettings, is_loopback
from pneumoscan.errors import ConfigurationError, InputError
from pneumoscan.files import move_atomically
from pneumoscan.inputs.imaging import Limits, load_xray
from pneumoscan.running.batching import Preprocessed, group_commit, prediction_batcher
from pneumoscan.running.inference import Predictor

log = logging.getLogger("pneumoscan.dicom")

SCORED, REFUSED, DUPLICATE = "scored", "refused", "duplicate"
#: DIMSE statuses of C-STORE (PS3.4 B.2.3): stored, "out of resources" (the sender should try again later), and a
#: failure of the C000-CFFF range ("cannot understand"), which senders do not retry: the instance is over a limit.
SUCCESS, OUT_OF_RESOURCES, OVER_LIMIT = 0x0000, 0xA700, 0xC001
#: Pauses before scoring an instance again after a failure of ours (seconds; the last one repeats).
RETRY_PAUSES = (1.0, 2.0, 5.0, 15.0, 30.0)


@dataclass
class Counts:
    """What the node did since it started (logged at stop; the audit log has every instance)."""

    received: int = 0
    scored: int = 0
    refused: int = 0
    duplicate: int = 0
    delivered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: str) -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)


def results_entry(sop_digest: str, model_sha256: str) -> str:
    """The id of an instance's results: the same instance and model give the same id (and the same outbox entry)."""
    return hashlib.sha256(f"{sop_digest} {model_sha256}".encode()).hexdigest()[:32]


class DicomNode:
    """Receives, scores and answers; ``start()`` returns at once, ``stop()`` finishes what was received."""

    def __init__(self, settings: DicomNodeSettings, predictor: Predictor | None = None, audit: AuditLog | None = None):
        check_listening(settings)
        self.settings = settings
        self.limits = Limits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self.predictor = predictor or Predictor.load(settings.model_dir, settings.precision, settings.threads, self.limits)
        self.model = ModelIdentity.of_predictor(self.predictor)
        self.audit = audit or AuditLog(connect(settings.resolved_database_url))
        folder = settings.data_dir / "dicom"
        self.spool = folder / "incoming"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(folder / "outbox")
        self.destination: Destination | None = (
            parse_destination(settings.destination, settings.ae_title) if settings.destination else None
        )
        self.receipts = Receipts(folder / "receiving", settings.max_upload_bytes, settings.max_association_bytes)
        self.jobs: queue.Queue[Path | None] = queue.Queue()
        self.failures: dict[Path, int] = {}  # instances whose scoring failed for a reason of ours: tries so far
        self.retries: set[threading.Timer] = set()
        self.stopping = threading.Event()
        self.counts = Counts()
        self.in_flight: set[str] = set()  # SOP digests being scored now: a copy arriving meanwhile waits its turn
        self.in_flight_lock = threading.Condition()
        self.workers: list[threading.Thread] = []
        self.sender: Sender | None = None
        self.server = None
        # Instances processed at once share model calls (dynamic batching) and commits: the rows that wait while a
        # commit syncs go in the next transaction together. Each worker waits for its own row before it lets its
        # instance leave the spool, so "acknowledged means kept" holds; a batch that fails is retried row by row.
        self.scorer = prediction_batcher(self.predictor, heatmap=True, max_batch=settings.batch_size,
                                         window=settings.batch_window_ms / 1000, workers=settings.model_workers,
                                         name="pneumoscan-model", expected=self.instances_being_read)  # fmt: skip
        self.recorder = group_commit(self.audit.record_instances)
        self.results = ResultWorkers(self.outbox, self.model, settings.result_processes)
        self.reading = 0  # workers reading an instance, not yet at the model
        self.reading_lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        from pynetdicom import AE, evt

        self.audit.record_model_event(started_row(self.predictor, "dicom-node"))
        receive_chunked_into(self.receipts)
        self.results.start()
        for leftover in sorted(self.spool.glob("*.dcm")):  # received before a crash or a stop: nothing is lost
            self.jobs.put(leftover)
        for index in range(max(1, self.settings.workers)):
            worker = threading.Thread(target=self.work, name=f"pneumoscan-score-{index}", daemon=True)
            worker.start()
            self.workers.append(worker)
        if self.destination is not None:
            self.sender = Sender(self.outbox, self.destination, on_delivered=self.delivered,
                                 on_refused=self.refused_by_destination, retry_max_seconds=self.settings.retry_max_seconds,
                                 associations=self.settings.destination_associations)  # fmt: skip
            self.sender.start()
        ae = AE(ae_title=self.settings.ae_title)
        add_storage_contexts(ae)
        ae.require_called_aet = True
        if self.settings.allowed_calling_aes:
            ae.require_calling_aet = list(self.settings.allowed_calling_aes)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.acse_timeout = self.settings.association_request_timeout  # a connection that never asks is closed after it
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_CONN_CLOSE, lambda event: self.receipts.discard_unclaimed(event.assoc))]  # fmt: skip
        server_class = guarded_server_class(self.settings.max_connections_per_peer)
        self.server = ae.make_server((self.settings.dicom_host, self.settings.dicom_port), evt_handlers=handlers,
                                     server_class=server_class)  # fmt: skip
        ae._servers.append(self.server)  # what AE.start_server does, which takes no server class of its own
        threading.Thread(target=self.server.serve_forever, name="pneumoscan-dicom-listener", daemon=True).start()

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when the settings say 0)."""
        return self.server.server_address[1] if self.server else self.settings.dicom_port

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, score what was received, and give the sender ``timeout`` seconds to deliver."""
        if self.server is not None:
            self.server.shutdown()
        self.stopping.set()
        for timer in list(self.retries):  # instances waiting for another try stay in the spool for the next start
            timer.cancel()
        self.jobs.join()
        for _ in self.workers:
            self.jobs.put(None)
        for worker in self.workers:
            worker.join(timeout)
        self.scorer.close()
        self.recorder.close()
        self.results.close()
        if self.sender is not None:
            self.sender.drain(timeout)
            self.sender.stop()
            self.sender.join(timeout)
        log.info("stopped: %s; %d result sets still in the outbox", self.summary(), len(self.outbox.pending()))

    def summary(self) -> str:
        c = self.counts
        return f"{c.received} received, {c.scored} scored, {c.refused} refused, {c.duplicate} duplicates, {c.delivered} delivered"

    # ------------------------------------------------------------------ receiving

    def handle_store(self, event):  # type: ignore[no-untyped-def]
        """Keep the instance on disk, then acknowledge it; over a limit it is refused, the disk refusing it asks for a retry."""
        name = uuid.uuid4().hex
        received = Path(event.dataset_path)
        bounded = self.receipts.claim(event.assoc, received)
        if bounded is not None and bounded.over_limit:
            received.unlink(missing_ok=True)
            log.warning("refused an instance of %d MB or more from %s: over the limit of %d MB per instance "
                        "(%d MB per association)", bounded.received // 2**20, event.assoc.requestor.ae_title,
                        self.settings.max_upload_bytes // 2**20, self.settings.max_association_bytes // 2**20)  # fmt: skip
            if bounded.limit < self.settings.max_upload_bytes:  # what the association had left
                return failure(OVER_LIMIT, f"association over {self.settings.max_association_bytes // 2**20} MB: open a new one")
            return failure(OVER_LIMIT, f"over the limit of {self.settings.max_upload_bytes // 2**20} MB per instance")
        try:
            sidecar = {"calling_ae": str(event.assoc.requestor.ae_title).strip(), "received_at": now().isoformat()}
            (self.spool / f"{name}.json").write_text(json.dumps(sidecar))
            if bounded is not None:
                bounded.file.flush()
            move_atomically(received, self.spool / f"{name}.dcm")
        except OSError as exc:
            log.error("an instance could not be kept (%s): the sender is asked to retry", exc.strerror or type(exc).__name__)
            (self.spool / f"{name}.json").unlink(missing_ok=True)
            received.unlink(missing_ok=True)
            return OUT_OF_RESOURCES
        self.counts.add("received")
        self.jobs.put(self.spool / f"{name}.dcm")
        return SUCCESS

    # ------------------------------------------------------------------ scoring

    def work(self) -> None:
        while (path := self.jobs.get()) is not None:
            try:
                self.process(path)
                self.failures.pop(path, None)
            except Exception:  # a bug of ours, the audit log or the disk away: the node goes on, the instance is retried
                self.retry_later(path)
            finally:
                self.jobs.task_done()

    def retry_later(self, path: Path) -> None:
        """An acknowledged instance whose scoring failed is tried again, after a pause that grows, without a restart."""
        tries = self.failures[path] = self.failures.get(path, 0) + 1
        pause = RETRY_PAUSES[min(tries, len(RETRY_PAUSES)) - 1]
        log.exception("instance %s could not be processed (try %d); kept in %s and tried again in %.0f s",
                      path.name, tries, self.spool, pause)  # fmt: skip
        if self.stopping.is_set():
            return

        def again() -> None:
            self.retries.discard(timer)
            if not self.stopping.is_set() and path.is_file():
                self.jobs.put(path)

        timer = threading.Timer(pause, again)
        timer.daemon = True
        self.retries.add(timer)
        timer.start()

    def process(self, path: Path) -> str:
        """Score one spooled instance and write its one audit row; returns the outcome."""
        from pydicom.filereader import read_file_meta_info

        sidecar = read_sidecar(path)
        data = path.read_bytes()
        try:
            meta = read_file_meta_info(path)
            sop_uid, sop_class = str(meta.MediaStorageSOPInstanceUID), str(meta.MediaStorageSOPClassUID)
        except Exception:  # noqa: BLE001 - the node wrote this header itself; a file we cannot read back is refused
            sop_uid, sop_class = f"unreadable {path.name}", ""
        digest = uid_digest(sop_uid)
        with self.in_flight_lock:  # two copies of one instance at once: the second waits, then finds the first's row
            self.in_flight_lock.wait_for(lambda: digest not in self.in_flight)
            self.in_flight.add(digest)
        try:
            outcome = self._process(data, digest, sop_class, sidecar)
        finally:
            with self.in_flight_lock:
                self.in_flight.discard(digest)
                self.in_flight_lock.notify_all()
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        self.counts.add(outcome)
        return outcome

    def _process(self, data: bytes, digest: str, sop_class: str, sidecar: dict) -> str:
        row = {
            "id": uuid.uuid4().hex,
            "received_at": now(),
            "sop_instance_sha256": digest,
            "sop_class_uid": sop_class[:64],
            "calling_ae": sidecar.get("calling_ae", "")[:16],
            "model_sha256": self.model.sha256,
        }
        try:
            with self.counted_as_reading():
                loaded, source = self.load(data)
                ready = Preprocessed.of(self.predictor, loaded)
        except InputError as exc:  # a refusal answers nothing: the same UID with another content is judged on its own
            self.record({**row, "outcome": REFUSED, "reason": str(exc)[:512]})
            log.info("refused an instance from %s: %s", row["calling_ae"], exc)
            return REFUSED
        pixels = image_digest(loaded.image)
        row["pixels_sha256"] = pixels
        earlier = self.audit.scored_instance(digest, pixels, self.model.sha256)
        if earlier is not None:
            when = earlier["received_at"].isoformat(timespec="seconds") if earlier["received_at"] else "earlier"
            self.record({**row, "outcome": DUPLICATE, "reason": f"already scored on {when} "
                         f"(row {earlier['id']}) by this model, same pixels: not scored twice"})  # fmt: skip
            return DUPLICATE
        prediction = self.scorer(ready)
        entry = results_entry(f"{digest} {pixels}", self.model.sha256)
        # in the outbox before the row: a crash between the two re-scores it, never loses it
        filed = self.results.file(entry, source, loaded.image, prediction)
        upload = prediction_row(prediction, data, "dicom", self.model.as_dict())
        reason = f"header values left out of the results: {', '.join(filed.dropped)}"[:512] if filed.dropped else None
        self.record({**row, "id": entry, "outcome": SCORED, "prediction_id": upload["id"], "reason": reason,
                     "report_uid": filed.report_uid, "heatmap_uid": filed.heatmap_uid,
                     "presentation_uid": filed.presentation_uid}, upload)  # fmt: skip
        return SCORED

    def record(self, instance: dict, prediction: dict | None = None) -> None:
        """The instance's rows, committed with those of the instances processed beside it; returns once on disk."""
        self.recorder((instance, prediction))

    @contextlib.contextmanager
    def counted_as_reading(self) -> Iterator[None]:
        with self.reading_lock:
            self.reading += 1
        try:
            yield
        finally:
            with self.reading_lock:
                self.reading -= 1

    def instances_being_read(self, outstanding: int) -> int:
        """What a model batch may wait for: instances being read by other workers, or waiting in the queue."""
        return self.reading + self.jobs.qsize()

    def load(self, data: bytes):  # type: ignore[no-untyped-def]
        """The loader of every entry point, and the header again for the results; InputError for what it refuses."""
        from pydicom import dcmread

        loaded = load_xray(data, self.limits)
        if loaded.format != "dicom":
            raise InputError("a DICOM node scores DICOM instances only")
        try:
            source = dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:
            raise InputError(f"its header cannot be read again ({type(exc).__name__})") from exc
        return loaded, source

    # ------------------------------------------------------------------ delivery

    def delivered(self, entry: str) -> None:
        self.counts.add("delivered")
        self.audit.mark_delivered(entry, now())

    def refused_by_destination(self, entry: str, reason: str) -> None:
        self.audit.mark_delivery_refused(entry, reason[:512])


def failure(status: int, comment: str):  # type: ignore[no-untyped-def]
    """A C-STORE failure status with the reason the sender's log shows (Error Comment: 64 characters at most)."""
    from pydicom.dataset import Dataset

    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]
    return answer


def read_sidecar(path: Path) -> dict:
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def add_storage_contexts(ae) -> None:  # type: ignore[no-untyped-def]
    """Every storage SOP class in every transfer syntax pynetdicom knows: what to refuse is decided after reading."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)


def check_listening(settings: DicomNodeSettings) -> None:
    """DICOM has no passwords: beyond loopback, only the calling AE titles the site lists may send X-rays."""
    if settings.allowed_calling_aes or is_loopback(settings.dicom_host) or settings.unsafe_allow_any_calling_ae:
        return
    raise ConfigurationError(
        f"the DICOM node would listen on {settings.dicom_host} and accept X-rays from any AE title: list the senders with "
        "--allow-ae (PNEUMOSCAN_ALLOWED_CALLING_AES, e.g. MODALITY1,PACS), listen on 127.0.0.1, or set "
        "PNEUMOSCAN_UNSAFE_ALLOW_ANY_CALLING_AE=true if a firewall already does it"
    )


def run_node(settings: DicomNodeSettings, stop: threading.Event) -> DicomNode:
    """Start a node and serve until ``stop`` is set (or SIGINT/SIGTERM when run from the command line)."""
    node = DicomNode(settings)
    node.start()
    where = f"{settings.ae_title}@{settings.dicom_host}:{node.port}"
    to = str(node.destination) if node.destination else "nowhere yet (no --destination): results wait in the outbox"
    print(f"pneumoscan DICOM node {where}: model {node.model.name} ({node.predictor.precision}); results to {to}", flush=True)
    for population, entry in node.predictor.populations.items():
        print(f"  operating point for {population}: {entry.operating_point}, threshold {entry.threshold:.4f} ({entry.in_force})", flush=True)
    stop.wait()
    node.stop()
    print(f"pneumoscan DICOM node stopped: {node.summary()}", flush=True)
    return node
