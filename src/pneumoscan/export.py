"""Export a trained checkpoint to ONNX with everything fitted to it, and its model card.

``export(checkpoint, out)`` writes ``model.onnx``, ``model_card.json`` and
``MODEL_CARD.md``. The temperature and the threshold are fitted here, on the
validation split scored *by the exported ONNX model itself*, so the shipped
numbers are exactly what ONNX Runtime computes. The test figures in the card are
reported once, after everything is fixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import pneumoscan
from pneumoscan.calibration import DEFAULT_POLICY, DEFAULT_TARGET_SENSITIVITY
from pneumoscan.config import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, DataConfig, portable_path
from pneumoscan.data import Record, list_records, sha256_file, split_by_patient
from pneumoscan.errors import ConfigurationError
from pneumoscan.evaluation import Calibration, fit_calibration, run_data_config, split_records, write_evaluation
from pneumoscan.inference import CARD_FILE, INT8_MODEL_FILE, MODEL_FILE, Predictor
from pneumoscan.preprocessing import INTENSITY_STEP_TEXT
from pneumoscan.training import PneumoniaClassifier

log = logging.getLogger(__name__)

ONNX_OPSET = 17
OOD_PROBE_DICOMS = ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_rgb_color.dcm", "examples_jpeg2k.dcm")
INTENDED_USE = (
    "Decision support for reading frontal chest X-rays of children aged 1–5: it flags images likely to show "
    "pneumonia so that a clinician looks at them first. It is not a diagnosis and does not replace a radiologist."
)
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
    as ``pytorch_grad_cam`` does.
    """

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Linear):
            raise ConfigurationError(
                "exporting heat maps needs a model that ends in global average pooling and one linear layer "
                "(the timm EfficientNet family does; simple_cnn does not)"
            )
        self.model = model
        self.image_size = image_size
        self.register_buffer("cam_weight", classifier.weight.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        logit = self.model.forward_head(features).reshape(-1)
        embedding = features.mean(dim=(2, 3))  # what the head sees; the out-of-distribution gate reads it
        cam = nn.functional.relu(nn.functional.conv2d(features, self.cam_weight))
        cam = nn.functional.interpolate(cam, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return logit, min_max_per_image(cam)[:, 0], embedding

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """The logit alone, for the extra views of test-time augmentation."""
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


def content_checksum(records: list[Record], root: Path) -> str:
    """sha256 over (relative path, file sha256) of every image: identifies the data itself."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.path.relative_to(root).as_posix()):
        digest.update(f"{record.path.relative_to(root).as_posix()} {sha256_file(record.path)}\n".encode())
    return digest.hexdigest()


def export_onnx(modules: list[PneumoniaClassifier], path: Path, image_size: int, tta_zoom: float | None = None) -> Path:
    """Write the ONNX graph with a dynamic batch dimension; one model without TTA is exported as it is."""
    members = [LogitAndHeatmap(m.model.to(memory_format=torch.contiguous_format), image_size).eval() for m in modules]
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
    keys = ("n", "n_pneumonia", "n_normal", "auroc", "auroc_ci", "average_precision", "sensitivity", "specificity",
            "precision", "f1", "accuracy", "confusion_matrix", "ece", "sensitivity_by_subtype", "threshold_transfer")  # fmt: skip
    return {k: metrics[k] for k in keys}


def export(
    checkpoint: Path | list[Path],
    out: Path,
    root: Path,
    name: str | None = None,
    policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY,
    int8: bool = False,
    tta_zoom: float | None = None,
) -> dict:
    """Export ``checkpoint`` into the model folder ``out`` and return its card.

    Several checkpoints become one ensemble graph, and ``tta_zoom`` adds a
    zoomed second view (see :class:`EnsembleGraph`); either way the result is
    one ONNX file that every command serves like a single model. With
    ``int8``, also a statically quantised ``model.int8.onnx`` (calibrated on
    training images), measured with the fp32 model's temperature and threshold.
    """
    checkpoints = [Path(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
    out, root = Path(out), Path(root)
    if tta_zoom is not None and not 0.5 <= tta_zoom < 1:
        raise ConfigurationError(f"--tta-zoom must lie in [0.5, 1), got {tta_zoom}")
    if int8 and (len(checkpoints) > 1 or tta_zoom):
        raise ConfigurationError("--int8 quantises single models only; export the ensemble or TTA model without it")
    modules = [PneumoniaClassifier.load_from_checkpoint(c, map_location="cpu", pretrained=False).eval() for c in checkpoints]
    data = common_data_config(checkpoints, modules)
    image_size, intensity = data.image_size, data.intensity
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(modules, out / MODEL_FILE, image_size, tta_zoom)

    run_configs = [read_run_record(c) for c in checkpoints]
    run_config = run_configs[0]
    card: dict = {
        "name": name or out.name,
        "pneumoscan_version": pneumoscan.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": " + ".join(str(m.hparams.arch) for m in modules),
        "labels": list(CLASS_NAMES),
        "output": "logit: logit of PNEUMONIA, probability = sigmoid(logit / temperature); "
        "heatmap: N×size×size class activation map of the PNEUMONIA logit (= Grad-CAM of the last block), in [0, 1]; "
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
        "validation": {"split": {"seed": data.seed, "val_fraction": data.val_fraction, "by": "patient, stratified by class"}},
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
    }
    if len(checkpoints) > 1:
        card["training"] = {
            "command": " && ".join(str(r.get("command")) for r in run_configs),
            "git_commit": ", ".join(sorted({str(r.get("git_commit")) for r in run_configs})),
            "members": [{"checkpoint": portable_path(c.resolve()), "config": r} for c, r in zip(checkpoints, run_configs)],
        }
    if tta_zoom:
        card["tta"] = {"views": ["the image", f"its central {tta_zoom:.0%}, resized back"], "combined": "mean of the logits"}
    # Placeholders so a Predictor can open the folder; replaced below once fitted.
    card["calibration"] = {"temperature": 1.0}
    card["operating_point"] = {"threshold": 0.5}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2))
    onnx_model = Predictor.load(out)

    val = split_records(root, "val", data.seed, data.val_fraction)
    val_out = onnx_model.outputs([r.path for r in val], ["logit", "embedding"], progress=True)
    val_logits = val_out["logit"].reshape(-1)
    calibration = fit_calibration(val_logits, np.asarray([r.label for r in val]), policy, target)
    card["calibration"] = {"method": "temperature scaling fitted on the validation split (NLL)", "temperature": calibration.temperature}
    card["operating_point"] = calibration.operating_point.to_dict()

    val_metrics = write_evaluation(out / "evaluation" / "val", val, val_logits, calibration, "val", root, card["name"])
    test = split_records(root, "test", data.seed, data.val_fraction)
    test_out = onnx_model.outputs([r.path for r in test], ["logit", "embedding"], progress=True)
    test_logits = test_out["logit"].reshape(-1)
    test_metrics = write_evaluation(out / "evaluation" / "test", test, test_logits, calibration, "test", root, card["name"])
    card["validation"]["metrics"] = summary(val_metrics)
    card["test"] = {"metrics": summary(test_metrics), "note": "reported once, after temperature and threshold were fixed on validation"}
    card["ood_gate"] = fit_and_report_gate(onnx_model, out, root, data, val_out["embedding"], test_out["embedding"])
    if int8:
        card["int8"] = export_int8(out, root, data, val, test, calibration, card["name"], test_metrics)
    card["data"] = {
        "root": root.name,
        "train_sha256": content_checksum(list_records(root, "train"), root),
        "test_sha256": content_checksum(test, root),
        "checksum_method": "sha256 over sorted lines '<relative path> <sha256 of file>'",
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(render_card(card))
    return card


def ood_probe_images() -> list[tuple[str, Image.Image]]:
    """Images that are not chest X-rays: every photo scikit-image ships, CT/MR/US slices
    from pydicom's test files, blank and noise images. The gate must flag them all."""
    import pydicom
    import skimage

    from pneumoscan.imaging import dicom_display_values, load_xray

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


def fit_and_report_gate(model: Predictor, out: Path, root: Path, data: DataConfig, val_embeddings: np.ndarray, test_embeddings: np.ndarray) -> dict:
    """Fit the gate on training-split features, threshold on validation; report test and non-X-ray shares."""
    from pneumoscan.ood import DEFAULT_KEEP, GATE_FILE, fit_gate

    train_side = training_side(root, data)
    train_embeddings = model.outputs([r.path for r in train_side], ["embedding"], progress=True)["embedding"]
    gate = fit_gate(train_embeddings, val_embeddings, DEFAULT_KEEP)
    gate.save(out)
    probes = ood_probe_images()
    probe_scores = gate.score(model.outputs([image for _, image in probes], ["embedding"])["embedding"])
    kept_probes = [name for (name, _), score in zip(probes, probe_scores) if score <= gate.threshold]
    return {
        "file": GATE_FILE,
        "sha256": sha256_file(out / GATE_FILE),
        "method": "squared Mahalanobis distance of the pooled features (ONNX output 'embedding') from the training "
        f"split's, Ledoit-Wolf covariance fitted on {len(train_side)} training images; threshold = the "
        f"{DEFAULT_KEEP:.0%} quantile of the validation scores",
        "threshold": gate.threshold,
        "kept_validation_share": float(np.mean(gate.in_distribution(gate.score(val_embeddings)))),
        "kept_test_share": float(np.mean(gate.in_distribution(gate.score(test_embeddings)))),
        "non_xray_rejected_share": 1.0 - len(kept_probes) / len(probes),
        "non_xray_n": len(probes),
        "non_xray_kept": kept_probes,
        "non_xray_probes": [name for name, _ in probes],
    }


def export_int8(out: Path, root: Path, data: DataConfig, val: list[Record], test: list[Record],
                calibration: Calibration, name: str, fp32_test: dict) -> dict:  # fmt: skip
    """Quantise, then score validation and test with the fp32 calibration; the card's int8 section."""
    from pneumoscan.quantization import calibration_sample, quantize_int8

    sample = calibration_sample(training_side(root, data))
    quantize_int8(out / MODEL_FILE, out / INT8_MODEL_FILE, sample, data.image_size, data.intensity)
    int8_model = Predictor.load(out, precision="int8")
    val_metrics = write_evaluation(out / "evaluation" / "val-int8", val, int8_model.logits([r.path for r in val], progress=True),
                                   calibration, "val", root, name + " (int8)")  # fmt: skip
    test_metrics = write_evaluation(out / "evaluation" / "test-int8", test, int8_model.logits([r.path for r in test], progress=True),
                                    calibration, "test", root, name + " (int8)")  # fmt: skip
    return {
        "file": INT8_MODEL_FILE,
        "sha256": sha256_file(out / INT8_MODEL_FILE),
        "method": "ONNX Runtime static QDQ: int8 weights per channel with reduce_range, uint8 activations (MinMax) "
        f"calibrated on {len(sample)} images of the training split (validation patients excluded); the first "
        "convolution, the head convolution, the classifier and the heat-map branch (CAM convolution, upsampling, normalisation) stay float",
        "validation": {"metrics": summary(val_metrics)},
        "test": {"metrics": summary(test_metrics)},
        "test_delta_vs_fp32": {
            "auroc": test_metrics["auroc"] - fp32_test["auroc"],
            "sensitivity": test_metrics["sensitivity"] - fp32_test["sensitivity"],
            "specificity": test_metrics["specificity"] - fp32_test["specificity"],
        },
    }


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
        return (c.seed, c.val_fraction, c.image_size, c.intensity)

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
        run_config["data"]["root"] = portable_path(run_config["data"]["root"])
    return run_config


def training_side(root: Path, data: DataConfig) -> list[Record]:
    """The training side of the by-patient split: int8 calibration never sees validation or test."""
    return split_by_patient(list_records(root, "train"), data.val_fraction, data.seed)[0]


def _fmt_split(metrics: dict) -> str:
    low, high = metrics["auroc_ci"]
    cm = metrics["confusion_matrix"]
    return (
        f"| {metrics['n']} | {metrics['auroc']:.4f} ({low:.4f}–{high:.4f}) | {metrics['sensitivity']:.4f} | "
        f"{metrics['specificity']:.4f} | {metrics['precision']:.4f} | {metrics['accuracy']:.4f} | {cm['fn']} | {cm['fp']} | "
        f"{metrics['ece']['after_calibration']:.4f} |"
    )


def render_card(card: dict) -> str:
    """The human-readable model card."""
    op, val, test = card["operating_point"], card["validation"]["metrics"], card["test"]["metrics"]
    limits = "\n".join(f"- {item}" for item in card["limitations"])
    gate = card.get("ood_gate")
    gate_text = "none" if not gate else (
        f"{gate['method']} (threshold {gate['threshold']:.1f}, `{gate['file']}`). Kept: "
        f"{gate['kept_validation_share']:.1%} of validation and {gate['kept_test_share']:.1%} of test images. "
        f"Rejected: {gate['non_xray_rejected_share']:.1%} of {gate['non_xray_n']} images that are not chest X-rays "
        f"(scikit-image's sample photos, CT/MR/US images from pydicom's test files, blank and noise images)"
        + (f"; not rejected: {', '.join(gate['non_xray_kept'])}." if gate["non_xray_kept"] else ".")
    )
    int8_rows = ""
    if "int8" in card:
        int8_rows = (
            f"| validation, int8 | {_fmt_split(card['int8']['validation']['metrics'])[2:]}\n"
            f"| test, int8 | {_fmt_split(card['int8']['test']['metrics'])[2:]}\n\n"
            f"int8 (`{card['int8']['file']}`, sha256 `{card['int8']['sha256']}`): {card['int8']['method']}; "
            "same temperature and threshold as fp32.\n"
        )
    return f"""# Model card: {card['name']}

{card['intended_use']}

| | |
|---|---|
| architecture | `{card['architecture']}` (timm), ImageNet-pretrained, one pneumonia logit |
| input | `{card['input']['name']}` float32 {card['input']['shape']}: {card['input']['preprocessing']} |
| labels | {', '.join(card['labels'])} |
| output | {card['output']} |
| temperature | {card['calibration']['temperature']:.4f} ({card['calibration']['method']}) |
| operating point | **{op['name']}**: threshold {op['threshold']:.4f} on the calibrated probability (policy `{op['policy']}`, target {op['target']}) |
| ONNX | `{card['onnx']['file']}`, opset {card['onnx']['opset']}, sha256 `{card['onnx']['sha256']}` |
| training command | `{card['training']['command']}` (commit `{card['training']['git_commit']}`) |
| data | train sha256 `{card['data']['train_sha256']}`, test sha256 `{card['data']['test_sha256']}` ({card['data']['checksum_method']}) |

## Figures at the operating point

| split | n | AUROC (95% CI, by patient) | sensitivity | specificity | precision | accuracy | missed pneumonias | false alarms | ECE |
|---|---|---|---|---|---|---|---|---|---|
| validation | {_fmt_split(val)[2:]}
| test | {_fmt_split(test)[2:]}
{int8_rows}
Threshold and temperature were fitted on the validation split (about 10 % of the
patients of `train/`, by patient); the test split was scored once, afterwards.
Reports with plots: `evaluation/val/report.md`, `evaluation/test/report.md`.

## Out-of-distribution gate

{gate_text}

## Limitations

{limits}
"""
