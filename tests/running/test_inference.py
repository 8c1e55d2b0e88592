"""The shipped model in ONNX Runtime: predictions, heat maps, int8, and the predict command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import card_sources, population_entries

from pneumoscan.learning.data import list_records
from pneumoscan.running.inference import CARD_FILE, Predictor, read_card


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


def test_shipped_onnx_file_matches_its_card(shipped_model: Path) -> None:
    from pneumoscan.files import sha256_file

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
    assert from_path.operating_point == population_entries(predictor.card)[from_path.population]["operating_point"]["name"]
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
    from pneumoscan.learning.datamodule import XrayDataset, eval_transform

    records = list_records(data_root, "test")[:3]
    dataset = XrayDataset(records, eval_transform(DataConfig(intensity=predictor.intensity)))
    for i, record in enumerate(records):
        training_tensor = dataset[i][0].numpy()
        inference_tensor = predictor.preprocess(record.path.read_bytes())
        np.testing.assert_array_equal(training_tensor, inference_tensor)


def copy_with_intensity(shipped_model: Path, folder: Path, intensity: str) -> Path:
    """The shipped model's files with a card that asks for another intensity normalisation."""
    import shutil

    shutil.copytree(shipped_model, folder)
    card = read_card(folder)
    card["input"]["intensity"] = intensity
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("intensity", ["equalize", "clahe", "morphology"])
def test_a_card_asking_for_an_intensity_normalisation_gets_it_at_inference_as_in_training(
    shipped_model: Path, data_root: Path, tmp_path: Path, intensity: str
) -> None:
    from pneumoscan.config import DataConfig
    from pneumoscan.learning.datamodule import XrayDataset, eval_transform

    equalising = Predictor.load(copy_with_intensity(shipped_model, tmp_path / "m", intensity))
    records = list_records(data_root, "test")[:3]
    dataset = XrayDataset(records, eval_transform(DataConfig(intensity=intensity)))
    plain = Predictor.load(copy_with_intensity(shipped_model, tmp_path / "plain", "none"))
    for i, record in enumerate(records):
        np.testing.assert_array_equal(dataset[i][0].numpy(), equalising.preprocess(record.path))
        assert not np.array_equal(plain.preprocess(record.path), equalising.preprocess(record.path))


def test_a_card_asking_for_an_unknown_intensity_normalisation_is_refused(shipped_model: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import ModelIntegrityError

    with pytest.raises(ModelIntegrityError, match="intensity normalisation 'retinex'.*export the model again"):
        Predictor.load(copy_with_intensity(shipped_model, tmp_path / "m", "retinex"))


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
    sensitivity = lambda p: float(np.mean(p[labels == 1] >= fp32.threshold))
    assert abs(sensitivity(p8) - sensitivity(p32)) <= 0.005


def test_int8_heatmaps_are_finite_for_confidently_normal_images(shipped_model: Path, data_root: Path) -> None:
    """A confidently normal image has a CAM of zeros; its normalised map must be 0, not 0/0 = NaN."""
    int8 = Predictor.load(shipped_model, precision="int8")
    normals = [r.path for r in list_records(data_root, "test") if r.label == 0][:48]
    predictions = int8.predict(normals, heatmap=True)
    assert min(p.logit for p in predictions) < -9  # the images that used to give NaN maps are among them
    for prediction in predictions:
        assert np.isfinite(prediction.heatmap).all() and 0.0 <= prediction.heatmap.min() <= prediction.heatmap.max() <= 1.0


def test_predict_command_scores_good_files_and_reports_bad_ones(data_root: Path, tmp_path: Path) -> None:
    good = [r.path for r in list_records(data_root, "test")[::300]]
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "scan.jpeg").write_bytes(good[0].read_bytes())
    files = [*map(str, good), str(tmp_path / "notes.jpg"), str(tmp_path / "empty.png"), str(tmp_path / "missing.jpeg"), str(folder)]
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan", "predict", *files, "--format", "json", "--heatmaps", str(tmp_path / "maps")],
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
        assert isinstance(record["in_distribution"], bool)
    assert "not an X-ray image" in by_path[str(tmp_path / "notes.jpg")]["error"]
    assert by_path[str(tmp_path / "empty.png")]["error"]
    assert by_path[str(tmp_path / "missing.jpeg")]["error"] == "file not found"
    assert all("in_distribution" in r for r in records)
    assert by_path[str(folder / "scan.jpeg")]["probability"] == by_path[str(good[0])]["probability"]


def test_predict_command_exit_code_is_zero_when_all_files_score(data_root: Path) -> None:
    path = list_records(data_root, "test")[0].path
    result = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", str(path), "--format", "csv"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header == ("path,decision,probability,label,threshold,population,population_source,operating_point,"
                      "operating_point_source,in_distribution,ood_score,heatmap,error,population_note,regions,regions_note")
    assert row.startswith(str(path))
    assert row.split(",")[8] == "validation"  # the shipped model answers at the operating point fitted on validation


@pytest.mark.parametrize(
    ("bits", "photometric", "syntax"),
    [
        (8, "MONOCHROME2", None),
        (8, "MONOCHROME1", None),
        (12, "MONOCHROME2", None),
        (12, "MONOCHROME1", None),
        (16, "MONOCHROME2", None),
        (16, "MONOCHROME1", "1.2.840.10008.1.2.5"),  # RLE lossless
        (16, "MONOCHROME2", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
        (8, "MONOCHROME2", "1.2.840.10008.1.2.4.90"),
    ],
)
def test_a_dicom_built_from_a_jpeg_gets_the_jpegs_probability(
    predictor: Predictor, data_root: Path, bits: int, photometric: str, syntax: str | None
) -> None:
    from dicom_factory import build_dicom

    for record in list_records(data_root, "test")[::311]:
        dicom = build_dicom(record.path, bits=bits, photometric=photometric, transfer_syntax=syntax)
        assert abs(predictor.predict(dicom).probability - predictor.predict(record.path).probability) <= 0.01


def test_predictions_carry_the_out_of_distribution_verdict(predictor: Predictor, data_root: Path) -> None:
    from PIL import Image

    assert predictor.has_gate
    xray = predictor.predict(list_records(data_root, "test")[5].path)
    assert isinstance(xray.in_distribution, bool) and xray.ood_score >= 0
    for blank in (Image.new("L", (224, 224), 0), Image.new("L", (224, 224), 255)):
        verdict = predictor.predict(blank)
        assert verdict.in_distribution is False and "Not validated for this image" in verdict.warning


def test_the_cards_gate_figures_are_reproduced(shipped_model: Path, data_root: Path, adult_root: Path) -> None:
    """Each population's gate keeps the card's share of its test part and rejects the card's share of non-X-rays."""
    from pneumoscan.learning.data import records_of
    from pneumoscan.learning.export import ood_probe_images

    card = read_card(shipped_model)
    predictor = Predictor.load(shipped_model)
    sources = card_sources(card, data_root, adult_root)
    split = card["validation"]["split"]
    test = records_of(sources, "test", split["seed"], split["val_fraction"])
    probes = predictor.outputs([image for _, image in ood_probe_images()], ["embedding"])["embedding"]
    for population, entry in population_entries(card).items():
        gate = predictor.populations[population].gate
        embeddings = predictor.outputs([r.path for r in test if r.population == population], ["embedding"])["embedding"]
        assert np.mean(gate.in_distribution(gate.score(embeddings))) == pytest.approx(entry["ood_gate"]["kept_test_share"], abs=1e-9)
        rejected = 1 - np.mean(gate.in_distribution(gate.score(probes)))
        assert rejected == pytest.approx(entry["ood_gate"]["non_xray_rejected_share"], abs=1e-9)


def test_predict_on_a_folder_mixing_every_kind_of_input(data_root: Path, tmp_path: Path) -> None:
    """One record per file, a probability for each readable radiograph, a clear error for the rest."""
    import io
    import os

    import pydicom
    import skimage
    from dicom_factory import build_dicom
    from PIL import Image

    xray = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    gray = Image.open(xray).convert("L")
    folder = tmp_path / "mixed"
    (folder / "nested" / "deeper").mkdir(parents=True)

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def jpeg(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    scored = {
        "xray.jpeg": xray.read_bytes(),
        "xray16.png": png(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)),
        "xray_rgba.png": png(gray.convert("RGBA")),
        "xray_cmyk.jpg": jpeg(gray.convert("CMYK")),
        "nested/IM000001": build_dicom(xray, bits=12, photometric="MONOCHROME1"),
        "nested/deeper/rle.dcm": build_dicom(xray, bits=16, transfer_syntax="1.2.840.10008.1.2.5"),
        "nested/no_preamble.dcm": build_dicom(xray, preamble=False),
        "photo.png": (Path(skimage.__file__).parent / "data" / "astronaut.png").read_bytes(),
    }
    refused = {
        "ct.dcm": (Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files" / "CT_small.dcm").read_bytes(),
        "empty.jpeg": b"",
        "truncated.jpeg": xray.read_bytes()[:1500],
        "notes.jpg": b"just some text",
        "page.png": b"<!DOCTYPE html><html></html>",
        "report.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    }
    for name, data in {**scored, **refused}.items():
        (folder / name).write_bytes(data)

    result = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", str(folder), "--format", "json"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    records = {str(Path(r["path"]).relative_to(folder)): r for r in json.loads(result.stdout)}
    assert set(records) == set(scored) | set(refused)
    for name in scored:
        assert records[name]["error"] is None and 0 <= records[name]["probability"] <= 1, name
        assert isinstance(records[name]["in_distribution"], bool), name
    for name in refused:
        assert records[name]["error"] and records[name].get("probability") is None, name
        assert "in_distribution" in records[name]
    assert "modality CT" in records["ct.dcm"]["error"]
    assert records["photo.png"]["in_distribution"] is False and "Not validated for this image" in records["photo.png"]["warning"]
    assert records["photo.png"]["decision"] == "not validated for this image"
    source = records["xray.jpeg"]["probability"]
    for name in ("xray16.png", "xray_rgba.png", "nested/IM000001", "nested/deeper/rle.dcm", "nested/no_preamble.dcm"):
        assert abs(records[name]["probability"] - source) <= 0.01, name


def assert_same_figures(measured: object, recorded: object, where: tuple) -> None:
    """Counts and words exactly; a float to float32 scores' precision, which differs in the last bits between CPUs
    (ONNX Runtime's AVX2 and AVX-512 kernels sum in different orders)."""
    if isinstance(recorded, dict):
        assert isinstance(measured, dict) and measured.keys() == recorded.keys(), where
        for key in recorded:
            assert_same_figures(measured[key], recorded[key], (*where, key))
    elif isinstance(recorded, list):
        assert isinstance(measured, list) and len(measured) == len(recorded), where
        for i, (m, r) in enumerate(zip(measured, recorded, strict=True)):
            assert_same_figures(m, r, (*where, i))
    elif isinstance(recorded, float):
        assert measured == pytest.approx(recorded, rel=1e-6, abs=1e-9), where
    else:
        assert measured == recorded, where


def test_evaluate_reproduces_the_shipped_cards_test_figures(shipped_model: Path, data_root: Path, adult_root: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    from pneumoscan.learning.evaluation import evaluate

    card = read_card(shipped_model)
    results = evaluate(shipped_model, card_sources(card, data_root, adult_root), "test", tmp_path)
    results = results.get("populations") or {card.get("population", "child"): results}
    for population, entry in population_entries(card).items():
        for key, value in entry["test"]["metrics"].items():
            assert_same_figures(results[population][key], value, (population, key))
        assert results[population]["threshold"] == entry["operating_point"]["threshold"]


def test_predict_command_size_limits_are_settable(data_root: Path) -> None:
    path = list_records(data_root, "test")[0].path
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan", "predict", str(path), "--format", "json", "--max-pixels", "1000"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "224×224 pixels, more than the limit of 1,000" in json.loads(result.stdout)[0]["error"]
