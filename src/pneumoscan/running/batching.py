"""Dynamic batching: items that arrive close together go through the model together.

A model call on eight images costs far less than eight calls on one (the graph's fixed cost and
its weights' trips through the cache are paid once), but a service answers requests one at a
time. :class:`DynamicBatcher` sits between them: a request hands its item in and waits for its own
answer; workers each take the first waiting item, gather whatever else arrives within ``window``
seconds (up to ``max_batch``), and process them in one call. One item alone waits at most the
window, and not at all when the caller says nothing else is on its way (``expected``). A batch that fails is split and each item retried alone, so one bad item fails only its
own caller. Used by the web service and the DICOM node (through :func:`prediction_batcher`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from pneumoscan.errors import ConfigurationError
from pneumoscan.inputs.imaging import LoadedImage
from pneumoscan.running.inference import Prediction, Predictor

T = TypeVar("T")
R = TypeVar("R")

#: How long the first item of a batch waits for others, and how many a batch holds at most (settings override them).
DEFAULT_WINDOW_S = 0.005
DEFAULT_MAX_BATCH = 8


class BatcherClosed(RuntimeError):
    """The batcher was closed: no item is taken any more."""


class DynamicBatcher(Generic[T, R]):
    """``submit(item)`` gives a future of ``process([... item ...])``'s answer for that item.

    ``process`` takes a list of items and returns one answer per item, in order. ``workers``
    threads each form and process batches, so one batch is gathered while another runs.
    """

    def __init__(self, process: Callable[[list[T]], Sequence[R]], max_batch: int = DEFAULT_MAX_BATCH,
                 window: float = DEFAULT_WINDOW_S, workers: int = 1, name: str = "batcher",
                 on_batch: Callable[[int], None] | None = None, expected: Callable[[int], int] | None = None):  # fmt: skip
        """``expected(outstanding)``: how many items are on their way besides the ``outstanding`` ones submitted and
        not answered yet (e.g. uploads still being read); when none, a batch leaves without waiting for the window."""
        if max_batch < 1 or workers < 1 or window < 0:
            raise ConfigurationError("a batcher needs max_batch ≥ 1, workers ≥ 1 and a window ≥ 0 seconds")
        self.process, self.max_batch, self.window, self.on_batch = process, max_batch, window, on_batch
        self.expected = expected
        self.outstanding = 0  # submitted and not answered yet
        self.counting = threading.Lock()
        self.waiting: queue.SimpleQueue[tuple[T, Future[R]] | None] = queue.SimpleQueue()
        self.closed = False
        self.sizes: deque[int] = deque(maxlen=1000)  # the latest batches' sizes, for figures and tests
        self.threads = [threading.Thread(target=self.work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def submit(self, item: T) -> Future[R]:
        if self.closed:
            raise BatcherClosed("the batcher is closed")
        future: Future[R] = Future()
        with self.counting:
            self.outstanding += 1
        future.add_done_callback(self.answered)
        self.waiting.put((item, future))
        return future

    def answered(self, _: Future[R]) -> None:
        with self.counting:
            self.outstanding -= 1

    def __call__(self, item: T) -> R:
        """Submit and wait: for callers in threads (the DICOM node's workers)."""
        return self.submit(item).result()

    def close(self) -> None:
        """Finish what was submitted, then stop the workers."""
        self.closed = True
        for _ in self.threads:
            self.waiting.put(None)
        for thread in self.threads:
            thread.join()

    def work(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch, stop = self.gather(first)
            self.run(batch)
            if stop:
                return

    def gather(self, first: tuple[T, Future[R]]) -> tuple[list[tuple[T, Future[R]]], bool]:
        """The first item and those arriving within the window after it, up to ``max_batch``; and whether a stop came."""
        window = self.window if self.expected is None or self.expected(self.outstanding) > 0 else 0.0
        batch, deadline = [first], time.monotonic() + window
        while len(batch) < self.max_batch:
            try:
                entry = self.waiting.get_nowait() if window == 0 else self.waiting.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False

    def run(self, batch: list[tuple[T, Future[R]]]) -> None:
        batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.sizes.append(len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            answers = list(self.process([item for item, _ in batch]))
            if len(answers) != len(batch):
                raise RuntimeError(f"the batch's process gave {len(answers)} answers for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for item, future in batch:  # each alone: a bad item fails its own caller only
                self.run_alone(item, future)
            return
        for (_, future), answer in zip(batch, answers):
            future.set_result(answer)

    def run_alone(self, item: T, future: Future[R]) -> None:
        try:
            (answer,) = self.process([item])
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(answer)


@dataclass(frozen=True)
class Preprocessed:
    """One image ready for the model: its input tensor, its DICOM PatientAge (years) and its original size."""

    tensor: np.ndarray  # 3×H×W
    age_years: float | None
    size: tuple[int, int]

    @classmethod
    def of(cls, predictor: Predictor, loaded: LoadedImage) -> Preprocessed:
        """What :meth:`Predictor.predict_loaded` would feed the model, done in the caller's thread."""
        return cls(predictor.preprocess(loaded.image), loaded.age_years, loaded.image.size)


def prediction_batcher(predictor: Predictor, heatmap: bool = True, max_batch: int = DEFAULT_MAX_BATCH,
                       window: float = DEFAULT_WINDOW_S, workers: int = 1, name: str = "model",
                       on_batch: Callable[[int], None] | None = None,
                       expected: Callable[[int], int] | None = None) -> DynamicBatcher[Preprocessed, Prediction]:  # fmt: skip
    """A batcher of :class:`Preprocessed` images into :class:`~pneumoscan.running.inference.Prediction` s."""

    def predict(items: list[Preprocessed]) -> list[Prediction]:
        return predictor.predict_tensors(np.stack([item.tensor for item in items]), heatmap,
                                         ages=[item.age_years for item in items], sizes=[item.size for item in items])  # fmt: skip

    return DynamicBatcher(predict, max_batch, window, workers, name, on_batch, expected)


def group_commit(record_many: Callable[[list[T]], list[R]], max_batch: int = 64) -> DynamicBatcher[T, R]:
    """Group commit: the rows that wait while one commit syncs go into the next transaction together, with no window
    (a row alone is committed at once); each caller still returns only once its own row is on disk, and a batch whose
    commit fails is retried row by row (:class:`DynamicBatcher`)."""
    return DynamicBatcher(record_many, max_batch=max_batch, window=0.0, workers=1, name="pneumoscan-audit")
