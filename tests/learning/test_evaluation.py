from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.learning.data import Record
from pneumoscan.learning.evaluation import (
    EVALUATION_FILES,
    Calibration,
    bootstrap_auroc_ci,
    checkpoint_logits,
    compute_metrics,
    evaluate,
    metrics_at_threshold,
)
from pneumoscan.running.calibration import OperatingPoint

pytestmark = pytest.mark.slow


def test_metrics_at_threshold_on_a_hand_made_case() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05])
    m = metrics_at_threshold(labels, probs, 0.5)
    assert m["confusion_matrix"] == {"tn": 5, "fp": 1, "fn": 1, "tp": 3}
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.75)


def test_compute_metrics_knows_the_answers_of_a_tiny_case() -> None:
    names = ["person1_bacteria_1", "person2_virus_2", "person3_virus_3", "IM-0001-0001", "IM-0002-0001", "IM-0003-0001"]
    labels = [1, 1, 1, 0, 0, 0]
    records = [Record(Path(n + ".jpeg"), y, n.split("_")[0].rsplit("-", 1)[0], "normal" if y == 0 else n.split("_")[1]) for n, y in zip(names, labels)]
    logits = np.array([3.0, 1.0, -1.0, -2.0, 0.5, -3.0])
    metrics = compute_metrics(records, logits, Calibration(1.0, OperatingPoint(0.5, "sensitivity", 0.98, "x")), "val", resamples=200)
    # positives 3, 1, -1 vs negatives -2, 0.5, -3: 8 of 9 pairs ordered right
    assert metrics["auroc"] == pytest.approx(8 / 9)
    assert metrics["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 2}
    assert metrics["sensitivity_by_subtype"] == {"bacteria": {"n": 1, "sensitivity": 1.0}, "virus": {"n": 2, "sensitivity": 0.5}}
    low, high = metrics["auroc_ci"]
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_interval_contains_the_estimate_and_resamples_patients() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 100)
    probs = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    patients = [f"p{i // 2}" for i in range(200)]  # two images per patient
    low, high = bootstrap_auroc_ci(labels, probs, patients, resamples=1000)
    from sklearn.metrics import roc_auc_score

    assert low < roc_auc_score(labels, probs) < high
    assert bootstrap_auroc_ci(labels, probs, patients, resamples=1000) == (low, high)  # seeded


def test_evaluate_a_checkpoint_writes_every_file(smoke_checkpoint: Path, small_data_root: Path, tmp_path: Path) -> None:
    metrics = evaluate(smoke_checkpoint, small_data_root, "test", tmp_path)
    for name in EVALUATION_FILES:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert metrics["n"] == 24
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("auroc", "auroc_ci", "average_precision", "threshold", "operating_point", "accuracy", "sensitivity",
                "specificity", "precision", "f1", "confusion_matrix", "ece", "sensitivity_by_subtype"):  # fmt: skip
        assert key in saved
    assert set(saved["ece"]) == {"before_calibration", "after_calibration"}
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,probability,predicted,population,view" and len(rows) == 25


def test_onnx_export_matches_the_checkpoint_and_reproduces_its_card(
    smoke_checkpoint: Path, small_data_root: Path, data_root: Path, tmp_path: Path
) -> None:
    from pneumoscan.learning.data import list_records
    from pneumoscan.learning.export import export
    from pneumoscan.running.inference import Predictor

    card = export(smoke_checkpoint, tmp_path / "model", small_data_root, name="test-model")
    assert (tmp_path / "model" / "MODEL_CARD.md").is_file()
    assert card["operating_point"]["policy"] == "sensitivity" and 0 < card["calibration"]["temperature"]
    gate = card["ood_gate"]
    assert (tmp_path / "model" / gate["file"]).is_file() and gate["kept_validation_share"] >= 0.99
    # one stage: its threshold keeps `keep` of the validation films and their two shifted copies, taken together
    assert (gate["kept_validation_share"] + 2 * gate["kept_shifted_validation_share"]) / 3 >= gate["keep"] - 1e-9
    assert gate["non_xray_n"] >= 30 and 0.0 <= gate["non_xray_rejected_share"] <= 1.0
    card_text = (tmp_path / "model" / "model_card.json").read_text()
    from pneumoscan.config import PROJECT_ROOT

    assert str(PROJECT_ROOT.parent) + "/" not in card_text, "the card must not carry this machine's absolute paths"

    records = list_records(data_root, "test")[::40]  # real images of both classes
    paths = [r.path for r in records]
    onnx = Predictor(tmp_path / "model").logits(paths)
    torch_logits = checkpoint_logits(smoke_checkpoint, paths, progress=False)
    assert np.max(np.abs(1 / (1 + np.exp(-onnx)) - 1 / (1 + np.exp(-torch_logits)))) <= 1e-4

    again = evaluate(tmp_path / "model", small_data_root, "test", tmp_path / "eval")
    for key, value in card["test"]["metrics"].items():
        assert again[key] == value, key
    assert card["operating_point"]["estimator"] == "harrell-davis" and "operating_point_spread" in card


def test_refitting_the_operating_point_with_another_estimator_measures_everything_again(
    smoke_checkpoint: Path, small_data_root: Path, tmp_path: Path
) -> None:
    import csv
    import json

    from pneumoscan.learning.export import export, refit_operating_points
    from pneumoscan.running.calibration import threshold_for_sensitivity

    export(smoke_checkpoint, tmp_path / "model", small_data_root, name="test-model")
    refit = refit_operating_points(tmp_path / "model", [small_data_root], 0, 0.15, estimator="order-statistic")
    assert refit == json.loads((tmp_path / "model" / "model_card.json").read_text())
    point = refit["operating_point"]
    assert point["estimator"] == "order-statistic"
    with open(tmp_path / "model" / "evaluation" / "val" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.asarray([r["label"] == "PNEUMONIA" for r in rows], dtype=int)
    probabilities = np.asarray([float(r["probability"]) for r in rows])
    # the validation part written again is the one the threshold was chosen on, with the order statistic
    assert point["threshold"] == pytest.approx(threshold_for_sensitivity(probabilities, labels, 0.98, "order-statistic"), abs=1e-6)
    assert "order statistic" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    again = evaluate(tmp_path / "model", small_data_root, "test", tmp_path / "eval")
    for key, value in refit["test"]["metrics"].items():
        assert again[key] == value, key


def test_the_points_spread_shows_what_an_order_statistic_of_few_pneumonias_delivers() -> None:
    from pneumoscan.learning.evaluation import operating_point_spread

    rng = np.random.default_rng(1)
    labels = np.array([1] * 50 + [0] * 50)
    probabilities = 1 / (1 + np.exp(-np.concatenate([rng.normal(2.0, 1.0, 50), rng.normal(-2.0, 1.0, 50)])))
    patients = [f"p{i}" for i in range(100)]
    order = operating_point_spread(labels, probabilities, patients, 0.98, "order-statistic", resamples=400)
    smooth = operating_point_spread(labels, probabilities, patients, 0.98, "harrell-davis", resamples=400)
    # the second least certain of 50 pneumonias promises 98 % and delivers about 1 - 2/51 on unseen films
    assert 0.93 < order["out_of_bag_sensitivity"] < 0.975
    assert order["out_of_bag_sensitivity_p05"] < order["out_of_bag_sensitivity"]
    assert smooth["threshold_sd_logit"] < order["threshold_sd_logit"]
    low, high = order["threshold_interval"]
    assert low < float(np.sort(probabilities[:50])[1]) < high
    # classes far apart: every resample's point finds every unseen pneumonia and clears every normal
    apart = np.where(labels == 1, 0.9, 0.1)
    separated = operating_point_spread(labels, apart, patients, 0.98, resamples=100)
    assert separated["out_of_bag_sensitivity"] == 1.0 and separated["out_of_bag_specificity"] == 1.0


def test_threshold_transfer_tells_a_misplaced_threshold_from_a_bad_ranking() -> None:
    from pneumoscan.learning.evaluation import threshold_transfer

    # Perfect ranking, but every score shifted up: the validation threshold 0.5 lets all
    # normals through; a threshold refitted on these labels would clear them all.
    labels = np.array([1] * 50 + [0] * 50)
    probs = np.concatenate([np.linspace(0.9, 0.99, 50), np.linspace(0.55, 0.85, 50)])
    op = OperatingPoint(0.5, "sensitivity", 0.98, "98% sensitivity on validation")
    assert metrics_at_threshold(labels, probs, 0.5)["specificity"] == 0.0
    transfer = threshold_transfer(labels, probs, op)
    assert transfer["specificity_at_own_threshold"] == 1.0
    assert transfer["sensitivity_at_own_threshold"] >= 0.98
    assert 0.85 < transfer["own_threshold"] < 0.91  # the 49th of the 50 pneumonia scores
    # A Youden operating point has no target sensitivity to refit for.
    assert threshold_transfer(labels, probs, OperatingPoint(0.5, "youden", None, "Youden")) is None
