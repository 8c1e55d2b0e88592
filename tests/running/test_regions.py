"""Regions from the heat map (issue 28, item 2): the rule on hand-made maps, and the Predictor's gating."""

from __future__ import annotations

import numpy as np

from pneumoscan.running.regions import Region, RegionRule, components, find_regions


def blob_map(size: int = 224) -> np.ndarray:
    """Two hot squares: a strong one top-left (rows/columns 20–59) and a weaker one at the right (rows 120–139)."""
    heat = np.zeros((size, size), dtype=np.float32)
    heat[20:60, 20:60] = 1.0
    heat[120:140, 180:200] = 0.6
    return heat


def test_each_hot_blob_is_a_box_in_the_original_images_pixels_scored_by_its_peak() -> None:
    rule = RegionRule(level=0.5, min_area=0.0, max_regions=3)
    regions = find_regions(blob_map(), 0.8, rule, (1000, 500))  # the original is 1000 wide, 500 high
    assert len(regions) == 2
    strong, weak = regions
    # cells of 4 model pixels; the cells whose centre falls inside 20–59 are 5..14 → x 5/56 · 1000
    assert strong == Region(x=round(5 * 1000 / 56, 1), y=round(5 * 500 / 56, 1), width=round(10 * 1000 / 56, 1),
                            height=round(10 * 500 / 56, 1), score=0.8)  # fmt: skip
    assert weak.score == 0.48 and weak.x > strong.x + strong.width  # the probability × its peak 0.6
    assert weak.y > 500 / 2


def test_the_level_minimum_area_and_number_of_regions_decide_what_is_kept() -> None:
    heat = blob_map()
    assert len(find_regions(heat, 0.9, RegionRule(level=0.7), (224, 224))) == 1  # the weak blob is below 0.7 × max
    assert len(find_regions(heat, 0.9, RegionRule(level=0.5, max_regions=1), (224, 224))) == 1
    # the weak blob is 5×5 cells of 56² (0.8 %), the strong 10×10 (3.2 %)
    assert len(find_regions(heat, 0.9, RegionRule(level=0.5, min_area=0.01), (224, 224))) == 1
    assert find_regions(heat, 0.9, RegionRule(level=0.5, min_area=0.05), (224, 224)) == []
    assert find_regions(np.zeros((224, 224)), 0.9, RegionRule(level=0.5), (224, 224)) == []


def test_cells_touching_only_at_a_corner_are_separate_regions() -> None:
    marked = np.zeros((4, 4), dtype=bool)
    marked[0, 0] = marked[1, 1] = marked[1, 2] = True
    assert components(marked) == [[(0, 0)], [(1, 1), (1, 2)]]


def test_the_rule_round_trips_through_the_card() -> None:
    rule = RegionRule(level=0.6, min_area=0.02, max_regions=2)
    assert RegionRule.from_card(rule.to_dict() | {"validation_map": 0.1}) == rule
    assert RegionRule.from_card(None) is None and RegionRule.from_card({}) is None
