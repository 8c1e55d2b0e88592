"""The result objects themselves: what the DICOM node and pull mode send a PACS for one scored image."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pytest
from dicom_factory import radiograph_dataset
from pydicom import dcmread
from pydicom.dataset import Dataset

from pneumoscan.apps.dicom.results import (
    MANUFACTURER,
    SR_SERIES_NUMBER,
    ModelIdentity,
    comprehensive_sr,
    grid_scale,
    image_digest,
    measurement_report,
    result_header,
)
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.learning.data import records_of
from pneumoscan.running.inference import Predictor

pytestmark = pytest.mark.slow

#: Stamped with the time each object is made: the only attributes two builds of the same object may differ in.
MADE_AT = frozenset({"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"})


@pytest.fixture(scope="module")
def scored(adult_root: Path, shipped_model: Path):  # type: ignore[no-untyped-def]
    """An adult pneumonia film as a sanitised DICOM header, its decoded image, its prediction (with regions), the model."""
    predictor = Predictor.load(shipped_model)
    films = [r.path for r in records_of([adult_root], "test") if r.label == 1]
    for film in films[:20]:
        buffer = io.BytesIO()
        radiograph_dataset(film, size=512, age_years=60).save_as(buffer, enforce_file_format=True)
        loaded = load_xray(buffer.getvalue())
        prediction = predictor.predict_loaded(loaded, heatmap=True)
        if prediction.regions:
            header, _ = result_header(dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True), image_digest(loaded.image))
            return header, loaded.image, prediction, ModelIdentity.of_predictor(predictor)
    raise AssertionError("none of 20 adult test pneumonias got a region")


def as_written(dataset: Dataset) -> Dataset:
    """The object as a PACS reads it back, without the times it was made at."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    written = dcmread(io.BytesIO(buffer.getvalue()))

    def drop_time(data: Dataset, element) -> None:  # type: ignore[no-untyped-def]
        if element.keyword in MADE_AT:
            del data[element.tag]

    written.walk(drop_time)
    return written


def ours_and_highdicoms(header: Dataset, image, prediction, model) -> tuple[Dataset, Dataset]:  # type: ignore[no-untyped-def]
    """The same content tree as a document assembled by :func:`comprehensive_sr` and by highdicom's constructor."""
    content = measurement_report(header, prediction, model, image_digest(image), grid_scale(header, image))
    ours = comprehensive_sr(header, content, series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.5", series_description="d")
    highdicoms = hd.sr.ComprehensiveSR(
        evidence=[header], content=content, series_instance_uid="1.2.3.4", series_number=SR_SERIES_NUMBER,
        sop_instance_uid="1.2.3.5", instance_number=1, manufacturer=MANUFACTURER, is_complete=True, series_description="d",
    )  # fmt: skip
    return as_written(ours), as_written(highdicoms)


def test_the_report_document_is_highdicoms_comprehensive_sr_element_for_element(scored) -> None:  # type: ignore[no-untyped-def]
    header, image, prediction, model = scored
    ours, highdicoms = ours_and_highdicoms(header, image, prediction, model)
    assert ours.file_meta == highdicoms.file_meta
    assert [e.keyword for e in ours] == [e.keyword for e in highdicoms]
    assert ours == highdicoms
    assert len(prediction.regions) and "CurrentRequestedProcedureEvidenceSequence" in ours


def test_a_report_without_acquisition_equipment_names_only_the_library_as_highdicom_does(scored) -> None:  # type: ignore[no-untyped-def]
    header, image, prediction, model = scored
    bare = Dataset()
    bare.update(header)
    del bare.Manufacturer
    ours, highdicoms = ours_and_highdicoms(bare, image, prediction, model)
    assert ours == highdicoms and len(ours.ContributingEquipmentSequence) == 1
