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
    """v2 scored 0.35 and v3, taught by the boxes, 0.81 (its card; 0.72 while its map was ReLU'd); here the same figure,
    computed again independently:
    the heat map resized to the file's own pixels (Pillow), its maximum tested against the boxes as the CSV gives them."""
    from pneumoscan.learning.evaluation import evaluate
    from pneumoscan.running.inference import Predictor

    results = evaluate(shipped_model, [adult_root], "test", tmp_path / "eval")
    figures = results["populations"]["adult"]["localisation"]
    assert figures["all"]["n"] == 164 and (tmp_path / "eval" / "adult" / "localisation.md").is_file()
    measured = figures["all"]["pointing_game"]["value"]
    assert 0.78 <= measured <= 0.84, measured
    assert measured > figures["all"]["pointing_game_fixed_point"]["value"] + 0.05  # the map beats a constant guess (v2 lost)
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
    # The 0.64 for the fixed point is the best pixel chosen on the test boxes themselves; learnt on the
    # training part's boxes, as evaluate does, the point scores less (0.604): both measured here
    cover = np.zeros((256, 256))
    for film in films:
        inside = np.zeros((256, 256), dtype=bool)
        for bx, by, bw, bh in boxes[film.path.relative_to(adult_root).as_posix()]:
            inside[int(np.ceil(by - 0.5)) : int(np.ceil(by + bh - 0.5)), int(np.ceil(bx - 0.5)) : int(np.ceil(bx + bw - 0.5))] = True
        cover += inside
    best_on_test = cover.max() / len(films)
    assert abs(best_on_test - 0.64) <= 0.03 and figures["all"]["pointing_game_fixed_point"]["value"] <= best_on_test

    regions = figures["regions"]  # by the card's rule, over every adult test film, normals included
    assert regions["rule_source"] == "the model card" and regions["all"]["films"] == 343
    assert regions["all"]["map"]["value"] > regions["all"]["map_fixed_boxes"]["value"] + 0.05  # v3's regions beat fixed boxes (v2's lost)
    from pneumoscan.learning.localisation import Box, mean_average_precision
    from pneumoscan.running.regions import Region

    tested = [r for r in records_of([adult_root], "test") if r.label == 0 or r.path.relative_to(adult_root).as_posix() in boxes]
    truth = [[Box(*b) for b in boxes.get(r.path.relative_to(adult_root).as_posix(), [])] if r.label else [] for r in tested]
    again, _ = mean_average_precision([[Region(**x.to_dict()) for x in p.regions] for p in predictor.predict([r.path for r in tested])],
                                      truth)  # the regions every answer carries, scored again  # fmt: skip
    assert again == pytest.approx(regions["all"]["map"]["value"], abs=1e-9)


def test_boxes_can_come_from_a_file_named_on_the_command_line(adult_root: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import ConfigurationError
    from pneumoscan.learning.evaluation import boxes_of

    lines = (adult_root / "boxes.csv").read_text().splitlines()
    elsewhere = tmp_path / "theirs.csv"  # another folder: paths written absolute
    elsewhere.write_text("\n".join([lines[0]] + [f"{(adult_root / l.split(',')[0]).as_posix()},{l.split(',', 1)[1]}" for l in lines[1:]]))
    assert boxes_of([adult_root], elsewhere) == boxes_of([adult_root]) == read_boxes(adult_root / "boxes.csv")
    with pytest.raises(ConfigurationError, match="no such file"):
        boxes_of([adult_root], tmp_path / "missing.csv")


# --- regions (item 1's RSNA mAP, the fixed boxes, the rule fitted on validation) ------------------------------------

from pneumoscan.learning.localisation import (  # noqa: E402
    Film,
    FixedBoxes,
    box_iou,
    fit_region_rule,
    image_precision,
    mean_average_precision,
)
from pneumoscan.running.regions import Region, RegionRule  # noqa: E402


def test_rsna_precision_on_known_cases() -> None:
    truth = [Box(0, 0, 100, 100)]
    assert image_precision([Region(0, 0, 100, 100, 0.9)], truth) == 1.0
    half = Region(0, 0, 100, 50, 0.9)  # IoU 0.5: a hit at the thresholds 0.40 and 0.45 only (IoU must exceed them)
    assert box_iou(half, truth[0]) == 0.5
    assert image_precision([half], truth) == 2 / 8
    # a hit and a false positive: TP 1, FP 1, FN 0 at every threshold
    assert image_precision([Region(0, 0, 100, 100, 0.9), Region(150, 150, 20, 20, 0.5)], truth) == 0.5
    assert image_precision([], truth) == 0.0  # a missed box
    assert image_precision([Region(0, 0, 10, 10, 0.9)], []) == 0.0  # a region on a normal film
    assert image_precision([], []) is None  # a normal film left alone is not counted
    value, counted = mean_average_precision([[Region(0, 0, 100, 100, 0.9)], [], [half]], [truth, [], truth])
    assert counted == [0, 2] and value == (1.0 + 0.25) / 2


def test_two_predictions_cannot_both_match_one_box() -> None:
    truth = [Box(0, 0, 100, 100)]
    twice = [Region(0, 0, 100, 100, 0.9), Region(0, 0, 100, 100, 0.8)]
    assert image_precision(twice, truth) == 0.5  # TP 1, FP 1


def test_fixed_boxes_are_the_median_box_of_each_side_commoner_side_first() -> None:
    size = (200, 100)
    training = [([Box(20, 10, 40, 40), Box(120, 20, 60, 60)], size), ([Box(30, 10, 40, 40)], size), ([Box(10, 30, 40, 20)], size)]
    fixed = FixedBoxes.learn(training)
    left, right = fixed.boxes
    assert left == (0.1, 0.1, 0.2, 0.4, 0.75) and right[4] == 0.25
    assert fixed.regions((400, 200), most=1) == [Region(40.0, 20.0, 80.0, 80.0, 0.75)]


def test_the_rule_fitted_on_validation_recovers_the_boxes_of_hand_made_maps() -> None:
    heat = np.zeros((224, 224), dtype=np.float32)
    heat[40:120, 40:100] = 0.8
    heat[60:80, 60:80] = 1.0  # a peak inside the opacity: at a high level only the peak would be boxed
    heat[180:200, 150:170] = 0.35  # a faint spot outside it
    truth = (Box(40, 40, 60, 80),)  # in pixels of a 224 px file
    films = [Film("p1", "PA", (224, 224), truth, heat, 0.9, True), Film("p2", "PA", (224, 224), (), heat, 0.2, False)]
    rule, value = fit_region_rule(films)
    assert value == 1.0
    assert rule == RegionRule(0.3, 0.0, 1)  # the first rule that scores 1: at 0.3 the faint spot is a second, weaker region
    flagged_normal = [films[0], Film("p3", "PA", (224, 224), (), heat, 0.9, True)]  # a region on it costs
    assert fit_region_rule(flagged_normal)[1] == 0.5
    with pytest.raises(LabelsFileError):
        fit_region_rule([films[1]])
