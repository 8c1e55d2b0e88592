"""Measuring a model: scores, metrics at its operating point, intervals, plots, report.

``evaluate(model, split=...)`` scores a split with a training checkpoint
(PyTorch) or an exported model folder (ONNX Runtime) and writes
``metrics.json``, ``predictions.csv``, the plots and ``report.md``. Threshold
and temperature always come from the validation split, never from ``test/``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumoscan.config import CLASS_NAMES, PROJECT_ROOT, DataConfig, ValFraction, default_data_root
from pneumoscan.errors import ConfigurationError, ModelNotFoundError
from pneumoscan.learning.data import Record, records_of
from pneumoscan.learning.plots import (
    plot_confusion_matrix,
    plot_pr,
    plot_reliability,
    plot_roc,
)
from pneumoscan.running.calibration import (
    DEFAULT_ESTIMATOR,
    DEFAULT_POLICY,
    DEFAULT_TARGET_SENSITIVITY,
    OperatingPoint,
    binary_nll,
    calibrated_probability,
    choose_operating_point,
    expected_calibration_error,
    fit_temperature,
    logit,
    reliability_curve,
    threshold_for_sensitivity,
)

if TYPE_CHECKING:
    from pneumoscan.running.inference import Predictor

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
EVALUATION_FILES = ("metrics.json", "predictions.csv", "roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "report.md")


@dataclass(frozen=True)
class Calibration:
    """What is fitted on validation and then applied everywhere."""

    temperature: float
    operating_point: OperatingPoint


def split_records(root: Path | list[Path], split: str, seed: int, val_fraction: ValFraction) -> list[Record]:
    """The images of ``val`` (each dataset's by-patient validation part) or ``test`` (each one's test part)."""
    if split not in ("val", "test"):
        raise ConfigurationError(f"split must be 'val' or 'test', not {split!r}")
    return records_of(root if isinstance(root, list) else [Path(root)], split, seed, val_fraction)


def fit_calibration(
    val_logits: np.ndarray, val_labels: np.ndarray, policy: str = DEFAULT_POLICY, target: float = DEFAULT_TARGET_SENSITIVITY,
    estimator: str = DEFAULT_ESTIMATOR,
) -> Calibration:
    """Temperature first, then the threshold on the calibrated validation probabilities."""
    temperature = fit_temperature(val_logits, val_labels)
    probabilities = calibrated_probability(val_logits, temperature)
    return Calibration(temperature, choose_operating_point(probabilities, val_labels, policy, target, estimator))


def patient_resamples(patients: list[str], resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Per resample, how often each image is drawn: patients drawn with replacement, each image as often as its patient."""
    _, patient_index = np.unique(np.asarray(patients), return_inverse=True)
    n_patients = patient_index.max() + 1
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)[patient_index]


def patient_bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray, np.ndarray], float], labels: np.ndarray, scores: np.ndarray,
    patients: list[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(labels, scores, weights)`` from resampling *patients* with replacement.

    Images of one patient are correlated; resampling them together keeps the
    interval honest. A resample counts each image as often as its patient was
    drawn; resamples without both classes are skipped.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    values = []
    for weights in patient_resamples(patients, resamples, seed):
        chosen = weights > 0
        if len(np.unique(labels[chosen])) < 2:
            continue
        values.append(statistic(labels[chosen], scores[chosen], weights[chosen]))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_auroc_ci(
    labels: np.ndarray, probabilities: np.ndarray, patients: list[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """AUROC's patient-bootstrap interval."""
    auroc = lambda y, p, w: roc_auc_score(y, p, sample_weight=w)
    return patient_bootstrap_ci(auroc, labels, probabilities, patients, resamples, seed, level)


def rates_with_intervals(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, patients: list[str], resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, object]:
    """Sensitivity and specificity at ``threshold``, each with its patient-bootstrap 95 % interval."""
    labels = np.asarray(labels)
    found = (np.asarray(probabilities) >= threshold).astype(float)

    def sensitivity(y: np.ndarray, hit: np.ndarray, w: np.ndarray) -> float:
        return float(np.sum(w * hit * (y == 1)) / np.sum(w * (y == 1)))

    def specificity(y: np.ndarray, hit: np.ndarray, w: np.ndarray) -> float:
        return float(np.sum(w * (1 - hit) * (y == 0)) / np.sum(w * (y == 0)))

    ones = np.ones(len(labels))
    return {
        "sensitivity": sensitivity(labels, found, ones),
        "sensitivity_ci": list(patient_bootstrap_ci(sensitivity, labels, found, patients, resamples)),
        "specificity": specificity(labels, found, ones),
        "specificity_ci": list(patient_bootstrap_ci(specificity, labels, found, patients, resamples)),
        "ci_method": f"percentile bootstrap over patients, {resamples} resamples, 95%, at the fixed threshold",
    }


def operating_point_spread(
    labels: np.ndarray, probabilities: np.ndarray, patients: list[str], target: float, estimator: str = DEFAULT_ESTIMATOR,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> dict[str, object]:
    """How far a sensitivity point would move, and what it would deliver, had validation drawn other patients.

    Each patient-bootstrap resample re-chooses the threshold on its own films and is
    measured on the patients it left out, so the figures describe the rule applied to
    a validation part of this size, not this one threshold: the point's interval, and
    the sensitivity and specificity it keeps on films it never saw.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    thresholds, found, positives, cleared, negatives, per_resample = [], 0, 0, 0, 0, []
    for drawn in patient_resamples(patients, resamples, seed):
        bag_pneumonias = np.repeat(probabilities[labels == 1], drawn[labels == 1])
        left_out = drawn == 0
        if bag_pneumonias.size == 0 or not (left_out & (labels == 1)).any():
            continue
        threshold = threshold_for_sensitivity(bag_pneumonias, np.ones(bag_pneumonias.size), target, estimator)
        thresholds.append(threshold)
        hit = probabilities[left_out] >= threshold
        left_labels = labels[left_out]
        found, positives = found + int(hit[left_labels == 1].sum()), positives + int((left_labels == 1).sum())
        cleared, negatives = cleared + int((~hit[left_labels == 0]).sum()), negatives + int((left_labels == 0).sum())
        per_resample.append(hit[left_labels == 1].mean())
    return {
        "method": f"patient bootstrap, {len(thresholds)} resamples (seed {seed}): the threshold re-chosen on each resample "
                  "and measured on the patients it left out",
        "threshold_interval": [float(v) for v in np.quantile(thresholds, [0.025, 0.975])],
        "threshold_sd_logit": float(np.std(logit(np.asarray(thresholds)))),
        "out_of_bag_sensitivity": found / positives,
        "out_of_bag_sensitivity_p05": float(np.quantile(per_resample, 0.05)),
        "out_of_bag_specificity": cleared / negatives if negatives else None,
    }


def metrics_at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, object]:
    """Decision metrics when ``probability >= threshold`` means pneumonia."""
    predicted = (probabilities >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "sensitivity": float(recall_score(labels, predicted, pos_label=1, zero_division=0)),
        "specificity": float(recall_score(labels, predicted, pos_label=0, zero_division=0)),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def threshold_transfer(labels: np.ndarray, probabilities: np.ndarray, operating_point: OperatingPoint) -> dict[str, object] | None:
    """How much specificity the shipped threshold gives away on these images: a diagnostic.

    The threshold is fitted on validation; on images from another period or site it can
    sit in the wrong place even when the ranking is good. Refitting it on *these* images
    for the same target sensitivity shows which of the two failed. The refitted threshold
    is never an operating point: on ``test`` it would be chosen by looking at test labels.
    """
    if operating_point.policy != "sensitivity" or operating_point.target is None or not labels.any():
        return None
    own = threshold_for_sensitivity(probabilities, labels, operating_point.target, operating_point.estimator or "order-statistic")
    at_own = metrics_at_threshold(labels, probabilities, own)
    return {
        "target_sensitivity": operating_point.target,
        "own_threshold": own,
        "sensitivity_at_own_threshold": at_own["sensitivity"],
        "specificity_at_own_threshold": at_own["specificity"],
        "note": "diagnostic: a threshold fitted on this split's own labels; never an operating point",
    }


def sensitivity_by_subtype(records: list[Record], predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """Share of bacterial and of viral pneumonias found: viral ones are subtler."""
    out = {}
    for subtype in ("bacteria", "virus"):
        hits = [p for r, p in zip(records, predicted) if r.subtype == subtype]
        if hits:
            out[subtype] = {"n": len(hits), "sensitivity": float(np.mean(hits))}
    return out


def partial_auroc_at_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float = 0.95,
                                 sample_weight: np.ndarray | None = None) -> float | None:  # fmt: skip
    """The standardised partial AUROC over the sensitivities ≥ ``sensitivity``: where the operating point lives.

    scikit-learn bounds the false-positive rate (McClish's standardisation: 0.5 is chance, 1 perfect); with the
    labels and scores flipped, its false-positive rate is 1 − sensitivity. None when a class is missing.
    """
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(1 - labels, -np.asarray(scores, dtype=float), sample_weight=sample_weight, max_fpr=1 - sensitivity))


def compute_metrics(
    records: list[Record], logits: np.ndarray, calibration: Calibration, split: str, resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, object]:
    """Every figure of ``metrics.json`` for one split."""
    labels = np.asarray([r.label for r in records])
    raw = calibrated_probability(logits, 1.0)
    probabilities = calibrated_probability(logits, calibration.temperature)
    op = calibration.operating_point
    at_threshold = metrics_at_threshold(labels, probabilities, op.threshold)
    predicted = probabilities >= op.threshold
    return {
        "split": split,
        "n": len(records),
        "n_pneumonia": int(labels.sum()),
        "n_normal": int((labels == 0).sum()),
        "auroc": float(roc_auc_score(labels, probabilities)),
        "auroc_ci": list(bootstrap_auroc_ci(labels, probabilities, [r.patient for r in records], resamples)),
        "auroc_ci_method": f"percentile bootstrap over patients, {resamples} resamples, 95%",
        "average_precision": float(average_precision_score(labels, probabilities)),
        "partial_auroc_sensitivity_095": partial_auroc_at_sensitivity(labels, probabilities),
        "threshold": op.threshold,
        "operating_point": op.name,
        "operating_point_policy": op.policy,
        "operating_point_target": op.target,
        **at_threshold,
        "temperature": calibration.temperature,
        "ece": {
            "before_calibration": expected_calibration_error(raw, labels),
            "after_calibration": expected_calibration_error(probabilities, labels),
        },
        "nll": {"before_calibration": binary_nll(logits, labels), "after_calibration": binary_nll(logits, labels, calibration.temperature)},
        "sensitivity_by_subtype": sensitivity_by_subtype([r for r in records if r.label == 1], predicted[labels == 1]),
        "threshold_transfer": threshold_transfer(labels, probabilities, op),
        "by_view": view_figures(records, probabilities, op.threshold),
    }


def write_predictions(path: Path, records: list[Record], probabilities: np.ndarray, threshold: float, root: Path | None = None) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "probability", "predicted", "population", "view"])
        for record, p in zip(records, probabilities):
            name = record.path.relative_to(root).as_posix() if root and record.root is None else record.relative
            writer.writerow([name, record.class_name, f"{p:.6f}", CLASS_NAMES[int(p >= threshold)], record.population or "", record.view or ""])
    return path


def reversed_view_weights(records: list[Record]) -> np.ndarray:
    """Weights that give NORMAL the view mix of PNEUMONIA and the other way round.

    A model that learnt "AP means pneumonia" ranks well on the original mix and
    badly on the reversed one; a model that reads the lungs does not care.
    """
    labels = np.asarray([r.label for r in records])
    views = np.asarray([r.view or "" for r in records])
    weights = np.ones(len(records))
    for view in set(views):
        share = {y: np.mean(views[labels == y] == view) for y in (0, 1)}
        for y in (0, 1):
            if share[y] > 0:
                weights[(labels == y) & (views == view)] = share[1 - y] / share[y]
    return weights


def view_figures(records: list[Record], probabilities: np.ndarray, threshold: float) -> dict[str, object] | None:
    """Figures within each view, with the view mix reversed, and what the view alone would score.

    The view-only baseline ranks every AP film above every PA film: its AUROC is
    what a model gets from the shortcut alone, the bar a real model must clear
    within each view and under the reversed mix.
    """
    views = [r.view for r in records]
    if not any(views):
        return None
    labels = np.asarray([r.label for r in records])
    p = np.asarray(probabilities, dtype=np.float64)
    out: dict[str, object] = {}
    for view in sorted({v for v in views if v}):
        mask = np.asarray([v == view for v in views])
        if len(np.unique(labels[mask])) < 2:
            continue
        out[view] = {
            "n": int(mask.sum()), "n_pneumonia": int(labels[mask].sum()), "n_normal": int((labels[mask] == 0).sum()),
            "auroc": float(roc_auc_score(labels[mask], p[mask])),
            "auroc_ci": list(bootstrap_auroc_ci(labels[mask], p[mask], [r.patient for r, m in zip(records, mask) if m], 500)),
            **metrics_at_threshold(labels[mask], p[mask], threshold),
        }
    weights = reversed_view_weights(records)
    ap_score = np.asarray([1.0 if v == "AP" else 0.0 for v in views])
    out["reversed_view_mix"] = {
        "auroc": float(roc_auc_score(labels, p, sample_weight=weights)),
        "method": "images weighted so that NORMAL has PNEUMONIA's share of each view and the other way round",
    }
    out["view_only_baseline"] = {
        "auroc": float(roc_auc_score(labels, ap_score)),
        "auroc_reversed_view_mix": float(roc_auc_score(labels, ap_score, sample_weight=weights)),
        "method": "score 1 for an AP film, 0 for PA: the shortcut alone",
    }
    return out


def transfer_row(metrics: dict) -> str:
    """The report's line on the threshold transfer diagnostic (empty when it does not apply)."""
    transfer = metrics.get("threshold_transfer")
    if not transfer:
        return ""
    return (
        f"\n| diagnostic only: specificity with a threshold refitted on these labels for "
        f"{transfer['target_sensitivity']:.0%} sensitivity (never an operating point) | "
        f"{transfer['specificity_at_own_threshold']:.4f} at threshold {transfer['own_threshold']:.4f} |"
    )


def write_report(out: Path, metrics: dict, model_name: str, protocol: str) -> Path:
    cm = metrics["confusion_matrix"]
    low, high = metrics["auroc_ci"]
    subtype = ", ".join(f"{k} {v['sensitivity']:.3f} (n={v['n']})" for k, v in metrics["sensitivity_by_subtype"].items())
    text = f"""# Evaluation of {model_name} on `{metrics['split']}` ({metrics['n']} images)

Operating point: **{metrics['operating_point']}**, threshold {metrics['threshold']:.4f} on the
calibrated probability (temperature {metrics['temperature']:.3f}).

| figure | value |
|---|---|
| AUROC (95% CI) | {metrics['auroc']:.4f} ({low:.4f}–{high:.4f}) |
| average precision | {metrics['average_precision']:.4f} |
| sensitivity (recall) | {metrics['sensitivity']:.4f} |
| specificity | {metrics['specificity']:.4f} |
| precision | {metrics['precision']:.4f} |
| F1 | {metrics['f1']:.4f} |
| accuracy | {metrics['accuracy']:.4f} |
| missed pneumonias (FN) / false alarms (FP) | {cm['fn']} / {cm['fp']} |
| ECE before → after calibration | {metrics['ece']['before_calibration']:.4f} → {metrics['ece']['after_calibration']:.4f} |
| sensitivity by subtype | {subtype} |{transfer_row(metrics)}

Protocol: {protocol}

![ROC](roc.png) ![Precision-recall](pr.png)

![Confusion matrix](confusion_matrix.png) ![Reliability](reliability.png)
"""
    path = out / "report.md"
    path.write_text(text)
    return path


PROTOCOL = (
    "the validation split holds about 10 % of the patients of train/, drawn by patient and stratified by class; "
    "the temperature and the threshold were fitted on it alone. test/ was used only to report these figures. "
    "The AUROC interval resamples patients."
)


def write_evaluation(out: Path, records: list[Record], logits: np.ndarray, calibration: Calibration, split: str, root: Path | None,
                     model_name: str, protocol: str = PROTOCOL) -> dict:  # fmt: skip
    """Write every evaluation file for already-scored records; return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(records, logits, calibration, split)
    labels = np.asarray([r.label for r in records])
    probabilities = calibrated_probability(logits, calibration.temperature)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(out / "predictions.csv", records, probabilities, calibration.operating_point.threshold, root)
    plot_roc(labels, probabilities, metrics, out / "roc.png")
    plot_pr(labels, probabilities, metrics, out / "pr.png")
    plot_confusion_matrix(metrics, out / "confusion_matrix.png")
    plot_reliability(
        reliability_curve(calibrated_probability(logits, 1.0), labels),
        reliability_curve(probabilities, labels),
        metrics["ece"]["before_calibration"],
        metrics["ece"]["after_calibration"],
        out / "reliability.png",
    )
    write_report(out, metrics, model_name, protocol)
    return metrics


# --- scoring with a training checkpoint (PyTorch) -------------------------------------------


def checkpoint_logits(checkpoint: Path, paths: list[Path], batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Logits of a Lightning checkpoint on image files, with the shared preprocessing."""
    import torch
    from tqdm import tqdm

    from pneumoscan.inputs.preprocessing import preprocess_file
    from pneumoscan.learning.training import PneumoniaClassifier
    from pneumoscan.running.inference import batched

    module = PneumoniaClassifier.load_from_checkpoint(checkpoint, map_location="cpu", pretrained=False).eval()
    size, intensity = module.hparams.image_size, module.intensity
    out = []
    with torch.inference_mode():
        for chunk in tqdm(list(batched(paths, batch_size)), desc="scoring", unit="batch", disable=not progress):
            batch = torch.from_numpy(np.stack([preprocess_file(p, size, intensity) for p in chunk]))
            out.append(module(batch).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def run_data_config(checkpoint: Path) -> DataConfig:
    """The split settings of the run that made a checkpoint (its ``config.json``)."""
    config_path = checkpoint.parent / "config.json"
    if config_path.is_file():
        data = json.loads(config_path.read_text())["data"]
        roots = data.get("root")
        roots = [roots] if isinstance(roots, str) else roots or []
        root = tuple(PROJECT_ROOT / r for r in roots)  # recorded relative to the project root (absolute stays absolute)
        return DataConfig(
            root=(root[0] if len(root) == 1 else root) if root else default_data_root(),
            seed=data["seed"], val_fraction=data["val_fraction"], image_size=data["image_size"],
            intensity=data.get("intensity", "none"),
        )
    log.warning("no config.json beside %s: using the default split settings", checkpoint)
    return DataConfig()


class ModelUnderTest:
    """A checkpoint or an exported folder, scored the same way."""

    def __init__(self, path: Path, precision: str = "fp32"):
        self.path = Path(path)
        if self.path.is_dir():
            from pneumoscan.running.inference import Predictor

            self.onnx = Predictor.load(self.path, precision=precision)
            split = self.onnx.card["validation"]["split"]
            self.seed, self.val_fraction = split["seed"], split["val_fraction"]
            self.name = self.onnx.card["name"]
            datasets = self.onnx.card.get("data", {}).get("datasets") or []
            self.sources = [PROJECT_ROOT / d["source"] for d in datasets] or [default_data_root()]
        elif self.path.is_file() and self.path.suffix == ".ckpt":
            if precision != "fp32":
                raise ConfigurationError("int8 needs an exported model folder, not a checkpoint")
            self.onnx = None
            config = run_data_config(self.path)
            self.seed, self.val_fraction, self.sources = config.seed, config.val_fraction, config.sources
            self.name = self.path.name
        else:
            raise ModelNotFoundError(f"{self.path} is neither a training checkpoint (.ckpt) nor an exported model folder")

    def datasets(self, root: Path | list[Path] | None) -> list[Path]:
        """``root`` as a list of datasets, or the model's own when None."""
        return self.sources if root is None else (list(root) if isinstance(root, (list, tuple)) else [Path(root)])

    def logits(self, paths: list[Path]) -> np.ndarray:
        if self.onnx is not None:
            return self.onnx.logits(paths, progress=True)
        return checkpoint_logits(self.path, paths)

    def calibrations(self, sources: list[Path], policy: str, target: float, estimator: str = DEFAULT_ESTIMATOR) -> dict[str, Calibration]:
        """Per population: an exported model's own; for a checkpoint, fitted now on each population's validation part."""
        if self.onnx is not None:
            from pneumoscan.running.inference import card_populations

            entries = card_populations(self.onnx.card)
            return {
                population: Calibration(entry["calibration"]["temperature"], OperatingPoint(
                    entry["operating_point"]["threshold"], entry["operating_point"]["policy"],
                    entry["operating_point"]["target"], entry["operating_point"]["name"], entry["operating_point"].get("estimator")))
                for population, entry in entries.items()
            }
        val = split_records(sources, "val", self.seed, self.val_fraction)
        logits = self.logits([r.path for r in val])
        out = {}
        for population in sorted({r.population or "child" for r in val}):
            pick = [i for i, r in enumerate(val) if (r.population or "child") == population]
            out[population] = fit_calibration(logits[pick], np.asarray([val[i].label for i in pick]), policy, target, estimator)
        return out


def population_parts(records: list[Record], calibrations: dict[str, Calibration]) -> Iterator[tuple[str, Calibration, list[int]]]:
    """Each population with a calibration and the indices of its records (every record, for a model of one)."""
    single = len(calibrations) == 1
    for population, calibration in calibrations.items():
        pick = [i for i, r in enumerate(records) if (r.population or "child") == population or single]
        if pick:
            yield population, calibration, pick


def evaluate(
    model: Path,
    root: Path | list[Path] | None,
    split: str,
    out: Path,
    policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    precision: str = "fp32",
    boxes: Path | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    held_out_by: Path | None = None,
) -> dict:
    """Score ``split`` and write the evaluation files into ``out`` (``out/<population>`` for a model of several).

    Each image is measured at the operating point of the population its dataset
    records; ``root`` defaults to the model's own datasets. Returns the metrics of
    a single-population model, or ``{"populations": {name: metrics}}``.
    ``held_out_by``, another model: only the films of ``split`` that are in that model's ``split`` too are
    scored, so two models trained on different splits are compared on films neither trained on (the
    operating points stay the subject's own).
    """
    subject = ModelUnderTest(model, precision)
    sources = subject.datasets(root)
    calibrations = subject.calibrations(sources, policy, target, estimator)
    records = split_records(sources, split, subject.seed, subject.val_fraction)
    if held_out_by is not None:
        records = films_held_out_by(records, ModelUnderTest(held_out_by), sources, split)
    logits = subject.logits([r.path for r in records])
    single = len(calibrations) == 1
    results = {}
    for population, calibration, pick in population_parts(records, calibrations):
        folder = Path(out) if single else Path(out) / population
        results[population] = write_evaluation(folder, [records[i] for i in pick], logits[pick], calibration, split, None,
                                               subject.name if single else f"{subject.name} ({population})")  # fmt: skip
    if not results:
        raise ConfigurationError(f"no image of {split} belongs to a population the model is validated for ({', '.join(calibrations)})")
    for population, metrics in results.items():
        chosen = [records[i] for i, r in enumerate(records) if (r.population or "child") == population or single]
        figures = localisation_of(subject, sources, chosen, boxes)
        if figures is not None:
            metrics["localisation"] = figures
            write_localisation(Path(out) if single else Path(out) / population, figures, split)
    return next(iter(results.values())) if single else {"populations": results}


def films_held_out_by(records: list[Record], other: ModelUnderTest, sources: list[Path], split: str) -> list[Record]:
    """The records that ``other``'s own split puts in ``split`` too; none in common is an error, not an empty report."""
    theirs = {r.path.resolve() for r in split_records(sources, split, other.seed, other.val_fraction)}
    common = [r for r in records if r.path.resolve() in theirs]
    if not common:
        raise ConfigurationError(f"{other.path} holds none of these {split} films out: its split shares no {split} film "
                                 "with the model's; compare on the test part instead")
    return common


def boxes_of(sources: list[Path], boxes_file: Path | None = None) -> dict:
    """Radiologists' boxes by image: from ``boxes_file`` when given, else each dataset's ``boxes.csv`` beside its labels."""
    from pneumoscan.learning.localisation import boxes_by_dataset, read_boxes

    if boxes_file is not None:
        if not Path(boxes_file).is_file():
            raise ConfigurationError(f"--boxes {boxes_file}: no such file (a CSV of path,x,y,width,height)")
        return read_boxes(Path(boxes_file))
    return {path: found for dataset in boxes_by_dataset(sources).values() for path, found in dataset.items()}


def localisation_of(subject: ModelUnderTest, sources: list[Path], records: list[Record], boxes_file: Path | None = None) -> dict | None:
    """The heat maps and regions of the films measured against radiologists' boxes (see :mod:`localisation`).

    Heat maps: on the pneumonia films with boxes. Regions: RSNA's mAP on every film of ``records``
    (normals included), by the card's region rule or, for a card without one, the rule fitted now on the
    validation part. None when no dataset has a ``boxes.csv``, or the model is a checkpoint (what is measured
    is the exported graph's map, the one every answer shows).
    """
    from pneumoscan.learning.localisation import FixedBoxes, fit_region_rule, fixed_count, localise, region_figures

    boxes = boxes_of(sources, boxes_file)
    boxed = [r for r in records if r.label == 1 and r.path.resolve() in boxes]
    if not boxed or subject.onnx is None:
        return None
    population = boxed[0].population
    training = [(r, size_of(r)) for r in records_of(sources, "train", subject.seed, subject.val_fraction)
                if r.label == 1 and r.path.resolve() in boxes]  # fmt: skip
    known = lambda r: r.label == 0 or r.path.resolve() in boxes  # noqa: E731  (a pneumonia without boxes: truth unknown)
    validation = films_of(subject.onnx, [r for r in records_of(sources, "val", subject.seed, subject.val_fraction)
                                         if r.population == population and known(r)], boxes)  # fmt: skip
    tested = films_of(subject.onnx, [r for r in records if known(r)], boxes)
    maps = {film.record.path: film.heatmap for film in tested}
    figures = localise(boxed, [maps[r.path] for r in boxed], [size_of(r) for r in boxed], boxes, training,
                       [(f.record, f.size, f.heatmap) for f in validation if f.truth])  # fmt: skip
    settings = subject.onnx.populations.get(population or "")
    rule, source = (settings.regions if settings is not None else None), "the model card"
    if rule is None:
        rule, _ = fit_region_rule(validation)
        source = "fitted now on the validation part"
    fixed = FixedBoxes.learn([(boxes[r.path.resolve()], size) for r, size in training])
    figures["regions"] = region_figures(tested, rule, fixed, fixed_count(validation, fixed))
    figures["regions"]["rule_source"] = source
    return figures


def size_of(record: Record) -> tuple[int, int]:
    """The file's width and height, from its header only."""
    from PIL import Image

    with Image.open(record.path) as image:
        return image.size


def films_of(predictor: Predictor, records: list[Record], boxes: dict) -> list:
    """Each record scored with its heat map, as a :class:`~pneumoscan.learning.localisation.Film`."""
    from pneumoscan.learning.localisation import Film

    predictions = predictor.predict([r.path for r in records], heatmap=True) if records else []
    return [Film(r.patient, r.view, size_of(r), tuple(boxes.get(r.path.resolve(), ()) if r.label == 1 else ()), p.heatmap,
                       p.probability, p.label == CLASS_NAMES[1] and p.validated, r)  # fmt: skip
            for r, p in zip(records, predictions)]


def fit_region_rules(predictor: Predictor, sources: list[Path], seed: int, val_fraction: ValFraction,
                     boxes_file: Path | None = None) -> dict[str, dict]:  # fmt: skip
    """Per population with radiologists' boxes in its validation part, the region rule with the best RSNA mAP there.

    A population without boxes gets no rule, and so no regions: where its pneumonias lie was never measured.
    """
    from pneumoscan.learning.localisation import fit_region_rule

    boxes = boxes_of(sources, boxes_file)
    val = records_of(sources, "val", seed, val_fraction)
    rules = {}
    for population in predictor.populations:
        picked = [r for r in val if (r.population or predictor.default_population) == population
                  and (r.label == 0 or r.path.resolve() in boxes)]  # fmt: skip
        if not any(r.label == 1 for r in picked):
            continue
        films = films_of(predictor, picked, boxes)
        rule, value = fit_region_rule(films)
        rules[population] = rule.to_dict() | {
            "fitted_on": "this population's validation part: the rule (level, minimum area, most regions) with the best "
                         "RSNA mAP@[0.40:0.75], normal films included",
            "validation_map": value, "validation_films": len(films), "validation_films_with_boxes": sum(1 for f in films if f.truth),
        }  # fmt: skip
    return rules


def write_localisation(folder: Path, figures: dict, split: str) -> None:
    from pneumoscan.learning.localisation import localisation_table

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "localisation.json").write_text(json.dumps(figures, indent=2) + "\n")
    (folder / "localisation.md").write_text(
        f"# Localisation on the {split} part: heat maps against the radiologists' boxes\n\n"
        "Pointing game: the heat map's maximum inside a box; mass inside: the share of the map inside the boxes; IoU "
        "and Dice: the map above a share of its maximum chosen on the validation part's boxed films, against the boxes. "
        "Fixed point, fixed map and fixed region: learnt from the training part's boxes, the same on every film (the "
        "region's level chosen on validation too); flat map: the boxes' share of the film. 95 % intervals resample "
        "patients.\n\n" + localisation_table(figures) + "\n\n## Regions\n\n" + regions_text(figures["regions"]) + "\n")


def regions_text(figures: dict) -> str:
    """What the regions' table means, with the rule they were made by, then the table."""
    from pneumoscan.learning.localisation import regions_table

    rule = figures["rule"]
    return (f"RSNA 2018's challenge metric (per film, the mean over IoU thresholds 0.40–0.75 of TP / (TP + FP + FN); a "
            "normal film with a region scores 0, one without is not counted) of the regions every answer carries (rule "
            f"from {figures['rule_source']}: level {rule['level']}, minimum area {rule['min_area']:.0%}, at most "
            f"{rule['max_regions']}), beside the fixed boxes (the median training box of each side, {len(figures['fixed_boxes'])} "
            "kept as chosen on validation) on the same flagged films.\n\n" + regions_table(figures))
