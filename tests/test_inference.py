"""The shipped model in ONNX Runtime: predictions, heat maps, int8, and the predict command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.data import list_records
from pneumoscan.inference import Predictor, read_card


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


def test_shipped_onnx_file_matches_its_card(shipped_model: Path) -> None:
    from pneumoscan.export import sha256_file

    card = read_card(shipped_model)
    assert sha256_file(shipped_model / card["onnx"]["file"]) == card["onnx"]["sha256"]
    if "int8" in card:
        assert sha256_file(shipped_model / card["int8"]["file"]) == card["int8"]["sha256"]


def test_predict_accepts_paths_bytes_arrays_and_batches(predictor: Predictor, data_root: Path) -> None:
    from PIL import Image

    path = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    from_path = predictor.predict(path)
    from_bytes = predictor.predict(path.read_bytes())
    from_array = predictor.predict(np.asarray(Image.open(path).convert("L")))
    assert from_path.probability == pytest.approx(from_bytes.probability, abs=1e-7)
    assert from_path.probability == pytest.approx(from_array.probability, abs=1e-7)
    assert from_path.label == ("PNEUMONIA" if from_path.probability >= predictor.threshold else "NORMAL")
    assert from_path.operating_point == predictor.card["operating_point"]["name"]
    batch = predictor.predict([path, path.read_bytes()])
    assert len(batch) == 2 and batch[0].probability == pytest.approx(from_path.probability, abs=1e-6)


def test_heatmap_on_request(predictor: Predictor, data_root: Path) -> None:
    path = list_records(data_root, "test")[0].path
    assert predictor.predict(path).heatmap is None
    heatmap = predictor.predict(path, heatmap=True).heatmap
    assert heatmap.shape == (224, 224) and heatmap.dtype == np.float32
    assert heatmap.min() == pytest.approx(0.0, abs=1e-6) and heatmap.max() == pytest.approx(1.0, abs=1e-3)


def test_training_and_inference_preprocessing_give_identical_tensors(predictor: Predictor, data_root: Path) -> None:
    from pneumoscan.config import DataConfig
    from pneumoscan.datamodule import XrayDataset, eval_transform

    records = list_records(data_root, "test")[:3]
    dataset = XrayDataset(records, eval_transform(DataConfig()))
    for i, record in enumerate(records):
        training_tensor = dataset[i][0].numpy()
        inference_tensor = predictor.preprocess(record.path.read_bytes())
        np.testing.assert_array_equal(training_tensor, inference_tensor)


def test_int8_stays_within_tolerance_of_fp32(shipped_model: Path, data_root: Path) -> None:
    """On the 624 test images: AUROC within 0.005, sensitivity at the shipped threshold within 0.005."""
    from sklearn.metrics import roc_auc_score

    card = read_card(shipped_model)
    if "int8" not in card:
        pytest.fail("the shipped model has no int8 version")
    records = list_records(data_root, "test")
    paths, labels = [r.path for r in records], np.asarray([r.label for r in records])
    fp32, int8 = Predictor.load(shipped_model), Predictor.load(shipped_model, precision="int8")
    p32 = 1 / (1 + np.exp(-fp32.logits(paths) / fp32.temperature))
    p8 = 1 / (1 + np.exp(-int8.logits(paths) / int8.temperature))
    assert abs(roc_auc_score(labels, p8) - roc_auc_score(labels, p32)) <= 0.005
    sensitivity = lambda p: float(np.mean(p[labels == 1] >= fp32.threshold))  # noqa: E731
    assert abs(sensitivity(p8) - sensitivity(p32)) <= 0.005


def test_predict_command_scores_good_files_and_reports_bad_ones(data_root: Path, tmp_path: Path) -> None:
    good = [r.path for r in list_records(data_root, "test")[::300]]
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "scan.jpeg").write_bytes(good[0].read_bytes())
    files = [*map(str, good), str(tmp_path / "notes.jpg"), str(tmp_path / "empty.png"), str(tmp_path / "missing.jpeg"), str(folder)]
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "predict", *files, "--format", "json", "--heatmaps", str(tmp_path / "maps")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = json.loads(result.stdout)
    assert len(records) == len(good) + 4  # the folder expands to its one image
    by_path = {r["path"]: r for r in records}
    for path in good:
        record = by_path[str(path)]
        assert record["error"] is None and 0.0 <= record["probability"] <= 1.0
        assert record["label"] in ("NORMAL", "PNEUMONIA") and Path(record["heatmap"]).is_file()
    assert "not a readable image" in by_path[str(tmp_path / "notes.jpg")]["error"]
    assert by_path[str(tmp_path / "empty.png")]["error"]
    assert by_path[str(tmp_path / "missing.jpeg")]["error"] == "file not found"
    assert by_path[str(folder / "scan.jpeg")]["probability"] == by_path[str(good[0])]["probability"]


def test_predict_command_exit_code_is_zero_when_all_files_score(data_root: Path) -> None:
    path = list_records(data_root, "test")[0].path
    result = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "predict", str(path), "--format", "csv"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header == "path,probability,label,threshold,heatmap,error" and row.startswith(str(path))
