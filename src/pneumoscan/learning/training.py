"""Training with Lightning: the pneumonia classifier, its loop, and what a run writes.

``fit(data_config, train_config)`` is the verb; ``pneumoscan train`` is a thin
layer over it. A run folder holds the best checkpoint, a CSV log, ``config.json``
(everything needed to reproduce the run) and ``curves.png``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import platform
import subprocess
import time
from datetime import UTC
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torchmetrics.classification import BinaryAUROC

import pneumoscan
from pneumoscan.config import (
    POPULATIONS,
    PROJECT_ROOT,
    DataConfig,
    TrainConfig,
    portable_path,
    to_jsonable,
)
from pneumoscan.errors import ConfigurationError
from pneumoscan.learning.data import class_counts, dataset_summary, file_list_checksum
from pneumoscan.learning.datamodule import XrayDataModule
from pneumoscan.learning.model import FineCam, backbone_parameters, create_model, head_parameters
from pneumoscan.learning.plots import plot_training_curves

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.ckpt"
SWA_CHECKPOINT = "swa.ckpt"
LAST_CHECKPOINT = "last.ckpt"  # Lightning's own, written every epoch: what --resume continues from
#: What picks the best epoch: the mean over populations of the validation AUROC, so a
#: population with fewer images counts as much as the larger one.
SELECTION_METRIC = "val_auroc_mean"
#: The other rule (``select_by = "operating"``, docs/ablations.md): where the operating point lives, and where the map points.
OPERATING_SELECTION_METRIC = "val_selection"
SELECTION_METRICS = {"auroc": SELECTION_METRIC, "operating": OPERATING_SELECTION_METRIC}
#: Weight of the adult validation pointing game in ``val_selection``.
POINTING_WEIGHT = 0.5
#: Sensitivity from which the partial AUROC of ``val_selection`` is taken.
PARTIAL_AUROC_SENSITIVITY = 0.95


class PneumoniaClassifier(L.LightningModule):
    """One pneumonia logit, class-weighted BCE, AdamW with a slower backbone."""

    def __init__(
        self,
        arch: str = "efficientnet_lite0",
        pretrained: bool = True,
        class_weights: tuple[float, float] = (1.0, 1.0),
        lr: float = 1e-3,
        backbone_lr: float = 3e-4,
        weight_decay: float = 1e-4,
        freeze_epochs: int = 0,
        plateau_patience: int = 1,
        plateau_factor: float = 0.3,
        channels_last: bool = True,
        image_size: int = 224,
        intensity: str = "none",
        label_smoothing: float = 0.0,
        schedule: str = "plateau",
        epochs: int = 10,
        mixup_alpha: float = 0.0,
        box_loss_weight: float = 0.0,
        fine_cam: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(arch, pretrained=pretrained)
        if fine_cam:
            self.model = FineCam(self.model)
        # a class activation map needs global pooling and one linear layer (timm's EfficientNets; not simple_cnn)
        self.has_cam = isinstance(getattr(self.model, "get_classifier", lambda: None)(), nn.Linear)
        if box_loss_weight > 0 and not self.has_cam:
            raise ConfigurationError(f"box_loss_weight needs a model that ends in global pooling and one linear layer ({arch} does not)")
        self.register_buffer("class_weight", torch.tensor(class_weights, dtype=torch.float32))
        self.train_auroc = BinaryAUROC()
        self.val_auroc = BinaryAUROC()
        self.val_auroc_by_population = nn.ModuleList(BinaryAUROC() for _ in POPULATIONS)
        # partial AUROC where sensitivity >= 0.95: the labels and scores flipped, so that torchmetrics' max_fpr bounds 1 - sensitivity
        self.val_partial_auroc_by_population = nn.ModuleList(BinaryAUROC(max_fpr=1 - PARTIAL_AUROC_SENSITIVITY) for _ in POPULATIONS)
        self._val_seen = [False] * len(POPULATIONS)
        self._pointing = [0, 0]  # validation films with boxes whose map peaks inside one, and all of them
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def intensity(self) -> str:
        """The intensity normalisation the model was trained with ("none" for checkpoints from before the option)."""
        return str(self.hparams.get("intensity", "none"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of pneumonia, shape ``(N,)``."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).squeeze(1)

    def weighted_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = self.class_weight[labels.long()]
        smoothing = self.hparams.get("label_smoothing", 0.0) if self.training else 0.0  # validation loss stays plain
        targets = labels * (1.0 - smoothing) + 0.5 * smoothing
        losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (weights * losses).sum() / weights.sum()

    def logits_and_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N,)`` and the class activation map's logits ``(N, h, w)`` on the last feature map.

        The head is global average pooling then one linear layer, so the logit is the mean of the map's
        cells (dropout aside): the map is the one the exported graph shows, before its ReLU and upsampling.
        """
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(self.model, FineCam):
            logits, cam = self.model.logit_and_cam(*self.model.features(x))
            return logits.squeeze(1), cam[:, 0]
        features = self.model.forward_features(x)
        logits = self.model.forward_head(features).squeeze(1)
        classifier = self.model.get_classifier()
        cam = nn.functional.conv2d(features, classifier.weight[:, :, None, None], classifier.bias)[:, 0]
        return logits, cam

    def _step(self, batch: tuple[torch.Tensor, ...], split: str) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        guided = self.has_cam and len(batch) > 4 and (self.hparams.get("box_loss_weight", 0.0) > 0 or split == "val")
        if guided:
            logits, cam = self.logits_and_cam(images)
        else:
            logits, cam = self(images), None
        loss = self.weighted_loss(logits, labels)
        if cam is not None and self.hparams.get("box_loss_weight", 0.0) > 0:
            box = box_guided_loss(cam, batch[3], batch[4])
            self.log(f"{split}_box_loss", box, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
            loss = loss + self.hparams.box_loss_weight * box
        self._log_step(split, loss, logits, labels)
        if split == "val" and len(batch) > 2:
            self._update_population_auroc(logits, labels, batch[2])
        if split == "val" and cam is not None:
            hits, films = pointing_hits(cam, batch[3], labels * batch[4])
            self._pointing[0] += hits
            self._pointing[1] += films
        return loss

    def _update_population_auroc(self, logits: torch.Tensor, labels: torch.Tensor, populations: torch.Tensor) -> None:
        for index, (metric, partial) in enumerate(zip(self.val_auroc_by_population, self.val_partial_auroc_by_population)):
            mask = populations == index
            if mask.any():
                metric.update(logits.detach()[mask].sigmoid(), labels[mask].long())
                partial.update(1 - logits.detach()[mask].sigmoid(), 1 - labels[mask].long())
                self._val_seen[index] = True

    def on_validation_epoch_end(self) -> None:
        """Per-population validation AUROC and partial AUROC (sensitivity >= 0.95), the pointing game on the films
        with boxes, and the two selection metrics (``SELECTION_METRICS``)."""
        values, partials = [], []
        for index, (metric, partial) in enumerate(zip(self.val_auroc_by_population, self.val_partial_auroc_by_population)):
            if self._val_seen[index]:
                value, part = metric.compute(), partial.compute()
                self.log(f"val_auroc_{POPULATIONS[index]}", value)
                self.log(f"val_partial_auroc_{POPULATIONS[index]}", part)
                values.append(value)
                partials.append(part)
            metric.reset()
            partial.reset()
        self._val_seen = [False] * len(POPULATIONS)
        mean = torch.stack(values).mean() if values else self.val_auroc.compute()
        self.log(SELECTION_METRIC, mean, prog_bar=True)
        hits, films = self._pointing
        self._pointing = [0, 0]
        pointing = hits / films if films else 0.0
        if films:
            self.log("val_pointing_game", float(pointing), prog_bar=True)
        partial_mean = torch.stack(partials).mean() if partials else mean
        self.log(OPERATING_SELECTION_METRIC, partial_mean + POINTING_WEIGHT * pointing)

    def _log_step(self, split: str, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        auroc = self.train_auroc if split == "train" else self.val_auroc
        auroc.update(logits.detach().sigmoid(), labels.long())
        self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True)
        self.log(f"{split}_auroc", auroc, on_step=False, on_epoch=True, prog_bar=True)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        if self.hparams.get("mixup_alpha", 0.0) > 0:
            return self._mixup_step(batch)
        return self._step(batch, "train")

    def _mixup_step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Train on blends of two films, so that the decision between the classes is learnt as a smooth ramp.

        The loss is the same blend of the two images' class-weighted losses, which
        keeps the class weights meaningful. Training AUROC is scored against the
        label of the larger share of each blend.
        """
        images, labels = batch[0], batch[1]
        alpha = float(self.hparams.mixup_alpha)
        share = float(torch.distributions.Beta(alpha, alpha).sample())
        order = torch.randperm(len(labels), device=labels.device)
        logits = self(share * images + (1 - share) * images[order])
        loss = share * self.weighted_loss(logits, labels) + (1 - share) * self.weighted_loss(logits, labels[order])
        self._log_step("train", loss, logits, labels if share >= 0.5 else labels[order])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        """Keep the pretrained backbone fixed for the first ``freeze_epochs`` epochs.

        The new head starts random; its early, large gradients would otherwise
        wreck the pretrained features before the head has learned anything.
        """
        frozen = self.current_epoch < self.hparams.freeze_epochs
        for param in backbone_parameters(self.model):
            param.requires_grad_(not frozen)
        if frozen:  # batch-norm statistics stay those of the pretrained backbone too
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def configure_optimizers(self) -> dict[str, object]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [
                {"params": backbone_parameters(self.model), "lr": hp.backbone_lr},
                {"params": head_parameters(self.model), "lr": hp.lr},
            ],
            weight_decay=hp.weight_decay,
        )
        if hp.get("schedule", "plateau") == "cosine":
            floor = 0.01 * min(hp.backbone_lr, hp.lr)  # anneal to 1 % of the smaller rate, not to 0
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, hp.epochs), eta_min=floor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
        if hp.get("schedule", "plateau") != "plateau":
            raise ConfigurationError(f"schedule must be 'plateau' or 'cosine', not {hp.schedule!r}")
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


def box_guided_loss(cam: torch.Tensor, masks: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """Per-cell BCE of the class activation map's logits against the share of each cell inside a radiologist's box.

    On a pneumonia film with boxes, the cells inside the boxes are pushed up and the others down; on a
    normal film of a dataset with boxes (its mask is empty), every cell is pushed down; films without
    boxes (``guided`` 0, the children's) add nothing. Zero when the batch holds no guided film.
    """
    chosen = guided > 0
    if not chosen.any():
        return cam.sum() * 0.0
    targets = nn.functional.adaptive_avg_pool2d(masks[chosen][:, None].float(), cam.shape[-2:])[:, 0]
    return nn.functional.binary_cross_entropy_with_logits(cam[chosen], targets)


def pointing_hits(cam: torch.Tensor, masks: torch.Tensor, boxed: torch.Tensor) -> tuple[int, int]:
    """Among the films with boxes (``boxed`` 1), how many have the map's maximum in a cell whose centre is inside a box."""
    chosen = boxed > 0
    if not chosen.any():
        return 0, 0
    maps, inside = cam[chosen].detach(), masks[chosen]
    h, w = maps.shape[-2:]
    rows = ((torch.arange(h) + 0.5) * inside.shape[-2] / h).long()
    columns = ((torch.arange(w) + 0.5) * inside.shape[-1] / w).long()
    centres = inside[:, rows][:, :, columns] > 0.5
    peak = maps.flatten(1).argmax(dim=1)
    return int(centres.flatten(1).gather(1, peak[:, None]).sum()), int(chosen.sum())


class EpochTimer(Callback):
    """Seconds and images per second of each training epoch, logged with the metrics."""

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._images += len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        module.log("epoch_seconds", seconds, sync_dist=True)
        module.log("train_images_per_s", self._images * trainer.world_size / max(seconds, 1e-9), sync_dist=True)


def keep_freed_memory() -> None:
    """Tell glibc not to hand freed memory back to the OS (≈2× faster training here).

    Equivalent to ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…`` but applied
    from inside the process, so no launcher has to remember it.
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def git_commit() -> str | None:
    """The commit of the source tree, so a run names the code that made it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_record(data_config: DataConfig, train_config: TrainConfig, datamodule: XrayDataModule, command: str | None) -> dict:
    """Everything ``config.json`` holds: settings, code version, data identity."""
    root = data_config.sources[0]
    records = datamodule.train_records + datamodule.val_records
    return {
        "pneumoscan_version": pneumoscan.__version__,
        "git_commit": git_commit(),
        "command": command,
        "torch_version": torch.__version__,
        "lightning_version": L.__version__,
        "data": to_jsonable(data_config),
        "train": to_jsonable(train_config),
        "data_root": portable_path(root.resolve()),
        "datasets": [dataset_summary(source, data_config.seed, data_config.val_fraction) for source in data_config.sources],
        "train_file_list_sha256": file_list_checksum(records),
        "counts": {
            "train": class_counts(datamodule.train_records),
            "val": class_counts(datamodule.val_records),
            "train_patients": len({r.patient for r in datamodule.train_records}),
            "val_patients": len({r.patient for r in datamodule.val_records}),
        },
        "class_weights": datamodule.class_weights,
        "selection_metric": selection_metric(train_config),
    }


def selection_metric(config: TrainConfig) -> str:
    """The validation metric that picks the epoch: ``val_auroc_mean`` or ``val_selection`` (see docs/ablations.md)."""
    if config.select_by not in SELECTION_METRICS:
        raise ConfigurationError(f"select_by must be one of {', '.join(SELECTION_METRICS)}, not {config.select_by!r}")
    return SELECTION_METRICS[config.select_by]


def resume_configs(run_dir: Path) -> tuple[DataConfig, TrainConfig]:
    """The settings of an interrupted run, from its ``config.json``, so it continues with the same split and settings."""
    import dataclasses

    run_dir = Path(run_dir)
    config_path, last = run_dir / "config.json", run_dir / LAST_CHECKPOINT
    if not config_path.is_file() or not last.is_file():
        raise ConfigurationError(
            f"{run_dir} cannot be resumed: it needs config.json and {LAST_CHECKPOINT} (written after each epoch); "
            "start a new run instead"
        )
    record = json.loads(config_path.read_text())

    def build(config_class: type, values: dict) -> object:
        known = {f.name for f in dataclasses.fields(config_class)}
        settings = {k: v for k, v in values.items() if k in known}
        for key, value in settings.items():
            if isinstance(value, list):
                settings[key] = tuple(value)
        return config_class(**settings)

    data = build(DataConfig, record["data"])
    roots = data.root if isinstance(data.root, tuple) else (data.root,)
    data.root = tuple(PROJECT_ROOT / str(r) if not Path(str(r)).is_absolute() else Path(str(r)) for r in roots)
    train = build(TrainConfig, record["train"])
    train.out = run_dir
    return data, train  # type: ignore[return-value]


def record_resumption(run_dir: Path, command: str | None) -> None:
    """Say in ``config.json`` that the run was continued, when, by what command, and from which epoch."""
    from datetime import datetime

    config_path = run_dir / "config.json"
    record = json.loads(config_path.read_text())
    epoch = torch.load(run_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=False).get("epoch")
    record.setdefault("resumed", []).append({
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": git_commit(),
        "from_checkpoint": LAST_CHECKPOINT,
        "epochs_done_before": None if epoch is None else int(epoch) + 1,
    })
    config_path.write_text(json.dumps(record, indent=2) + "\n")


def keep_earlier_log(run_dir: Path) -> Path | None:
    """Lightning's CSV logger starts ``metrics.csv`` afresh on resume: keep the epochs before the interruption."""
    current = run_dir / "metrics.csv"
    if not current.is_file():
        return None
    index = len(list(run_dir.glob("metrics.before-resume-*.csv"))) + 1
    return current.rename(run_dir / f"metrics.before-resume-{index}.csv")


def run_history(run_dir: Path) -> list[dict[str, float]]:
    """One row per epoch over the whole run, interrupted parts included (later logs win for an epoch logged twice)."""
    parts = sorted(Path(run_dir).glob("metrics.before-resume-*.csv"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    by_epoch: dict[int, dict[str, float]] = {}
    for path in [*parts, Path(run_dir) / "metrics.csv"]:
        if path.is_file():
            by_epoch.update({int(row["epoch"]): row for row in read_history(path)})
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_history(metrics_csv: Path) -> list[dict[str, float]]:
    """One row per epoch from Lightning's CSV log (train and val rows merged)."""
    import csv

    by_epoch: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            merged = by_epoch.setdefault(epoch, {"epoch": epoch})
            merged.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    return [by_epoch[e] for e in sorted(by_epoch)]


def stopping_or_averaging(config: TrainConfig) -> list[Callback]:
    """Early stopping on validation AUROC, or, for stochastic weight averaging, Lightning's SWA callback.

    An averaged run must reach its last epoch: stopping early would leave the
    average unfinished. Lightning adds one epoch after the last that only
    recomputes the batch-norm statistics of the averaged weights and then
    validates them, so the last row of the history is the averaged model's.

    A moving average (``ema_decay``) is different: it exists at every step, so
    each epoch validates it and early stopping and the best checkpoint judge it.
    """
    if config.ema_decay and config.swa_epochs:
        raise ConfigurationError("ema_decay and swa_epochs are two ways to average the weights: choose one")
    if config.ema_decay and not 0 < config.ema_decay < 1:
        raise ConfigurationError(f"ema_decay must lie between 0 and 1 (e.g. 0.995), not {config.ema_decay}")
    if not config.swa_epochs:
        stopping = EarlyStopping(monitor=selection_metric(config), mode="max", patience=config.patience)
        return [stopping, EMAWeightAveraging(decay=config.ema_decay)] if config.ema_decay else [stopping]
    if not 0 < config.swa_epochs < config.epochs:
        raise ConfigurationError(f"swa_epochs must lie between 1 and epochs - 1 ({config.epochs - 1}), not {config.swa_epochs}")
    rates = [config.swa_lr_factor * config.backbone_lr, config.swa_lr_factor * config.lr]  # optimiser groups: backbone, head
    # Lightning's swa_epoch_start counts from 1 and it averages the weights each epoch *starts* with:
    # this averages the weights that the last swa_epochs epochs begin with (the last epoch's own update is not in it).
    start = config.epochs - config.swa_epochs + 1
    return [StochasticWeightAveraging(swa_lrs=rates, swa_epoch_start=start, annealing_epochs=1)]


def fit(data_config: DataConfig, train_config: TrainConfig, command: str | None = None, resume: bool = False) -> Path:
    """Train a model and return the path of its best checkpoint (by :func:`selection_metric`).

    With ``resume``, continue the run in ``train_config.out`` from its ``last.ckpt``
    (Lightning restores weights, optimiser, scheduler, callbacks and epoch); the
    settings must be the run's own (see :func:`resume_configs`).
    """
    keep_freed_memory()
    L.seed_everything(data_config.seed, workers=True)
    out = Path(train_config.out)
    out.mkdir(parents=True, exist_ok=True)

    datamodule = XrayDataModule(data_config)
    datamodule.setup()
    log.info("class weights (NORMAL, PNEUMONIA): %s", [round(w, 4) for w in datamodule.class_weights])
    module = PneumoniaClassifier(
        arch=train_config.arch,
        pretrained=train_config.pretrained,
        class_weights=tuple(datamodule.class_weights),
        lr=train_config.lr,
        backbone_lr=train_config.backbone_lr,
        weight_decay=train_config.weight_decay,
        freeze_epochs=train_config.freeze_epochs,
        plateau_patience=train_config.plateau_patience,
        plateau_factor=train_config.plateau_factor,
        channels_last=train_config.channels_last,
        image_size=data_config.image_size,
        intensity=data_config.intensity,
        label_smoothing=train_config.label_smoothing,
        schedule=train_config.schedule,
        epochs=train_config.epochs,
        mixup_alpha=train_config.mixup_alpha,
        box_loss_weight=train_config.box_loss_weight,
        fine_cam=train_config.fine_cam,
    )
    monitor = selection_metric(train_config)
    checkpoint = ModelCheckpoint(
        dirpath=out, filename="best", monitor=monitor, mode="max", save_last=False, auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Lightning's save_last writes last.ckpt only when the monitored checkpoint is saved (an improving epoch): a second
    # callback without a monitor writes it after every epoch, so --resume continues from the epoch really reached.
    every_epoch = ModelCheckpoint(dirpath=out, filename=Path(LAST_CHECKPOINT).stem, monitor=None, save_top_k=1,
                                  auto_insert_metric_name=False, enable_version_counter=False)  # fmt: skip
    trainer = L.Trainer(
        default_root_dir=out,
        max_epochs=train_config.epochs,
        accelerator=train_config.accelerator,
        devices=train_config.devices,
        num_nodes=train_config.num_nodes,
        strategy=train_config.strategy,
        precision=train_config.precision,
        limit_train_batches=train_config.limit_train_batches,
        limit_val_batches=train_config.limit_val_batches,
        logger=CSVLogger(out, name="", version=""),
        callbacks=[checkpoint, every_epoch, *stopping_or_averaging(train_config), LearningRateMonitor(logging_interval="epoch"), EpochTimer()],
        deterministic=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    resume_from = out / LAST_CHECKPOINT if resume else None
    if trainer.is_global_zero:
        if resume:
            record_resumption(out, command)
            keep_earlier_log(out)
        else:
            (out / "config.json").write_text(
                json.dumps(run_record(data_config, train_config, datamodule, command), indent=2) + "\n"
            )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else out / BEST_CHECKPOINT
    if train_config.swa_epochs:
        trainer.save_checkpoint(out / SWA_CHECKPOINT)  # the averaged weights, with batch-norm statistics recomputed
        best = out / SWA_CHECKPOINT
    if trainer.is_global_zero:
        history = run_history(out)
        plot_training_curves(history, out / "curves.png")
        summary = {
            "best_checkpoint": best.name,
            "swa_val_auroc": history[-1].get("val_auroc") if train_config.swa_epochs else None,
            "best_val_auroc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
            "epochs_run": len(history),
            "history": history,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return best
