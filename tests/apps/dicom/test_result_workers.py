"""Results built and filed in worker processes: the same objects as in the node's own thread, and a dead worker costs
only the instances it held."""

from __future__ import annotations

import io
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from dicom_factory import radiograph_dataset
from pydicom import dcmread
from pydicom.dataset import Dataset

from pneumoscan.apps.dicom.outbox import ENTRY_FILES, Outbox
from pneumoscan.apps.dicom.result_workers import ResultWorkers, warm_up
from pneumoscan.apps.dicom.results import ModelIdentity
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.learning.data import list_records
from pneumoscan.running.inference import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored(data_root: Path, shipped_model: Path):  # type: ignore[no-untyped-def]
    """A pneumonia film as a DICOM header, its decoded image and its prediction (with heat map and regions)."""
    predictor = Predictor.load(shipped_model)
    film = next(r.path for r in list_records(data_root, "test") if r.class_name == "PNEUMONIA")
    buffer = io.BytesIO()
    radiograph_dataset(film, size=512, age_years=6).save_as(buffer, enforce_file_format=True)
    loaded = load_xray(buffer.getvalue())
    header = dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)
    return header, loaded.image, predictor.predict_loaded(loaded, heatmap=True), ModelIdentity.of_predictor(predictor)


#: Stamped with the time each object is made: the only attributes two builds of the same results may differ in.
MADE_AT = frozenset({"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "DateOfSecondaryCapture",
                     "TimeOfSecondaryCapture", "ContributionDateTime"})  # fmt: skip


def entry_objects(entry: Path) -> dict[str, Dataset]:
    """An entry's objects, without the times they were made at (at any depth)."""

    def drop_time(dataset: Dataset, element) -> None:  # type: ignore[no-untyped-def]
        if element.keyword in MADE_AT:
            del dataset[element.tag]

    objects = {name: dcmread(entry / name) for name in ENTRY_FILES if (entry / name).is_file()}
    for dataset in objects.values():
        dataset.walk(drop_time)
    return objects


def test_a_worker_process_files_the_same_results_as_the_node_thread(scored, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    header, image, prediction, model = scored
    in_thread, in_process = Outbox(tmp_path / "thread"), Outbox(tmp_path / "process")
    here = ResultWorkers(in_thread, model, processes=0).file("entry", header, image, prediction)
    workers = ResultWorkers(in_process, model, processes=1)
    try:
        there = workers.file("entry", header, image, prediction)
    finally:
        workers.close()
    assert there == here  # the UIDs the audit row names, and the header values left out
    assert [p.name for p in in_process.pending()] == ["entry"]  # filed whole, where the sender looks
    objects = entry_objects(in_process.folder / "entry")
    assert objects == entry_objects(in_thread.folder / "entry")  # the same report, picture (pixels included) and presentation
    assert objects["report.dcm"].SOPInstanceUID == here.report_uid
    assert len(objects) == (3 if prediction.regions else 2)


def test_a_dead_worker_fails_only_its_instance_and_the_next_one_gets_a_new_pool(scored, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    header, image, prediction, model = scored
    outbox = Outbox(tmp_path / "outbox")
    workers = ResultWorkers(outbox, model, processes=1)
    try:
        workers.file("first", header, image, prediction)
        for process in list(workers._pool._processes.values()):  # type: ignore[union-attr] # killed as the OOM killer would
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
        with pytest.raises(BrokenProcessPool):
            workers.file("second", header, image, prediction)
        filed = workers.file("third", header, image, prediction)
    finally:
        workers.close()
    assert filed.report_uid and (outbox.folder / "third" / "report.dcm").is_file()
    assert {p.name for p in outbox.pending()} == {"first", "third"}  # nothing half-written under "second"


def test_start_waits_for_every_worker_to_warm_up(tmp_path: Path) -> None:
    workers = ResultWorkers(Outbox(tmp_path), ModelIdentity("m", "1", "0" * 64), processes=2)
    try:
        ready = workers.start()
    finally:
        workers.close()
    assert len(ready) == 2 and os.getpid() not in ready
    assert ResultWorkers(Outbox(tmp_path), ModelIdentity("m", "1", "0" * 64), processes=0).start() == set()


def test_the_warm_up_builds_a_whole_set_of_results(caplog) -> None:  # type: ignore[no-untyped-def]
    """A warm-up that failed would only be logged, and the first study would pay for loading again."""
    from highdicom._standard_utils import get_module_attribute_map

    get_module_attribute_map.cache_clear()
    with caplog.at_level("ERROR", logger="pneumoscan.dicom"):
        warm_up()
    assert caplog.records == [] and get_module_attribute_map.cache_info().currsize == 1
