"""Where on the film: the heat map turned into a few boxes, by a rule fitted on radiologists' boxes (NumPy and OpenCV).

A heat map is read as "the pneumonia is here"; a region says it the way a radiologist's
reading (and a PACS viewer) does: a box with a score. The rule is deliberately simple so that
the browser's on-device mode (``static/device.js``) repeats it step by step and draws the same
boxes as the server:

1. sample the map at the centre of each cell of a ``grid``×``grid`` lattice over the model's input;
2. mark the cells at or above ``level`` × the sampled maximum;
3. group marked cells that touch by an edge (4-connected), in reading order;
4. drop groups smaller than ``min_area`` (a share of the film); score each group by the image's
   calibrated probability × the group's own peak (so the region holding the map's maximum scores
   the probability itself); keep the ``max_regions`` best (the earlier group on a tie);
5. each group's bounding box, scaled from the model's input to the original image's pixels (the
   input is the whole image resized, aspect not kept).

The level, minimum size and number are fitted per population on the validation part's films
(radiologists' boxes and normals alike) by :func:`pneumoscan.learning.localisation.fit_region_rule`
and kept in the model card; a population without boxes to fit them on gets no regions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: Cells per side of the lattice the map is read on: 4 px cells at a 224 px input.
DEFAULT_GRID = 56


@dataclass(frozen=True)
class Region:
    """A box in pixels of the original image (x, y: its top-left corner) and its score in [0, 1]."""

    x: float
    y: float
    width: float
    height: float
    score: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class RegionRule:
    """How a heat map becomes regions (see the module's text); fitted on validation, kept in the card."""

    level: float
    min_area: float = 0.0
    max_regions: int = 3
    grid: int = DEFAULT_GRID

    @classmethod
    def from_card(cls, entry: dict | None) -> RegionRule | None:
        """The rule a card's population entry keeps under ``regions``; None when it has none."""
        if not entry or "level" not in entry:
            return None
        return cls(float(entry["level"]), float(entry.get("min_area", 0.0)), int(entry.get("max_regions", 3)),
                   int(entry.get("grid", DEFAULT_GRID)))  # fmt: skip

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def sample(heatmap: np.ndarray, grid: int) -> np.ndarray:
    """The map's value at the centre pixel of each cell: ``grid``×``grid``, read the same way in the browser."""
    size = heatmap.shape[-1]
    centres = ((np.arange(grid) + 0.5) * size / grid).astype(int)
    return np.asarray(heatmap, dtype=np.float32)[np.ix_(centres, centres)]


def components(marked: np.ndarray) -> list[list[tuple[int, int]]]:
    """Groups of marked cells touching by an edge, in the reading order of their first cells; each group's cells in
    reading order too."""
    _, labels, _, _ = connected_components(marked)
    flat = labels.ravel()
    return [[divmod(int(i), marked.shape[1]) for i in np.flatnonzero(flat == flat[start])] for start in sorted(first_cells(flat))]


def first_cells(labels: np.ndarray) -> np.ndarray:
    """Where each group (label 1, 2, ...; 0 is the unmarked background, absent when every cell is marked) is first met
    in reading order."""
    values, first = np.unique(labels, return_index=True)
    return first[values > 0]


def connected_components(marked: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's 4-connected labelling: the number of labels (background included), the labels, and each label's box.

    A flood fill in Python took 0.7 ms a heat map with many marked cells, a tenth of an adult pneumonia's whole answer
    on one core; OpenCV's takes 20 µs. Its labels need not follow the reading order: :func:`scored_groups` orders the
    groups by their first cells itself.
    """
    import cv2  # already a dependency of serving (CLAHE); loaded when the first regions are drawn

    return cv2.connectedComponentsWithStats(np.ascontiguousarray(marked, dtype=np.uint8), connectivity=4, ltype=cv2.CV_32S)


def scored_groups(heatmap: np.ndarray, probability: float, level: float, grid: int) -> list[tuple[float, int, int, int, int, int]]:
    """Every group of cells at or above ``level``: (score, cells, top row, bottom row, left, right column), best first."""
    cells = sample(heatmap, grid)
    top = float(cells.max())
    if top <= 0:
        return []
    marked = cells >= np.float32(level) * np.float32(top)
    count, labels, boxes, _ = connected_components(marked)
    flat = labels.ravel()
    peaks = np.zeros(count, dtype=np.float32)
    np.maximum.at(peaks, flat[marked.ravel()], cells.ravel()[marked.ravel()])
    scored = []
    for order, label in enumerate(np.argsort(first_cells(flat)) + 1):  # groups in the order their first cells are read
        left, top_row, width, height, n = (int(v) for v in boxes[label])  # OpenCV's CC_STAT_LEFT ... CC_STAT_AREA
        peak = float(peaks[label]) / top
        scored.append((round(probability * peak, 4), -order, n, top_row, top_row + height, left, left + width))
    scored.sort(reverse=True)  # by score, then the group found first
    return [(score, n, top_row, bottom_row, left, right) for score, _, n, top_row, bottom_row, left, right in scored]


def select(groups: list[tuple[float, int, int, int, int, int]], rule: RegionRule, image_size: tuple[int, int]) -> list[Region]:
    """The rule's regions among ``groups`` (from :func:`scored_groups`), in pixels of an image of ``image_size``."""
    width, height = image_size
    kept = [g for g in groups if g[1] >= rule.min_area * rule.grid * rule.grid][: rule.max_regions]
    cell_width, cell_height = width / rule.grid, height / rule.grid
    return [Region(round(left * cell_width, 1), round(top_row * cell_height, 1), round((right - left) * cell_width, 1),
                   round((bottom_row - top_row) * cell_height, 1), score)
            for score, _, top_row, bottom_row, left, right in kept]  # fmt: skip


def find_regions(heatmap: np.ndarray, probability: float, rule: RegionRule, image_size: tuple[int, int]) -> list[Region]:
    """The regions of one heat map (``size``×``size`` in [0, 1]) for an image of ``image_size`` (width, height)."""
    return select(scored_groups(heatmap, probability, rule.level, rule.grid), rule, image_size)
