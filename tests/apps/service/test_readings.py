"""Radiologists' readings: recorded over the API against real predictions of the shipped model, and imported from a
RIS's CSV (by prediction id and by a DICOM node study's SOP Instance UID), all or nothing."""

from __future__ import annotations

import csv
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pneumoscan.apps.audit import AuditLog, connect, now, prediction_row, uid_digest
from pneumoscan.apps.cli import main
from pneumoscan.apps.readings import import_readings
from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings
from pneumoscan.errors import ReadingsFileError
from pneumoscan.learning.data import list_records


@pytest.fixture(scope="module")
def service(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, ServiceSettings]:
    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path_factory.mktemp("readings"), api_key="k3y")
    return TestClient(create_app(settings), headers={"X-API-Key": "k3y"}), settings


@pytest.fixture(scope="module")
def predictions(service, data_root: Path) -> list[str]:
    """Three real predictions of the service: two children's pneumonia films and one normal."""
    client, _ = service
    records = list_records(data_root, "test")
    films = [r.path for r in records if r.label == 1][:2] + [next(r.path for r in records if r.label == 0)]
    ids = []
    for film in films:
        response = client.post("/api/v1/predictions", files={"file": (film.name, film.read_bytes(), "image/jpeg")})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def test_a_reading_is_recorded_and_a_later_one_supersedes_it(service, predictions: list[str], caplog) -> None:
    client, _ = service
    first, second = predictions[0], predictions[1]
    caplog.set_level(logging.DEBUG)
    answer = client.post(f"/api/v1/predictions/{first}/readings",
                         json={"finding": "no_pneumonia", "reader": "dr.lee", "comment": "subtle left base opacity?"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["prediction_id"] == first and body["finding"] == "no_pneumonia" and body["source"] == "api"
    later = client.post(f"/api/v1/predictions/{first}/readings",
                        json={"finding": "pneumonia", "reader": "dr.okafor", "read_at": "2026-11-30T10:00:00Z", "source": "page"})
    assert later.status_code == 201
    listed = client.get(f"/api/v1/predictions/{first}/readings").json()
    assert [r["finding"] for r in listed] == ["no_pneumonia", "pneumonia"]  # all kept, the last in force
    assert listed[1]["read_at"] == "2026-11-30T10:00:00+00:00" and listed[1]["source"] == "page"
    assert client.get(f"/api/v1/predictions/{second}/readings").json() == []
    assert "subtle left base" not in caplog.text  # the comment is stored with the reading, never logged


@pytest.mark.parametrize(("body", "status"), [
    ({"finding": "maybe", "reader": "dr.lee"}, 422),
    ({"finding": "pneumonia", "reader": "Jane Doe, MRN 12345"}, 422),  # a reader id, not a name with a patient number
    ({"finding": "pneumonia"}, 422),
    ({"finding": "pneumonia", "reader": "dr.lee", "read_at": (datetime.now(UTC) + timedelta(days=2)).isoformat()}, 422),
    ({"finding": "pneumonia", "reader": "dr.lee", "comment": "x" * 2001}, 422),
    ({"finding": "pneumonia", "reader": "dr.lee", "patient_name": "DOE^JANE"}, 422),
])  # fmt: skip
def test_a_bad_reading_is_422_with_the_reason(service, predictions: list[str], body: dict, status: int) -> None:
    client, _ = service
    answer = client.post(f"/api/v1/predictions/{predictions[2]}/readings", json=body)
    assert answer.status_code == status and answer.json()["error"] == "InvalidRequest" and answer.json()["detail"]
    assert client.get(f"/api/v1/predictions/{predictions[2]}/readings").json() == []


def test_readings_of_an_unknown_prediction_are_404_and_need_the_key(service) -> None:
    client, settings = service
    assert client.post(f"/api/v1/predictions/{'0' * 32}/readings", json={"finding": "pneumonia", "reader": "a"}).status_code == 404
    assert client.get("/api/v1/predictions/nope/readings").status_code == 404
    anonymous = TestClient(client.app)
    assert anonymous.get("/api/v1/predictions/nope/readings").status_code == 401


def write_readings(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture()
def node_study(service) -> tuple[str, str]:
    """A study as the DICOM node records one it scored: its prediction row and its instance row keyed by the UID's hash."""
    _, settings = service
    audit = AuditLog(connect(settings.resolved_database_url))

    class Scored:  # what prediction_row reads of a Prediction
        probability, threshold, label, in_distribution, ood_score = 0.91, 0.5, "PNEUMONIA", True, 1.0
        population, population_source, operating_point, population_note = "adult", "image", "98% sensitivity on validation", None
        operating_point_source, regions, regions_note = "validation", [], None

    uid = f"1.2.826.0.1.3680043.8.498.{int(datetime.now(UTC).timestamp() * 1e6)}"
    prediction = prediction_row(Scored(), b"dicom bytes", "dicom", {"name": "pneumoscan-v3", "version": "0", "sha256": "0" * 64})
    audit.record_instance({"id": prediction["id"], "received_at": now(), "sop_instance_sha256": uid_digest(uid),
                           "pixels_sha256": "1" * 64, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "calling_ae": "MODALITY",
                           "model_sha256": "0" * 64, "outcome": "scored", "prediction_id": prediction["id"]}, prediction)
    return uid, prediction["id"]


def test_a_ris_export_is_imported_by_prediction_id_and_by_sop_instance_uid(service, predictions: list[str], node_study,
                                                                            tmp_path: Path, capsys) -> None:  # fmt: skip
    client, settings = service
    uid, node_prediction = node_study
    path = write_readings(tmp_path / "ris.csv", ["prediction_id", "sop_instance_uid", "finding", "reader", "read_at", "comment"], [
        [predictions[1], "", "Pneumonia", "dr.lee", "2026-11-29 08:15", ""],
        ["", uid, "No pneumonia", "dr.lee", "", "clear lungs"],
        [predictions[2], "", "cannot-tell", "dr.okafor", "2026-11-29T09:00:00+01:00", ""],
    ])  # fmt: skip
    code = main(["readings", "import", str(path), "--database-url", settings.resolved_database_url])
    assert code == 0
    assert "imported 3 reading(s)" in capsys.readouterr().out
    second = client.get(f"/api/v1/predictions/{predictions[1]}/readings").json()
    assert second[-1]["finding"] == "pneumonia" and second[-1]["source"] == "import"
    assert second[-1]["read_at"] == "2026-11-29T08:15:00+00:00"
    audit = AuditLog(connect(settings.resolved_database_url))
    assert [r["finding"] for r in audit.readings_of(node_prediction)] == ["no_pneumonia"]
    assert audit.readings_of(predictions[2])[-1]["finding"] == "cannot_tell"


def test_a_file_with_bad_rows_names_each_line_and_imports_nothing(service, predictions: list[str], tmp_path: Path, capsys) -> None:
    _, settings = service
    audit = AuditLog(connect(settings.resolved_database_url))
    before = {p: len(audit.readings_of(p)) for p in predictions}
    path = write_readings(tmp_path / "bad.csv", ["prediction_id", "sop_instance_uid", "finding", "reader"], [
        [predictions[0], "", "pneumonia", "dr.lee"],  # good
        [predictions[1], "", "probably", "dr.lee"],  # line 3: finding
        ["f" * 32, "", "pneumonia", "dr.lee"],  # line 4: no such prediction
        ["", "1.2.3.4.5.999", "pneumonia", "dr.lee"],  # line 5: no such study
        [predictions[2], "1.2.3", "pneumonia", "dr.lee"],  # line 6: two keys
        [predictions[2], "", "pneumonia", "Dr Lee (MRN 42)"],  # line 7: reader
    ])  # fmt: skip
    with pytest.raises(ReadingsFileError) as raised:
        import_readings(path, audit)
    message = str(raised.value)
    assert "5 bad row(s), nothing was imported" in message
    for line in ("line 3: finding 'probably'", "line 4: no prediction has id", "line 5: no study the DICOM node scored",
                 "line 6: give exactly one", "line 7: reader"):  # fmt: skip
        assert line in message, message
    assert {p: len(audit.readings_of(p)) for p in predictions} == before
    assert main(["readings", "import", str(path), "--database-url", settings.resolved_database_url]) == 2
    assert "line 3" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    ("finding,reader\npneumonia,dr.lee\n", "prediction_id or sop_instance_uid"),
    ("prediction_id,finding,reader,patient_name\n1,pneumonia,a,DOE\n", "unknown column(s) patient_name"),
    ("prediction_id,finding,reader\n", "holds no readings"),
])  # fmt: skip
def test_a_malformed_file_is_a_message(service, tmp_path: Path, content: str, message: str) -> None:
    _, settings = service
    path = tmp_path / "readings.csv"
    path.write_text(content)
    with pytest.raises(ReadingsFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_readings(path, AuditLog(connect(settings.resolved_database_url)))
