"""Running an exported model with ONNX Runtime, without PyTorch.

A model folder holds ``model.onnx`` (and ``model.int8.onnx`` when quantised)
and ``model_card.json``; the card carries everything fitted to the model
(temperature, threshold, input contract), so a prediction here is exactly what
evaluation measured. ``Predictor.load()`` opens the shipped model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from pneumoscan.files import sha256_file
from pneumoscan.config import (
    CLASS_NAMES,
    DEFAULT_MODEL_DIR,
    INTENSITY_MODES,
    POPULATIONS,
)
from pneumoscan.errors import (
    ConfigurationError,
    ModelIntegrityError,
    ModelNotFoundError,
)
from pneumoscan.inputs.imaging import Limits, LoadedImage, load_xray
from pneumoscan.inputs.preprocessing import preprocess
from pneumoscan.running.calibration import calibrated_probability
from pneumoscan.running.ood import WARNING as OOD_WARNING
from pneumoscan.running.ood import OodGate
from pneumoscan.running.population import (
    PopulationClassifier,
    PopulationDecision,
    decide_population,
)
from pneumoscan.running.regions import Region, RegionRule, find_regions

MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
CARD_FILE = "model_card.json"
PRECISIONS = {"fp32": MODEL_FILE, "int8": INT8_MODEL_FILE}
#: Why a flagged film may have no region although its population has a rule.
NO_REGION_MARKED = "no region marked: no part of the heat map is both hot and large enough under the rule fitted on validation"

ImageInput = Union[str, Path, bytes, np.ndarray, Image.Image]


def read_card(model_dir: Path) -> dict:
    """The model card of an exported model folder."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"no exported model at {model_dir} (missing {CARD_FILE}); "
            "export one with 'pneumoscan export CHECKPOINT --out DIR' or pass --model"
        )
    return json.loads(path.read_text())


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_grayscale_image(source: ImageInput, limits: Limits | None = None) -> Image.Image:
    """Accept a path, encoded bytes, a NumPy array or a PIL image; return 8-bit grayscale.

    Paths and bytes go through :func:`pneumoscan.inputs.imaging.load_xray`, which raises
    a typed :class:`~pneumoscan.errors.InputError` for anything it cannot score.
    """
    if isinstance(source, Image.Image):
        return source.convert("L")
    if isinstance(source, np.ndarray):
        array = source if source.dtype == np.uint8 else np.clip(source, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("L")
    return load_xray(source, limits).image  # bytes or a path: any supported format, DICOM included


def verify_model_file(model_path: Path, card: dict, precision: str) -> str:
    """The file's sha256; refused if it differs from the card's: a damaged or swapped file must not answer."""
    actual = sha256_file(model_path)
    expected = (card.get("int8" if precision == "int8" else "onnx") or {}).get("sha256")
    if expected and actual != expected:  # a card written before checksums has nothing to compare
        raise ModelIntegrityError(
            f"{model_path} does not match its model card (sha256 {actual[:12]}…, the card says {expected[:12]}…): "
            "the file is damaged, truncated or was replaced; restore it or export the model again"
        )
    return actual


@dataclass(frozen=True)
class PopulationSettings:
    """What is fitted to one population on its own validation part: temperature, threshold, gate."""

    temperature: float
    threshold: float
    operating_point: str
    gate: OodGate | None = None
    source: str = "validation"  # where the operating point was fitted: "validation", or "site" (pneumoscan calibrate)
    date: str | None = None  # when a site calibration set it
    regions: RegionRule | None = None  # how its heat maps become regions; None: never fitted (no radiologists' boxes)
    target_sensitivity: float | None = None  # what the point promises (sensitivity policy); live performance checks it

    @property
    def in_force(self) -> str:
        """Which operating point answers, in words: 'validation' or 'site calibration of 2026-11-23'."""
        return f"site calibration of {self.date}" if self.source == "site" else "validation"


def card_populations(card: dict) -> dict[str, dict]:
    """A card's fitted settings and figures per population; a card of one population (v1's) is its children's."""
    return card.get("populations") or {card.get("population", "child"): card}


def promised_sensitivity(point: dict) -> float | None:
    """The sensitivity an operating point was set to keep; None for a point of another policy (e.g. Youden)."""
    return float(point["target"]) if point.get("policy") == "sensitivity" and point.get("target") is not None else None


def population_settings(card: dict, model_dir: Path) -> dict[str, PopulationSettings]:
    """Per population from the card; a model of one population keeps its gate in ``ood_gate.npz``."""
    several = "populations" in card
    return {
        name: PopulationSettings(
            float(entry["calibration"]["temperature"]), float(entry["operating_point"]["threshold"]),
            str(entry["operating_point"].get("name", "unfitted")), OodGate.load(model_dir, name if several else None),
            str(entry["operating_point"].get("source", "validation")), entry["operating_point"].get("date"),
            RegionRule.from_card(entry.get("regions")), promised_sensitivity(entry["operating_point"]),
        )
        for name, entry in card_populations(card).items()
        if name in POPULATIONS
    }


@dataclass
class Prediction:
    """What pneumoscan answers for one image."""

    probability: float  # calibrated probability of pneumonia (with the temperature of its population)
    label: str  # PNEUMONIA when probability >= threshold
    threshold: float
    operating_point: str
    logit: float
    in_distribution: bool | None = None  # None: the model has no out-of-distribution gate
    operating_point_source: str = "validation"  # or "site calibration of <date>": which operating point is in force
    ood_score: float | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)  # size×size in [0, 1]
    population: str | None = None  # child or adult: whose operating point and gate were used
    population_source: str | None = None  # what decided it: the image, the DICOM PatientAge, or the model's only one
    population_note: str | None = None  # the image and the DICOM age disagree
    regions: list[Region] = field(default_factory=list)  # where the pneumonia is, in pixels of the original image
    regions_note: str | None = None  # why a pneumonia has no regions, when it is the population's rule that is missing

    @property
    def warning(self) -> str | None:
        return OOD_WARNING if self.in_distribution is False else None

    @property
    def validated(self) -> bool:
        """False for an image the gate flags: its decision must not be shown as a verdict."""
        return self.in_distribution is not False

    def to_dict(self) -> dict[str, object]:
        return {
            "probability": self.probability,
            "label": self.label,
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "operating_point_source": self.operating_point_source,
            "population": self.population,
            "population_source": self.population_source,
            "population_note": self.population_note,
            "in_distribution": self.in_distribution,
            "ood_score": self.ood_score,
            "warning": self.warning,
            "regions": [region.to_dict() for region in self.regions],
            "regions_note": self.regions_note,
        }


class Predictor:
    """The shipped model in ONNX Runtime: one shared session, safe to call from many threads."""

    def __init__(
        self,
        model_dir: Path | str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        limits: Limits | None = None,
    ):
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise ConfigurationError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        self.card = read_card(self.model_dir)
        self.precision = precision
        model_path = self.model_dir / PRECISIONS[precision]
        if not model_path.is_file():
            hint = "export with --int8" if precision == "int8" else "export the model again"
            raise ModelNotFoundError(f"{model_path} is missing: {hint}")
        self.model_sha256 = verify_model_file(model_path, self.card, precision)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises several kinds for a file it cannot parse
            raise ModelIntegrityError(f"{model_path} cannot be loaded by ONNX Runtime ({type(exc).__name__}); "
                                      "export the model again or restore the file") from exc  # fmt: skip
        self.input_name = self.session.get_inputs()[0].name
        self.image_size = int(self.card["input"]["size"])
        self.intensity = str(self.card["input"].get("intensity", "none"))  # cards before intensity normalisation: none
        if self.intensity not in INTENSITY_MODES:
            raise ModelIntegrityError(f"{self.model_dir} asks for intensity normalisation {self.intensity!r}, which "
                                      f"this pneumoscan does not know ({', '.join(INTENSITY_MODES)}); "
                                      "upgrade pneumoscan or export the model again")  # fmt: skip
        self.populations = population_settings(self.card, self.model_dir)
        self.population_classifier = PopulationClassifier.load(self.model_dir)
        self.limits = limits or Limits()

    @property
    def has_gate(self) -> bool:
        return any(settings.gate is not None for settings in self.populations.values())

    @property
    def needs_embedding(self) -> bool:
        return self.has_gate or self.population_classifier is not None

    @classmethod
    def load(
        cls,
        model_dir: Path | str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        limits: Limits | None = None,
    ) -> Predictor:
        """Open an exported model folder (default: the shipped model); ``limits`` bound the inputs."""
        return cls(model_dir, precision, threads, limits)

    @property
    def default_population(self) -> str:
        """The population of a model of one; for several, the first (children) when nothing else decides."""
        return next(iter(self.populations))

    @property
    def temperature(self) -> float:
        return self.populations[self.default_population].temperature

    @property
    def threshold(self) -> float:
        return self.populations[self.default_population].threshold

    @property
    def operating_point(self) -> str:
        return self.populations[self.default_population].operating_point

    def decide_populations(self, embeddings: np.ndarray | None, n: int, ages: Sequence[float | None] | None) -> list[PopulationDecision]:
        """Route each image: the model's only population, or the image's look overruled by a stated DICOM age."""
        ages = list(ages) if ages is not None else [None] * n
        if len(self.populations) == 1:
            return [decide_population(None, None, only=self.default_population) for _ in range(n)]
        looks: list[str | None] = (
            self.population_classifier.predict(embeddings) if self.population_classifier is not None and embeddings is not None
            else [None] * n
        )
        decisions = []
        for look, age in zip(looks, ages):
            decision = decide_population(look, age)
            if decision.population not in self.populations:  # no classifier and no age: the first population, said so
                decision = PopulationDecision(self.default_population, "default (nothing told the population)", look)
            decisions.append(decision)
        return decisions

    def run(self, batch: np.ndarray, outputs: Sequence[str] = ("logit",)) -> dict[str, np.ndarray]:
        """Named outputs (``logit``, ``heatmap``, ``embedding``) for preprocessed inputs ``N×3×H×W``."""
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        return dict(zip(outputs, self.session.run(list(outputs), feed)))

    def outputs(
        self, sources: Sequence[ImageInput], names: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> dict[str, np.ndarray]:
        """Named outputs for many images, batched, with an optional progress bar."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for chunk in tqdm(list(batched(sources, batch_size)), desc="scoring", unit="batch", disable=not progress):
            for name, value in self.run(np.stack([self.preprocess(s) for s in chunk]), names).items():
                parts[name].append(value)
        return {name: np.concatenate(values) if values else np.zeros(0, np.float32) for name, values in parts.items()}

    def preprocess(self, source: ImageInput) -> np.ndarray:
        return preprocess(to_grayscale_image(source, self.limits), self.image_size, self.intensity)

    def logits(self, sources: Sequence[ImageInput], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return self.outputs(sources, ["logit"], batch_size, progress)["logit"].reshape(-1)

    def gate_scores(self, embeddings: np.ndarray | None, populations: list[str]) -> list[float | None]:
        """Each image's out-of-distribution score under the gate of its own population (one product per population)."""
        scores: list[float | None] = [None] * len(populations)
        for name, settings in self.populations.items():
            rows = [i for i, p in enumerate(populations) if p == name]
            if rows and settings.gate is not None and embeddings is not None:
                for i, score in zip(rows, settings.gate.score(embeddings[rows])):
                    scores[i] = float(score)
        return scores

    def predict(
        self, images: ImageInput | Sequence[ImageInput], heatmap: bool = False, batch_size: int = 32
    ) -> Prediction | list[Prediction]:
        """Calibrated probability, label at the threshold of the image's population and (on request) a heat map.

        A single image gives one :class:`Prediction`; a list gives a list. A
        DICOM's PatientAge is read from paths and bytes and routes the image.
        """
        single = not isinstance(images, (list, tuple))
        sources = [images] if single else list(images)
        predictions: list[Prediction] = []
        for chunk in batched(sources, batch_size):
            loaded = [self.read_image(s) for s in chunk]
            tensors = np.stack([self.preprocess(image) for image, _ in loaded])
            predictions += self.predict_tensors(tensors, heatmap, ages=[age for _, age in loaded],
                                                sizes=[image.size for image, _ in loaded])
        return predictions[0] if single else predictions

    def read_image(self, source: ImageInput) -> tuple[Image.Image, float | None]:
        """The grayscale image and, for a DICOM, the patient's age in years (None when not stated)."""
        if isinstance(source, (str, Path, bytes)):
            loaded = load_xray(source, self.limits)
            return loaded.image, loaded.age_years
        return to_grayscale_image(source, self.limits), None

    def predict_loaded(self, loaded: LoadedImage, heatmap: bool = False) -> Prediction:
        """One image as :func:`~pneumoscan.inputs.imaging.load_xray` read it; its DICOM PatientAge routes it."""
        return self.predict_tensors(self.preprocess(loaded.image)[None], heatmap, ages=[loaded.age_years],
                                    sizes=[loaded.image.size])[0]

    @property
    def has_regions(self) -> bool:
        return any(settings.regions is not None for settings in self.populations.values())

    def predict_tensors(
        self, batch: np.ndarray, heatmap: bool = False, ages: Sequence[float | None] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Prediction]:
        """:meth:`predict` for inputs already preprocessed (``N×3×H×W``), e.g. decoded by worker threads.

        ``ages`` (years, from DICOM PatientAge; None where unknown) overrule the image's look for the population.
        ``sizes`` (width, height of each original image) place the regions in its pixels; without them, in the
        model's input pixels. The heat map is always computed when a population has a region rule (regions come
        from it) but kept only when asked for.
        """
        wants_map = heatmap or self.has_regions
        names = ["logit"] + (["heatmap"] if wants_map else []) + (["embedding"] if self.needs_embedding else [])
        out = self.run(batch, names)
        logits, maps, embeddings = out["logit"].reshape(-1), out.get("heatmap"), out.get("embedding")
        decisions = self.decide_populations(embeddings, len(logits), ages)
        scores = self.gate_scores(embeddings, [d.population for d in decisions])
        predictions = []
        for i, (logit, decision) in enumerate(zip(logits, decisions)):
            settings = self.populations[decision.population]
            score = scores[i]
            probability = float(calibrated_probability(logit, settings.temperature))
            label = CLASS_NAMES[int(probability >= settings.threshold)]
            in_distribution = bool(score <= settings.gate.cutoff) if score is not None else None
            size = tuple(sizes[i]) if sizes is not None else (self.image_size, self.image_size)
            regions, regions_note = self.regions_of(maps[i] if maps is not None else None, probability, label,
                                                    in_distribution, decision.population, size)  # fmt: skip
            predictions.append(
                Prediction(
                    probability=probability,
                    label=label,
                    threshold=settings.threshold,
                    operating_point=settings.operating_point,
                    operating_point_source=settings.in_force,
                    logit=float(logit),
                    in_distribution=in_distribution,
                    ood_score=score,
                    heatmap=maps[i] if heatmap and maps is not None else None,
                    population=decision.population,
                    population_source=decision.source,
                    population_note=decision.note,
                    regions=regions,
                    regions_note=regions_note,
                )
            )
        return predictions

    def regions_of(self, heatmap: np.ndarray | None, probability: float, label: str, in_distribution: bool | None,
                   population: str, size: tuple[int, int]) -> tuple[list[Region], str | None]:  # fmt: skip
        """Regions only for a pneumonia the gate lets through, and only where a rule was fitted on boxes."""
        if label != CLASS_NAMES[1] or in_distribution is False:
            return [], None
        rule = self.populations[population].regions
        if rule is None or heatmap is None:
            return [], (f"no regions: where the pneumonia lies was not measured for the {population} population "
                        "(no radiologists' boxes in its validation part); the heat map is shown for reference")  # fmt: skip
        regions = find_regions(heatmap, probability, rule, size)
        return regions, None if regions else NO_REGION_MARKED
