"""Regions as DICOM (issue 28, item 3): SCOORD groups in the TID 1500 report and a GSPS, valid, through Orthanc.

The regions a PACS viewer draws (read back from Orthanc) must be the REST API's for the same file.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import radiograph_dataset
from fastapi.testclient import TestClient
from pacs import INSTALL_HINT, Orthanc, available, dciodvfy_errors
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts

from pneumoscan.apps.dicom.node import DicomNode
from pneumoscan.apps.dicom.results import REGION_SCORE, ModelIdentity, box_outline, build_results
from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import DicomNodeSettings, ServiceSettings
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.learning.data import list_records, records_of
from pneumoscan.running.inference import Predictor

pytestmark = pytest.mark.slow
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


def as_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def adult_study(adult_root: Path, predictor: Predictor) -> tuple[Dataset, object]:
    """An adult pneumonia film as a 1024×768 DX (not square: the regions must follow each axis) that gets regions."""
    for record in [r for r in records_of([adult_root], "test") if r.label == 1]:
        study = radiograph_dataset(record.path, size=None, age_years=60)
        image = film_pixels(record.path, (1024, 768))
        study.Rows, study.Columns = image.shape
        study.PixelData = image.tobytes()
        prediction = predictor.predict_loaded(load_xray(as_bytes(study)), heatmap=True)
        if prediction.regions:
            return study, prediction
    raise AssertionError("no adult test pneumonia got a region")


def film_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The film resampled to ``size`` (width, height), as 8-bit pixels."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def scoord_items(report: Dataset) -> list[tuple[np.ndarray, str, float]]:
    """Each SCOORD of the report: its points, the SOP Instance UID it is drawn on, and its group's region score."""
    found = []

    def walk(items, score=None):  # type: ignore[no-untyped-def]
        for item in items or []:
            children = list(getattr(item, "ContentSequence", None) or [])
            scores = [float(c.MeasuredValueSequence[0].NumericValue) for c in children if c.ValueType == "NUM"
                      and c.ConceptNameCodeSequence[0].CodeValue == REGION_SCORE.value]  # fmt: skip
            here = scores[0] if scores else score
            if item.ValueType == "SCOORD":
                image = next(c for c in children if c.ValueType == "IMAGE")
                found.append((np.asarray(item.GraphicData, dtype=float).reshape(-1, 2),
                              str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID), here))  # fmt: skip
            walk(children, here)

    walk(report.ContentSequence)
    return found


def gsps_outlines(state: Dataset) -> list[np.ndarray]:
    return [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2) for a in state.GraphicAnnotationSequence for g in a.GraphicObjectSequence]


def test_each_region_is_a_scoord_of_the_report_and_a_box_of_the_presentation_state_both_valid(adult_study, predictor, tmp_path) -> None:
    study, prediction = adult_study
    loaded = load_xray(as_bytes(study))
    results = build_results(study, loaded.image, prediction, ModelIdentity.of_predictor(predictor))
    assert results.presentation is not None and len(list(results)) == 3
    for obj in results:
        assert dciodvfy_errors(as_bytes(obj), tmp_path) == [], obj.SOPClassUID.name
    expected = [box_outline(r, (1.0, 1.0)) for r in prediction.regions]  # the DX's pixels are the image's
    scoords = scoord_items(results.report)
    assert len(scoords) == len(prediction.regions)
    for (points, referenced, score), outline, region in zip(scoords, expected, prediction.regions):
        np.testing.assert_allclose(points, outline, atol=1e-3)
        assert referenced == study.SOPInstanceUID and score == pytest.approx(region.score)
    state = results.presentation
    assert state.SOPClassUID == GSPS and state.StudyInstanceUID == study.StudyInstanceUID
    assert state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == study.SOPInstanceUID
    for drawn, outline in zip(gsps_outlines(state), expected):
        np.testing.assert_allclose(drawn, outline, atol=1e-3)
    labels = [t.UnformattedTextValue for a in state.GraphicAnnotationSequence for t in a.TextObjectSequence]
    assert labels == [f"pneumoscan: pneumonia {r.score:.2f}" for r in prediction.regions]
    x1 = max(p[0] for p in expected[0])
    assert x1 <= study.Columns and max(p[1] for p in expected[0]) <= study.Rows


def test_a_study_without_regions_gets_no_presentation_state_and_no_scoord(data_root, predictor) -> None:
    child = radiograph_dataset(next(r.path for r in list_records(data_root, "test") if r.label == 1), size=512, age_years=5)
    loaded = load_xray(as_bytes(child))
    prediction = predictor.predict_loaded(loaded, heatmap=True)
    assert prediction.label == "PNEUMONIA" and prediction.regions == [] and "child" in prediction.regions_note
    results = build_results(child, loaded.image, prediction, ModelIdentity.of_predictor(predictor))
    assert results.presentation is None and len(list(results)) == 2 and scoord_items(results.report) == []


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    if not available():
        pytest.fail(INSTALL_HINT)
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def test_the_regions_a_pacs_viewer_draws_are_the_apis(adult_study, predictor, shipped_model, orthanc, tmp_path) -> None:
    """The node sends SR + SC + GSPS to Orthanc; the GSPS read back from Orthanc draws the REST API's regions."""
    study, _ = adult_study
    node = DicomNode(DicomNodeSettings(dicom_port=0, data_dir=tmp_path / "node", retry_max_seconds=1,
                                       destination=orthanc.destination), predictor)  # fmt: skip
    node.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.requested_contexts = StoragePresentationContexts
        association = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert association.is_established
        assert association.send_c_store(study).Status == 0
        association.release()
        node.jobs.join()
        assert node.sender.drain(60), "results were not delivered"
        with node.audit.engine.connect() as connection:
            row = connection.exec_driver_sql("select presentation_uid from dicom_instances").scalar_one()
    finally:
        node.stop()
    stored = orthanc.instances_of_study(study.StudyInstanceUID)
    assert sorted(i["Modality"] for i in stored) == ["OT", "PR", "SR"]  # the results (the film itself went to the node)
    state = pydicom.dcmread(io.BytesIO(orthanc.instance_file(next(i["OrthancID"] for i in stored if i["Modality"] == "PR"))))
    assert state.SOPInstanceUID == row
    client = TestClient(create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path / "service")))
    answer = client.post("/api/v1/predictions", files={"file": ("study.dcm", as_bytes(study), "application/dicom")})
    assert answer.status_code == 201
    from pneumoscan.running.regions import Region

    api = [box_outline(Region(**r), (1.0, 1.0)) for r in answer.json()["regions"]]
    assert api and len(api) == len(gsps_outlines(state))
    for drawn, outline in zip(gsps_outlines(state), api):
        np.testing.assert_allclose(drawn, outline, atol=1e-3)
    report = pydicom.dcmread(io.BytesIO(orthanc.instance_file(next(i["OrthancID"] for i in stored if i["Modality"] == "SR"))))
    scoords = scoord_items(report)  # the report read back from the PACS carries the same regions, on the source image
    assert [s[1] for s in scoords] == [study.SOPInstanceUID] * len(api)
    for (points, _, score), outline, region in zip(scoords, api, answer.json()["regions"]):
        np.testing.assert_allclose(points, outline, atol=1e-3)
        assert score == pytest.approx(region["score"])


def test_pull_mode_stores_the_presentation_state_with_the_results(adult_study, orthanc, shipped_model, tmp_path) -> None:
    study, _ = adult_study
    pulled = study.copy()
    pulled.StudyInstanceUID, pulled.SeriesInstanceUID, pulled.SOPInstanceUID = (pydicom.uid.generate_uid() for _ in range(3))
    pulled.file_meta.MediaStorageSOPInstanceUID = pulled.SOPInstanceUID
    orthanc.upload(as_bytes(pulled))
    command = [sys.executable, "-m", "pneumoscan", "triage", "--dicomweb", orthanc.dicomweb, "--since", "2026-11-01",
               "--out", str(tmp_path / "pulled"), "--model", str(shipped_model), "--store-results"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(i["Modality"] for i in orthanc.instances_of_study(pulled.StudyInstanceUID)) == ["DX", "OT", "PR", "SR"]
