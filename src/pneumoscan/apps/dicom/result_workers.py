"""Building and filing an instance's results in worker processes, so that the node's other work goes on meanwhile.

highdicom builds a structured report, a Secondary Capture and a presentation state in pure Python: about 70–100 ms a
study, the largest share of what the node does, and all of it under the interpreter's lock, which the node's receiving,
scoring and audit threads need too (py-spy on ``benchmarks/bench_dicom_node.py``). Worker processes each have a lock of
their own. A worker gets the header (read without its pixels), the decoded image and the prediction, builds the results
and writes them into the outbox entry (:meth:`Outbox.put`: synced, renamed into place whole), and answers only the UIDs
the audit row names. The node still waits for that answer before it writes the row, so "a delivery is recorded before
its entry leaves the outbox" and "acknowledged means kept" hold as before; a worker that dies (killed, out of memory)
fails only the instances it held, which the node tries again, and the pool is made anew.

``processes = 0`` builds in the calling thread, as before the pool existed. Workers are spawned, so a program that
starts a :class:`~pneumoscan.apps.dicom.node.DicomNode` itself must guard its entry point (``if __name__ ==
"__main__":``), as for any spawned process; ``pneumoscan dicom-node`` needs nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pneumoscan.apps.dicom.outbox import Outbox
from pneumoscan.apps.dicom.results import ModelIdentity, build_results
from pneumoscan.running.inference import Prediction
from pneumoscan.running.regions import Region

log = logging.getLogger("pneumoscan.dicom")


@dataclass(frozen=True)
class FiledResults:
    """What the audit row says of the results an outbox entry now holds."""

    report_uid: str
    heatmap_uid: str
    presentation_uid: str | None
    dropped: tuple[str, ...]


def build_and_file(outbox_folder: Path, entry: str, source: Dataset, image: Image.Image, prediction,  # type: ignore[no-untyped-def]
                   model: ModelIdentity) -> FiledResults:  # fmt: skip
    """Build the results of one scored instance and keep them in the outbox under ``entry``; runs in a worker process."""
    results = build_results(source, image, prediction, model)
    Outbox(outbox_folder).put(entry, list(results), wake=False)
    presentation = str(results.presentation.SOPInstanceUID) if results.presentation is not None else None
    return FiledResults(str(results.report.SOPInstanceUID), str(results.heatmap.SOPInstanceUID), presentation, results.dropped)


def start_worker(node_pid: int) -> None:
    """Load what building needs once, when a worker starts, and end the worker when the node is gone.

    A node killed (kill -9, the OOM killer) cannot shut its pool down, and a worker holds its own end of the task queue,
    so it would wait for work forever, keeping the node's log pipe open; it checks its parent once a second instead.
    """

    def exit_when_orphaned() -> None:
        while os.getppid() == node_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, name="pneumoscan-results-watchdog", daemon=True).start()
    warm_up()


def warm_up() -> None:
    """Build one throw-away set of results, so that the first study does not pay for what is loaded on first use.

    highdicom reads its tables of the standard (JSON, parsed on the first object made), and Pillow and pydicom load
    their encoders, on the first use: a quarter of a second a worker, which fell on the node's first studies. A failure
    here is only logged: the worker builds the real results all the same.
    """
    header = Dataset()
    header.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    header.SOPInstanceUID, header.StudyInstanceUID, header.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    header.Modality, header.Rows, header.Columns = "DX", 64, 64
    header.SamplesPerPixel, header.PhotometricInterpretation = 1, "MONOCHROME2"
    header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 8, 8, 7, 0
    prediction = Prediction(probability=0.5, label="PNEUMONIA", threshold=0.5, operating_point="warm-up", logit=0.0,
                            in_distribution=True, heatmap=np.zeros((8, 8), np.float32), population="adult",
                            regions=[Region(8, 8, 16, 16, 0.5)])  # fmt: skip
    try:
        build_results(header, Image.new("L", (64, 64)), prediction, ModelIdentity("warm-up", "0", "0" * 64))
    except Exception:  # noqa: BLE001 - a warm-up, not a result: nothing depends on it
        log.exception("a results worker could not warm up; its first study will load what it needs")


def worker_ready() -> int:
    """A worker's process id, once it has started and warmed up (a pool's tasks wait for its initializer)."""
    time.sleep(0.05)  # long enough for a second worker, starting at the same time, to take the next such task
    return os.getpid()


class ResultWorkers:
    """``file(...)`` builds and files one instance's results in one of ``processes`` worker processes and returns its UIDs."""

    def __init__(self, outbox: Outbox, model: ModelIdentity, processes: int):
        self.outbox, self.model, self.processes = outbox, model, processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 60.0) -> set[int]:
        """Spawn the workers and wait until each has warmed up (:func:`warm_up`), so the node's first studies need not;
        the process ids of those ready.

        A worker that is not ready within ``timeout`` seconds is not waited for: it serves once it is.
        """
        ready: set[int] = set()
        if self.processes == 0:
            return ready
        pool, deadline = self._running_pool(), time.monotonic() + timeout
        while len(ready) < self.processes and time.monotonic() < deadline:
            # each submit spawns a worker while none is idle; tasks go to the workers that are ready
            ready |= {task.result() for task in [pool.submit(worker_ready) for _ in range(self.processes)]}
        return ready

    def file(self, entry: str, source: Dataset, image: Image.Image, prediction) -> FiledResults:  # type: ignore[no-untyped-def]
        if self.processes == 0:
            filed = build_and_file(self.outbox.folder, entry, source, image, prediction, self.model)
        else:
            pool = self._running_pool()
            try:
                filed = pool.submit(build_and_file, self.outbox.folder, entry, source, image, prediction, self.model).result()
            except BrokenProcessPool:  # when the worker died, or had died before this instance came
                self._renew(pool)
                raise
        self.outbox.wake()
        return filed

    def _running_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the node has threads (pynetdicom, ONNX Runtime, SQLAlchemy) a fork would copy mid-step
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=start_worker, initargs=(os.getpid(),))  # fmt: skip
            return self._pool

    def _renew(self, broken: ProcessPoolExecutor) -> None:
        """A worker died: its pool refuses every later call, so the next call starts a new one (once per broken pool)."""
        with self._lock:
            if self._pool is broken:
                log.error("a results worker process died; its instances are tried again in a new pool")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
