"""Two populations end to end: labels-file data, per-population export, routing by image and by DICOM age."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import acr_nema_dicom

from pneumoscan.running.inference import Predictor, read_card

pytestmark = pytest.mark.slow


def test_export_fits_each_population_on_its_own_validation_part(two_population_model: Path) -> None:
    card = read_card(two_population_model)
    assert set(card["populations"]) == {"child", "adult"}
    for population, entry in card["populations"].items():
        assert entry["validation"]["metrics"]["n"] > 0 and entry["test"]["metrics"]["n"] > 0
        assert entry["operating_point"]["policy"] == "sensitivity"
        assert (two_population_model / entry["ood_gate"]["file"]).is_file()
        assert entry["ood_gate"]["file"] == f"ood_gate.{population}.npz"
    adult = card["populations"]["adult"]["test"]["metrics"]
    assert {"AP", "PA", "reversed_view_mix", "view_only_baseline"} <= set(adult["by_view"])
    assert card["populations"]["child"]["test"]["metrics"]["by_view"] is None  # Kermany records no view
    assert (two_population_model / "population.npz").is_file()
    names = [d["name"] for d in card["data"]["datasets"]]
    assert len(names) == 2 and all(len(d["test_patients_sha256"]) == 64 for d in card["data"]["datasets"])
    text = (two_population_model / "MODEL_CARD.md").read_text()
    assert "## Children" in text and "## Adults" in text and "view-only baseline" in text


def test_population_from_the_image_and_from_the_dicom_age(two_population_model: Path, small_data_root: Path,
                                                          small_adult_root: Path) -> None:  # fmt: skip
    predictor = Predictor.load(two_population_model)
    child = sorted((small_data_root / "test" / "NORMAL").iterdir())[0]
    adult = sorted((small_adult_root / "images").iterdir())[0]
    by_image = predictor.predict([child, adult])
    assert [p.population for p in by_image] == ["child", "adult"]
    assert all(p.population_source == "image" and p.population_note is None for p in by_image)
    card = read_card(two_population_model)["populations"]
    assert [p.threshold for p in by_image] == [card["child"]["operating_point"]["threshold"], card["adult"]["operating_point"]["threshold"]]

    agreeing = predictor.predict(acr_nema_dicom(adult, age="052Y"))
    assert (agreeing.population, agreeing.population_source, agreeing.population_note) == ("adult", "DICOM PatientAge", None)
    disagreeing = predictor.predict(acr_nema_dicom(child, age="004Y", photometric="MONOCHROME2", bits=8))
    assert disagreeing.population == "child" and disagreeing.population_source == "DICOM PatientAge"
    adult_said_child = predictor.predict(acr_nema_dicom(adult, age="004Y"))
    assert adult_said_child.population == "child" and "looks like an adult's" in adult_said_child.population_note
    assert adult_said_child.threshold == card["child"]["operating_point"]["threshold"]


def test_the_gate_of_each_population_is_used(two_population_model: Path) -> None:
    from pneumoscan.running.ood import OodGate

    predictor = Predictor.load(two_population_model)
    assert all(s.gate.two_stage for s in predictor.populations.values())
    assert {name: s.gate.threshold for name, s in predictor.populations.items()} == {
        name: OodGate.load(two_population_model, name).threshold for name in ("child", "adult")
    }
    noise = (np.random.default_rng(0).integers(0, 256, (224, 224))).astype(np.uint8)
    flagged = predictor.predict(noise)
    assert flagged.in_distribution is False and not flagged.validated


def test_evaluate_reproduces_the_card_per_population(two_population_model: Path, tmp_path: Path) -> None:
    from pneumoscan.learning.evaluation import evaluate

    results = evaluate(two_population_model, None, "test", tmp_path)["populations"]
    card = read_card(two_population_model)["populations"]
    for population in ("child", "adult"):
        for key in ("n", "auroc", "sensitivity", "specificity"):
            assert results[population][key] == pytest.approx(card[population]["test"]["metrics"][key], abs=1e-6), (population, key)
        assert (tmp_path / population / "report.md").is_file()


def test_evaluate_held_out_by_another_split_scores_only_the_films_both_held_out(two_population_model: Path, tmp_path: Path) -> None:
    """Two models of different splits compared on the validation films neither trained on, each at its own operating point."""
    import json
    import shutil

    from pneumoscan.learning.data import records_of
    from pneumoscan.learning.evaluation import evaluate

    other = tmp_path / "other-split"
    shutil.copytree(two_population_model, other)
    card = json.loads((other / "model_card.json").read_text())
    split = card["validation"]["split"]
    split["seed"] += 1
    (other / "model_card.json").write_text(json.dumps(card))
    own = evaluate(two_population_model, None, "val", tmp_path / "own")["populations"]
    shared = evaluate(two_population_model, None, "val", tmp_path / "shared", held_out_by=other)["populations"]
    sources = [Path(read_card(two_population_model)["data"]["datasets"][i]["source"]) for i in range(2)]
    from pneumoscan.config import PROJECT_ROOT

    mine = records_of([PROJECT_ROOT / s for s in sources], "val", split["seed"] - 1, split["val_fraction"])
    theirs = {r.path for r in records_of([PROJECT_ROOT / s for s in sources], "val", split["seed"], split["val_fraction"])}
    expected = {p: sum(1 for r in mine if r.population == p and r.path in theirs) for p in ("child", "adult")}
    assert {p for p, n in expected.items() if n} == set(shared) and any(0 < n < own[p]["n"] for p, n in expected.items())
    for population, metrics in shared.items():
        assert metrics["n"] == expected[population]
        assert metrics["threshold"] == own[population]["threshold"]  # the subject's own point


def test_test_parts_choose_nothing(two_population_checkpoint: Path, two_population_model: Path, small_adult_root: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    """Replace every test image of the adult set by noise: temperatures, thresholds, gates and the classifier stay the same."""
    import shutil

    from PIL import Image

    from pneumoscan.learning.data import dataset_split
    from pneumoscan.learning.export import export

    altered = tmp_path / small_adult_root.name
    shutil.copytree(small_adult_root, altered, symlinks=True)
    rng = np.random.default_rng(1)
    for record in dataset_split(small_adult_root, "test"):
        target = altered / record.path.relative_to(small_adult_root)
        target.unlink()
        Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(target, format="JPEG")
    original = read_card(two_population_model)
    sources = [Path(d["source"]) for d in original["data"]["datasets"]]
    from pneumoscan.config import PROJECT_ROOT

    card = export(two_population_checkpoint, tmp_path / "model", [PROJECT_ROOT / sources[0], altered])
    for population in ("child", "adult"):
        for key in ("calibration", "operating_point"):
            assert card["populations"][population][key] == original["populations"][population][key]
        assert card["populations"][population]["ood_gate"]["threshold"] == original["populations"][population]["ood_gate"]["threshold"]
    assert card["populations"]["adult"]["ood_gate"]["kept_test_share"] == 0.0  # the test part changed, and was read
    assert card["data"]["test_sha256"] != original["data"]["test_sha256"]
    with np.load(tmp_path / "model" / "population.npz") as new, np.load(two_population_model / "population.npz") as old:
        assert all(np.array_equal(new[k], old[k]) for k in old.files)
