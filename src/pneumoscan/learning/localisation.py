"""Does the heat map point where a radiologist would? Its figures against radiologists' boxes, beside fixed baselines.

A heat map is a claim about *where* the pneumonia is, and clinicians read it so. This measures
the claim on the films whose opacities radiologists boxed (``boxes.csv`` beside a dataset's
labels file: ``path,x,y,width,height`` in pixels of the file, x and y its top-left corner, as
the RSNA 2018 boxes of ``rsna_adult``):

- **pointing game**: the map's maximum lies inside a box;
- **mass inside**: the share of the map's total that lies inside the boxes;
- **IoU and Dice** of the map thresholded at a level chosen on the *validation* part's boxed films
  (the level with the best mean IoU there), against the union of the boxes.

Beside each, what needs no model at all, learnt from the *training* part's boxes: the **fixed
point** (the pixel most often inside a training box, the same on every film) and the **fixed
map** (how often each pixel is inside a training box; thresholded at its own validation-chosen
level, it is the **fixed region** the IoU is compared with). A heat map that does not beat them does
not localise. Intervals resample patients (95 %, percentile bootstrap).

Everything is computed on the heat map's own grid (the model's input size): the boxes are
scaled from the file's size to it, as the image itself is (aspect not kept).

The **regions** every answer carries (:mod:`pneumoscan.running.regions`) are measured by RSNA 2018's
challenge metric (:func:`image_precision`, :func:`mean_average_precision`) on every film, normals
included, beside the **fixed boxes** of the training part (:class:`FixedBoxes`) placed on the films
the model flags; the rule that makes them is fitted on validation by the same metric
(:func:`fit_region_rule`). Those are in the file's pixels, as the regions are.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan.errors import LabelsFileError
from pneumoscan.learning.data import Record, labels_file_of
from pneumoscan.running.regions import DEFAULT_GRID, Region, RegionRule, find_regions, scored_groups, select

BOXES_FILE = "boxes.csv"
BOX_COLUMNS = ("path", "x", "y", "width", "height")
RESAMPLES = 2000


@dataclass(frozen=True)
class Box:
    """A radiologist's box, in pixels of the image file (x, y: top-left corner)."""

    x: float
    y: float
    width: float
    height: float


def boxes_file_of(source: Path) -> Path | None:
    """The ``boxes.csv`` beside a dataset's labels file, if it has one."""
    path = labels_file_of(Path(source)).parent / BOXES_FILE
    return path if path.is_file() else None


def boxes_by_dataset(sources: Sequence[Path]) -> dict[Path, dict[Path, list[Box]]]:
    """Each dataset with a ``boxes.csv`` beside its labels (keyed by its resolved folder), with its boxes by image."""
    found = {}
    for source in map(Path, sources):
        file = boxes_file_of(source)
        if file is not None:
            found[source.resolve() if source.is_dir() else source.resolve().parent] = read_boxes(file)
    return found


def read_boxes(path: Path) -> dict[Path, list[Box]]:
    """Each image's boxes, keyed by the image's resolved path; a bad row is refused with its line."""
    path = Path(path)
    boxes: dict[Path, list[Box]] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ())[:5] != BOX_COLUMNS:
            raise LabelsFileError(f"{path.name}: the columns must be {','.join(BOX_COLUMNS)} (found {','.join(reader.fieldnames or [])})")
        for line, row in enumerate(reader, start=2):
            try:
                box = Box(*(float(row[c]) for c in BOX_COLUMNS[1:]))
            except (TypeError, ValueError):
                raise LabelsFileError(f"{path.name}, line {line}: x, y, width and height must be numbers") from None
            if box.width <= 0 or box.height <= 0:
                raise LabelsFileError(f"{path.name}, line {line}: a box has a positive width and height")
            boxes.setdefault((path.parent / (row["path"] or "").strip()).resolve(), []).append(box)
    return boxes


def box_mask(boxes: Sequence[Box], image_size: tuple[int, int], grid: int) -> np.ndarray:
    """``grid``×``grid`` booleans: which pixel centres of the heat map lie inside any box (scaled from the file's size)."""
    width, height = image_size
    centres = (np.arange(grid) + 0.5) / grid
    xs, ys = centres * width, centres * height
    mask = np.zeros((grid, grid), dtype=bool)
    for box in boxes:
        columns = (xs >= box.x) & (xs < box.x + box.width)
        rows = (ys >= box.y) & (ys < box.y + box.height)
        mask |= rows[:, None] & columns[None, :]
    return mask


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """The map's maximum inside a box (the first maximum, in reading order, when several pixels share it)."""
    return bool(mask.flat[int(np.argmax(heatmap))])


#: The levels a map may be thresholded at (a share of its own maximum) for IoU and Dice; one is chosen on validation.
LEVELS = tuple(round(level, 2) for level in np.arange(0.05, 1.0, 0.05))


def overlap(heatmap: np.ndarray, mask: np.ndarray, level: float) -> tuple[float, float]:
    """IoU and Dice of the map above ``level`` × its maximum with the boxes (both 0 when either is empty)."""
    top = float(np.max(heatmap))
    region = heatmap >= level * top if top > 0 else np.zeros_like(mask)
    both, either = np.logical_and(region, mask).sum(), np.logical_or(region, mask).sum()
    total = region.sum() + mask.sum()
    return (float(both / either) if either else 0.0), (float(2 * both / total) if total else 0.0)


def best_level(heatmaps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """The level with the highest mean IoU over (validation) films; the lowest such level on a tie."""
    scores = [np.mean([overlap(h, m, level)[0] for h, m in zip(heatmaps, masks, strict=True)]) for level in LEVELS]
    return LEVELS[int(np.argmax(scores))]


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """The share of the map's total inside the boxes; a map that is zero everywhere has none."""
    total = float(np.sum(heatmap))
    return float(np.sum(heatmap[mask]) / total) if total > 0 else 0.0


@dataclass(frozen=True)
class Baselines:
    """What the training part's boxes give without looking at the film."""

    fixed_point: tuple[int, int]  # row, column of the heat-map grid
    fixed_map: np.ndarray  # grid×grid: how often each pixel is inside a training box

    @classmethod
    def learn(cls, training_masks: Sequence[np.ndarray]) -> Baselines:
        if not training_masks:
            raise LabelsFileError("no training image has boxes: the baselines cannot be learnt")
        frequency = np.mean(np.stack(training_masks).astype(np.float64), axis=0)
        row, column = np.unravel_index(int(np.argmax(frequency)), frequency.shape)
        return cls((int(row), int(column)), frequency)


def bootstrap_mean(values: np.ndarray, patients: Sequence[str], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of a mean over images, resampling patients with replacement."""
    values = np.asarray(values, dtype=np.float64)
    _, index = np.unique(np.asarray(patients), return_inverse=True)
    n = index.max() + 1
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n)[index]
        if weights.sum():
            means.append(float(np.average(values, weights=weights)))
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def figure(values: np.ndarray, patients: Sequence[str], resamples: int) -> dict[str, object]:
    return {"value": float(np.mean(values)), "ci": list(bootstrap_mean(values, patients, resamples))}


def localisation_figures(masks: Sequence[np.ndarray], heatmaps: Sequence[np.ndarray], patients: Sequence[str],
                         baselines: Baselines, levels: tuple[float, float] | None = None,
                         resamples: int = RESAMPLES) -> dict[str, object]:  # fmt: skip
    """The pointing game, the mass inside and (given the validation-chosen ``levels`` of the map and of the fixed map)
    IoU and Dice, for the heat maps and for the baselines, over films with boxes."""
    row, column = baselines.fixed_point
    hits = np.asarray([pointing_hit(h, m) for h, m in zip(heatmaps, masks, strict=True)], dtype=float)
    fixed_hits = np.asarray([m[row, column] for m in masks], dtype=float)
    mass = np.asarray([mass_inside(h, m) for h, m in zip(heatmaps, masks, strict=True)])
    fixed_mass = np.asarray([mass_inside(baselines.fixed_map, m) for m in masks])
    out: dict[str, object] = {
        "n": len(masks),
        "patients": len(set(patients)),
        "pointing_game": figure(hits, patients, resamples),
        "pointing_game_fixed_point": figure(fixed_hits, patients, resamples),
        "mass_inside": figure(mass, patients, resamples),
        "mass_inside_fixed_map": figure(fixed_mass, patients, resamples),
        "box_area_share": float(np.mean([m.mean() for m in masks])),  # what a flat map puts inside
    }
    if levels is not None:
        level, fixed_level = levels
        ours = np.asarray([overlap(h, m, level) for h, m in zip(heatmaps, masks, strict=True)])
        fixed = np.asarray([overlap(baselines.fixed_map, m, fixed_level) for m in masks])
        out |= {"level": level, "iou": figure(ours[:, 0], patients, resamples), "dice": figure(ours[:, 1], patients, resamples),
                "fixed_region_level": fixed_level, "iou_fixed_region": figure(fixed[:, 0], patients, resamples),
                "dice_fixed_region": figure(fixed[:, 1], patients, resamples)}  # fmt: skip
    return out


def localise(records: Sequence[Record], heatmaps: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]],
             boxes: dict[Path, list[Box]], training: Sequence[tuple[Record, tuple[int, int]]],
             validation: Sequence[tuple[Record, tuple[int, int], np.ndarray]] = (),
             resamples: int = RESAMPLES) -> dict[str, object]:  # fmt: skip
    """Figures over the films with boxes, in all and per view, with the baselines of the ``training`` films' boxes.

    ``validation`` (record, size, heat map) of boxed films chooses the thresholding levels of IoU and Dice;
    without it those are left out.
    """
    grid = int(np.asarray(heatmaps[0]).shape[-1]) if heatmaps else 224
    baselines = Baselines.learn([box_mask(boxes[r.path.resolve()], size, grid) for r, size in training
                                 if r.path.resolve() in boxes])  # fmt: skip
    levels = None
    if validation:
        validation_masks = [box_mask(boxes[r.path.resolve()], size, grid) for r, size, _ in validation]
        levels = (best_level([np.asarray(h) for _, _, h in validation], validation_masks),
                  best_level([baselines.fixed_map] * len(validation_masks), validation_masks))  # fmt: skip
    chosen = [i for i, r in enumerate(records) if r.path.resolve() in boxes]
    masks = {i: box_mask(boxes[records[i].path.resolve()], image_sizes[i], grid) for i in chosen}
    groups = {"all": chosen} | {f"view {view}": [i for i in chosen if records[i].view == view]
                                for view in sorted({records[i].view for i in chosen if records[i].view})}  # fmt: skip
    out: dict[str, object] = {"fixed_point": list(baselines.fixed_point), "grid": grid,
                              "validation_films": len(validation)}  # fmt: skip
    for name, picked in groups.items():
        if picked:
            out[name] = localisation_figures([masks[i] for i in picked], [np.asarray(heatmaps[i]) for i in picked],
                                             [records[i].patient for i in picked], baselines, levels, resamples)  # fmt: skip
    return out


def localisation_table(figures: dict) -> str:
    """The figures as a Markdown table, each beside its baseline."""

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "–"
        low, high = entry["ci"]
        return f"{entry['value']:.3f} ({low:.3f}–{high:.3f})"

    lines = ["| films with boxes | n | pointing game | fixed point | mass inside | fixed map | flat map | IoU | fixed region IoU "
             "| Dice | fixed region Dice |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in figures.items():
        if isinstance(entry, dict) and "pointing_game" in entry:
            lines.append(f"| {name} | {entry['n']} | {cell(entry['pointing_game'])} | {cell(entry['pointing_game_fixed_point'])} | "
                         f"{cell(entry['mass_inside'])} | {cell(entry['mass_inside_fixed_map'])} | {entry['box_area_share']:.3f} | "
                         f"{cell(entry.get('iou'))} | {cell(entry.get('iou_fixed_region'))} | {cell(entry.get('dice'))} | "
                         f"{cell(entry.get('dice_fixed_region'))} |")  # fmt: skip
    return "\n".join(lines)


# --- regions: RSNA's challenge metric, the fixed boxes, and the rule fitted on validation ----------------------------

#: The IoU thresholds of the RSNA 2018 challenge's metric.
RSNA_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.40, 0.751, 0.05))


def box_iou(a: Box | Region, b: Box | Region) -> float:
    """Intersection over union of two boxes given as x, y (top-left), width, height."""
    width = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    height = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    inter = max(width, 0.0) * max(height, 0.0)
    union = a.width * a.height + b.width * b.height - inter
    return float(inter / union) if union > 0 else 0.0


def image_precision(predicted: Sequence[Region], truth: Sequence[Box], thresholds: Sequence[float] = RSNA_THRESHOLDS) -> float | None:
    """One image's score in the RSNA 2018 challenge: the mean over IoU thresholds of TP / (TP + FP + FN).

    Predictions are matched in the order of their scores, each to the unmatched box it overlaps most
    above the threshold. An image with neither boxes nor predictions is left out (None); a prediction
    on an image without boxes scores it 0, as a box without a prediction does.
    """
    if not predicted and not truth:
        return None
    if not predicted or not truth:
        return 0.0
    ordered = sorted(predicted, key=lambda region: -region.score)
    ious = np.asarray([[box_iou(p, t) for t in truth] for p in ordered])
    precisions = []
    for threshold in thresholds:
        matched: set[int] = set()
        for row in ious:
            candidates = [j for j in np.argsort(-row) if row[j] > threshold and j not in matched]
            if candidates:
                matched.add(int(candidates[0]))
        tp = len(matched)
        precisions.append(tp / (tp + (len(ordered) - tp) + (len(truth) - tp)))
    return float(np.mean(precisions))


def mean_average_precision(predicted: Sequence[Sequence[Region]], truth: Sequence[Sequence[Box]]) -> tuple[float, list[int]]:
    """The challenge's metric over images (the mean of :func:`image_precision`), and which images it counted."""
    scores = [image_precision(p, t) for p, t in zip(predicted, truth, strict=True)]
    counted = [i for i, s in enumerate(scores) if s is not None]
    return (float(np.mean([scores[i] for i in counted])) if counted else 0.0), counted


@dataclass(frozen=True)
class FixedBoxes:
    """The baseline of regions: on each side of the film, the median training box (as shares of the film's size).

    Scored by how often a training box lies on that side, so the commoner side comes first; placed on
    the films the model flags, it keeps the model's decisions and drops what the film shows.
    """

    boxes: tuple[tuple[float, float, float, float, float], ...]  # x, y, width, height as shares of the film; share of boxes

    @classmethod
    def learn(cls, training: Sequence[tuple[Sequence[Box], tuple[int, int]]]) -> FixedBoxes:
        relative = np.asarray([(b.x / w, b.y / h, b.width / w, b.height / h) for found, (w, h) in training for b in found])
        if not len(relative):
            raise LabelsFileError("no training image has boxes: the fixed boxes cannot be learnt")
        left = relative[:, 0] + relative[:, 2] / 2 < 0.5
        sides = [relative[left], relative[~left]]
        found = [(*np.median(side, axis=0), len(side) / len(relative)) for side in sides if len(side)]
        return cls(tuple(tuple(float(v) for v in box) for box in sorted(found, key=lambda b: -b[4])))

    def regions(self, image_size: tuple[int, int], most: int = 2) -> list[Region]:
        width, height = image_size
        return [Region(x * width, y * height, w * width, h * height, share) for x, y, w, h, share in self.boxes[:most]]


@dataclass(frozen=True)
class Film:
    """What fitting and measuring regions need of one scored film."""

    patient: str
    view: str | None
    size: tuple[int, int]  # width, height of the file
    truth: tuple[Box, ...]  # the radiologists' boxes; none on a normal film
    heatmap: np.ndarray
    probability: float
    flagged: bool  # above the threshold and let through by the gate: the films that get regions
    record: Record | None = field(default=None, compare=False)


#: What the rule may be (see :mod:`pneumoscan.running.regions`); one of each is chosen on validation.
RULE_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RULE_MIN_AREAS = (0.0, 0.01, 0.02, 0.05)
RULE_MAX_REGIONS = (1, 2, 3)


def fit_region_rule(films: Sequence[Film]) -> tuple[RegionRule, float]:
    """The rule with the best RSNA mAP over (validation) films, and that mAP; the first such rule in the order above.

    Normal films count: a region on a flagged normal film is a false positive.
    """
    if not any(f.truth for f in films):
        raise LabelsFileError("no film has radiologists' boxes: a region rule cannot be fitted")
    best: tuple[float, RegionRule] | None = None
    for level in RULE_LEVELS:
        groups = [scored_groups(f.heatmap, f.probability, level, DEFAULT_GRID) if f.flagged else [] for f in films]
        for min_area in RULE_MIN_AREAS:
            for most in RULE_MAX_REGIONS:
                rule = RegionRule(level, min_area, most)
                value, _ = mean_average_precision([select(g, rule, f.size) for g, f in zip(groups, films)], [f.truth for f in films])
                if best is None or value > best[0] + 1e-12:
                    best = (value, rule)
    assert best is not None
    return best[1], best[0]


def fixed_count(films: Sequence[Film], fixed: FixedBoxes) -> int:
    """How many fixed boxes (the commoner side's, or both) score best on (validation) films; one on a tie."""
    scores = [mean_average_precision([fixed.regions(f.size, most) if f.flagged else [] for f in films], [f.truth for f in films])[0]
              for most in (1, 2)]  # fmt: skip
    return 1 + int(scores[1] > scores[0])


def region_figures(films: Sequence[Film], rule: RegionRule, fixed: FixedBoxes, fixed_most: int = 2,
                   resamples: int = RESAMPLES) -> dict[str, object]:  # fmt: skip
    """RSNA mAP of the model's regions and of ``fixed_most`` fixed boxes on the same flagged films, in all and per view."""
    ours = [find_regions(f.heatmap, f.probability, rule, f.size) if f.flagged else [] for f in films]
    baseline = [fixed.regions(f.size, fixed_most) if f.flagged else [] for f in films]
    views = sorted({f.view for f in films if f.view})
    out: dict[str, object] = {"rule": rule.to_dict(), "fixed_boxes": [list(b) for b in fixed.boxes[:fixed_most]]}
    groups = {"all": list(range(len(films)))} | {f"view {v}": [i for i, f in enumerate(films) if f.view == v] for v in views}
    for name, picked in groups.items():
        truth = [films[i].truth for i in picked]
        entry: dict[str, object] = {"films": len(picked), "with_boxes": sum(1 for t in truth if t)}
        for key, predicted in (("map", [ours[i] for i in picked]), ("map_fixed_boxes", [baseline[i] for i in picked])):
            scores = [image_precision(p, t) for p, t in zip(predicted, truth)]
            counted = [i for i, s in enumerate(scores) if s is not None]
            values = np.asarray([scores[i] for i in counted], dtype=float)
            entry[key] = {"value": float(values.mean()) if len(values) else 0.0, "counted": len(counted),
                          "ci": list(bootstrap_mean(values, [films[picked[i]].patient for i in counted], resamples))
                          if len(values) else [0.0, 0.0]}  # fmt: skip
        out[name] = entry
    return out


def regions_table(figures: dict) -> str:
    """RSNA mAP of the regions beside the fixed boxes, as Markdown."""
    lines = ["| films | n (with boxes) | images counted | mAP@[0.40:0.75] | fixed boxes |", "|---|---|---|---|---|"]
    for name, entry in figures.items():
        if isinstance(entry, dict) and "map" in entry:
            cells = [f"{e['value']:.3f} ({e['ci'][0]:.3f}–{e['ci'][1]:.3f})" for e in (entry["map"], entry["map_fixed_boxes"])]
            lines.append(f"| {name} | {entry['films']} ({entry['with_boxes']}) | {entry['map']['counted']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
