"""Regions in every output (issue 28, item 2): the same boxes from Predictor, predict, triage and the REST API.

On adult test films (the population with a region rule in the shipped card): a flagged pneumonia has them; a film
below the threshold, an image the gate flags and a child's pneumonia have none (the child's with a note why).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage
from fastapi.testclient import TestClient
from PIL import Image

from pneumoscan.apps.predict import format_records, predict_files
from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings
from pneumoscan.apps.triage import THUMBNAIL_DIR, read_worklist, triage
from pneumoscan.learning.data import list_records, records_of
from pneumoscan.running.inference import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


@pytest.fixture(scope="module")
def adult_films(adult_root: Path, predictor: Predictor, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    """A folder of adult test films, some with regions, some without; each name → the Predictor's regions."""
    folder = tmp_path_factory.mktemp("adults")
    records = records_of([adult_root], "test")
    expected: dict[str, list] = {}
    for record in records:
        prediction = predictor.predict(record.path)
        has = bool(prediction.regions)
        if sum(bool(v) == has for v in expected.values()) < (4 if has else 3):
            shutil.copy(record.path, folder / record.path.name)
            expected[record.path.name] = [r.to_dict() for r in prediction.regions]
        if len(expected) == 7:
            break
    assert sum(bool(v) for v in expected.values()) == 4
    return folder, expected


def test_predict_gives_the_predictors_regions_in_json_csv_and_the_table(adult_films, predictor) -> None:
    folder, expected = adult_films
    records = predict_files(predictor, sorted(folder.iterdir()), progress=False)
    assert {Path(r.path).name: r.regions for r in records} == expected
    rows = list(csv.DictReader(io.StringIO(format_records(records, "csv"))))
    assert {Path(row["path"]).name: json.loads(row["regions"]) for row in rows} == expected
    assert [r["regions"] for r in json.loads(format_records(records, "json"))] == [r.regions for r in records]
    table = format_records(records, "table")
    assert table.count("region ") == sum(len(v) for v in expected.values())


def test_triage_writes_the_regions_in_the_worklist_and_draws_them_on_the_thumbnails(adult_films, predictor, tmp_path) -> None:
    folder, expected = adult_films
    triage([folder], tmp_path / "out", predictor, progress=False)
    rows = read_worklist(tmp_path / "out")
    assert {Path(r.path).name: json.loads(r.regions) for r in rows} == expected
    for row in rows:
        thumbnail = np.asarray(Image.open(tmp_path / "out" / THUMBNAIL_DIR / row.thumbnail_name).convert("RGB")).astype(int)
        left = thumbnail[:, : thumbnail.shape[1] // 2]  # the film; the overlay is on the right
        green = int(np.sum((np.abs(left - np.array([57, 255, 20])) <= 40).all(axis=-1)))
        assert (green > 20) == bool(expected[Path(row.path).name]), row.path
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count('class="regions"') == sum(1 for v in expected.values() if v)


def test_the_api_answers_records_and_documents_the_regions(adult_films, shipped_model, data_root, tmp_path) -> None:
    folder, expected = adult_films
    client = TestClient(create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path / "service")))
    for name, regions in expected.items():
        answer = client.post("/api/v1/predictions", files={"file": (name, (folder / name).read_bytes(), "image/jpeg")})
        assert answer.status_code == 201 and answer.json()["regions"] == regions
        again = client.get(f"/api/v1/predictions/{answer.json()['id']}")  # read back from the audit log
        assert again.json()["regions"] == regions
    child = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    body = client.post("/api/v1/predictions", files={"file": ("child.jpeg", child.read_bytes(), "image/jpeg")}).json()
    assert body["label"] == "PNEUMONIA" and body["regions"] == [] and "child population" in body["regions_note"]
    photo = Path(skimage.__file__).parent / "data" / "astronaut.png"
    flagged = client.post("/api/v1/predictions", files={"file": ("photo.png", photo.read_bytes(), "image/png")}).json()
    assert flagged["validated"] is False and flagged["regions"] == [] and flagged["regions_note"] is None
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(schema["RegionBody"]["properties"]) == {"x", "y", "width", "height", "score"}
    assert "regions" in schema["PredictionBody"]["properties"]


def test_a_film_below_the_threshold_has_no_regions(adult_root, predictor) -> None:
    normal = next(p for r in records_of([adult_root], "test") if r.label == 0 and (p := predictor.predict(r.path)).label == "NORMAL")
    assert normal.regions == [] and normal.regions_note is None
