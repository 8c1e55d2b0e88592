"""Export a trained checkpoint to ONNX with everything fitted to it, and its model card.

``export(checkpoint, out)`` writes ``model.onnx``, ``model_card.json`` and
``MODEL_CARD.md``. The temperature and the threshold are fitted here, on the
validation split scored *by the exported ONNX model itself*, so the shipped
numbers are exactly what ONNX Runtime computes. The test figures in the card are
reported once, after everything is fixed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import pneumoscan
from pneumoscan.files import sha256_file
from pneumoscan.config import (
    CLASS_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    POPULATIONS,
    TEST_FRACTION,
    DataConfig,
    ValFraction,
    portable_path,
)
from pneumoscan.errors import ConfigurationError
from pneumoscan.inputs.preprocessing import INTENSITY_STEP_TEXT
from pneumoscan.learning.data import (
    Record,
    content_checksum,
    dataset_summary,
    records_of,
)
from pneumoscan.learning.evaluation import (
    Calibration,
    fit_calibration,
    ModelUnderTest,
    fit_region_rules,
    localisation_of,
    operating_point_spread,
    run_data_config,
    write_evaluation,
)
from pneumoscan.learning.model import FineCam
from pneumoscan.learning.model_card import render_card
from pneumoscan.learning.training import PneumoniaClassifier
from pneumoscan.running.calibration import (
    DEFAULT_ESTIMATOR,
    DEFAULT_POLICY,
    DEFAULT_TARGET_SENSITIVITY,
    calibrated_probability,
)
from pneumoscan.running.inference import (
    CARD_FILE,
    INT8_MODEL_FILE,
    MODEL_FILE,
    Predictor,
    card_populations,
)

log = logging.getLogger(__name__)

ONNX_OPSET = 17
OOD_PROBE_DICOMS = ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_rgb_color.dcm", "examples_jpeg2k.dcm")
GATE_KEEPS = (0.9975, 0.995, 0.99)
GATE_SHIFTED_COPIES = 2
GATE_SHIFT_SEED = 0
INTENDED_USE = (
    "Decision support for reading frontal chest X-rays of children aged 1–5: it flags images likely to show "
    "pneumonia so that a clinician looks at them first. It is not a diagnosis and does not replace a radiologist."
)
INTENDED_USE_BOTH = (
    "Decision support for reading frontal (PA or AP) chest X-rays of children aged 1–5 and of adults: it flags images "
    "likely to show pneumonia so that a clinician looks at them first, each with the operating point of its population. "
    "It is not a diagnosis and does not replace a radiologist."
)
LIMITATIONS_BOTH = [
    "Children: one hospital's pediatric frontal chest X-rays (Guangzhou Women and Children's Medical Center, Kermany "
    "et al. 2018), ages 1–5. Adults: frontal films of one US hospital (NIH Clinical Center, 18–91 years) with RSNA 2018 "
    "radiologist labels, 1,669 images, of which a fifth of the patients is the test part. Other hospitals, equipment, "
    "and ages 6–17 are untested; the gate flags films unlike those validated.",
    "Adult labels: PNEUMONIA is 'Lung Opacity' read by a radiologist on the image alone, not a confirmed diagnosis; "
    "NORMAL is 'Normal'. Films with other abnormalities ('No Lung Opacity / Not Normal') were not in the data, so "
    "how the model scores them is unknown.",
    "In the adult data the view follows the label (AP bedside films are mostly pneumonia); training balanced view "
    "against label, and the figures within AP, within PA and with the view mix reversed are reported, beside what the "
    "view alone would score. AP films are also sicker patients: within-AP figures are the ones to read for a ward.",
    "Lateral views, and films that DICOM says are not of the chest, are refused; the model sees frontal views only.",
    "Each population's threshold is fitted on its own by-patient validation part; on test parts recorded elsewhere or "
    "at another time, sensitivity and specificity differ from validation (see the figures below).",
    "The adult files were 256 px and already histogram-equalised; every input is equalised before the network, so a "
    "film gets the same answer either way (measured below), but full-resolution adult films were not in the data.",
    "Images are resized to 224×224 without keeping the aspect ratio, as the training data was.",
]
LIMITATIONS = [
    "Trained and validated on one hospital's pediatric frontal chest X-rays (Guangzhou Women and Children's "
    "Medical Center, Kermany et al. 2018), ages 1–5; adults, lateral views and other hospitals' equipment are untested.",
    "Labels are image-level NORMAL/PNEUMONIA from the dataset; no other finding is detected.",
    "The threshold is fitted on a by-patient validation split drawn from train/; on the test split, recorded at "
    "another time, sensitivity and specificity differ from validation (see the figures below).",
    "Images are resized to 224×224 without keeping the aspect ratio, as the training data was.",
]


class LogitAndHeatmap(nn.Module):
    """The exported graph: ImageNet-normalised ``N×3×H×W`` -> logits ``N``, heat maps ``N×H×W``, embeddings ``N×C``.

    The classifier is global average pooling then one linear layer, so Grad-CAM
    on the last feature map *is* the class activation map: the gradient of the
    logit with respect to each feature map is the head weight divided by the
    map size. Computing it in the forward pass makes a heat map cost one 1×1
    convolution and an upsampling, with no backward pass, in any ONNX runtime.
    The map is ReLU'd, upsampled (bilinear) and min-max normalised per image,
    as ``pytorch_grad_cam`` does. A box-guided model (``cell_probabilities``)
    shows each cell's sigmoid instead: training taught its cells' logits to say
    "inside a radiologist's box", and on many pneumonia films every cell stays
    below zero, so ReLU'd its map was blank (22 of v3's 72 boxed adult
    validation films) and its peak the top-left pixel. The sigmoid keeps the
    cells' order, so the map peaks at the cell training scored (``pointing_hits``).
    """

    def __init__(self, model: nn.Module, image_size: int, cell_probabilities: bool = False):
        super().__init__()
        self.cell_probabilities = cell_probabilities
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Linear):
            raise ConfigurationError(
                "exporting heat maps needs a model that ends in global average pooling and one linear layer "
                "(the timm EfficientNet family does; simple_cnn does not)"
            )
        self.model = model
        self.image_size = image_size
        self.register_buffer("cam_weight", classifier.weight.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("cam_bias", classifier.bias.detach().clone() if classifier.bias is not None else torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.model, FineCam):  # the map at stride 16, its logits as box-guided training saw them
            fine, features = self.model.features(x)
            logit, cam = self.model.logit_and_cam(fine, features)
            logit = logit.reshape(-1)
        else:
            features = self.model.forward_features(x)
            logit = self.model.forward_head(features).reshape(-1)
            cam = nn.functional.conv2d(features, self.cam_weight, self.cam_bias if self.cell_probabilities else None)
        cam = torch.sigmoid(cam) if self.cell_probabilities else nn.functional.relu(cam)
        embedding = features.mean(dim=(2, 3))  # what the head sees; the out-of-distribution gate reads it
        cam = nn.functional.interpolate(cam, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return logit, min_max_per_image(cam)[:, 0], embedding

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """The logit alone, for the extra views of test-time augmentation."""
        if isinstance(self.model, FineCam):
            return self.model(x).reshape(-1)
        return self.model.forward_head(self.model.forward_features(x)).reshape(-1)


def min_max_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``N×1×H×W`` to [0, 1], as ``pytorch_grad_cam`` does."""
    maps = maps - maps.amin(dim=(2, 3), keepdim=True)
    return maps / (maps.amax(dim=(2, 3), keepdim=True) + 1e-7)


class EnsembleGraph(nn.Module):
    """Several models and optionally a zoomed second view as one graph with a single model's three outputs.

    The logit is the mean of the members' logits over the views (the temperature
    is fitted to it afterwards), the heat map the renormalised mean of the
    members' maps on the unzoomed view, and the embedding the members'
    embeddings side by side, for the out-of-distribution gate.
    """

    def __init__(self, members: list[LogitAndHeatmap], tta_zoom: float | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tta_zoom = tta_zoom

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, maps, embeddings = zip(*(member(x) for member in self.members))
        views = [torch.stack(logits).mean(dim=0)]
        if self.tta_zoom:
            zoomed = zoom_centre(x, self.tta_zoom, self.members[0].image_size)
            views.append(torch.stack([member.logit(zoomed) for member in self.members]).mean(dim=0))
        heatmap = min_max_per_image(torch.stack(maps).mean(dim=0)[:, None])[:, 0]
        return torch.stack(views).mean(dim=0), heatmap, torch.cat(embeddings, dim=1)


def zoom_centre(x: torch.Tensor, zoom: float, size: int) -> torch.Tensor:
    """The central ``zoom`` share of each ``size``×``size`` image, resized back: like the crops training saw (scale 0.85–1)."""
    margin = round(size * (1 - zoom) / 2)
    centre = x[:, :, margin : size - margin, margin : size - margin]
    return nn.functional.interpolate(centre, size=(size, size), mode="bilinear", align_corners=False)


def is_box_guided(module: PneumoniaClassifier) -> bool:
    """Whether the run trained its class activation map on radiologists' boxes (its map's cells are then logits)."""
    return module.hparams.get("box_loss_weight", 0.0) > 0


def export_onnx(modules: list[PneumoniaClassifier], path: Path, image_size: int, tta_zoom: float | None = None) -> Path:
    """Write the ONNX graph with a dynamic batch dimension; one model without TTA is exported as it is."""
    members = [LogitAndHeatmap(m.model.to(memory_format=torch.contiguous_format), image_size, cell_probabilities=is_box_guided(m)).eval()
               for m in modules]  # fmt: skip
    graph = members[0] if len(members) == 1 and not tta_zoom else EnsembleGraph(members, tta_zoom).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logit", "heatmap", "embedding"],
        dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}, "heatmap": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    return path


def summary(metrics: dict) -> dict:
    """The headline figures of a split for the card (plots stay in the evaluation folder)."""
    keys = ("n", "n_pneumonia", "n_normal", "auroc", "auroc_ci", "average_precision", "partial_auroc_sensitivity_095", "sensitivity", "specificity",
            "precision", "f1", "accuracy", "confusion_matrix", "ece", "sensitivity_by_subtype", "threshold_transfer", "by_view")  # fmt: skip
    return {k: metrics[k] for k in keys}


def export(
    checkpoint: Path | list[Path],
    out: Path,
    root: Path | list[Path] | None = None,
    name: str | None = None,
    policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    int8: bool = False,
    tta_zoom: float | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
) -> dict:
    """Export ``checkpoint`` into the model folder ``out`` and return its card.

    ``root`` names the datasets (default: the run's own). Each population found in
    their validation parts (children, adults) gets its own temperature, threshold and
    gate, fitted on its own validation part; a model of several populations also gets
    a population classifier. Several checkpoints become one ensemble graph, and
    ``tta_zoom`` adds a zoomed second view (see :class:`EnsembleGraph`). With
    ``int8``, also a statically quantised ``model.int8.onnx`` (calibrated on
    training images), measured with the fp32 model's temperatures and thresholds.
    """
    checkpoints = [Path(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
    out = Path(out)
    if tta_zoom is not None and not 0.5 <= tta_zoom < 1:
        raise ConfigurationError(f"--tta-zoom must lie in [0.5, 1), got {tta_zoom}")
    if int8 and (len(checkpoints) > 1 or tta_zoom):
        raise ConfigurationError("--int8 quantises single models only; export the ensemble or TTA model without it")
    modules = [PneumoniaClassifier.load_from_checkpoint(c, map_location="cpu", pretrained=False).eval() for c in checkpoints]
    data = common_data_config(checkpoints, modules)
    if root is not None:
        data = dataclasses.replace(data, root=tuple(root) if isinstance(root, (list, tuple)) else Path(root))
    sources = data.sources
    image_size, intensity = data.image_size, data.intensity
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(modules, out / MODEL_FILE, image_size, tta_zoom)

    card = base_card(checkpoints, modules, out, name, data)
    if tta_zoom:
        card["tta"] = {"views": ["the image", f"its central {tta_zoom:.0%}, resized back"], "combined": "mean of the logits"}
    # Placeholders so a Predictor can open the folder; replaced below once fitted.
    card["calibration"], card["operating_point"] = {"temperature": 1.0}, {"threshold": 0.5}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2))
    onnx_model = Predictor.load(out)

    parts = {split: records_of(sources, split, data.seed, data.val_fraction) for split in ("train", "val", "test")}
    scored = {split: onnx_model.outputs([r.path for r in parts[split]], ["logit", "embedding"], progress=True) for split in ("val", "test")}
    scored["train"] = onnx_model.outputs([r.path for r in parts["train"]], ["embedding"], progress=True)
    populations = [p for p in POPULATIONS if any(r.population == p for r in parts["val"])]
    if not populations:
        raise ConfigurationError("no validation image has a known population (child or adult): give the labels file an age column")
    single = len(populations) == 1
    probes = ood_probe_images()
    probe_embeddings = onnx_model.outputs([image for _, image in probes], ["embedding"])["embedding"]
    shifted = {population: onnx_model.outputs(shifted_copies([r for r in parts["val"] if r.population == population]),
                                              ["embedding"], progress=True)["embedding"] for population in populations}  # fmt: skip

    entries: dict[str, dict] = {}
    calibrations: dict[str, Calibration] = {}
    for population in populations:
        folder = out / "evaluation" if single else out / "evaluation" / population
        pick = {split: [i for i, r in enumerate(parts[split]) if r.population == population] for split in parts}
        val = [parts["val"][i] for i in pick["val"]]
        test = [parts["test"][i] for i in pick["test"]]
        val_logits, test_logits = (scored[s]["logit"].reshape(-1)[pick[s]] for s in ("val", "test"))
        label = card["name"] if single else f"{card['name']} ({population})"
        calibration, measured = fit_and_measure_point(folder, val, test, val_logits, test_logits, label, policy, target, estimator)
        calibrations[population] = calibration
        gate = fit_and_report_gate(
            out, None if single else population, scored["train"]["embedding"][pick["train"]],
            scored["val"]["embedding"][pick["val"]], shifted[population], scored["test"]["embedding"][pick["test"]], probes,
            probe_embeddings, len(pick["train"]),
        )
        entries[population] = {
            **measured,
            "ood_gate": gate,
            "invariance": equalisation_invariance(onnx_model, evenly(test, INVARIANCE_IMAGES), calibration.temperature),
        }
    if single:
        entry = entries[populations[0]]
        card["population"] = populations[0]
        card["calibration"], card["operating_point"] = entry["calibration"], entry["operating_point"]
        card["validation"]["metrics"], card["test"] = entry["validation"]["metrics"], entry["test"]
        card["ood_gate"], card["invariance"] = entry["ood_gate"], entry["invariance"]
        if "operating_point_spread" in entry:
            card["operating_point_spread"] = entry["operating_point_spread"]
    else:
        del card["calibration"], card["operating_point"]
        card["intended_use"], card["limitations"] = INTENDED_USE_BOTH, LIMITATIONS_BOTH
        card["populations"] = entries
        card["population_classifier"] = fit_and_report_population_classifier(out, parts, scored, populations)
    card["drift_reference"] = validation_drift_reference(out, parts["val"], scored["val"], calibrations, single)
    if int8:
        card["int8"] = export_int8(out, data, parts, calibrations, card["name"], entries, single)
    card["data"] = {
        "datasets": [dataset_summary(source, data.seed, data.val_fraction) for source in sources],
        "train_sha256": content_checksum(parts["train"] + parts["val"]),
        "test_sha256": content_checksum(parts["test"]),
        "checksum_method": "sha256 over sorted lines '<dataset>/<relative path> <sha256 of file>'",
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return record_region_rules(out, list(sources), data.seed, data.val_fraction)


def fit_and_measure_point(folder: Path, val: list[Record], test: list[Record], val_logits: np.ndarray, test_logits: np.ndarray,
                          label: str, policy: str, target: float, estimator: str) -> tuple[Calibration, dict]:  # fmt: skip
    """One population's temperature and threshold fitted on its validation part, the point's bootstrap spread there,
    and both parts measured at it (evaluation files in ``folder``): the card entries that depend on the threshold."""
    val_labels = np.asarray([r.label for r in val])
    calibration = fit_calibration(val_logits, val_labels, policy, target, estimator)
    val_metrics = write_evaluation(folder / "val", val, val_logits, calibration, "val", None, label)
    test_metrics = write_evaluation(folder / "test", test, test_logits, calibration, "test", None, label)
    measured = {
        "calibration": {"method": "temperature scaling fitted on this population's validation part (NLL)",
                        "temperature": calibration.temperature},
        "operating_point": calibration.operating_point.to_dict(),
        "validation": {"metrics": summary(val_metrics)},
        "test": {"metrics": summary(test_metrics),
                 "note": "reported once, after temperature, threshold and gate were fixed on validation"},
    }  # fmt: skip
    if policy == "sensitivity":
        probabilities = calibrated_probability(val_logits, calibration.temperature)
        measured["operating_point_spread"] = operating_point_spread(val_labels, probabilities, [r.patient for r in val], target, estimator)
    return calibration, measured


def refit_operating_points(out: Path, sources: list[Path], seed: int, val_fraction: ValFraction, policy: str = DEFAULT_POLICY,
                           target: float = DEFAULT_TARGET_SENSITIVITY, estimator: str = DEFAULT_ESTIMATOR) -> dict:  # fmt: skip
    """Re-choose an exported model's temperatures and thresholds on its validation parts, as export does, and measure
    again everything measured at them: validation and test parts (fp32 and int8), then the region rules and their test
    figures. The graphs, gates and population classifier stay as they are. Returns the card.

    For a folder whose checkpoint is gone, when the way a point is chosen changes (e.g. ``estimator``).
    """
    out = Path(out)
    path = out / CARD_FILE
    card = json.loads(path.read_text())
    single = "populations" not in card
    model = Predictor.load(out)
    parts = {split: records_of(sources, split, seed, val_fraction) for split in ("val", "test")}
    logits = {split: model.logits([r.path for r in parts[split]], progress=True) for split in parts}
    calibrations: dict[str, Calibration] = {}
    entries = card_populations(card)
    for population, entry in entries.items():
        folder = out / "evaluation" if single else out / "evaluation" / population
        pick = {split: [i for i, r in enumerate(parts[split]) if r.population == population or single] for split in parts}
        val, test = ([parts[s][i] for i in pick[s]] for s in ("val", "test"))
        label = card["name"] if single else f"{card['name']} ({population})"
        calibrations[population], measured = fit_and_measure_point(
            folder, val, test, logits["val"][pick["val"]], logits["test"][pick["test"]], label, policy, target, estimator)
        if single:  # a card of one population keeps its validation section's other keys (v1's)
            entry["validation"]["metrics"] = measured.pop("validation")["metrics"]
        entry.update(measured)
    if card.get("int8"):
        card["int8"] = {**card["int8"], **measure_int8(out, parts, calibrations, card["name"], entries, single)}
    path.write_text(json.dumps(card, indent=2) + "\n")
    return record_region_rules(out, sources, seed, val_fraction)


def record_region_rules(out: Path, sources: list[Path], seed: int, val_fraction: ValFraction, boxes: Path | None = None) -> dict:
    """Fit each population's region rule on its validation boxes (:func:`fit_region_rules`) and write it into the card;
    then, the rule fixed, measure the heat maps and regions on the test part once (:func:`localisation_of`) and record
    those figures too. A population without boxes keeps no rule and no figures. Returns the card."""
    path = Path(out) / CARD_FILE
    card = json.loads(path.read_text())
    rules = fit_region_rules(Predictor.load(out), sources, seed, val_fraction, boxes)
    for population, entry in card_populations(card).items():
        entry.pop("regions", None)
        entry.pop("localisation", None)
        if population in rules:
            entry["regions"] = rules[population]
    path.write_text(json.dumps(card, indent=2) + "\n")
    subject = ModelUnderTest(Path(out))  # with the rules just written
    test = records_of(sources, "test", seed, val_fraction)
    for population, entry in card_populations(card).items():
        if population in rules:
            figures = localisation_of(subject, sources, [r for r in test if r.population == population], boxes)
            if figures is not None:
                entry["localisation"] = localisation_summary(figures)
    path.write_text(json.dumps(card, indent=2) + "\n")
    (Path(out) / "MODEL_CARD.md").write_text(render_card(card))
    return card


def localisation_summary(figures: dict) -> dict:
    """What the card keeps of :func:`localisation_of`'s figures on the test part: the values and intervals, per view."""
    keys = ("n", "pointing_game", "pointing_game_fixed_point", "mass_inside", "mass_inside_fixed_map", "box_area_share", "iou",
            "iou_fixed_region", "dice", "dice_fixed_region")  # fmt: skip
    groups = {name: {k: entry[k] for k in keys if k in entry} for name, entry in figures.items()
              if isinstance(entry, dict) and "pointing_game" in entry}  # fmt: skip
    regions = figures["regions"]
    for name, entry in regions.items():
        if isinstance(entry, dict) and "map" in entry:
            groups.setdefault(name, {}).update(films=entry["films"], map=entry["map"], map_fixed_boxes=entry["map_fixed_boxes"])
    return {"split": "test", "note": "measured once, after the region rule was fitted on validation", "levels": {
        "iou": figures.get("all", {}).get("level"), "fixed_region": figures.get("all", {}).get("fixed_region_level")},
        "fixed_boxes": regions["fixed_boxes"], "groups": groups}  # fmt: skip


def validation_drift_reference(out: Path, val: list[Record], scored: dict[str, np.ndarray], calibrations: dict[str, Calibration],
                               single: bool) -> dict:  # fmt: skip
    """What a running service compares its recent predictions with: each population's validation part, as served."""
    from pneumoscan.running.drift import Observation, build_reference
    from pneumoscan.running.ood import OodGate

    observations = []
    for population, calibration in calibrations.items():
        pick = [i for i, r in enumerate(val) if r.population == population]
        gate = OodGate.load(out, None if single else population)
        probabilities = calibrated_probability(scored["logit"].reshape(-1)[pick], calibration.temperature)
        scores = gate.score(scored["embedding"][pick]) if gate is not None else [None] * len(pick)
        observations += [Observation(population, float(p), None if s is None else float(s)) for p, s in zip(probabilities, scores)]
    return build_reference(observations, f"validation parts ({len(observations)} images)")


#: Test images per population on which equalising the file first must not change the answer.
INVARIANCE_IMAGES = 200


def evenly(records: list[Record], n: int) -> list[Record]:
    """``n`` records spread evenly over the list (both classes, whatever the order)."""
    step = max(1, len(records) // n)
    return records[::step][:n]


def equalisation_invariance(model: Predictor, records: list[Record], temperature: float) -> dict[str, object]:
    """|Δprobability| between each file and its histogram-equalised copy: real films arrive either way."""
    from PIL import ImageOps

    from pneumoscan.inputs.imaging import load_xray

    images = [load_xray(r.path).image for r in records]
    plain = model.logits(images)
    equalised = model.logits([ImageOps.equalize(image) for image in images])
    delta = np.abs(calibrated_probability(plain, temperature) - calibrated_probability(equalised, temperature))
    return {
        "n": len(records),
        "median_abs_delta_probability": float(np.median(delta)),
        "p95_abs_delta_probability": float(np.quantile(delta, 0.95)),
        "max_abs_delta_probability": float(delta.max()),
        "method": f"{len(records)} test images of the population spread evenly over its test part, as stored and after "
        "Pillow's ImageOps.equalize",
    }


GRAD_CAM_TEXT = "N×size×size class activation map of the PNEUMONIA logit (= Grad-CAM of the last block), in [0, 1]"
BOX_GUIDED_HEATMAP_TEXT = (
    "N×size×size class activation map of the PNEUMONIA logit, trained per cell on radiologists' boxes: each cell's "
    "sigmoid (the probability training taught it of lying inside a box), upsampled and min-max scaled to [0, 1]"
)


def heatmap_text(modules: list[PneumoniaClassifier]) -> str:
    """What the card says the heat map is: the ReLU'd Grad-CAM, or a box-guided map's cell probabilities."""
    if all(is_box_guided(m) for m in modules):
        return BOX_GUIDED_HEATMAP_TEXT
    return GRAD_CAM_TEXT


def base_card(checkpoints: list[Path], modules: list[PneumoniaClassifier], out: Path, name: str | None, data: DataConfig) -> dict:
    """What the card says before anything is fitted: identity, input contract, training provenance."""
    image_size, intensity = data.image_size, data.intensity
    run_configs = [read_run_record(c) for c in checkpoints]
    run_config = run_configs[0]
    card: dict = {
        "name": name or out.name,
        "pneumoscan_version": pneumoscan.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": " + ".join(str(m.hparams.arch) for m in modules),
        "labels": list(CLASS_NAMES),
        "output": "logit: logit of PNEUMONIA, probability = sigmoid(logit / temperature of the image's population); "
        f"heatmap: {heatmap_text(modules)}; "
        "embedding: N×C globally pooled features of the last block",
        "input": {
            "name": "image",
            "shape": ["batch", 3, image_size, image_size],
            "size": image_size,
            "intensity": intensity,
            "dtype": "float32",
            "preprocessing": "decode as 8-bit grayscale, resize to size×size (bilinear, aspect not kept), "
            + INTENSITY_STEP_TEXT[intensity]
            + "scale to [0, 1], repeat to 3 channels, subtract ImageNet mean and divide by ImageNet std",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "onnx": {"file": MODEL_FILE, "opset": ONNX_OPSET, "sha256": sha256_file(out / MODEL_FILE)},
        "training": {"command": run_config.get("command"), "git_commit": run_config.get("git_commit"), "config": run_config},
        "validation": {"split": {"seed": data.seed, "val_fraction": data.val_fraction, "test_fraction": TEST_FRACTION,
                                 "by": "patient, stratified by class, each dataset on its own"}},
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }
    if len(checkpoints) > 1:
        card["training"] = {
            "command": " && ".join(str(r.get("command")) for r in run_configs),
            "git_commit": ", ".join(sorted({str(r.get("git_commit")) for r in run_configs})),
            "members": [{"checkpoint": portable_path(c.resolve()), "config": r} for c, r in zip(checkpoints, run_configs)],
        }
    return card


def ood_probe_images() -> list[tuple[str, Image.Image]]:
    """Images that are not chest X-rays: every photo scikit-image ships, CT/MR/US slices
    from pydicom's test files, blank and noise images. The gate must flag them all."""
    import pydicom
    import skimage

    from pneumoscan.inputs.imaging import dicom_display_values, load_xray

    probes: list[tuple[str, Image.Image]] = []
    photo_dir = Path(skimage.__file__).parent / "data"
    for path in sorted(photo_dir.glob("*")):
        if path.suffix.lower() in (".png", ".jpg"):
            probes.append((f"scikit-image {path.stem}", load_xray(path).image))
    dicom_dir = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in OOD_PROBE_DICOMS:
        ds = pydicom.dcmread(dicom_dir / name)
        probes.append((f"pydicom {name} ({ds.Modality})", Image.fromarray(dicom_display_values(ds))))
    rng = np.random.default_rng(0)
    size = (224, 224)
    probes += [
        ("blank black", Image.new("L", size, 0)),
        ("blank white", Image.new("L", size, 255)),
        ("blank gray", Image.new("L", size, 128)),
        ("uniform noise", Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8))),
        ("gaussian noise", Image.fromarray(np.clip(rng.normal(128, 40, size), 0, 255).astype(np.uint8))),
    ]
    return probes


def shifted_copies(records: list[Record], copies: int = GATE_SHIFTED_COPIES, seed: int = GATE_SHIFT_SEED) -> list[Image.Image]:
    """Each film again as another hospital might have made it: training's photometric shifts, seeded.

    Validation films are the training films' twins, so a threshold at the 99.75 % quantile of their
    scores alone flags the ordinary films of a site whose exposure, sharpness or compression differ
    (rule 5 of docs/ablations.md).
    """
    from pneumoscan.inputs.imaging import load_xray
    from pneumoscan.learning.datamodule import PhotometricAugment

    shift = PhotometricAugment()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [shift(load_xray(r.path).image) for r in records for _ in range(copies)]


def fit_and_report_gate(
    out: Path, population: str | None, train_embeddings: np.ndarray, val_embeddings: np.ndarray,
    shifted_embeddings: np.ndarray, test_embeddings: np.ndarray, probes: list[tuple[str, Image.Image]],
    probe_embeddings: np.ndarray, n_train: int,
) -> dict:
    """Fit one population's gate on its training features, threshold on its validation part; report test and non-X-rays.

    A model of several populations gets the two-stage gate (features and their direction, see
    :class:`~pneumoscan.running.ood.OodGate`). Each threshold keeps the first share of ``GATE_KEEPS`` of the
    validation films, as they are and shifted (:func:`shifted_copies`), that lets no non-X-ray probe through
    (the rules of docs/ablations.md; the probes are no test part); if none does, the last.
    """
    from pneumoscan.running.ood import fit_gate, gate_file

    threshold_embeddings = np.concatenate([val_embeddings, shifted_embeddings])
    for keep in GATE_KEEPS:
        gate = fit_gate(train_embeddings, threshold_embeddings, keep, two_stage=population is not None)
        probe_scores = gate.score(probe_embeddings)
        kept_probes = [name for (name, _), score in zip(probes, probe_scores) if score <= gate.cutoff]
        if not kept_probes:
            break
    gate.save(out, population)
    file = gate_file(population)
    return {
        "file": file,
        "sha256": sha256_file(out / file),
        "method": (
            "squared Mahalanobis distance of the pooled features (ONNX output 'embedding') from the training "
            f"part's, Ledoit-Wolf covariance fitted on {n_train} training images"
            + (", and the same on the features scaled to unit length; score = the larger of the two distances, each "
               "divided by its threshold (flagged above 1)" if gate.two_stage else "")
            + f"; threshold{'s' if gate.two_stage else ''} = the {gate.keep:.2%} quantile of the validation scores, "
            f"the films as they are and {GATE_SHIFTED_COPIES} photometrically shifted copies of each (gamma, blur, noise, JPEG)"
        ),
        "threshold": gate.cutoff,
        "distance_thresholds": [gate.threshold] + ([gate.l2_threshold] if gate.two_stage else []),
        "keep": gate.keep,
        "kept_validation_share": float(np.mean(gate.in_distribution(gate.score(val_embeddings)))),
        "kept_shifted_validation_share": float(np.mean(gate.in_distribution(gate.score(shifted_embeddings)))),
        "kept_test_share": float(np.mean(gate.in_distribution(gate.score(test_embeddings)))),
        "non_xray_rejected_share": 1.0 - len(kept_probes) / len(probes),
        "non_xray_n": len(probes),
        "non_xray_kept": kept_probes,
        "non_xray_probes": [name for name, _ in probes],
    }


def fit_and_report_population_classifier(out: Path, parts: dict[str, list[Record]], scored: dict[str, dict], populations: list[str]) -> dict:
    """Child or adult from the embedding, fitted on the training parts; right how often on validation and test."""
    from pneumoscan.running.population import POPULATION_FILE, fit_population_classifier

    train = [i for i, r in enumerate(parts["train"]) if r.population in populations]
    classifier = fit_population_classifier(scored["train"]["embedding"][train], [parts["train"][i].population for i in train])
    classifier.save(out)
    report: dict = {
        "file": POPULATION_FILE,
        "sha256": sha256_file(out / POPULATION_FILE),
        "method": f"logistic regression (scikit-learn) on the standardised embedding of {len(train)} training images; "
        "adult when P(adult) ≥ 0.5; a DICOM PatientAge, when present, decides instead (under 18: child)",
    }
    for split in ("val", "test"):
        guessed = classifier.predict(scored[split]["embedding"])
        report[split] = {
            population: {
                "n": sum(r.population == population for r in parts[split]),
                "right_share": float(np.mean([g == population for g, r in zip(guessed, parts[split]) if r.population == population])),
            }
            for population in populations
        }
    return report


def export_int8(out: Path, data: DataConfig, parts: dict[str, list[Record]], calibrations: dict[str, Calibration],
                name: str, entries: dict[str, dict], single: bool) -> dict:  # fmt: skip
    """Quantise, then score each population's validation and test parts with its fp32 calibration."""
    from pneumoscan.learning.quantization import calibration_sample, quantize_int8

    sample = calibration_sample(parts["train"])
    quantize_int8(out / MODEL_FILE, out / INT8_MODEL_FILE, sample, data.image_size, data.intensity)
    section = {
        "file": INT8_MODEL_FILE,
        "sha256": sha256_file(out / INT8_MODEL_FILE),
        "method": "ONNX Runtime static QDQ: int8 weights per channel with reduce_range, uint8 activations (MinMax) "
        f"calibrated on {len(sample)} images of the training parts (validation and test patients excluded); the first "
        "convolution, the head convolution, the classifier and the heat-map branch (CAM convolution, upsampling, normalisation) stay float",
    }
    return {**section, **measure_int8(out, parts, calibrations, name, entries, single)}


def measure_int8(out: Path, parts: dict[str, list[Record]], calibrations: dict[str, Calibration], name: str,
                 entries: dict[str, dict], single: bool) -> dict:  # fmt: skip
    """Each population's validation and test parts scored by ``model.int8.onnx`` at the fp32 temperature and threshold."""
    int8_model = Predictor.load(out, precision="int8")
    section: dict = {}
    for population, calibration in calibrations.items():
        folder = out / "evaluation" if single else out / "evaluation" / population
        figures: dict = {}
        for split in ("val", "test"):
            records = [r for r in parts[split] if r.population == population or single]
            metrics = write_evaluation(folder / f"{split}-int8", records, int8_model.logits([r.path for r in records], progress=True),
                                       calibration, split, None, f"{name} ({population}, int8)")  # fmt: skip
            figures["validation" if split == "val" else "test"] = {"metrics": summary(metrics)}
        fp32_test = entries[population]["test"]["metrics"]
        int8_test = figures["test"]["metrics"]
        figures["test_delta_vs_fp32"] = {k: int8_test[k] - fp32_test[k] for k in ("auroc", "sensitivity", "specificity")}
        if single:
            section.update(figures)
        else:
            section.setdefault("populations", {})[population] = figures
    return section


def read_run_record(checkpoint: Path) -> dict:
    """The run's ``config.json`` beside its checkpoint, made portable ({} if there is none)."""
    path = checkpoint.parent / "config.json"
    return portable_run_config(json.loads(path.read_text()) if path.is_file() else {})


def common_data_config(checkpoints: list[Path], modules: list[PneumoniaClassifier]) -> DataConfig:
    """The split and preprocessing all members share; members of different splits would leak validation.

    Image size and intensity normalisation come from the checkpoints themselves, the split from their runs' records.
    """
    configs = [
        dataclasses.replace(run_data_config(c), image_size=int(m.hparams.image_size), intensity=m.intensity)
        for c, m in zip(checkpoints, modules)
    ]

    def key(c: DataConfig) -> tuple:
        shares = tuple(sorted(c.val_fraction.items())) if isinstance(c.val_fraction, dict) else c.val_fraction
        return (c.seed, shares, c.image_size, c.intensity, tuple(str(p) for p in c.sources))

    if len({key(c) for c in configs}) > 1:
        raise ConfigurationError(
            "ensemble members must share the validation split (seed, val_fraction), image size and intensity "
            f"normalisation; they have {sorted({key(c) for c in configs})}: retrain them on the same split"
        )
    return configs[0]


def portable_run_config(run_config: dict) -> dict:
    """The run record without this machine's absolute data paths (runs recorded before they were made portable)."""
    run_config = json.loads(json.dumps(run_config))
    if "data_root" in run_config:
        run_config["data_root"] = portable_path(run_config["data_root"])
    if isinstance(run_config.get("data"), dict) and "root" in run_config["data"]:
        roots = run_config["data"]["root"]
        run_config["data"]["root"] = [portable_path(r) for r in roots] if isinstance(roots, list) else portable_path(roots)
    return run_config
