"""What a film's edges still buy the model: its scores and heat maps with the borders blanked.

Side markers, "PORTABLE" stamps, collimation and the table sit at a film's edges and differ between bedsides and
hospitals; the lungs, and the radiologists' boxes, lie inside. Blanking the edges and scoring again tells how much
of the ranking comes from there: a model that reads the lungs ranks the films as before, and its heat map's peak
stays off the edges. The other shortcut, projection, is measured by the view-only baseline
(:func:`pneumoscan.learning.evaluation.view_figures`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from pneumoscan.config import BORDER_PROBE_DEPTH
from pneumoscan.errors import ConfigurationError
from pneumoscan.inputs.preprocessing import normalize, resize_and_normalize_intensity
from pneumoscan.learning.data import Record
from pneumoscan.learning.evaluation import (
    ModelUnderTest,
    boxes_of,
    metrics_at_threshold,
    partial_auroc_at_sensitivity,
    patient_bootstrap_ci,
    population_parts,
    reversed_view_weights,
    size_of,
    split_records,
)
from pneumoscan.running.calibration import (
    DEFAULT_POLICY,
    DEFAULT_TARGET_SENSITIVITY,
    calibrated_probability,
)
from pneumoscan.running.inference import batched, to_grayscale_image

if TYPE_CHECKING:
    from pneumoscan.learning.localisation import Box
    from pneumoscan.running.inference import Predictor
    from pneumoscan.running.ood import OodGate

RESAMPLES = 1000


def check_depth(depth: float) -> None:
    if not 0.0 < depth < 0.5:
        raise ConfigurationError(f"border depth {depth}: give a share of the side between 0 and 0.5 (e.g. {BORDER_PROBE_DEPTH})")


def border_band(height: int, width: int, depth: float) -> np.ndarray:
    """``True`` on the strips ``depth`` of the side deep along the four edges."""
    rows, cols = int(depth * height), int(depth * width)
    band = np.ones((height, width), dtype=bool)
    band[rows : height - rows, cols : width - cols] = False
    return band


def blank_borders(image: np.ndarray, depth: float) -> np.ndarray:
    """A copy with the border band set to black, as the electronic shutters of many digital films leave their edges."""
    out = np.array(image, copy=True)
    out[border_band(*out.shape[:2], depth)] = 0
    return out


def probe_borders(model: Path, root: Path | list[Path] | None, split: str, out: Path, depth: float = BORDER_PROBE_DEPTH,
                  precision: str = "fp32", boxes_file: Path | None = None) -> dict[str, dict]:  # fmt: skip
    """Score ``split`` as it is and with the borders blanked; per population, the figures, also in ``borders.md``.

    The films and operating points are those :func:`~pneumoscan.learning.evaluation.evaluate` measures, and the
    files go where it writes its report (``out``, or ``out/<population>`` for a model of several).
    """
    check_depth(depth)
    subject = ModelUnderTest(model, precision)
    if subject.onnx is None:
        raise ConfigurationError("the border probe scores the exported graph: give an exported model folder, not a checkpoint")
    sources = subject.datasets(root)
    records = split_records(sources, split, subject.seed, subject.val_fraction)
    if not records:
        raise ConfigurationError(f"no film in the {split} part of {', '.join(map(str, sources))}")
    calibrations = subject.calibrations(sources, DEFAULT_POLICY, DEFAULT_TARGET_SENSITIVITY)  # an exported model's own
    scored = score_with_borders_blanked(subject.onnx, [r.path for r in records], depth)
    boxes = boxes_of(sources, boxes_file)
    single = len(calibrations) == 1
    results = {}
    for population, calibration, pick in population_parts(records, calibrations):
        part = {name: value[pick] for name, value in scored.items()}
        settings = subject.onnx.populations.get(population)
        figures = border_figures([records[i] for i in pick], part, calibration.temperature,
                                 calibration.operating_point.threshold, depth, boxes,
                                 gate_keeps(settings.gate if settings is not None else None, part))  # fmt: skip
        write_borders(Path(out) if single else Path(out) / population, figures, split)
        results[population] = figures
    return results


def probe_inputs(predictor: Predictor, source: Path, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """A film's model input as it is and with its borders blanked.

    The strips are blanked after resizing and equalising, where training's BorderErase blanks them, so the lungs'
    grey levels are the same in both.
    """
    image = resize_and_normalize_intensity(to_grayscale_image(source, predictor.limits), predictor.image_size, predictor.intensity)
    return normalize(image), normalize(Image.fromarray(blank_borders(np.asarray(image), depth)))


def score_with_borders_blanked(predictor: Predictor, paths: Sequence[Path], depth: float, batch_size: int = 32,
                               progress: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """Logits (and, for a model with a gate, embeddings) as they are and with the borders blanked, and whether each
    heat map (as it is) peaks in the band."""
    extra = ("embedding",) if predictor.has_gate else ()
    parts: dict[str, list[np.ndarray]] = {"as_is": [], "blanked": [], "peak_in_band": []}
    for chunk in tqdm(list(batched(paths, batch_size)), desc="borders blanked", unit="batch", disable=not progress):
        pairs = [probe_inputs(predictor, path, depth) for path in chunk]
        as_is = predictor.run(np.stack([p for p, _ in pairs]), ("logit", "heatmap", *extra))
        without = predictor.run(np.stack([b for _, b in pairs]), ("logit", *extra))
        parts["peak_in_band"].append(heatmap_peaks_in_band(as_is["heatmap"], depth))
        for version, out in (("as_is", as_is), ("blanked", without)):
            parts[version].append(out["logit"].reshape(-1))
            if extra:
                parts.setdefault(f"{version}_embedding", []).append(out["embedding"])
    return {name: np.concatenate(values) for name, values in parts.items()}


def gate_keeps(gate: OodGate | None, scored: dict[str, np.ndarray]) -> dict[str, float] | None:
    """The share of films the population's out-of-distribution gate lets through, as they are and blanked."""
    if gate is None or "as_is_embedding" not in scored:
        return None
    return {version: float(gate.in_distribution(gate.score(scored[f"{version}_embedding"])).mean()) for version in ("as_is", "blanked")}


def heatmap_peaks_in_band(heatmaps: np.ndarray, depth: float) -> np.ndarray:
    """Per map ``N×H×W``, whether its maximum lies in the border band."""
    n, height, width = heatmaps.shape
    band = border_band(height, width, depth).reshape(-1)
    return band[heatmaps.reshape(n, -1).argmax(axis=1)]


def box_area_in_band(boxes: Sequence[Box], size: tuple[int, int], depth: float) -> float:
    """The share of the radiologists' boxes' area (their union) that the blanked strips cover."""
    width, height = size
    inside = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0 = max(int(box.x), 0), max(int(box.y), 0)
        inside[y0 : int(np.ceil(box.y + box.height)), x0 : int(np.ceil(box.x + box.width))] = True
    total = inside.sum()
    return float((inside & border_band(height, width, depth)).sum() / total) if total else 0.0


def paired_difference(labels: np.ndarray, as_is: np.ndarray, blanked: np.ndarray, patients: list[str],
                      sensitivity: float | None = None) -> dict[str, object]:  # fmt: skip
    """AUROC (or the partial AUROC at sensitivity ≥ ``sensitivity``) as it is, blanked, and the change with its interval.

    Patients are resampled together, and each resample scores both versions of the same films, so the interval
    is that of the change itself, narrower than the two intervals side by side.
    """

    def figure(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
        if sensitivity is None:
            return float(roc_auc_score(y, s, sample_weight=w))
        return float(partial_auroc_at_sensitivity(y, s, sensitivity, w))

    change = lambda y, pair, w: figure(y, pair[:, 1], w) - figure(y, pair[:, 0], w)
    low, high = patient_bootstrap_ci(change, labels, np.stack([as_is, blanked], axis=1), patients, RESAMPLES)
    before, after = figure(labels, as_is), figure(labels, blanked)
    return {"as_is": before, "blanked": after, "change": after - before, "change_ci": [low, high]}


def rates_at(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    figures = metrics_at_threshold(labels, probabilities, threshold)
    return {"sensitivity": figures["sensitivity"], "specificity": figures["specificity"]}


def border_figures(records: list[Record], scored: dict[str, np.ndarray], temperature: float, threshold: float, depth: float,
                   boxes: dict[Path, list[Box]] | None = None, gate: dict[str, float] | None = None) -> dict[str, object]:  # fmt: skip
    """Every figure of the border probe for one population's films (``scored`` from :func:`score_with_borders_blanked`)."""
    labels = np.asarray([r.label for r in records])
    patients = [r.patient for r in records]
    plain, blanked = scored["as_is"].astype(np.float64), scored["blanked"].astype(np.float64)
    p_plain, p_blanked = calibrated_probability(plain, temperature), calibrated_probability(blanked, temperature)
    change = np.abs(p_blanked - p_plain)
    peaks = scored["peak_in_band"]
    out: dict[str, object] = {
        "depth": depth, "n": len(records), "n_pneumonia": int(labels.sum()),
        "auroc": paired_difference(labels, plain, blanked, patients),
        "partial_auroc_sensitivity_095": paired_difference(labels, plain, blanked, patients, sensitivity=0.95),
        "at_operating_point": {"threshold": threshold, "as_is": rates_at(labels, p_plain, threshold),
                               "blanked": rates_at(labels, p_blanked, threshold)},
        "probability_change": {"median": float(np.median(change)), "p95": float(np.quantile(change, 0.95)), "max": float(change.max())},
        "heatmap_peak_in_band": {"pneumonia": float(peaks[labels == 1].mean()), "normal": float(peaks[labels == 0].mean()),
                                 "band_share_of_film": float(border_band(1000, 1000, depth).mean())},
    }  # fmt: skip
    views = np.asarray([r.view or "" for r in records])
    by_view = {}
    for view in sorted(set(views) - {""}):
        mask = views == view
        if len(np.unique(labels[mask])) == 2:
            by_view[view] = paired_difference(labels[mask], plain[mask], blanked[mask], [p for p, m in zip(patients, mask) if m])
    if by_view:
        weights = reversed_view_weights(records)
        out["by_view"] = by_view
        out["reversed_view_mix"] = {"as_is": float(roc_auc_score(labels, plain, sample_weight=weights)),
                                    "blanked": float(roc_auc_score(labels, blanked, sample_weight=weights))}  # fmt: skip
    if gate is not None:
        out["gate_keeps"] = gate
    boxed = [r for r in records if r.label == 1 and boxes and r.path.resolve() in boxes]
    if boxed:
        out["box_area_in_band"] = {"films": len(boxed), "mean": float(np.mean(
            [box_area_in_band(boxes[r.path.resolve()], size_of(r), depth) for r in boxed]))}  # fmt: skip
    return out


def write_borders(folder: Path, figures: dict, split: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "borders.json").write_text(json.dumps(figures, indent=2) + "\n")
    (folder / "borders.md").write_text(borders_text(figures, split))


def borders_text(figures: dict, split: str) -> str:
    """The probe's report: each figure as it is, with the borders blanked, and the change with its 95 % interval."""

    def row(name: str, entry: dict) -> str:
        low, high = entry["change_ci"]
        return f"| {name} | {entry['as_is']:.4f} | {entry['blanked']:.4f} | {entry['change']:+.4f} ({low:+.4f} to {high:+.4f}) |"

    point = figures["at_operating_point"]
    rows = [row("AUROC", figures["auroc"]), row("partial AUROC, sensitivity ≥ 0.95", figures["partial_auroc_sensitivity_095"])]
    rows += [row(f"AUROC within {view}", entry) for view, entry in figures.get("by_view", {}).items()]
    if "reversed_view_mix" in figures:
        mix = figures["reversed_view_mix"]
        rows.append(f"| AUROC, view mix reversed | {mix['as_is']:.4f} | {mix['blanked']:.4f} | {mix['blanked'] - mix['as_is']:+.4f} |")
    for name in ("sensitivity", "specificity"):
        rows.append(f"| {name} at the operating point | {point['as_is'][name]:.4f} | {point['blanked'][name]:.4f} | "
                    f"{point['blanked'][name] - point['as_is'][name]:+.4f} |")  # fmt: skip
    if "gate_keeps" in figures:
        kept = figures["gate_keeps"]
        rows.append(f"| share the out-of-distribution gate lets through | {kept['as_is']:.4f} | {kept['blanked']:.4f} | "
                    f"{kept['blanked'] - kept['as_is']:+.4f} |")  # fmt: skip
    peaks, change = figures["heatmap_peak_in_band"], figures["probability_change"]
    lines = [
        f"# The film's borders blanked, on the {split} part ({figures['n']} films, {figures['n_pneumonia']} pneumonia)",
        "",
        (f"A strip {figures['depth']:.0%} of the side deep along each edge (markers, stamps, collimation; "
         f"{peaks['band_share_of_film']:.0%} of the film) set to black after resizing and equalising, where training's "
         "border erasing blanks it; the same films scored as they are and blanked. Changes' 95 % intervals resample "
         f"patients ({RESAMPLES} resamples, each scoring both versions). Operating point: threshold {point['threshold']:.4f} "
         "on the calibrated probability, the population's own."),
        "",
        "| figure | as it is | borders blanked | change (95 % interval) |",
        "|---|---|---|---|",
        *rows,
        "",
        (f"- Calibrated probability, |blanked − as it is|: median {change['median']:.4f}, 95th percentile "
         f"{change['p95']:.4f}, max {change['max']:.4f}."),
        (f"- The heat map's peak (as it is) in the strips: {peaks['pneumonia']:.1%} of pneumonia films, "
         f"{peaks['normal']:.1%} of normal films (a peak placed at random: {peaks['band_share_of_film']:.0%})."),
    ]
    if "box_area_in_band" in figures:
        area = figures["box_area_in_band"]
        lines.append(f"- Radiologists' boxes inside the strips: {area['mean']:.1%} of their area on average "
                     f"({area['films']} films with boxes): blanking hides little of what they marked.")  # fmt: skip
    return "\n".join(lines) + "\n"

