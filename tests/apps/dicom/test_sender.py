"""The sender: several runs of outbox entries at once, a failed run kept for the next try, and C-STORE without Nagle."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from pacs import free_port
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pneumoscan.apps.dicom.outbox import BATCH, CStoreDestination, Outbox, Sender
from pneumoscan.errors import DeliveryError


def secondary_capture() -> Dataset:
    """A small valid Secondary Capture, enough for a C-STORE."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientID, dataset.Modality = "P", "OT"
    dataset.Rows = dataset.Columns = 4
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = bytes(16)
    return dataset


def filled_outbox(folder: Path, entries: int) -> Outbox:
    outbox = Outbox(folder)
    for index in range(entries):
        outbox.put(f"entry{index:03d}", [secondary_capture()])
    return outbox


class RunsAtOnce:
    """A destination whose runs must all be in flight together to pass a barrier; the run holding ``failing`` fails."""

    def __init__(self, runs: int, failing: str | None = None):
        self.together = threading.Barrier(runs, timeout=30)
        self.failing = failing
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def send_batches(self, batches):  # type: ignore[no-untyped-def]
        self.together.wait()  # a sender that sends one run after another never gets past this
        uids = [str(datasets[0].SOPInstanceUID) for datasets in batches]
        if self.failing in uids:
            raise DeliveryError("this run's association was lost")
        with self.lock:
            self.sent += uids
        return [None] * len(batches)


def test_runs_of_entries_go_at_once_and_a_failed_run_stays_for_the_next_try(tmp_path: Path) -> None:
    outbox = filled_outbox(tmp_path / "outbox", 2 * BATCH + 3)  # three runs: 16, 16 and 3 entries
    entries = outbox.pending()
    second_run = entries[BATCH : 2 * BATCH]
    failing = str(Outbox.read(second_run[0])[0].SOPInstanceUID)
    destination = RunsAtOnce(runs=3, failing=failing)
    delivered: list[str] = []
    sender = Sender(outbox, destination, on_delivered=delivered.append, associations=4)  # type: ignore[arg-type]
    with pytest.raises(DeliveryError, match="association was lost"):
        sender.deliver(entries)
    assert [p.name for p in outbox.pending()] == [p.name for p in second_run]  # only the failed run waits
    assert sorted(delivered) == sorted(p.name for p in entries if p not in second_run)
    assert len(destination.sent) == BATCH + 3 and sender.delivered == BATCH + 3


def test_one_association_sends_one_run_at_a_time(tmp_path: Path) -> None:
    outbox = filled_outbox(tmp_path / "outbox", BATCH + 1)
    destination = RunsAtOnce(runs=1)
    sender = Sender(outbox, destination, associations=1)  # type: ignore[arg-type]
    sender.deliver(outbox.pending()[:BATCH])
    assert len(destination.sent) == BATCH and len(outbox.pending()) == 1


def test_c_store_sends_without_waiting_for_delayed_acknowledgements(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Nagle's algorithm off on the sender's connection (TCP_NODELAY), checked on a real association to a pynetdicom SCP."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.association import Association

    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    nodelay: list[int] = []
    release = Association.release

    def release_and_note(self):  # type: ignore[no-untyped-def]
        nodelay.append(self.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return release(self)

    monkeypatch.setattr(Association, "release", release_and_note)
    try:
        assert CStoreDestination("PACS", "127.0.0.1", port).send_batches([[secondary_capture()]]) == [None]
    finally:
        server.shutdown()
    assert nodelay and nodelay[0] != 0
