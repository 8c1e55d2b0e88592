"""The audit log says which model and operating points answered from when (serve, dicom-node), and records each
promotion from a ``pneumoscan compare`` report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pneumoscan.apps.audit import AuditLog, connect
from pneumoscan.apps.cli import main
from pneumoscan.apps.dicom.node import DicomNode
from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings
from pneumoscan.apps.settings import DicomNodeSettings
from pneumoscan.files import sha256_file
from pneumoscan.running.inference import Predictor


def events(data_dir: Path) -> list[dict]:
    return AuditLog(connect(ServiceSettings(data_dir=data_dir).resolved_database_url)).model_events()


def test_the_service_records_the_model_and_points_it_answers_with(shipped_model: Path, tmp_path: Path) -> None:
    predictor = Predictor.load(shipped_model)
    TestClient(create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path), predictor))
    (started,) = events(tmp_path)
    assert (started["event"], started["entry_point"]) == ("started", "serve")
    assert started["model_sha256"] == predictor.model_sha256 and started["model_name"] == predictor.card["name"]
    assert started["operating_points"] == {
        p: {"name": s.operating_point, "threshold": s.threshold, "source": s.in_force} for p, s in predictor.populations.items()
    }
    TestClient(create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path), predictor))  # a restart: another row
    assert [e["event"] for e in events(tmp_path)] == ["started", "started"]


def test_the_dicom_node_records_the_model_it_answers_with(shipped_model: Path, tmp_path: Path) -> None:
    predictor = Predictor.load(shipped_model)
    node = DicomNode(DicomNodeSettings(dicom_port=0, data_dir=tmp_path), predictor)
    node.start()
    try:
        (started,) = events(tmp_path)
        assert (started["entry_point"], started["model_sha256"]) == ("dicom-node", predictor.model_sha256)
    finally:
        node.stop()


def report(promote: bool) -> dict:
    """A compare report as comparison.json holds it (the figures promote reads)."""
    side = {"operating_point": "98% sensitivity on the site set", "threshold": 0.42, "temperature": 1.7}
    return {
        "date": "2026-12-07",
        "current": {"name": "pneumoscan-v2", "folder": "pneumoscan-v2", "onnx_sha256": "a" * 64},
        "candidate": {"name": "pneumoscan-v3", "folder": "pneumoscan-v3", "onnx_sha256": "b" * 64},
        "populations": {"child": {"current": {**side, "threshold": 0.3}, "candidate": side}},
        "decision": {"promote": promote, "decision": "promote" if promote else "do not promote",
                     "reasons": [] if promote else ["child: the candidate misses 3 pneumonias, the current model 2"]},
    }  # fmt: skip


def test_a_promotion_is_an_audit_row_and_a_report_against_it_needs_a_reason(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "compare"
    folder.mkdir()
    (folder / "comparison.json").write_text(json.dumps(report(promote=True)))
    assert main(["promote", str(folder), "--by", "dr.house", "--data-dir", str(tmp_path)]) == 0
    (promoted,) = events(tmp_path)
    assert (promoted["event"], promoted["model_name"], promoted["model_sha256"]) == ("promoted", "pneumoscan-v3", "b" * 64)
    assert promoted["operating_points"]["child"]["threshold"] == 0.42
    detail = promoted["detail"]
    assert detail["report_sha256"] == sha256_file(folder / "comparison.json") and detail["by"] == "dr.house"
    assert detail["replaces"] == {"name": "pneumoscan-v2", "onnx_sha256": "a" * 64} and detail["override"] is None

    against = tmp_path / "against.json"
    against.write_text(json.dumps(report(promote=False)))
    assert main(["promote", str(against), "--by", "dr.house", "--data-dir", str(tmp_path)]) == 2
    assert "says do not promote (child: the candidate misses 3 pneumonias" in capsys.readouterr().err
    assert len(events(tmp_path)) == 1
    assert main(["promote", str(against), "--by", "dr.house", "--override", "the old model is withdrawn",
                 "--data-dir", str(tmp_path)]) == 0  # fmt: skip
    assert events(tmp_path)[-1]["detail"]["override"] == "the old model is withdrawn"


@pytest.mark.parametrize("broken", ["not json", json.dumps({"date": "2026-12-07"}), None])
def test_promote_refuses_what_is_not_a_compare_report(tmp_path: Path, capsys, broken: str | None) -> None:
    path = tmp_path / "comparison.json"
    if broken is not None:
        path.write_text(broken)
    assert main(["promote", str(path), "--by", "dr.house", "--data-dir", str(tmp_path)]) == 2
    assert "is not a report of 'pneumoscan compare'" in capsys.readouterr().err


def test_promote_refuses_a_patient_field_as_the_user(tmp_path: Path, capsys) -> None:
    (tmp_path / "comparison.json").write_text(json.dumps(copy.deepcopy(report(promote=True))))
    assert main(["promote", str(tmp_path), "--by", "Doe, John", "--data-dir", str(tmp_path)]) == 2
    assert "is not a user id" in capsys.readouterr().err
