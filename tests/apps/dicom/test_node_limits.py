"""The DICOM node under hostile or broken input (issue 27): size, connections, refused copies, our own failures, headers.

Each test failed on the node before issue 27: a 400 MB instance cost +787 MB and was read whole,
50 idle connections kept the listed sender out for 30 s, a refused copy made the real study a
"duplicate", an instance whose scoring failed waited for a restart, and a PatientSex of "Q" lost
the results.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from dicom_factory import JPEG_2000_LOSSLESS, large_dicom, radiograph_dataset, write_huge_dicom
from pacs import dcmtk, free_port
from pynetdicom import AE, StoragePresentationContexts, _config
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from pneumoscan.apps.audit import AuditLog, connect
from pneumoscan.apps.dicom.node import DUPLICATE, OVER_LIMIT, REFUSED, SCORED, DicomNode
from pneumoscan.apps.settings import DicomNodeSettings
from pneumoscan.config import MAX_INPUT_PIXELS
from pneumoscan.errors import DatabaseUnavailableError
from pneumoscan.learning.data import list_records
from pneumoscan.running.inference import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def films(data_root: Path) -> list[Path]:
    records = list_records(data_root, "test")
    return [r.path for r in records if r.class_name == "PNEUMONIA"][:4]


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


def start_node(tmp_path: Path, predictor: Predictor, audit: AuditLog | None = None, **settings: object) -> DicomNode:
    node = DicomNode(DicomNodeSettings(dicom_port=0, data_dir=tmp_path / "node", **settings), predictor, audit)
    node.start()
    return node


def send(port: int, datasets: list, calling: str = "MODALITY") -> list:  # type: ignore[type-arg]
    """C-STORE each dataset (or file path, in Explicit VR Little Endian) in one association; each answer's status."""
    ae = AE(ae_title=calling)
    if any(isinstance(d, Path) for d in datasets):  # a file is sent as it is: the context must be its transfer syntax
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    else:
        ae.requested_contexts = StoragePresentationContexts
    association = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    assert association.is_established, "the node refused the association"
    answers = [association.send_c_store(dataset) for dataset in datasets]
    association.release()
    return answers


def wait_for(condition, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def peak_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


@contextlib.contextmanager
def command_line_node(tmp_path: Path, model: Path, **env: str):  # type: ignore[no-untyped-def]
    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "pneumoscan", "dicom-node", "--port", str(port), "--model", str(model),
                             "--data-dir", str(tmp_path / "node")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PNEUMOSCAN_ALLOWED_CALLING_AES": "MODALITY,STORESCU", **env})  # fmt: skip
    try:
        assert node.stdout.readline().startswith("pneumoscan DICOM node"), "the node did not start"
        yield node, port
    finally:
        node.terminate()
        node.communicate(timeout=60)


def test_a_400_mb_instance_is_refused_with_a_failure_status_and_costs_the_node_no_memory(tmp_path, films, shipped_model) -> None:
    """And an honest JPEG 2000 film at the pixel limit (a 3 MB file of 30 M pixels) is scored within +250 MB."""
    huge = write_huge_dicom(tmp_path / "huge.dcm")
    honest = tmp_path / "honest.dcm"
    width = int((MAX_INPUT_PIXELS * 10 / 11) ** 0.5)
    honest.write_bytes(large_dicom(width, MAX_INPUT_PIXELS // width, JPEG_2000_LOSSLESS))
    with command_line_node(tmp_path, shipped_model) as (node, port):
        assert [int(a.Status) for a in send(port, [radiograph_dataset(films[0], size=512)])] == [0]  # warm: model, decoders
        time.sleep(3)
        before = peak_mb(node.pid)
        _config.STORE_SEND_CHUNKED_DATASET = True  # the sender streams the file from disk, as a PACS does
        try:
            (answer,) = send(port, [huge])
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assert int(answer.Status) == OVER_LIMIT and "limit" in answer.get("ErrorComment", ""), answer
        refused_growth = peak_mb(node.pid) - before
        assert refused_growth < 100, f"+{refused_growth:.0f} MB for a refused 400 MB instance"
        assert list((tmp_path / "node" / "dicom" / "receiving").iterdir()) == []  # nothing of it kept on disk
        sent = subprocess.run([dcmtk("storescu"), "-xv", "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port), str(honest)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        audit = AuditLog(connect(f"sqlite:///{tmp_path / 'node' / 'pneumoscan.db'}"))
        assert wait_for(lambda: len(audit.instances()) == 2, 120), audit.instances()
        assert [row["outcome"] for row in audit.instances()] == [SCORED, SCORED]
        growth = peak_mb(node.pid) - before
        assert growth <= 250, f"+{growth:.0f} MB for a {honest.stat().st_size / 1e6:.1f} MB JPEG 2000 of {MAX_INPUT_PIXELS:,} pixels"


def test_idle_connections_do_not_keep_a_listed_sender_out(tmp_path, predictor) -> None:
    """50 TCP connections that never ask for an association, from one address and then from 50: C-ECHO within 2 s."""
    node = start_node(tmp_path, predictor, allowed_calling_aes=["MODALITY"], association_request_timeout=3.0)
    idle: list[socket.socket] = []
    try:
        for sources in (["127.0.0.2"] * 50, [f"127.0.1.{i}" for i in range(1, 51)]):
            for source in sources:
                connection = socket.socket()
                connection.bind((source, 0))
                connection.connect(("127.0.0.1", node.port))
                idle.append(connection)
            time.sleep(0.3)
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(Verification)
            started = time.monotonic()
            association = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
            assert association.is_established, "the listed sender was rejected"
            status = association.send_c_echo()
            association.release()
            took = time.monotonic() - started
            assert status and int(status.Status) == 0 and took < 2.0, f"C-ECHO took {took:.1f} s"
        # a connection that never sends an A-ASSOCIATE-RQ is closed by the node after association_request_timeout
        last = idle[-1]
        last.settimeout(10)
        started = time.monotonic()
        assert last.recv(1) == b"" and time.monotonic() - started < 6
    finally:
        for connection in idle:
            connection.close()
        node.stop()


def test_a_refused_copy_never_blocks_the_real_study_with_the_same_uid(tmp_path, films, predictor) -> None:
    node = start_node(tmp_path, predictor)
    try:
        hand = radiograph_dataset(films[0], body_part="HAND", modality="CR")
        chest = radiograph_dataset(films[0])
        chest.SOPInstanceUID = chest.file_meta.MediaStorageSOPInstanceUID = hand.SOPInstanceUID
        other_pixels = radiograph_dataset(films[1])
        other_pixels.SOPInstanceUID = other_pixels.file_meta.MediaStorageSOPInstanceUID = hand.SOPInstanceUID
        for dataset in (hand, chest, chest, other_pixels):  # one at a time: the order of the rows is the order sent
            assert [int(a.Status) for a in send(node.port, [dataset])] == [0]
            node.jobs.join()
        rows = node.audit.instances()
        assert [row["outcome"] for row in rows] == [REFUSED, SCORED, DUPLICATE, SCORED], [(r["outcome"], r["reason"]) for r in rows]
        assert "hand" in rows[0]["reason"].lower() and "same pixels" in rows[2]["reason"]
        entries = node.outbox.pending()
        assert len(entries) == 2  # the chest film and the other image have results of their own, the copy none
    finally:
        node.stop()


class FlakyAudit(AuditLog):
    """The audit database away for the first ``failures`` writes, then back."""

    def __init__(self, engine, failures: int):  # type: ignore[no-untyped-def]
        super().__init__(engine)
        self.failures = failures

    def record_instances(self, rows):  # type: ignore[no-untyped-def]
        if self.failures > 0:
            self.failures -= 1
            raise DatabaseUnavailableError("the audit database is away (test)")
        return super().record_instances(rows)


def test_an_acknowledged_instance_is_scored_once_the_audit_log_is_back_without_a_restart(tmp_path, films, predictor) -> None:
    audit = FlakyAudit(connect(f"sqlite:///{tmp_path / 'audit.db'}"), failures=2)
    node = start_node(tmp_path, predictor, audit=audit)
    try:
        study = radiograph_dataset(films[2])
        assert [int(a.Status) for a in send(node.port, [study])] == [0]  # acknowledged: on disk
        # the spooled file is removed just after the row is committed: wait for both, or the check races the node
        assert wait_for(lambda: [r["outcome"] for r in audit.instances()] == [SCORED] and not list(node.spool.glob("*.dcm")),
                        20), (audit.instances(), list(node.spool.glob("*.dcm")))  # fmt: skip
        assert audit.failures == 0
        assert len(node.outbox.pending()) == 1  # its results, once, though it was tried three times
    finally:
        node.stop()


class SlowCommits(AuditLog):
    """Each commit takes 0.3 s (a slow disk's sync): rows of instances finished meanwhile queue for the next one."""

    def record_instances(self, rows):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return super().record_instances(rows)


class FirstBatchFails(SlowCommits):
    """The first commit of more than one instance fails (the database away for it); later ones go through."""

    failed = False

    def record_instances(self, rows):  # type: ignore[no-untyped-def]
        if len(rows) > 1 and not self.failed:
            self.failed = True
            raise DatabaseUnavailableError("the audit database is away for this batch (test)")
        return super().record_instances(rows)


def chest_studies(data_root: Path, n: int) -> list:  # type: ignore[type-arg]
    return [radiograph_dataset(r.path, size=512) for r in list_records(data_root, "test")[::37][:n]]


@pytest.mark.parametrize("audit_kind", [SlowCommits, FirstBatchFails])
def test_instances_processed_together_share_model_calls_and_commits_and_each_ends_as_one_row(
        tmp_path, data_root, predictor, audit_kind) -> None:  # fmt: skip
    """Rows that wait while a commit syncs go in the next transaction together; a batch whose commit fails is retried
    row by row: every acknowledged instance ends as exactly one row with its prediction, its results once."""
    audit = audit_kind(connect(f"sqlite:///{tmp_path / 'audit.db'}"))
    node = start_node(tmp_path, predictor, audit=audit, workers=4)
    studies = chest_studies(data_root, 10)
    try:
        assert [int(a.Status) for a in send(node.port, studies)] == [0] * len(studies)  # acknowledged: on disk
        node.jobs.join()
        rows = audit.instances()
        assert sorted(r["outcome"] for r in rows) == [SCORED] * len(studies)
        assert len({r["sop_instance_sha256"] for r in rows}) == len(studies)  # one row each, none twice
        assert all(audit.get(r["prediction_id"]) is not None for r in rows)  # each with its prediction's row
        assert list(node.spool.glob("*.dcm")) == [] and len(node.outbox.pending()) == len(studies)
        assert max(node.recorder.sizes) > 1, list(node.recorder.sizes)  # one commit for several instances
        assert sum(node.scorer.sizes) == len(studies)
        if audit_kind is FirstBatchFails:
            assert audit.failed
    finally:
        node.stop()


def test_a_node_killed_while_batches_are_in_flight_loses_nothing_and_scores_nothing_twice(tmp_path, data_root,
                                                                                          shipped_model) -> None:  # fmt: skip
    """kill -9 of the command-line node right after the last acknowledgement, with instances mid-batch (scored but not
    committed, committed but still in the spool, not read yet), then a restart on the same folder: every acknowledged
    instance ends scored exactly once, with one outbox entry; one committed before the kill and met again is a duplicate."""
    studies = chest_studies(data_root, 12)
    # A batch waits up to 1 s for the instances still arriving: at the kill, batches are being gathered or scored.
    with command_line_node(tmp_path, shipped_model, PNEUMOSCAN_BATCH_WINDOW_MS="1000") as (node, port):
        assert [int(a.Status) for a in send(port, studies)] == [0] * len(studies)  # acknowledged: on disk
        node.kill()
        node.wait(timeout=30)
    audit = AuditLog(connect(f"sqlite:///{tmp_path / 'node' / 'pneumoscan.db'}"))
    uids = {str(study.SOPInstanceUID) for study in studies}
    scored_before = {r["sop_instance_sha256"] for r in audit.instances() if r["outcome"] == SCORED}
    assert len(scored_before) < len(uids), "the kill came after every instance was done: nothing was in flight"
    with command_line_node(tmp_path, shipped_model):
        assert wait_for(lambda: len(audit.instances()) >= len(uids) and not list((tmp_path / "node" / "dicom" / "incoming").glob("*.dcm")), 120)
    rows = audit.instances()
    scored = [r["sop_instance_sha256"] for r in rows if r["outcome"] == SCORED]
    assert sorted(scored) == sorted(set(scored)) and len(scored) == len(uids), [(r["outcome"], r["reason"]) for r in rows]
    assert {r["outcome"] for r in rows} <= {SCORED, DUPLICATE}
    assert all(audit.get(r["prediction_id"]) is not None for r in rows if r["outcome"] == SCORED)
    outbox = [p for p in (tmp_path / "node" / "dicom" / "outbox").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(outbox) == len(uids)  # results made again for a re-scored instance replace its entry, never add one


def test_an_acknowledged_instance_is_scored_once_the_disk_has_room_again(tmp_path, films, predictor, monkeypatch) -> None:
    """The outbox's disk full (ENOSPC) for the first two tries: the instance stays in the spool and is retried."""
    import errno

    from pneumoscan.apps.dicom.outbox import Outbox

    put, failures = Outbox.put, [2]

    def full_then_room(self, entry, datasets, wake=True):  # type: ignore[no-untyped-def]
        if failures[0] > 0:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return put(self, entry, datasets, wake)

    monkeypatch.setattr(Outbox, "put", full_then_room)
    node = start_node(tmp_path, predictor, result_processes=0)  # the patched put runs where the results are filed
    try:
        assert [int(a.Status) for a in send(node.port, [radiograph_dataset(films[1])])] == [0]
        # the spooled file is removed just after the row is committed: wait for both, or the check races the node
        assert wait_for(lambda: [r["outcome"] for r in node.audit.instances()] == [SCORED] and not list(node.spool.glob("*.dcm")),
                        20), (node.audit.instances(), list(node.spool.glob("*.dcm")))  # fmt: skip
        assert failures == [0] and len(node.outbox.pending()) == 1
    finally:
        node.stop()


@pytest.mark.parametrize("keyword, value", [("PatientSex", "Q"), ("StudyDate", "20261399"), ("StudyTime", "99xx"),
                                            ("PatientBirthDate", "1970-01-01")])  # fmt: skip
def test_header_values_highdicom_rejects_never_cost_the_results(tmp_path, films, predictor, keyword, value) -> None:
    node = start_node(tmp_path, predictor)
    try:
        study = radiograph_dataset(films[3])
        setattr(study, keyword, value)
        assert [int(a.Status) for a in send(node.port, [study])] == [0]
        node.jobs.join()
        (row,) = node.audit.instances()
        assert row["outcome"] == SCORED and keyword in row["reason"], row
        (entry,) = node.outbox.pending()
        objects = [pydicom.dcmread(path) for path in sorted(entry.glob("*.dcm"))]
        assert sorted(o.Modality for o in objects) == ["OT", "SR"]
        for result in objects:
            assert result.StudyInstanceUID == study.StudyInstanceUID and result.get(keyword, "") == ""
    finally:
        node.stop()


def test_an_association_past_its_byte_limit_gets_failure_statuses_and_a_new_one_is_served(tmp_path, films, predictor) -> None:
    study = radiograph_dataset(films[0])
    size = len(study.PixelData)
    node = start_node(tmp_path, predictor, max_association_bytes=int(size * 1.5))
    try:
        answers = send(node.port, [radiograph_dataset(films[i % len(films)]) for i in range(3)])
        assert [int(a.Status) for a in answers] == [0, OVER_LIMIT, OVER_LIMIT], answers
        assert answers[1].ErrorComment.startswith("association over") and "open a new one" in answers[1].ErrorComment
        assert [int(a.Status) for a in send(node.port, [study])] == [0]  # the limit is per association
        node.jobs.join()
        assert [row["outcome"] for row in node.audit.instances()] == [SCORED, SCORED]
        assert list((tmp_path / "node" / "dicom" / "receiving").iterdir()) == []
    finally:
        node.stop()


def test_results_stay_in_the_source_study_whatever_its_uid_looks_like(films, predictor) -> None:
    """A UID with leading zeros (some modalities write them) is kept; a missing one is derived, the same each time."""
    import io

    from pneumoscan.apps.dicom.results import ModelIdentity, build_results
    from pneumoscan.inputs.imaging import load_xray

    model = ModelIdentity.of_predictor(predictor)
    study = radiograph_dataset(films[0])
    study.StudyInstanceUID = "1.2.840.0113654.2.70.1.123"
    buffer = io.BytesIO()
    study.save_as(buffer, enforce_file_format=True)
    loaded = load_xray(buffer.getvalue())
    prediction = predictor.predict_loaded(loaded, heatmap=True)
    header = pydicom.dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)
    results = build_results(header, loaded.image, prediction, model)
    assert results.dropped == () and {o.StudyInstanceUID for o in results} == {study.StudyInstanceUID}
    del header.StudyInstanceUID
    first, again = build_results(header, loaded.image, prediction, model), build_results(header, loaded.image, prediction, model)
    assert "StudyInstanceUID" in first.dropped and first.report.StudyInstanceUID == first.heatmap.StudyInstanceUID
    assert first.report.StudyInstanceUID == again.report.StudyInstanceUID  # one derived study for both objects, every time


def test_the_node_takes_a_film_in_pdus_as_large_as_its_setting(tmp_path, films, predictor) -> None:
    """A 1 MB film in 1 MB PDUs, not 64 of 16 KB each decoded in Python; the instance arrives whole all the same."""
    node = start_node(tmp_path, predictor, max_pdu_bytes=2**20)
    try:
        ae = AE(ae_title="MODALITY")
        ae.requested_contexts = StoragePresentationContexts
        association = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert association.is_established and association.acceptor.maximum_length == 2**20
        assert int(association.send_c_store(radiograph_dataset(films[0], size=1024)).Status) == 0
        association.release()
        assert wait_for(lambda: [r["outcome"] for r in node.audit.instances()] == [SCORED], 30), node.audit.instances()
    finally:
        node.stop()
