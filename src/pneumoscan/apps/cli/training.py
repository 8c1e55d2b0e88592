"""``pneumoscan train``: its parser (a settings file's values become its defaults) and its runner."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pneumoscan.apps.cli.common import HelpFormatter, add_data_argument, data_sources
from pneumoscan.config import (
    INTENSITY_MODES,
    PROJECT_ROOT,
    DataConfig,
    TrainConfig,
    ValFraction,
    val_fraction_for,
)
from pneumoscan.errors import ConfigurationError


def batches(value: str) -> float | int:
    """``--limit-*-batches``: an integer is a count of batches, a float a fraction."""
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return int(number) if number.is_integer() and "." not in value else number


def val_fraction_arg(value: str) -> ValFraction:
    """``--val-fraction``: one share (``0.10``) or shares per dataset (``0.10,rsna_adult=0.20``; a bare share is the default)."""
    shares: dict[str, float] = {}
    try:
        for item in value.split(","):
            name, _, share = item.rpartition("=")
            shares[name.strip() or "default"] = float(share)
        checked = {name: val_fraction_for(shares, name) for name in shares}
    except (ValueError, ConfigurationError) as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: give a share in (0, 1), or NAME=SHARE items separated by commas ({exc})")
    return checked["default"] if list(checked) == ["default"] else checked


def devices(value: str) -> int | str:
    """Lightning's ``devices``: a count, ``auto``, or a list such as ``0,1``."""
    return int(value) if value.isdigit() else value


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    data, train = DataConfig(root=Path(".")), TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a model on the patient-level split of train/",
        description="Fine-tune a classifier on train/ (a by-patient validation split is held out; "
        "test/ is never read). Writes the best checkpoint, metrics.csv, config.json and curves.png to --out.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("data")
    add_data_argument(g)
    g.add_argument("--val-fraction", type=val_fraction_arg, default=data.val_fraction, metavar="SHARE[,NAME=SHARE]",
                   help="share of each dataset's training patients held out for validation; NAME=SHARE sets one dataset's "
                   "(e.g. 0.10,rsna_adult=0.20)")  # fmt: skip
    g.add_argument("--seed", type=int, default=data.seed, help="seed of the split, augmentation and weights")
    g.add_argument("--image-size", type=int, default=data.image_size)
    g.add_argument("--batch-size", type=int, default=data.batch_size)
    g.add_argument("--workers", type=int, default=data.num_workers, help="data-loading processes")
    g.add_argument("--hflip", action="store_true", help="add random horizontal flips (off: chests are not symmetric)")
    g.add_argument("--strong-photometric", action="store_true", help="gamma, blur, noise and JPEG augmentation")
    g.add_argument("--erase-borders", type=float, default=data.erase_borders, metavar="P",
                   help="blank a strip along each edge of a training film with probability P (markers, stamps; 0: off)")  # fmt: skip
    g.add_argument("--balance-views", action="store_true",
                   help="sample so that view (AP/PA) is independent of the label in each dataset that records views")  # fmt: skip
    g.add_argument("--intensity", choices=INTENSITY_MODES, default=data.intensity,
                   help="intensity normalisation before augmentation and at inference (equalize: histogram equalisation; clahe: contrast-limited adaptive equalisation; morphology: grey closing then opening)")  # fmt: skip
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--arch", default=train.arch, help="efficientnet_lite0/1/2, simple_cnn, or any timm name")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="start from random weights")
    g.add_argument("--epochs", type=int, default=train.epochs, help="maximum epochs (early stopping may end sooner)")
    g.add_argument("--lr", type=float, default=train.lr, help="learning rate of the new head")
    g.add_argument("--backbone-lr", type=float, default=train.backbone_lr, help="learning rate of the backbone")
    g.add_argument("--weight-decay", type=float, default=train.weight_decay)
    g.add_argument("--freeze-epochs", type=int, default=train.freeze_epochs, help="epochs with a frozen backbone")
    g.add_argument("--label-smoothing", type=float, default=train.label_smoothing, help="ε: targets ε/2 and 1-ε/2")
    g.add_argument("--mixup-alpha", type=float, default=train.mixup_alpha,
                   help="mixup: blend each batch with a shuffled copy, share ~ Beta(α, α) (0: off)")  # fmt: skip
    g.add_argument("--box-loss-weight", type=float, default=train.box_loss_weight,
                   help="λ of the box-guided loss: the heat map pulled into radiologists' boxes (boxes.csv beside a dataset's "
                   "labels) and down on that dataset's normal films (0: off)")  # fmt: skip
    g.add_argument("--fine-cam", action=argparse.BooleanOptionalAction, default=train.fine_cam,
                   help="the heat map at stride 16 (14×14 cells at 224 px) instead of the last feature map's 7×7")  # fmt: skip
    g.add_argument("--select-by", choices=("auroc", "operating"), default=train.select_by,
                   help="what picks the epoch on validation: mean AUROC, or mean partial AUROC at sensitivity >= 0.95 plus "
                   "0.5 × the pointing game on films with boxes")  # fmt: skip
    g.add_argument("--schedule", choices=("plateau", "cosine"), default=train.schedule, help="learning-rate schedule")
    g.add_argument("--patience", type=int, default=train.patience, help="early-stopping patience on val AUROC")
    g.add_argument("--swa-epochs", type=int, default=train.swa_epochs,
                   help="stochastic weight averaging over the last N epochs (0: off); the averaged model is swa.ckpt")  # fmt: skip
    g.add_argument("--swa-lr-factor", type=float, default=train.swa_lr_factor, help="SWA learning rates as a share of the rates")
    g.add_argument("--ema-decay", type=float, default=train.ema_decay,
                   help="validate and keep an exponential moving average of the weights with this decay, e.g. 0.995 (0: off)")  # fmt: skip
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="plain NCHW memory layout")
    g = p.add_argument_group("run")
    g.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="settings file with [data] and [train] tables (see configs/); flags given too win")  # fmt: skip
    g.add_argument("--out", type=Path, default=train.out, help="run folder")
    g.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last.ckpt, with its own split and settings (other flags are ignored)")  # fmt: skip
    g.add_argument("--limit-train-batches", type=batches, default=train.limit_train_batches, help="count or fraction")
    g.add_argument("--limit-val-batches", type=batches, default=train.limit_val_batches, help="count or fraction")
    g = p.add_argument_group("scale-out (passed to Lightning)")
    g.add_argument("--accelerator", default=train.accelerator, help="cpu, gpu, auto")
    g.add_argument("--devices", type=devices, default=train.devices, help="devices per node")
    g.add_argument("--num-nodes", type=int, default=train.num_nodes)
    g.add_argument("--strategy", default=train.strategy, help="auto, ddp, ddp_spawn, fsdp ...")
    g.add_argument("--precision", default=train.precision, help="32-true, bf16-mixed, 16-mixed")
    p.set_defaults(handler=run_train)
    return p


#: Field names whose command-line flag has another name.
FLAG_NAMES = {"num_workers": "workers", "root": "data"}


def defaults_from_config(path: Path) -> dict[str, object]:
    """A run's settings file as argparse defaults: ``[data]`` and ``[train]`` tables of the two dataclasses' fields."""
    import dataclasses
    import tomllib

    try:
        settings = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigurationError(f"no settings file at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    defaults: dict[str, object] = {}
    for table, config_class in (("data", DataConfig), ("train", TrainConfig)):
        known = {f.name: f for f in dataclasses.fields(config_class)}
        for key, value in settings.pop(table, {}).items():
            if key not in known:
                raise ConfigurationError(f"{path}: [{table}] has no setting {key!r}; known: {', '.join(sorted(known))}")
            if key == "root":  # one dataset or a list; relative paths are relative to the project root, like configs/
                value = [PROJECT_ROOT / v for v in ([value] if isinstance(value, str) else value)]
            if key == "val_fraction":  # one share, or a table of shares per dataset name (``default`` for the others)
                value = checked_val_fraction(path, value)
            defaults[FLAG_NAMES.get(key, key)] = Path(value) if key == "out" else value
    if settings:
        raise ConfigurationError(f"{path}: unknown table(s) {sorted(settings)}; use [data] and [train]")
    return defaults


def checked_val_fraction(path: Path, value: object) -> ValFraction:
    """A settings file's share, or table of shares, checked now: a table must say what the unnamed datasets get."""
    shares = value if isinstance(value, dict) else {"default": value}
    try:
        if "default" not in shares:
            raise ConfigurationError("a table of shares needs a default for the datasets it does not name")
        for name in shares:
            val_fraction_for(shares, name)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: [data] val_fraction: {exc}; give a share in (0, 1) or a table such as "
                                 "{default = 0.10, rsna_adult = 0.20}") from None
    return value


def run_train(args: argparse.Namespace) -> int:
    from pneumoscan.learning.training import fit, resume_configs

    command = "pneumoscan " + shlex.join(sys.argv[1:])
    if args.resume is not None:
        data, train = resume_configs(args.resume)
        best = fit(data, train, command=command, resume=True)
        print(f"best checkpoint: {best}")
        return 0
    data = DataConfig(
        root=data_sources(args.data),
        balance_views=args.balance_views,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        hflip=args.hflip,
        strong_photometric=args.strong_photometric,
        erase_borders=args.erase_borders,
        intensity=args.intensity,
        **{name: tuple(getattr(args, name)) if name == "crop_scale" else getattr(args, name)
           for name in ("crop_scale", "rotation_degrees", "brightness", "contrast") if hasattr(args, name)},
    )
    train = TrainConfig(
        arch=args.arch,
        pretrained=args.pretrained,
        epochs=args.epochs,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        weight_decay=args.weight_decay,
        freeze_epochs=args.freeze_epochs,
        label_smoothing=args.label_smoothing,
        mixup_alpha=args.mixup_alpha,
        box_loss_weight=args.box_loss_weight,
        fine_cam=args.fine_cam,
        select_by=args.select_by,
        schedule=args.schedule,
        patience=args.patience,
        swa_epochs=args.swa_epochs,
        swa_lr_factor=args.swa_lr_factor,
        ema_decay=args.ema_decay,
        **{name: getattr(args, name) for name in ("plateau_patience", "plateau_factor") if hasattr(args, name)},
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        channels_last=args.channels_last,
        out=args.out,
    )
    best = fit(data, train, command=command)
    print(f"best checkpoint: {best}")
    return 0

