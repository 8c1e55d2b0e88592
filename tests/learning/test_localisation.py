"""Heat maps against radiologists' boxes (issue 28, item 1): the metrics on hand-made maps, then the shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.errors import LabelsFileError
from pneumoscan.learning.data import records_of
from pneumoscan.learning.localisation import (
    Baselines,
    Box,
    best_level,
    bootstrap_mean,
    box_mask,
    overlap,
    localisation_figures,
    mass_inside,
    pointing_hit,
    read_boxes,
)


def test_a_map_peaking_inside_a_box_scores_1_and_outside_0() -> None:
    mask = box_mask([Box(0, 0, 128, 256)], (256, 256), 224)  # the left half of the film
    inside, outside = np.zeros((224, 224)), np.zeros((224, 224))
    inside[100, 30], outside[100, 200] = 1.0, 1.0
    assert pointing_hit(inside, mask) and not pointing_hit(outside, mask)
    assert mass_inside(inside, mask) == 1.0 and mass_inside(outside, mask) == 0.0
    assert mass_inside(np.ones((224, 224)), mask) == pytest.approx(0.5)  # a flat map puts the box's share inside
    assert mass_inside(np.zeros((224, 224)), mask) == 0.0


def test_iou_and_dice_of_the_thresholded_map_and_the_level_chosen_on_validation() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # the left half
    heat = np.zeros((10, 10))
    heat[:, :5], heat[:, 5:] = 1.0, 0.3  # strong on the box, weaker beside it
    assert overlap(heat, mask, 0.5) == (1.0, 1.0)  # above half the maximum: exactly the box
    iou, dice = overlap(heat, mask, 0.2)  # everything: the box is half of it
    assert iou == 0.5 and dice == pytest.approx(2 / 3)
    assert overlap(np.zeros((10, 10)), mask, 0.5) == (0.0, 0.0)
    assert 0.3 < best_level([heat, heat], [mask, mask]) <= 1.0  # a level that cuts the weak half off


def test_boxes_are_scaled_from_the_file_to_the_heat_map_grid() -> None:
    mask = box_mask([Box(512, 0, 512, 512)], (1024, 2048), 8)  # top quarter of the right half of a tall film
    expected = np.zeros((8, 8), dtype=bool)
    expected[:2, 4:] = True
    assert np.array_equal(mask, expected)
    two = box_mask([Box(0, 0, 256, 512), Box(768, 1536, 256, 512)], (1024, 2048), 8)
    assert two.sum() == 8 and two[0, 0] and two[7, 7] and not two[0, 7]


def test_the_fixed_point_is_where_the_training_boxes_overlap_most() -> None:
    masks = [box_mask([Box(0, 0, 100, 100)], (200, 200), 20), box_mask([Box(50, 50, 100, 100)], (200, 200), 20),
             box_mask([Box(60, 60, 30, 30)], (200, 200), 20)]  # fmt: skip
    baselines = Baselines.learn(masks)
    row, column = baselines.fixed_point
    assert all(m[row, column] for m in masks) and 6 <= row <= 8 and 6 <= column <= 8
    assert baselines.fixed_map.max() == 1.0 and baselines.fixed_map.min() == 0.0
    with pytest.raises(LabelsFileError, match="no training image has boxes"):
        Baselines.learn([])


def test_figures_count_hits_and_their_interval_resamples_patients() -> None:
    grid = 10
    masks = [box_mask([Box(0, 0, 5, 10)], (10, 10), grid) for _ in range(4)]
    heatmaps = [np.zeros((grid, grid)) for _ in range(4)]
    for i, heat in enumerate(heatmaps):
        heat[5, 1 if i < 3 else 8] = 1.0  # three inside, one outside
    figures = localisation_figures(masks, heatmaps, ["a", "a", "b", "c"], Baselines.learn(masks), resamples=500)
    assert figures["n"] == 4 and figures["patients"] == 3
    assert figures["pointing_game"]["value"] == 0.75 and figures["pointing_game_fixed_point"]["value"] == 1.0
    low, high = figures["pointing_game"]["ci"]
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert bootstrap_mean(np.ones(5), ["p"] * 5, resamples=50) == (1.0, 1.0)


def test_a_bad_boxes_file_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "boxes.csv").write_text("path,x,y,width,height\na.png,1,2,3,4\nb.png,1,two,3,4\n")
    with pytest.raises(LabelsFileError, match="line 3"):
        read_boxes(tmp_path / "boxes.csv")
    (tmp_path / "boxes.csv").write_text("path,x,y,width,height\na.png,1,2,0,4\n")
    with pytest.raises(LabelsFileError, match="line 2: a box has a positive width"):
        read_boxes(tmp_path / "boxes.csv")
    (tmp_path / "boxes.csv").write_text("path,x,y,width,height\na.png,1,2,3,4\na.png,5,6,7,8\n")
    assert read_boxes(tmp_path / "boxes.csv") == {(tmp_path / "a.png").resolve(): [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]}


@pytest.mark.slow
def test_evaluate_reproduces_the_pointing_game_of_the_shipped_model_on_the_adult_test_part(shipped_model: Path, adult_root: Path,
                                                                                            tmp_path: Path) -> None:  # fmt: skip
    """The issue measured 0.35 for v2; here the same figure, computed again independently: the heat map resized to the
    file's own pixels (Pillow), its maximum tested against the boxes as the CSV gives them."""
    from pneumoscan.learning.evaluation import evaluate
    from pneumoscan.running.inference import Predictor

    results = evaluate(shipped_model, [adult_root], "test", tmp_path / "eval")
    figures = results["populations"]["adult"]["localisation"]
    assert figures["all"]["n"] == 164 and (tmp_path / "eval" / "adult" / "localisation.md").is_file()
    measured = figures["all"]["pointing_game"]["value"]
    assert 0.32 <= measured <= 0.38, measured
    assert figures["all"]["pointing_game_fixed_point"]["value"] > measured + 0.15  # the map loses to a constant guess
    assert figures["validation_films"] > 50 and 0 < figures["all"]["level"] < 1 and 0 <= figures["all"]["iou"]["value"] <= 1

    rows = [line.split(",") for line in (adult_root / "boxes.csv").read_text().splitlines()[1:]]
    boxes: dict[str, list[tuple[float, ...]]] = {}
    for name, *numbers in rows:
        boxes.setdefault(name, []).append(tuple(float(n) for n in numbers))
    films = [r for r in records_of([adult_root], "test") if r.label == 1 and r.path.relative_to(adult_root).as_posix() in boxes]
    predictor = Predictor.load(shipped_model)
    hits = 0
    for film, prediction in zip(films, predictor.predict([r.path for r in films], heatmap=True)):
        width, height = Image.open(film.path).size
        heat = np.asarray(Image.fromarray(prediction.heatmap.astype(np.float32)).resize((width, height), Image.Resampling.NEAREST))
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits += any(bx <= x + 0.5 < bx + bw and by <= y + 0.5 < by + bh for bx, by, bw, bh in boxes[film.path.relative_to(adult_root).as_posix()])
    assert len(films) == 164
    assert abs(hits / len(films) - measured) <= 0.03, (hits / len(films), measured)
