from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.apps import cli
from pneumoscan.config import BORDER_PROBE_DEPTH
from pneumoscan.learning.evaluation import evaluate
from pneumoscan.learning.localisation import Box
from pneumoscan.learning.shortcuts import (
    blank_borders,
    border_band,
    box_area_in_band,
    heatmap_peaks_in_band,
    paired_difference,
    probe_borders,
)


def test_blanking_sets_the_four_strips_black_and_leaves_the_middle_as_it_was() -> None:
    image = np.random.default_rng(0).integers(1, 256, (224, 200), dtype=np.uint8)
    blanked = blank_borders(image, 0.12)
    rows, cols = int(0.12 * 224), int(0.12 * 200)
    assert (blanked[:rows] == 0).all() and (blanked[-rows:] == 0).all()
    assert (blanked[:, :cols] == 0).all() and (blanked[:, -cols:] == 0).all()
    assert (blanked[rows:-rows, cols:-cols] == image[rows:-rows, cols:-cols]).all()
    assert (image > 0).all()  # the input is not changed
    assert border_band(1000, 1000, 0.12).mean() == pytest.approx(1 - 0.76**2)


def test_a_heat_map_peaks_in_the_band_only_when_its_maximum_lies_there() -> None:
    maps = np.zeros((3, 224, 224), np.float32)
    maps[0, 2, 2] = 1.0  # corner
    maps[1, 112, 112] = 1.0  # middle
    maps[2, 112, 220] = 1.0  # right edge
    assert heatmap_peaks_in_band(maps, 0.12).tolist() == [True, False, True]


def test_the_boxes_area_in_the_band_is_measured_on_the_file_s_pixels() -> None:
    size = (1000, 1000)  # band: 120 px along each edge
    assert box_area_in_band([Box(300, 300, 200, 200)], size, 0.12) == 0.0
    assert box_area_in_band([Box(0, 0, 100, 100)], size, 0.12) == 1.0
    assert box_area_in_band([Box(20, 400, 200, 100)], size, 0.12) == pytest.approx(0.5)
    # overlapping boxes count their union once
    assert box_area_in_band([Box(20, 400, 200, 100), Box(20, 400, 200, 100)], size, 0.12) == pytest.approx(0.5)


def test_the_paired_change_is_zero_when_blanking_changes_nothing_and_clearly_negative_when_it_ruins_the_ranking() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 100)
    scores = labels * 2.0 + rng.normal(0, 1, 200)
    patients = [f"p{i}" for i in range(200)]
    same = paired_difference(labels, scores, scores.copy(), patients)
    assert same["change"] == 0.0 and same["change_ci"] == [0.0, 0.0]
    ruined = paired_difference(labels, scores, rng.normal(0, 1, 200), patients)
    assert ruined["as_is"] > 0.85 and ruined["change"] < -0.2
    assert ruined["change_ci"][1] < 0 < ruined["as_is"] - 0.5
    partial = paired_difference(labels, scores, scores.copy(), patients, sensitivity=0.95)
    assert 0.5 < partial["as_is"] < 1.0 and partial["change"] == 0.0


@pytest.mark.slow
def test_the_border_probe_of_the_shipped_model_scores_the_films_as_the_evaluation_does(
    shipped_model: Path, small_adult_root: Path, tmp_path: Path
) -> None:
    metrics = evaluate(shipped_model, [small_adult_root], "test", tmp_path)["populations"]["adult"]
    borders = probe_borders(shipped_model, [small_adult_root], "test", tmp_path, BORDER_PROBE_DEPTH)["adult"]
    # "as it is" comes from the probe's own inputs: it must rank the films exactly as the evaluation did
    assert borders["auroc"]["as_is"] == pytest.approx(metrics["auroc"], abs=1e-6)
    assert borders["n"] == metrics["n"] and set(borders["by_view"]) == {"AP", "PA"}
    point = borders["at_operating_point"]
    assert point["threshold"] == metrics["threshold"]
    assert point["as_is"]["sensitivity"] == pytest.approx(metrics["sensitivity"])
    assert point["as_is"]["specificity"] == pytest.approx(metrics["specificity"])
    assert borders["probability_change"]["max"] > 0  # the blanked films are really other inputs
    assert borders["gate_keeps"]["as_is"] >= 0.9  # the gate keeps ≥ 99 % of the adult test part as it is
    written = json.loads((tmp_path / "adult" / "borders.json").read_text())
    assert written["auroc"] == borders["auroc"]
    assert "| AUROC within PA |" in (tmp_path / "adult" / "borders.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--blank-borders", "0.6"], "between 0 and 0.5"), (["--blank-borders", "--held-out-by", "models/pneumoscan-v2"], "without --held-out-by")],
)
def test_the_command_line_refuses_a_probe_that_cannot_run_before_scoring_anything(
    shipped_model: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    code = cli.main(["evaluate", "--model", str(shipped_model), "--split", "val", "--out", str(tmp_path / "out"), *extra])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_is_refused_by_the_probe_with_what_to_give_instead(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"")
    assert cli.main(["evaluate", "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--blank-borders"]) != 0
    assert "exported model folder" in capsys.readouterr().err
