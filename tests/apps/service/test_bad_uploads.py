"""The committed corpus of bad uploads (tests/corpus): each gets its expected 4xx and a reason, never a 5xx."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings

CORPUS = Path(__file__).parents[2] / "corpus"
MANIFEST = json.loads((CORPUS / "bad_uploads.json").read_text())
PYDICOM_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"


@pytest.fixture(scope="module")
def client(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path_factory.mktemp("bad_uploads"), max_upload_bytes=2_000_000)
    return TestClient(create_app(settings))


def test_the_corpus_is_large_and_complete() -> None:
    assert len(MANIFEST) >= 30 and len({case.get("file") or case["pydicom"] for case in MANIFEST}) == len(MANIFEST)
    on_disk = {p.name for p in (CORPUS / "bad_uploads").iterdir()}
    assert on_disk == {case["file"] for case in MANIFEST if "file" in case}, "regenerate with tests/corpus/make_bad_uploads.py"


@pytest.mark.parametrize("case", MANIFEST, ids=lambda case: case.get("file") or case["pydicom"])
def test_each_bad_upload_gets_its_status_and_a_reason(client: TestClient, case: dict) -> None:
    path = CORPUS / "bad_uploads" / case["file"] if "file" in case else PYDICOM_FILES / case["pydicom"]
    response = client.post("/api/v1/predictions", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
    assert response.status_code == case["status"], response.text
    body = response.json()
    assert body["error"] == case["error"] and len(body["detail"]) > 10


def test_an_upload_over_the_size_limit_is_413(client: TestClient) -> None:
    response = client.post("/api/v1/predictions", files={"file": ("big.jpeg", b"\xff\xd8\xff" + bytes(2_000_000), "image/jpeg")})
    assert response.status_code == 413 and response.json()["error"] == "ImageTooLarge"


def test_no_bad_upload_left_a_row_in_the_audit_log(client: TestClient) -> None:
    assert client.get("/api/v1/predictions").json() == []
