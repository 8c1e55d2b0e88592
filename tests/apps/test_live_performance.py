"""The site loop's replay: Kermany's test/ posted to the service, readings for half of the patients imported, and
/api/v1/performance and /metrics checked against an independent computation on the same half; then
``calibrate --from-audit`` on those readings against ``calibrate`` on the same files."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import confusion_matrix

from pneumoscan.apps.cli import main
from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings
from pneumoscan.learning.data import list_records, split_in_halves

pytestmark = pytest.mark.slow


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre, half = (k + z * z / 2) / (n + z * z), z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


def test_live_performance_and_calibrate_from_audit_on_the_read_half(shipped_model: Path, data_root: Path, tmp_path: Path,
                                                                    capsys) -> None:  # fmt: skip
    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path / "service")
    client = TestClient(create_app(settings))
    records = list_records(data_root, "test")
    answered = {}
    for record in records:
        response = client.post("/api/v1/predictions", files={"file": (record.path.name, record.path.read_bytes(), "image/jpeg")})
        assert response.status_code == 201, response.text
        answered[record.path] = response.json()
    read, _ = split_in_halves(records, seed=0)
    with open(tmp_path / "ris.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prediction_id", "finding", "reader"])
        writer.writerows([answered[r.path]["id"], "pneumonia" if r.label else "no_pneumonia", "replay"] for r in read)
    assert main(["readings", "import", str(tmp_path / "ris.csv"), "--data-dir", str(settings.data_dir)]) == 0

    figures = client.get("/api/v1/performance", params={"window": 10_000}).json()
    assert figures["n"] == len(read)
    (group,) = [g for g in figures["groups"] if g["in_force"] and g["population"] == "child"]  # a few go to the adults'
    assert group["target_sensitivity"] == 0.98
    assert sum(g["n"] + g["not_validated"] for g in figures["groups"]) == len(read)
    decided = [r for r in read if answered[r.path]["validated"] and answered[r.path]["population"] == "child"]
    truth = [r.label for r in decided]
    said = [int(answered[r.path]["label"] == "PNEUMONIA") for r in decided]
    tn, fp, fn, tp = confusion_matrix(truth, said, labels=[0, 1]).ravel()
    assert group["counts"] == {"true_positive": tp, "false_negative": fn, "true_negative": tn, "false_positive": fp}
    assert group["not_validated"] == sum(1 for r in read if not answered[r.path]["validated"] and answered[r.path]["population"] == "child")
    assert group["sensitivity"]["value"] == pytest.approx(tp / (tp + fn)) and group["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert (group["specificity"]["low"], group["specificity"]["high"]) == pytest.approx(wilson(tn, tn + fp))
    assert group["ppv"]["value"] == pytest.approx(tp / (tp + fp)) and group["npv"]["value"] == pytest.approx(tn / (tn + fn))
    assert group["warning"] is (fn > group["allowed_misses"] or group["sensitivity"]["high"] < 0.98)

    metrics = client.get("/metrics").text
    assert f'pneumoscan_live_performance{{bound="value",figure="specificity",population="child"}} {tn / (tn + fp)}' in metrics
    assert f'pneumoscan_live_read_studies{{population="child"}} {float(tp + fn + tn + fp)}' in metrics

    # calibrate from the readings (no image) and from the same files, routed by the image as the service routes them
    half = tmp_path / "half"
    half.mkdir()
    for record in read:
        (half / record.path.name).symlink_to(record.path)
    with open(half / "labels.csv", "w", newline="") as handle:  # no age column: each film routed by its image
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows([r.path.name, r.class_name, r.patient] for r in read)
    audit_out, files_out = tmp_path / "from-audit", tmp_path / "from-files"
    assert main(["calibrate", "--model", str(shipped_model), "--from-audit", "--data-dir", str(settings.data_dir),
                 "--out", str(audit_out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    distinct = len({hashlib.sha256(r.path.read_bytes()).digest() for r in read})  # Kermany's test/ has a file twice
    assert f"{distinct} read answers of pneumoscan-v3" in printed
    if distinct < len(read):
        assert f"{len(read) - distinct} the same image answered again" in printed
    assert main(["calibrate", "--model", str(shipped_model), "--data", str(half / "labels.csv"), "--out", str(files_out)]) == 0
    import json

    from_audit, from_files = (json.loads((folder / "model_card.json").read_text()) for folder in (audit_out, files_out))
    assert from_audit["site_calibration"]["populations"] == from_files["site_calibration"]["populations"] == ["child"]
    assert from_audit["site_calibration"]["counts"] == from_files["site_calibration"]["counts"]
    child_audit, child_files = from_audit["populations"]["child"], from_files["populations"]["child"]
    assert child_audit["operating_point"]["threshold"] == pytest.approx(child_files["operating_point"]["threshold"], abs=1e-9)
    assert child_audit["calibration"]["temperature"] == pytest.approx(child_files["calibration"]["temperature"], abs=1e-6)
    assert child_audit["site"]["figures"]["specificity"] == child_files["site"]["figures"]["specificity"]
    assert "adult" in from_audit["site_calibration"]["kept_validation_point"]  # the few routed to adults: too few, kept
