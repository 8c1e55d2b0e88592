"""What the page needs to run the exported model on the device itself (onnxruntime-web), in forms a browser loads.

The browser must give the same answer as :class:`~pneumoscan.running.inference.Predictor`:
the same ONNX file (checked against the card's sha256 before use), the card's
preprocessing, temperatures and thresholds, the population classifier, and the
out-of-distribution gates. ``device_settings`` is the JSON of all but the gates;
``gate_bytes`` packs a gate's means and precision matrices as little-endian
float32, which a browser reads straight into a ``Float32Array``.
"""

from __future__ import annotations

import numpy as np

from pneumoscan.running.inference import (
    INT8_MODEL_FILE,
    MODEL_FILE,
    Predictor,
    card_populations,
)
from pneumoscan.running.ood import OodGate

#: Where the page finds the files (server routes; the service worker keeps them for offline use).
MODEL_ROUTE = "/model"


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """A symmetric matrix's upper triangle, row by row: half the bytes for the browser to download."""
    matrix = np.asarray(matrix)
    return matrix[np.triu_indices(matrix.shape[0])]


def gate_bytes(gate: OodGate) -> bytes:
    """``mean (C) · upper triangle of precision (C(C+1)/2)``, then the same for the direction gate of a two-stage gate;
    float32, little-endian (the gate computes in float32)."""
    parts = [gate.mean, upper_triangle(gate.precision)]
    if gate.two_stage:
        parts += [gate.l2_mean, upper_triangle(gate.l2_precision)]
    return b"".join(np.asarray(p, dtype="<f4").tobytes() for p in parts)


def gate_sha256(card: dict, population: str) -> str:
    """The sha256 the card records for a population's gate file (what the browser's copy is keyed by)."""
    return str((card_populations(card)[population].get("ood_gate") or {}).get("sha256", ""))


def device_settings(predictor: Predictor) -> dict:
    """Everything but the weights and gates: files and checksums, preprocessing, and per population what was fitted."""
    card = predictor.card
    # each URL carries its file's sha256: the service worker keeps files by URL, so a new model is a new entry
    files = {"fp32": {"url": f"{MODEL_ROUTE}/{MODEL_FILE}?sha256={card['onnx']['sha256']}", "sha256": card["onnx"]["sha256"]}}
    if (predictor.model_dir / INT8_MODEL_FILE).is_file() and card.get("int8"):
        files["int8"] = {"url": f"{MODEL_ROUTE}/{INT8_MODEL_FILE}?sha256={card['int8']['sha256']}", "sha256": card["int8"]["sha256"]}
    classifier = predictor.population_classifier
    populations = {}
    for name, settings in predictor.populations.items():
        gate = settings.gate
        populations[name] = {
            "temperature": settings.temperature,
            "threshold": settings.threshold,
            "operating_point": settings.operating_point,
            "operating_point_source": settings.in_force,
            "regions": None if settings.regions is None else settings.regions.to_dict(),
            "gate": None if gate is None else {
                "url": f"{MODEL_ROUTE}/gate.{name}.bin?sha256={gate_sha256(card, name)}", "dim": int(np.asarray(gate.mean).size), "two_stage": gate.two_stage,
                "threshold": float(gate.threshold), "l2_threshold": None if gate.l2_threshold is None else float(gate.l2_threshold),
                "cutoff": gate.cutoff,
            },
        }  # fmt: skip
    return {
        "name": card["name"],
        "files": files,
        "input": {k: card["input"][k] for k in ("size", "intensity", "mean", "std")},
        "labels": card["labels"],
        "default_population": predictor.default_population,
        "populations": populations,
        "population_classifier": None if classifier is None else {
            "mean": np.asarray(classifier.mean).tolist(), "scale": np.asarray(classifier.scale).tolist(),
            "coef": np.asarray(classifier.coef).tolist(), "intercept": float(classifier.intercept),
        },
    }
