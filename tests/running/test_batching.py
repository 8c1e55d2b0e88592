"""Dynamic batching: answers as one at a time, errors kept to their own caller, nobody held past the window."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.errors import ConfigurationError
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.learning.data import list_records
from pneumoscan.running.batching import BatcherClosed, DynamicBatcher, Preprocessed, prediction_batcher
from pneumoscan.running.inference import Predictor


def test_concurrent_predictions_are_batched_and_equal_one_at_a_time(shipped_model: Path, data_root: Path) -> None:
    predictor = Predictor.load(shipped_model)
    records = list_records(data_root, "test")[::40][:16]
    loaded = [load_xray(r.path) for r in records]
    alone = [predictor.predict_loaded(image, heatmap=True) for image in loaded]
    batcher = prediction_batcher(predictor, max_batch=8, window=0.05)
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda image: batcher(Preprocessed.of(predictor, image)), loaded))
    finally:
        batcher.close()
    assert max(batcher.sizes) > 1, list(batcher.sizes)  # they really went through the model together
    for one, other in zip(alone, together, strict=True):
        assert other.label == one.label and other.population == one.population
        assert other.probability == pytest.approx(one.probability, abs=1e-5)
        assert other.ood_score == pytest.approx(one.ood_score, rel=1e-4, abs=1e-4)
        assert np.abs(other.heatmap - one.heatmap).max() < 1e-4
        boxes = lambda p: [[r.x, r.y, r.width, r.height, r.score] for r in p.regions]  # noqa: E731
        assert len(boxes(other)) == len(boxes(one)) and np.allclose(boxes(other), boxes(one), atol=1e-3)


def test_a_failing_item_fails_only_its_own_caller() -> None:
    def double(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("13 cannot be doubled")
        return [2 * i for i in items]

    batcher = DynamicBatcher(double, max_batch=8, window=0.05)
    try:
        futures = [batcher.submit(i) for i in (1, 13, 3, 4)]
        assert [f.result(timeout=5) for f in (futures[0], futures[2], futures[3])] == [2, 6, 8]
        with pytest.raises(ValueError, match="13 cannot"):
            futures[1].result(timeout=5)
    finally:
        batcher.close()


def test_one_item_alone_waits_no_longer_than_the_window() -> None:
    """A later request (or a slow upload still being read) does not hold an earlier one past the window."""
    window = 0.05
    batcher = DynamicBatcher(lambda items: list(items), max_batch=8, window=window)
    try:
        start = time.monotonic()
        first = batcher.submit("early")
        assert first.result(timeout=5) == "early"
        waited = time.monotonic() - start
        late = batcher.submit("late")  # arrives after the first batch left
        assert late.result(timeout=5) == "late"
    finally:
        batcher.close()
    assert waited < window + 0.04, waited
    assert list(batcher.sizes) == [1, 1]


def test_a_slow_batch_does_not_hold_the_next_one_with_two_workers() -> None:
    release = threading.Event()

    def process(items: list[str]) -> list[str]:
        if "slow" in items:
            release.wait(5)
        return items

    batcher = DynamicBatcher(process, max_batch=1, window=0.0, workers=2)
    try:
        slow = batcher.submit("slow")
        time.sleep(0.02)
        assert batcher.submit("quick").result(timeout=1) == "quick"
        assert not slow.done()
        release.set()
        assert slow.result(timeout=5) == "slow"
    finally:
        batcher.close()


def test_batches_hold_at_most_max_batch_and_a_closed_batcher_refuses() -> None:
    gate = threading.Event()
    batcher = DynamicBatcher(lambda items: (gate.wait(5), list(items))[1], max_batch=3, window=0.05)
    futures = [batcher.submit(i) for i in range(7)]
    gate.set()
    assert [f.result(timeout=5) for f in futures] == list(range(7))
    assert max(batcher.sizes) <= 3 and sum(batcher.sizes) == 7
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(8)
    with pytest.raises(ConfigurationError):
        DynamicBatcher(lambda items: items, max_batch=0)


def test_with_nothing_else_on_its_way_an_item_leaves_without_waiting_for_the_window() -> None:
    on_their_way = [0]
    batcher = DynamicBatcher(lambda items: list(items), max_batch=8, window=1.0, expected=lambda outstanding: on_their_way[0])
    try:
        start = time.monotonic()
        assert batcher.submit("alone").result(timeout=5) == "alone"
        assert time.monotonic() - start < 0.5  # not the 1 s window
        on_their_way[0] = 1  # another caller is still preparing its item: the first waits for it
        first = batcher.submit("first")
        time.sleep(0.1)
        second = batcher.submit("second")
        assert (first.result(timeout=5), second.result(timeout=5)) == ("first", "second")
    finally:
        batcher.close()
    assert list(batcher.sizes) == [1, 2] and batcher.outstanding == 0
