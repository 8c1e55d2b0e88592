"""The REST API against the real app and the shipped model, with a real SQLite audit log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings
from pneumoscan.learning.data import list_records

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import load_test

PYDICOM_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"


@pytest.fixture(scope="module")
def service(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, ServiceSettings]:
    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path_factory.mktemp("service"), max_upload_bytes=2_000_000)
    return TestClient(create_app(settings)), settings


def audit_row(settings: ServiceSettings, prediction_id: str) -> dict:
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as connection:
        return dict(connection.execute(text("select * from predictions where id = :id"), {"id": prediction_id}).mappings().one())


def test_upload_an_xray_and_read_it_back(service, data_root: Path) -> None:
    client, settings = service
    xray = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    response = client.post("/api/v1/predictions", files={"file": ("scan.jpeg", xray.read_bytes(), "image/jpeg")})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["label"] in ("NORMAL", "PNEUMONIA") and 0 <= body["probability"] <= 1
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= body["threshold"] else "NORMAL")
    assert body["operating_point"] == "98% sensitivity on validation"
    assert isinstance(body["in_distribution"], bool) and body["model"]["name"] == "pneumoscan-v3"
    row = audit_row(settings, body["id"])
    assert row["probability"] == body["probability"] and row["label"] == body["label"]
    assert row["threshold"] == body["threshold"] and row["file_type"] == "jpeg"
    assert row["model_sha256"] == body["model"]["sha256"] and len(row["upload_sha256"]) == 64
    assert client.get(f"/api/v1/predictions/{body['id']}").json() == body
    heatmap = client.get(body["heatmap_url"])
    assert heatmap.status_code == 200 and heatmap.content.startswith(b"\x89PNG")
    listed = client.get("/api/v1/predictions", params={"limit": 5}).json()
    assert listed[0]["id"] == body["id"]


def test_a_dicom_upload_keeps_no_patient_field(service, data_root: Path) -> None:
    from dicom_factory import build_dicom

    client, settings = service
    xray = list_records(data_root, "test")[3].path
    data = build_dicom(xray, bits=12, photometric="MONOCHROME1", patient_name="Recognisable^Patient")
    response = client.post("/api/v1/predictions", files={"file": ("IM0001", data, "application/dicom")})
    assert response.status_code == 201, response.text
    assert "Recognisable" not in response.text and "PID-123456" not in response.text
    row = audit_row(settings, response.json()["id"])
    assert row["file_type"] == "dicom" and "Recognisable" not in repr(row) and "PID-123456" not in repr(row)


@pytest.mark.parametrize(
    ("name", "data", "status", "kind"),
    [
        ("notes.jpg", b"plain text, not an image", 415, "UnsupportedFormat"),
        ("page.png", b"<!DOCTYPE html><html></html>", 415, "UnsupportedFormat"),
        ("empty.jpeg", b"", 422, "CorruptImage"),
        ("ct.dcm", (PYDICOM_FILES / "CT_small.dcm").read_bytes(), 422, "NotARadiograph"),
        ("big.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 2_100_000, 413, "ImageTooLarge"),
    ],
)
def test_bad_uploads_get_a_4xx_with_the_reason(service, name: str, data: bytes, status: int, kind: str) -> None:
    client, _ = service
    response = client.post("/api/v1/predictions", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and response.json()["detail"]


def test_truncated_jpeg_is_422(service, data_root: Path) -> None:
    client, _ = service
    data = list_records(data_root, "test")[0].path.read_bytes()[:1500]
    response = client.post("/api/v1/predictions", files={"file": ("cut.jpeg", data, "image/jpeg")})
    assert response.status_code == 422 and response.json()["error"] == "CorruptImage"


def test_missing_file_field_and_unknown_id(service) -> None:
    client, _ = service
    assert client.post("/api/v1/predictions").status_code == 422
    assert client.get("/api/v1/predictions/doesnotexist").status_code == 404


def test_health_and_readiness(service) -> None:
    client, _ = service
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"]["name"] == "pneumoscan-v3"
    assert client.get("/openapi.json").status_code == 200


#: Every operation of the API, as the routers declare them: none may drop out of the schema in a reorganisation.
API_OPERATIONS = {
    ("/api/v1/predictions", "POST"), ("/api/v1/predictions", "GET"), ("/api/v1/predictions/{prediction_id}", "GET"),
    ("/api/v1/predictions/{prediction_id}/{picture}.png", "GET"), ("/api/v1/predictions/{prediction_id}/readings", "POST"),
    ("/api/v1/predictions/{prediction_id}/readings", "GET"), ("/api/v1/performance", "GET"), ("/api/v1/model", "GET"),
    ("/api/v1/drift", "GET"), ("/healthz", "GET"), ("/readyz", "GET"),
}  # fmt: skip


def test_every_route_of_the_routers_is_documented_in_openapi_with_its_tag_and_key(service) -> None:
    from fastapi.routing import APIRoute

    from pneumoscan.apps.service.app import ROUTERS

    client, _ = service
    schema = client.get("/openapi.json").json()
    documented = {(path, method.upper()) for path, operations in schema["paths"].items() for method in operations}
    declared = {(route.path, method) for router in ROUTERS for route in router.routes
                if isinstance(route, APIRoute) and route.include_in_schema and router.include_in_schema
                for method in route.methods}  # fmt: skip
    assert declared == documented == API_OPERATIONS
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("tags"), (method, path)  # each belongs to its router's resource
            if path.startswith("/api/"):
                assert operation.get("security") == [{"APIKeyHeader": []}], (method, path)
                assert "401" in operation["responses"], (method, path)
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the service's key, when one is set"}


def test_api_key_is_required_when_configured(shipped_model: Path, tmp_path: Path, data_root: Path) -> None:
    client = TestClient(create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path, api_key="s3cret")))
    xray = list_records(data_root, "test")[0].path.read_bytes()
    assert client.get("/api/v1/predictions").status_code == 401
    assert client.post("/api/v1/predictions", files={"file": ("a.jpeg", xray, "image/jpeg")}).status_code == 401
    assert client.get("/api/v1/predictions", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/api/v1/predictions", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # health stays open for load balancers


@contextlib.contextmanager
def live_server(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``pneumoscan serve`` started by the test on a free port of 127.0.0.1 (output in ``server.log``); SIGTERM at the end."""
    with load_test.running_server(tmp_path, env=env) as server:
        yield server.base, server.process


def test_pneumoscan_serve_answers_over_http(shipped_model: Path, tmp_path: Path, data_root: Path) -> None:
    """The real command on 127.0.0.1: starts, becomes ready, scores an upload, exits 0 on SIGTERM."""
    with live_server(tmp_path) as (base, process):
        xray = list_records(data_root, "test")[0].path.read_bytes()
        response = httpx.post(f"{base}/api/v1/predictions", files={"file": ("a.jpeg", xray, "image/jpeg")}, timeout=30)
        assert response.status_code == 201 and response.json()["label"] in ("NORMAL", "PNEUMONIA")
        assert (tmp_path / "pneumoscan.db").is_file()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    output = (tmp_path / "server.log").read_text()
    assert process.returncode == 0, output
    assert f"{base}/" in output and "operating point in force (child): 98% sensitivity on validation" in output


def test_the_audit_schema_is_managed_by_alembic(service) -> None:
    _, settings = service
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar_one() == "0008"
        assert connection.execute(text("pragma journal_mode")).scalar_one() == "wal"


def test_page_assets_and_metrics_are_served(service, data_root: Path) -> None:
    client, _ = service
    page = client.get("/")
    assert page.status_code == 200 and "pneumoscan" in page.text and "/static/app.js" in page.text
    assert "://" not in page.text  # no CDN: every asset comes from the app
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    xray = list_records(data_root, "test")[1].path.read_bytes()
    body = client.post("/api/v1/predictions", files={"file": ("a.jpeg", xray, "image/jpeg")}).json()
    image = client.get(body["image_url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    metrics = client.get("/metrics").text
    assert "pneumoscan_predictions_total{in_distribution=" in metrics
    assert "pneumoscan_http_request_seconds_bucket" in metrics and 'route="/api/v1/predictions"' in metrics


def test_the_audit_log_works_in_a_real_postgresql(shipped_model: Path, tmp_path: Path, data_root: Path) -> None:
    """PNEUMOSCAN_DATABASE_URL at PostgreSQL 16 (binaries from the pgserver wheel, started here on a Unix socket)."""
    import pgserver

    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        socket_dir = str(tmp_path / "pg")
        url = f"postgresql+psycopg://postgres@/postgres?host={socket_dir}"
        settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path / "service", database_url=url)
        xray = next(r.path for r in list_records(data_root, "test") if r.label == 0)
        dicom = PYDICOM_FILES / "CT_small.dcm"
        with TestClient(create_app(settings)) as client:
            body = client.post("/api/v1/predictions", files={"file": ("a.jpeg", xray.read_bytes(), "image/jpeg")}).json()
            refused = client.post("/api/v1/predictions", files={"file": ("ct.dcm", dicom.read_bytes(), "application/dicom")})
            assert refused.status_code == 422
            assert client.get(f"/api/v1/predictions/{body['id']}").json() == body
            reading = client.post(f"/api/v1/predictions/{body['id']}/readings", json={"finding": "no_pneumonia", "reader": "dr.lee"})
            assert reading.status_code == 201, reading.text
            assert client.get(f"/api/v1/predictions/{body['id']}/readings").json() == [reading.json()]
        engine = create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(text("select version()")).scalar_one().startswith("PostgreSQL")
            assert connection.execute(text("select version_num from alembic_version")).scalar_one() == "0008"
            row = dict(connection.execute(text("select * from predictions where id = :id"), {"id": body["id"]}).mappings().one())
            assert connection.execute(text("select count(*) from predictions")).scalar_one() == 1  # refusals are not rows
            assert connection.execute(text("select finding from readings")).scalars().all() == ["no_pneumonia"]
            assert [tuple(r) for r in connection.execute(text("select event, entry_point from model_events"))] == [("started", "serve")]
        engine.dispose()
        assert row["probability"] == pytest.approx(body["probability"]) and row["label"] == body["label"]
        assert row["file_type"] == "jpeg" and row["model_sha256"] == body["model"]["sha256"]
    finally:
        server.cleanup()


def test_the_api_says_which_operating_point_is_in_force(service, site_model: Path, data_root: Path, tmp_path: Path) -> None:
    client, _ = service
    shipped = client.get("/api/v1/model").json()
    assert {p["population"]: p["in_force"] for p in shipped["operating_points"]} == {"child": "validation", "adult": "validation"}
    settings = ServiceSettings(model_dir=site_model, data_dir=tmp_path)
    site = TestClient(create_app(settings))
    points = {p["population"]: p for p in site.get("/api/v1/model").json()["operating_points"]}
    assert points["child"]["source"] == "site" and points["child"]["date"] == "2026-11-20"
    assert points["child"]["in_force"] == "site calibration of 2026-11-20" and points["adult"]["in_force"] == "validation"
    xray = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    body = site.post("/api/v1/predictions", files={"file": ("a.jpeg", xray.read_bytes(), "image/jpeg")}).json()
    assert body["operating_point_source"] == "site calibration of 2026-11-20"
    assert body["operating_point"] == "98% sensitivity on the site set of 2026-11-20"
    assert body["threshold"] == points["child"]["threshold"]
    assert audit_row(settings, body["id"])["operating_point_source"] == "site calibration of 2026-11-20"
    assert site.get(f"/api/v1/predictions/{body['id']}").json()["operating_point_source"] == body["operating_point_source"]


def test_drift_over_the_api_and_metrics_warns_on_a_shifted_stream(shipped_model: Path, data_root: Path, tmp_path: Path) -> None:
    """A window of pneumonia films only is not what validation looked like: the probability of children drifts."""
    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path, drift_window=12, drift_min_predictions=12)
    client = TestClient(create_app(settings))
    empty = client.get("/api/v1/drift").json()
    assert empty["available"] and empty["n"] == 0 and not empty["warning"] and empty["reference"].startswith("validation parts")
    pneumonias = [r.path for r in list_records(data_root, "test") if r.label == 1][:12]
    for path in pneumonias:
        assert client.post("/api/v1/predictions", files={"file": ("a.jpeg", path.read_bytes(), "image/jpeg")}).status_code == 201
    drift = client.get("/api/v1/drift").json()
    child = next(i for i in drift["indicators"] if i["name"] == "probability" and i["population"] == "child")
    assert drift["n"] == 12 and child["judged"] and child["drifted"] and child["psi"] > 0.25
    assert drift["warning"] and "calibrated probability of children" in drift["message"]
    metrics = client.get("/metrics").text
    assert "pneumoscan_drift_warning 1.0" in metrics and 'pneumoscan_drift_psi{indicator="probability",population="child"}' in metrics
    assert "/api/v1/drift" in client.get("/openapi.json").json()["paths"]
    restarted = TestClient(create_app(settings))  # the window is refilled from the audit log, nothing else is kept
    assert restarted.get("/api/v1/drift").json()["n"] == 12


def test_concurrent_uploads_share_model_calls_and_each_gets_its_own_answer(shipped_model: Path, tmp_path: Path,
                                                                           data_root: Path) -> None:  # fmt: skip
    """Dynamic batching: answers equal one-at-a-time scoring; a corrupt upload among them fails alone."""
    import asyncio

    import httpx

    from pneumoscan.running.inference import Predictor

    files = [r.path for r in list_records(data_root, "test")[::50][:12]]
    alone = Predictor.load(shipped_model).predict(files)
    app = create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path, max_concurrent=4, batch_window_ms=50))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as client:
            posts = [client.post("/api/v1/predictions", files={"file": ("x.jpeg", f.read_bytes(), "image/jpeg")}) for f in files]
            posts.insert(5, client.post("/api/v1/predictions", files={"file": ("x.jpeg", b"\xff\xd8\xff not a jpeg", "image/jpeg")}))
            return await asyncio.gather(*posts)

    responses = asyncio.run(burst())
    corrupt = responses.pop(5)
    assert corrupt.status_code == 422 and corrupt.json()["error"] == "CorruptImage", corrupt.text
    assert [r.status_code for r in responses] == [201] * len(files)
    for response, expected in zip(responses, alone, strict=True):
        answer = response.json()
        assert answer["label"] == expected.label and answer["population"] == expected.population
        assert answer["probability"] == pytest.approx(expected.probability, abs=1e-5)
    sizes = list(app.state.service.batcher.sizes)
    assert sum(sizes) == len(files) and max(sizes) > 1, sizes  # they went through the model together
    assert sum(app.state.service.recorder.sizes) == len(files)  # every answer's row committed (grouped as they came)
    client = TestClient(app)
    assert all(client.get(f"/api/v1/predictions/{r.json()['id']}").status_code == 200 for r in responses)
    metrics = client.get("/metrics").text
    assert f"pneumoscan_batch_images_sum {float(len(files))}" in metrics and f"pneumoscan_batch_images_count {float(len(sizes))}" in metrics
