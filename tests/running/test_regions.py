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


def flood_fill_groups(heatmap: np.ndarray, probability: float, level: float, grid: int) -> list[tuple]:
    """The rule's steps 1–4 as written (and as ``static/device.js`` repeats them): a flood fill from each marked cell in
    reading order. The reference that OpenCV's labelling must reproduce group for group, order and ties included."""
    from pneumoscan.running.regions import sample

    cells = sample(heatmap, grid)
    top = float(cells.max())
    if top <= 0:
        return []
    marked = cells >= np.float32(level) * np.float32(top)
    seen, scored = np.zeros_like(marked), []
    for start in zip(*np.nonzero(marked)):
        if seen[start]:
            continue
        seen[start], group, stack = True, [], [start]
        while stack:
            r, c = stack.pop()
            group.append((int(r), int(c)))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < grid and 0 <= nc < grid and marked[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        rs, cs = [r for r, _ in group], [c for _, c in group]
        peak = max(float(cells[r, c]) for r, c in group) / top
        scored.append((round(probability * peak, 4), -len(scored), len(group), min(rs), max(rs) + 1, min(cs), max(cs) + 1))
    scored.sort(reverse=True)
    return [(score, n, t, b, left, right) for score, _, n, t, b, left, right in scored]


def test_the_groups_are_the_flood_fills_group_for_group_on_many_maps() -> None:
    """Smooth random maps (several blobs, snakes and ties among them) and coarse noise, at several levels."""
    from pneumoscan.running.regions import scored_groups

    rng = np.random.default_rng(0)
    maps = []
    for _ in range(150):
        coarse = rng.random((int(rng.integers(3, 15)),) * 2).astype(np.float32)
        maps.append(np.kron(coarse, np.ones((224 // coarse.shape[0] + 1,) * 2, np.float32))[:224, :224])
        maps.append(np.round(rng.random((224, 224)), 1).astype(np.float32))  # many equal peaks: ties broken by order
    maps += [blob_map(), np.zeros((224, 224), np.float32)]
    compared = 0
    for heat in maps:
        for level in (0.3, 0.6, 0.9):
            expected = flood_fill_groups(heat, 0.87, level, 56)
            assert scored_groups(heat, 0.87, level, 56) == expected
            compared += len(expected)
    assert compared > 10_000  # groups of every size and shape were compared, not only empty maps
