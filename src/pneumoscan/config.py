"""Every setting of pneumoscan in one place, with its default.

Commands build these dataclasses from their flags; nothing else in the package
keeps its own constants for image size, normalisation, data location or
training hyper-parameters.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pneumoscan.errors import ConfigurationError

#: Label names in index order: index 1 is the positive class.
CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
SPLITS: tuple[str, str] = ("train", "test")
#: Populations a model can be validated for; a person is an adult from this age (years).
POPULATIONS: tuple[str, str] = ("child", "adult")
ADULT_AGE = 18
#: Share of patients held out as the test part of a dataset that has none of its own.
TEST_FRACTION = 0.20
#: Share of each dataset's (training) patients held out for validation: one share for every dataset, or one per
#: dataset keyed by its name (its folder's, or the labels file's folder's) with ``default`` for the others. A
#: population's 98 % operating point is read off its validation pneumonias, and it holds with 95 % confidence only
#: from 149 of them on (docs/ablations.md, rule 6): the adults' part is made larger than the children's.
ValFraction = float | dict[str, float]
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})

#: ImageNet statistics: the pretrained backbones were trained with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
#: Depth of the strip that training's BorderErase blanks along an edge, as a share of the side: the film's edges
#: carry markers, stamps and collimation, the lungs lie inside. The border probe (learning.shortcuts) blanks the
#: deepest of these on all four edges.
BORDER_ERASE_DEPTHS: tuple[float, float] = (0.02, 0.12)
BORDER_PROBE_DEPTH = BORDER_ERASE_DEPTHS[1]
#: Intensity normalisations a model can be trained with; the model card records which one.
INTENSITY_MODES: tuple[str, ...] = ("none", "equalize", "clahe", "morphology")
#: CLAHE (OpenCV) settings of the ``clahe`` mode: OpenCV's usual clip limit, 8×8 tiles
#: (28-pixel tiles on a 224-pixel image). A model's card names the mode, so changing these
#: needs a new mode name, or shipped models would be fed other inputs than they learnt on.
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)
#: Side of the elliptical kernel of the ``morphology`` mode (grey closing, then opening):
#: strokes thinner than this (burnt-in letters, dust, film noise) go, lung structures stay.
#: Same rule as CLAHE's settings: a change needs a new mode name.
MORPHOLOGY_KERNEL = 5

#: Inputs above these are refused before decoding (decompression bombs, wrong files).
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_INPUT_PIXELS = 30_000_000  # 5477² ; the largest chest detectors (43 cm at 100 µm) give 4300² = 18.5 M
#: ... and decoding one at the limit costs at most ~6 bytes a pixel (JPEG 2000: OpenJPEG holds 32-bit planes), 180 MB.



@dataclass(frozen=True)
class PullLimits:
    """Bounds of pull mode against a DICOMweb server, which may be broken or hostile: it ends, in bounded memory.

    A QIDO search is paged and stops at ``max_instances`` (a day's CR/DX of a large hospital is a
    few hundred to a few thousand); every answer is read a chunk at a time up to its byte limit
    (a WADO instance: the input limit) and within ``request_seconds`` in all, however slowly it
    trickles; after ``failures_in_a_row`` requests that time out or break off, the PACS is taken to be
    down for this run and what is left is reported, not fetched.
    """

    page_size: int = 100
    max_series: int = 1000
    max_instances: int = 2000
    max_query_bytes: int = 16 * 2**20
    max_instance_bytes: int = MAX_INPUT_BYTES
    request_seconds: float = 30.0
    failures_in_a_row: int = 2


DATA_ENV_VAR = "PNEUMOSCAN_DATA"
#: The project root: ``src/pneumoscan/config.py`` -> three levels up.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_RELATIVE = Path("..") / "shared" / "data" / "chest_xray"
MODELS_DIR = PROJECT_ROOT / "models"
#: The model every command uses unless ``--model`` names another.
DEFAULT_MODEL_DIR = MODELS_DIR / "pneumoscan-v3"


def val_fraction_for(val_fraction: ValFraction, dataset: str) -> float:
    """The validation share of the dataset named ``dataset``; a mapping without that name or ``default`` is an error."""
    if isinstance(val_fraction, dict):
        if dataset not in val_fraction and "default" not in val_fraction:
            raise ConfigurationError(f"val_fraction names no share for dataset {dataset!r} and has no 'default' "
                                     f"({val_fraction}): add default = 0.10 or {dataset} = <share>")
        val_fraction = val_fraction.get(dataset, val_fraction.get("default"))
    try:
        fraction = float(val_fraction)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise ConfigurationError(f"val_fraction of dataset {dataset!r} must be a share in (0, 1), not {val_fraction!r}")
    return fraction


def default_data_root() -> Path:
    """Where the dataset lives unless ``--data`` says otherwise.

    ``PNEUMOSCAN_DATA`` wins; otherwise ``../shared/data/chest_xray`` beside the
    project checkout, which is where the shared, read-only copy is kept.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return (PROJECT_ROOT / DEFAULT_DATA_RELATIVE).resolve()


@dataclass
class DataConfig:
    """How images are found, split and fed to the model."""

    # One dataset or several (``--data`` repeated): a folder of {train,test}/{NORMAL,PNEUMONIA}, a folder with
    # labels.csv, a labels CSV or NIH's Data_Entry_2017*.csv; each is split by patient on its own.
    root: Path | tuple[Path, ...] = field(default_factory=default_data_root)
    val_fraction: ValFraction = 0.10
    seed: int = 42
    image_size: int = DEFAULT_IMAGE_SIZE
    batch_size: int = 32
    num_workers: int = 1
    hflip: bool = False
    # Augmentation strengths; small on purpose: an X-ray's geometry carries meaning.
    crop_scale: tuple[float, float] = (0.85, 1.0)
    rotation_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    # Exposure and equipment differ between sites and years: gamma, blur, noise and JPEG
    # re-encoding imitate that (see datamodule.PhotometricAugment). Off in v1.
    strong_photometric: bool = False
    # Probability of blanking a strip along each edge of a training film (markers, stamps, collimation: see
    # datamodule.BorderErase); 0: off.
    erase_borders: float = 0.0
    # Intensity normalisation before augmentation and at inference: none, equalize
    # (histogram equalisation), clahe (contrast-limited adaptive histogram equalisation) or
    # morphology (grey closing then opening). The model card records it, so inference repeats it.
    intensity: str = "none"
    # Sample images so that view (AP/PA) is independent of the label within each dataset (see data.view_balancing_weights).
    balance_views: bool = False

    @property
    def sources(self) -> list[Path]:
        """Every dataset of the run, in order."""
        roots = self.root if isinstance(self.root, (tuple, list)) else (self.root,)
        return [Path(r).expanduser() for r in roots]


@dataclass
class TrainConfig:
    """Model and optimisation settings of ``pneumoscan train``."""

    arch: str = "efficientnet_lite0"
    pretrained: bool = True
    epochs: int = 10
    lr: float = 1e-3
    backbone_lr: float = 3e-4
    weight_decay: float = 1e-4
    freeze_epochs: int = 0
    label_smoothing: float = 0.0  # targets become ε/2 and 1 - ε/2
    # Mixup (Zhang et al. 2018): each training batch is blended with a shuffled copy of itself, with a
    # share λ ~ Beta(α, α) drawn per batch, and the loss is blended the same way (0: off).
    mixup_alpha: float = 0.0
    # Box-guided training: λ of a per-cell loss that pulls the class activation map into the radiologists' boxes of
    # a dataset's pneumonia films (a boxes.csv beside its labels) and down on its normal films (0: off).
    box_loss_weight: float = 0.0
    # The class activation map (and so the heat map, regions and box-guided loss) at stride 16, 14×14 cells at 224 px,
    # instead of the last feature map's 7×7 (learning.model.FineCam).
    fine_cam: bool = False
    # What picks the epoch on validation: "auroc" (the mean over populations of the AUROC) or "operating" (the mean
    # partial AUROC at sensitivity >= 0.95, plus 0.5 × the pointing game on the films with boxes; docs/ablations.md).
    select_by: str = "auroc"
    schedule: str = "plateau"  # plateau (ReduceLROnPlateau on val loss) or cosine (to 1 % of the rates over the epochs)
    patience: int = 4
    # Stochastic weight averaging of the weights the last swa_epochs epochs start with, trained at swa_lr_factor × the two rates
    # (0: off). The averaged model is saved as swa.ckpt; early stopping is off in such runs.
    swa_epochs: int = 0
    swa_lr_factor: float = 0.3
    # Exponential moving average of the weights after every optimiser step, with this decay (0: off; Lightning's
    # EMAWeightAveraging). Validation, the chosen checkpoint and so the export use the average, which moves less from
    # one epoch to the next than the trained weights do.
    ema_decay: float = 0.0
    plateau_patience: int = 1
    plateau_factor: float = 0.3
    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    accelerator: str = "cpu"
    devices: str | int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    channels_last: bool = True
    out: Path = Path("runs") / "default"


def portable_path(path: Path | str) -> str:
    """A path as it may be written into a shared file: relative to the project root.

    Run records and model cards are committed and read on other machines, so
    they must not carry this machine's absolute paths (``../shared/...``
    instead of ``/home/someone/shared/...``).
    """
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    return os.path.relpath(path, PROJECT_ROOT)


def to_jsonable(obj: object) -> object:
    """Turn dataclasses, paths and tuples into plain JSON values; paths become portable."""
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return portable_path(obj)
    return obj
