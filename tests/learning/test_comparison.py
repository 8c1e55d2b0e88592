"""``pneumoscan compare``: a candidate replayed on a site's labelled studies against the model in service.

Every figure of the report is recomputed here from the per-study answers it lists (sklearn's AUROC, the counts,
scipy's exact binomial test) and the promotion rule is applied independently."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from pneumoscan.apps.cli import main
from pneumoscan.config import PROJECT_ROOT
from pneumoscan.errors import ConfigurationError
from pneumoscan.learning.comparison import AUROC_MARGIN, compare, mcnemar, promotion_decision
from pneumoscan.learning.data import list_records, split_in_halves

V1, V2 = PROJECT_ROOT / "models" / "pneumoscan-v1", PROJECT_ROOT / "models" / "pneumoscan-v2"


def check_reproduced(result: dict, out: Path, target: float = 0.98) -> None:
    """Each population's figures from the study rows of comparison.json, and the decision from those figures."""
    assert (out / "comparison.html").is_file()
    report = (out / "comparison.html").read_text()
    assert result["decision"]["decision"] in report
    for population, entry in result["populations"].items():
        assert (out / f"roc_{population}.png").stat().st_size > 10_000
        rows = [r for r in result["studies"] if r["population"] == population]
        labels = np.asarray([r["label"] == "PNEUMONIA" for r in rows])
        assert entry["n"] == len(rows) and entry["n_pneumonia"] == labels.sum()
        for side in ("current", "candidate"):
            figures = entry[side]
            probabilities = np.asarray([r[f"{side}_probability"] for r in rows])
            flags = np.asarray([r[f"{side}_flags"] for r in rows])
            assert np.array_equal(flags, probabilities >= figures["threshold"])
            assert figures["auroc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-12)
            assert figures["auroc_ci"][0] <= figures["auroc"] <= figures["auroc_ci"][1]
            counts = {"true_positive": int((flags & labels).sum()), "false_negative": int((~flags & labels).sum()),
                      "true_negative": int((~flags & ~labels).sum()), "false_positive": int((flags & ~labels).sum())}  # fmt: skip
            assert figures["counts"] == counts
            assert figures["sensitivity"] == pytest.approx(counts["true_positive"] / labels.sum())
            assert figures["specificity"] == pytest.approx(counts["true_negative"] / (~labels).sum())
            assert counts["false_negative"] <= math.ceil((1 - target) * labels.sum()) + 1  # calibrated at the site's target
        current = np.asarray([r["current_probability"] for r in rows])
        candidate = np.asarray([r["candidate_probability"] for r in rows])
        difference = entry["auroc_difference"]
        assert difference["value"] == pytest.approx(roc_auc_score(labels, candidate) - roc_auc_score(labels, current), abs=1e-12)
        assert difference["ci"][0] <= difference["value"] <= difference["ci"][1]
        current_right = np.asarray([r["current_flags"] for r in rows]) == labels
        candidate_right = np.asarray([r["candidate_flags"] for r in rows]) == labels
        only_current, only_candidate = int((current_right & ~candidate_right).sum()), int((~current_right & candidate_right).sum())
        assert (entry["mcnemar"]["only_current_right"], entry["mcnemar"]["only_candidate_right"]) == (only_current, only_candidate)
        assert entry["mcnemar"]["p_value"] == pytest.approx(binomtest(only_candidate, only_current + only_candidate).pvalue)
        changed = [r["study"] for r in rows if r["current_flags"] != r["candidate_flags"]]
        assert entry["decisions_changed"] == len(changed) > 0
        assert all(name in report for name in changed)
        assert f"{len(changed)} decisions change" in report
    holds = all(
        e["auroc_difference"]["ci"][0] > -AUROC_MARGIN
        and e["candidate"]["counts"]["false_negative"] <= e["current"]["counts"]["false_negative"]
        and e["candidate"]["counts"]["true_negative"] >= e["current"]["counts"]["true_negative"]
        for e in result["populations"].values()
    )
    assert result["decision"]["promote"] is (holds and bool(result["populations"]))
    assert bool(result["decision"]["reasons"]) is not result["decision"]["promote"]


@pytest.mark.slow
def test_v1_against_v2_on_the_childrens_half(data_root: Path, tmp_path: Path, capsys) -> None:
    records = list_records(data_root, "test")
    half, _ = split_in_halves(records, seed=0)
    site = tmp_path / "site"
    site.mkdir()
    for record in half:
        (site / record.path.name).symlink_to(record.path)
    labels = site / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows([r.path.name, r.class_name, r.patient] for r in half)
    out = tmp_path / "v1-v2"
    assert main(["compare", "--model", str(V1), "--candidate", str(V2), "--data", str(labels), "--out", str(out),
                 "--resamples", "500"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    assert result["current"]["name"] == "pneumoscan-v1" and result["candidate"]["name"] == "pneumoscan-v2"
    assert list(result["populations"]) == ["child"]  # v1 has the children's population only
    check_reproduced(result, out)
    assert f"decision: {result['decision']['decision']}" in printed


@pytest.mark.slow
def test_v2_against_v1_on_the_adult_test_part(adult_root: Path, tmp_path: Path) -> None:
    result = compare(V2, V1, [adult_root], tmp_path / "v2-v1", split="test", resamples=400, progress=False)
    assert list(result["populations"]) == ["adult"]  # v2 routes the adult films to its adults' population
    assert result["populations"]["adult"]["n"] >= 300
    check_reproduced(result, tmp_path / "v2-v1")


def population(fn: tuple[int, int], tn: tuple[int, int], low: float) -> dict:
    """Figures of one population: (current, candidate) missed pneumonias and cleared normals, the AUROC difference's low end."""
    return {"current": {"counts": {"false_negative": fn[0], "true_negative": tn[0]}},
            "candidate": {"counts": {"false_negative": fn[1], "true_negative": tn[1]}},
            "auroc_difference": {"ci": [low, low + 0.02]}}  # fmt: skip


def test_the_promotion_rule() -> None:
    assert promotion_decision({"child": population((2, 2), (100, 110), -0.005)}, {})["promote"]
    assert promotion_decision({"child": population((2, 2), (100, 100), -0.005)}, {"adult": "too few"})["promote"]
    missed = promotion_decision({"child": population((2, 3), (100, 150), 0.01)}, {})
    assert not missed["promote"] and missed["reasons"] == ["child: the candidate misses 3 pneumonias, the current model 2"]
    assert not promotion_decision({"child": population((2, 2), (100, 99), 0.01)}, {})["promote"]
    worse_ranking = promotion_decision({"child": population((2, 2), (100, 110), -AUROC_MARGIN)}, {})
    assert not worse_ranking["promote"] and "may rank worse" in worse_ranking["reasons"][0]
    one_bad = {"child": population((2, 2), (100, 110), 0.0), "adult": population((1, 2), (50, 60), 0.0)}
    assert not promotion_decision(one_bad, {})["promote"]
    nothing = promotion_decision({}, {"child": "too few"})
    assert not nothing["promote"] and nothing["reasons"] == ["no population has enough studies to compare"]


def test_mcnemar_counts_the_discordant_pairs_only() -> None:
    current = np.asarray([True] * 50 + [True] * 9 + [False] * 2 + [False] * 5)
    candidate = np.asarray([True] * 50 + [False] * 9 + [True] * 2 + [False] * 5)
    test = mcnemar(current, candidate)
    assert (test["only_current_right"], test["only_candidate_right"]) == (9, 2)
    assert test["p_value"] == pytest.approx(binomtest(2, 11, 0.5).pvalue)
    assert mcnemar(current, current)["p_value"] == 1.0


def test_a_model_is_not_compared_with_itself_and_no_report_is_overwritten(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="same ONNX graph"):
        compare(V2, V2, [data_root], tmp_path / "same", split="test", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "comparison.json").write_text("{}")
    assert main(["compare", "--model", str(V1), "--candidate", str(V2), "--data", str(data_root), "--out", str(tmp_path / "taken")]) == 2
