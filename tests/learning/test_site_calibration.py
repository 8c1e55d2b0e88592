"""``pneumoscan calibrate`` and the halves protocol, with the shipped model and real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import site_folder

from pneumoscan.apps import cli
from pneumoscan.apps.predict import format_records, predict_files
from pneumoscan.files import sha256_file
from pneumoscan.config import PROJECT_ROOT
from pneumoscan.errors import TooFewSiteCases
from pneumoscan.learning.data import (
    Record,
    class_folder_records,
    content_checksum,
    list_records,
    split_in_halves,
)
from pneumoscan.learning.site_calibration import (
    MIN_PER_CLASS,
    SiteStudy,
    fit_population,
    halves_protocol,
    minimum_cases,
)
from pneumoscan.running.calibration import calibrated_probability
from pneumoscan.running.inference import Predictor

MODEL_FILES = ("model.onnx", "model.int8.onnx", "ood_gate.child.npz", "ood_gate.adult.npz", "population.npz")


def test_the_site_model_reuses_the_onnx_files_and_records_where_its_operating_point_came_from(
    site_model: Path, shipped_model: Path
) -> None:
    for name in MODEL_FILES:
        assert sha256_file(site_model / name) == sha256_file(shipped_model / name), name
    card, shipped = (json.loads((folder / "model_card.json").read_text()) for folder in (site_model, shipped_model))
    assert card["onnx"]["sha256"] == shipped["onnx"]["sha256"] and card["int8"]["sha256"] == shipped["int8"]["sha256"]
    child, adult = card["populations"]["child"], card["populations"]["adult"]
    op = child["operating_point"]
    assert op["source"] == "site" and op["date"] == "2026-11-20"
    assert op["name"] == "98% sensitivity on the site set of 2026-11-20" and op["target"] == 0.98
    assert child["validation_operating_point"]["operating_point"] == shipped["populations"]["child"]["operating_point"]
    assert adult["operating_point"] == shipped["populations"]["adult"]["operating_point"]  # not calibrated: unchanged
    site = card["site_calibration"]
    records = class_folder_records(PROJECT_ROOT / site["data"][0]["source"])  # portable: relative to the project, or absolute
    assert site["set_sha256"] == content_checksum(records, with_labels=True) == child["site"]["set_sha256"]
    assert site["n"] == 120 and sum(site["counts"]["child"].values()) + sum(site["counts"].get("adult", {}).values()) == 120
    assert site["base_model"]["onnx_sha256"] == shipped["onnx"]["sha256"] and site["command"]
    figures = child["site"]["figures"]
    assert figures["n_pneumonia"] + figures["n_normal"] == figures["n"] <= 120
    for name in ("sensitivity", "specificity", "auroc"):
        low, high = figures[f"{name}_ci"]
        assert 0 <= low <= figures[name] <= high <= 1, name
    assert figures["sensitivity"] >= 0.98  # the threshold was set for it on these studies
    assert card["drift_reference"]["source"].startswith("the site set of 2026-11-20")
    text = (site_model / "MODEL_CARD.md").read_text()
    assert "Site calibration of 2026-11-20" in text and site["set_sha256"] in text
    assert (site_model / "site" / "child" / "metrics.json").is_file() and (site_model / "site" / "child" / "roc.png").is_file()


def test_the_site_operating_point_answers_and_says_so(site_model: Path, data_root: Path) -> None:
    card = json.loads((site_model / "model_card.json").read_text())
    predictor = Predictor.load(site_model)
    settings = predictor.populations["child"]
    assert settings.threshold == card["populations"]["child"]["operating_point"]["threshold"]
    assert settings.temperature == card["populations"]["child"]["calibration"]["temperature"]
    assert settings.in_force == "site calibration of 2026-11-20" and predictor.populations["adult"].in_force == "validation"
    record = next(r for r in list_records(data_root, "test") if r.label == 1)
    prediction = predictor.predict(record.path)
    assert prediction.population == "child" and prediction.operating_point_source == "site calibration of 2026-11-20"
    assert prediction.probability == pytest.approx(float(calibrated_probability(prediction.logit, settings.temperature)))
    assert prediction.to_dict()["operating_point_source"] == "site calibration of 2026-11-20"
    table = format_records(predict_files(predictor, [record.path]), "table")
    assert "operating point in force (child): 98% sensitivity on the site set of 2026-11-20 [site calibration of 2026-11-20]" in table


def test_calibrate_takes_a_labels_file_from_the_command_line(shipped_model: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    site = site_folder(data_root, tmp_path / "site", 55, 55, start=3)
    with open(site / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "age"])
        for path in sorted(site.rglob("*.jpeg")):
            writer.writerow([path.relative_to(site).as_posix(), path.parent.name, path.name.split("_")[0].rsplit("-", 1)[0], 4])
    out = tmp_path / "calibrated"
    assert cli.main(["calibrate", "--model", str(shipped_model), "--data", str(site / "labels.csv"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[child] 98% sensitivity on the site set of" in printed and "[adult] unchanged" in printed
    card = json.loads((out / "model_card.json").read_text())
    assert card["site_calibration"]["data"][0]["labels_file_sha256"] == sha256_file(site / "labels.csv")
    assert card["site_calibration"]["counts"] == {"child": {"NORMAL": 55, "PNEUMONIA": 55}}  # the age column decides
    assert card["site_calibration"]["command"] == f"pneumoscan calibrate --model {shipped_model} --data {site / 'labels.csv'} --out {out}"
    assert card["name"] == "calibrated"


def test_too_few_cases_are_refused_with_the_numbers(shipped_model: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    site = site_folder(data_root, tmp_path / "small-site", 20, 60)
    code = cli.main(["calibrate", "--model", str(shipped_model), "--data", str(site), "--population", "child", "--out", str(tmp_path / "x")])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert "20 normal of the 50 needed" in error and "pneumonia" not in error.split("needed")[0].split("20 normal")[0]
    assert not (tmp_path / "x" / "model_card.json").exists()


def fake_studies(labels: list[int], logits: np.ndarray, population: str = "child") -> list[SiteStudy]:
    return [
        SiteStudy(Record(Path(f"{i}.png"), label, f"p{i // 2}", "x"), float(logit), population, True, 0.5)
        for i, (label, logit) in enumerate(zip(labels, logits))
    ]


def test_the_minimum_follows_the_target() -> None:
    assert minimum_cases("sensitivity", 0.98) == {"PNEUMONIA": 50, "NORMAL": MIN_PER_CLASS}
    assert minimum_cases("sensitivity", 0.99)["PNEUMONIA"] == 100  # below 1/(1-target) the threshold may miss none
    assert minimum_cases("youden", 0.98)["PNEUMONIA"] == MIN_PER_CLASS
    rng = np.random.default_rng(0)
    labels = [1] * 80 + [0] * 60
    studies = fake_studies(labels, np.where(np.asarray(labels) == 1, rng.normal(2, 1, 140), rng.normal(-2, 1, 140)))
    fit_population(studies, "child", "sensitivity", 0.98, "test")  # 80 pneumonias: enough for 98 %
    with pytest.raises(TooFewSiteCases, match="80 pneumonia of the 100 needed"):
        fit_population(studies, "child", "sensitivity", 0.99, "test")


def test_a_wide_sensitivity_interval_is_a_warning() -> None:
    rng = np.random.default_rng(1)
    few = [1] * 50 + [0] * 50
    _, figures = fit_population(fake_studies(few, rng.normal(0, 1, 100) + 1.5 * np.asarray(few)), "child", "sensitivity", 0.98, "x", 300)
    low = figures["sensitivity_ci"][0]
    assert low < 0.98 - 0.03 and any("wide" in w for w in figures["warnings"])  # 50 pneumonias: 0.93 cannot be excluded
    many = [1] * 2000 + [0] * 2000
    _, firm = fit_population(fake_studies(many, rng.normal(0, 1, 4000) + 4 * np.asarray(many)), "child", "sensitivity", 0.98, "x", 300)
    assert not firm["warnings"]


def test_halves_keep_patients_whole_and_are_seeded() -> None:
    records = [Record(Path(f"{i}.png"), int(i % 3 == 0), f"p{i // 3}", "x") for i in range(300)]
    a, b = split_in_halves(records, seed=0)
    assert not {r.patient for r in a} & {r.patient for r in b} and len(a) + len(b) == 300
    assert abs(len({r.patient for r in a}) - len({r.patient for r in b})) <= 2
    assert [r.path for r in split_in_halves(records, seed=0)[0]] == [r.path for r in a]
    assert [r.path for r in split_in_halves(records, seed=1)[0]] != [r.path for r in a]


def test_the_halves_protocol_on_a_small_made_up_set(shipped_model: Path, data_root: Path, tmp_path: Path) -> None:
    """Fit on one half, measure on the other, both ways: both reported, each half measured at the other's threshold."""
    site = site_folder(data_root, tmp_path / "site", 110, 110, start=1)
    result = halves_protocol(shipped_model, [site], split="all", population="child", resamples=200, progress=False)
    assert [d["direction"] for d in result["directions"]] == ["A → B", "B → A"]
    assert sum(result["halves"]["images"]) == 220
    forward, backward = result["directions"]
    assert forward["fitted_on"]["n"] <= backward["measured_on"]["n"] and backward["fitted_on"]["n"] <= forward["measured_on"]["n"]
    assert forward["fitted_on"]["threshold"] != backward["fitted_on"]["threshold"]
    for d in result["directions"]:
        m = d["measured_on"]
        assert m["n_pneumonia"] + m["n_normal"] == m["n"]
        for name in ("sensitivity", "specificity"):
            low, high = m[f"{name}_ci"]
            assert low <= m[name] <= high
        assert d["fitted_on"]["sensitivity_on_fit_half"] >= 0.98


def test_a_site_file_that_cannot_be_read_is_named(shipped_model: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    site = site_folder(data_root, tmp_path / "site", 50, 50)
    (site / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    code = cli.main(["calibrate", "--model", str(shipped_model), "--data", str(site), "--out", str(tmp_path / "x")])
    error = capsys.readouterr().err
    assert code == 2 and "site/NORMAL/broken.jpeg" in error and "Traceback" not in error


def test_the_shipped_card_records_both_directions_of_the_halves_and_renders_them(shipped_model: Path) -> None:
    from pneumoscan.learning.model_card import render_card

    card = json.loads((shipped_model / "model_card.json").read_text())
    for population in ("child", "adult"):
        protocol = card["site_protocol"][population]
        assert [d["direction"] for d in protocol["directions"]] == ["A → B", "B → A"] and protocol["target"] == 0.98
        assert protocol["model_onnx_sha256"] == card["onnx"]["sha256"] and protocol["split"] == "test"
        assert json.loads((shipped_model / "site-protocol" / f"{population}.json").read_text()) == protocol
    assert (shipped_model / "MODEL_CARD.md").read_text() == render_card(card)


def test_calibrate_from_an_audit_log_without_readings_says_what_is_missing(shipped_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "site"
    assert cli.main(["calibrate", "--model", str(shipped_model), "--from-audit", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    name = json.loads((shipped_model / "model_card.json").read_text())["name"]
    assert f"the audit log holds no readings of {name}'s answers: record radiologists' readings first" in capsys.readouterr().err
    assert not (out / "model_card.json").exists()
    assert cli.main(["calibrate", "--model", str(shipped_model), "--data", str(tmp_path), "--since", "2026-12-01",
                     "--out", str(out)]) == 2  # fmt: skip
    assert "--since goes with --from-audit" in capsys.readouterr().err
