"""The ``pneumoscan`` command line.

Sub-commands import their heavy libraries (PyTorch, Lightning) only when they
run, so ``pneumoscan --help`` answers at once. Every :class:`PneumoscanError`
becomes a one-line message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pneumoscan import __version__
from pneumoscan.config import (
    DEFAULT_MODEL_DIR,
    INTENSITY_MODES,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    PullLimits,
    POPULATIONS,
    PROJECT_ROOT,
    DataConfig,
    TrainConfig,
    ValFraction,
    default_data_root,
    val_fraction_for,
)
from pneumoscan.errors import ConfigurationError, ModelNotFoundError, PneumoscanError, TooFewSiteCases

EPILOG = """examples:
  pneumoscan train --config configs/v3-lite1.toml --out runs/v3-lite1
  pneumoscan train --resume runs/v3-lite1
  pneumoscan train --epochs 1 --limit-train-batches 4 --limit-val-batches 2 --out runs/smoke
  pneumoscan train --accelerator gpu --devices 4 --strategy ddp --out runs/ddp
  pneumoscan export runs/v3-lite1/best.ckpt --out models/pneumoscan-v3 --int8
  pneumoscan evaluate --model models/pneumoscan-v3 --split test --out runs/eval-test
  pneumoscan calibrate --data site-labels.csv --out models/pneumoscan-v3-mysite
  pneumoscan calibrate --from-audit --since 2026-12-01 --out models/pneumoscan-v3-mysite
  pneumoscan site-protocol --data ../shared/data/chest_xray --population child --out runs/site-protocol/child.json
  pneumoscan compare --model models/pneumoscan-v2 --candidate models/pneumoscan-v3 --data site-labels.csv --out runs/compare
  pneumoscan predict scan1.jpeg scans/ --heatmaps heatmaps/ --format json
  pneumoscan triage studies/ --out triage/today --int8
  pneumoscan triage --dicomweb http://pacs:8042/dicom-web --since 2026-11-23 --out triage/today --store-results
  pneumoscan dicom-node --port 11112 --allow-ae MODALITY1 --destination ORTHANC@pacs:4242

data: --data or PNEUMOSCAN_DATA, else ../shared/data/chest_xray beside the project.
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def add_data_argument(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--data", type=Path, action="append", default=None,
                   help="a dataset: a {train,test}/{NORMAL,PNEUMONIA} folder, a folder with labels.csv, a labels CSV "
                   "(path,label[,patient_id,split,age,sex,view]) or NIH's Data_Entry_2017*.csv; repeat for several "
                   f"(default: {default or default_data_root()})")  # fmt: skip


def data_sources(values: list[Path] | Path | None) -> tuple[Path, ...] | Path:
    """``--data`` given once, several times, or not at all (the default dataset)."""
    if not values:
        return default_data_root()
    if isinstance(values, Path):
        return values
    return values[0] if len(values) == 1 else tuple(values)


def add_operating_point_arguments(p: argparse.ArgumentParser, note: str) -> None:
    from pneumoscan.running.calibration import (
        DEFAULT_ESTIMATOR,
        DEFAULT_POLICY,
        DEFAULT_TARGET_SENSITIVITY,
        ESTIMATORS,
        POLICIES,
    )

    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY, help=f"how the threshold is chosen on validation{note}")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET_SENSITIVITY, help=f"target validation sensitivity{note}")
    p.add_argument("--estimator", choices=ESTIMATORS, default=DEFAULT_ESTIMATOR,
                   help="how the sensitivity policy reads the pneumonias' (1 − target) quantile: harrell-davis moves less "
                   "between samples than the order statistic (docs/ablations.md, rule 6)")  # fmt: skip


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a split and write metrics, predictions, plots and a report",
        description="Score every image of a split with a checkpoint or an exported model folder. The threshold and "
        "temperature come from the exported model's card, or (for a checkpoint) are fitted on the validation split.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help=f"checkpoint (.ckpt) or exported folder (default: {DEFAULT_MODEL_DIR})")
    add_data_argument(p, "the model's own datasets, from its card")
    p.add_argument("--split", choices=("val", "test"), default="val", help="val: the by-patient hold-out of train/")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/eval-<split>)")
    add_operating_point_arguments(p, " (checkpoints only)")
    p.add_argument("--int8", action="store_true", help="score with the exported model's int8 version")
    add_boxes_argument(p)
    p.add_argument("--held-out-by", type=Path, default=None, metavar="MODEL",
                   help="score only the films of --split that MODEL (trained on another split) held out too, to compare the two "
                   "on films neither trained on; the operating points stay --model's")  # fmt: skip
    p.set_defaults(handler=run_evaluate)


def add_boxes_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                   help="radiologists' boxes, a CSV of path,x,y,width,height (pixels of each file, paths relative to the CSV) "
                   "(default: a boxes.csv beside each dataset's labels file, if there is one)")  # fmt: skip


def run_evaluate(args: argparse.Namespace) -> int:
    from pneumoscan.learning.evaluation import evaluate

    out = args.out or Path("runs") / f"eval-{args.split}"
    results = evaluate(args.model or DEFAULT_MODEL_DIR, args.data, args.split, out, args.policy, args.target,
                       "int8" if args.int8 else "fp32", args.boxes, args.estimator, args.held_out_by)  # fmt: skip
    by_population = results.get("populations") or {"": results}
    for population, metrics in by_population.items():
        low, high = metrics["auroc_ci"]
        print(
            f"{args.split}{' ' + population if population else ''}: n={metrics['n']} AUROC {metrics['auroc']:.4f} "
            f"(95% CI {low:.4f}-{high:.4f}) | at threshold {metrics['threshold']:.4f} ({metrics['operating_point']}): "
            f"sensitivity {metrics['sensitivity']:.4f}, specificity {metrics['specificity']:.4f}, "
            f"precision {metrics['precision']:.4f}, accuracy {metrics['accuracy']:.4f}"
        )
        for view, figures in (metrics.get("by_view") or {}).items():
            if "sensitivity" in figures:
                print(f"  within {view}: n={figures['n']} AUROC {figures['auroc']:.4f}, sensitivity {figures['sensitivity']:.4f}, "
                      f"specificity {figures['specificity']:.4f}")  # fmt: skip
        if metrics.get("by_view"):
            print(f"  view mix reversed: AUROC {metrics['by_view']['reversed_view_mix']['auroc']:.4f} "
                  f"(view alone: {metrics['by_view']['view_only_baseline']['auroc_reversed_view_mix']:.4f})")  # fmt: skip
        if metrics.get("localisation"):
            from pneumoscan.learning.localisation import localisation_table

            from pneumoscan.learning.evaluation import regions_text

            print(f"  where the heat map points, on the films with radiologists' boxes:\n{localisation_table(metrics['localisation'])}")
            print(f"  regions: {regions_text(metrics['localisation']['regions'])}")
        print(f"report: {(out / population if population else out) / 'report.md'}")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX with its calibration, threshold and model card",
        description="Write model.onnx, model_card.json and MODEL_CARD.md. Temperature and threshold are fitted on "
        "the validation split scored by the exported model; the test split is then reported once.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, nargs="+",
                   help="training checkpoint (best.ckpt of a run); several make one ensemble graph")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/pneumoscan-v3")
    add_data_argument(p, "the run's own datasets")
    p.add_argument("--name", default=None, help="model name (default: the folder name)")
    add_operating_point_arguments(p, "")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static, per-channel) and measure it")
    p.add_argument("--tta-zoom", type=float, default=None, metavar="SHARE",
                   help="test-time augmentation: also score the central SHARE (e.g. 0.9) of each image and average the logits")  # fmt: skip
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pneumoscan.learning.export import export

    for checkpoint in args.checkpoint:
        if not checkpoint.is_file():
            raise ModelNotFoundError(f"no checkpoint at {checkpoint}: train one with 'pneumoscan train --out DIR'")
    card = export(args.checkpoint, args.out, args.data, args.name, args.policy, args.target, args.int8, args.tta_zoom, args.estimator)
    from pneumoscan.running.inference import card_populations

    for population, entry in card_populations(card).items():
        test, op = entry["test"]["metrics"], entry["operating_point"]
        print(
            f"exported {card['name']} to {args.out} [{population}]: threshold {op['threshold']:.4f} ({op['name']}), "
            f"temperature {entry['calibration']['temperature']:.3f}; test AUROC {test['auroc']:.4f}, "
            f"sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}"
        )
    return 0


def add_fit_regions_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit-regions",
        help="fit how heat maps become regions on the validation part's radiologists' boxes; record it in the card",
        description="For each population whose validation part has radiologists' boxes (a boxes.csv beside the labels), "
        "choose the level, minimum area and number of regions with the best RSNA mAP there (normal films included) and "
        "write that rule into model_card.json and MODEL_CARD.md; then, the rule fixed, measure the heat maps and regions "
        "on the test part once and record those figures beside it. export does this itself; this refits a model folder "
        "exported before regions, or with other boxes. Nothing is chosen on the test part.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    add_data_argument(p, "the model's own datasets, from its card")
    add_boxes_argument(p)
    p.set_defaults(handler=run_fit_regions)


def exported_model_and_sources(args: argparse.Namespace) -> tuple:
    """The exported model folder a refitting command works on (a ModelUnderTest) and its datasets (``--data`` or its own)."""
    from pneumoscan.learning.evaluation import ModelUnderTest

    model = ModelUnderTest(args.model or DEFAULT_MODEL_DIR)
    if model.onnx is None:
        raise ModelNotFoundError(f"{model.path} is not an exported model folder: export the checkpoint first")
    chosen = data_sources(args.data) if args.data else model.sources
    return model, [chosen] if isinstance(chosen, Path) else list(chosen)


def run_fit_regions(args: argparse.Namespace) -> int:
    from pneumoscan.learning.export import record_region_rules
    from pneumoscan.running.inference import card_populations

    model, sources = exported_model_and_sources(args)
    card = record_region_rules(model.path, sources, model.seed, model.val_fraction, args.boxes)
    for population, entry in card_populations(card).items():
        rule = entry.get("regions")
        if rule is None:
            print(f"[{population}] no radiologists' boxes in its validation part: no regions")
        else:
            print(f"[{population}] level {rule['level']}, minimum area {rule['min_area']:.0%}, at most {rule['max_regions']} "
                  f"region(s): validation mAP@[0.40:0.75] {rule['validation_map']:.3f} over {rule['validation_films']} films "
                  f"({rule['validation_films_with_boxes']} with boxes)")  # fmt: skip
    return 0


def add_fit_operating_points_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit-operating-points",
        help="re-choose an exported model's temperatures and thresholds on its validation parts; measure again",
        description="Fit each population's temperature and threshold on its validation part with the exported graph, as "
        "export does (e.g. with another --estimator), and measure again everything measured at them: the validation and "
        "test parts (fp32 and int8), the point's bootstrap spread, the region rule and its test figures. The ONNX files, "
        "gates and population classifier are kept. Nothing is chosen on the test part.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    add_data_argument(p, "the model's own datasets, from its card")
    add_operating_point_arguments(p, "")
    p.set_defaults(handler=run_fit_operating_points)


def run_fit_operating_points(args: argparse.Namespace) -> int:
    from pneumoscan.learning.export import refit_operating_points
    from pneumoscan.running.inference import card_populations

    model, sources = exported_model_and_sources(args)
    card = refit_operating_points(model.path, sources, model.seed, model.val_fraction, args.policy, args.target, args.estimator)
    for population, entry in card_populations(card).items():
        test, op = entry["test"]["metrics"], entry["operating_point"]
        print(f"[{population}] threshold {op['threshold']:.4f} ({op['name']}, {op.get('estimator') or op['policy']}), "
              f"temperature {entry['calibration']['temperature']:.3f}; test sensitivity {test['sensitivity']:.4f}, "
              f"specificity {test['specificity']:.4f}")  # fmt: skip
    return 0


def add_audit_database_arguments(p: argparse.ArgumentParser, note: str = "") -> None:
    """Where the audit log lives: the same two flags for every command that reads or writes it."""
    p.add_argument("--data-dir", type=Path, default=None, help=f"{note}where the SQLite audit database lives (default ./data)")
    p.add_argument("--database-url", default=None, help=f"{note}SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")


def open_audit_log(args: argparse.Namespace):  # type: ignore[no-untyped-def]  # an AuditLog; imported lazily
    """The audit log that --data-dir / --database-url (or PNEUMOSCAN_DATA_DIR / PNEUMOSCAN_DATABASE_URL) name."""
    from pneumoscan.apps.audit import AuditLog, connect
    from pneumoscan.apps.settings import ApplicationSettings, settings_from

    settings = settings_from(ApplicationSettings, data_dir=args.data_dir, database_url=args.database_url)
    return AuditLog(connect(settings.resolved_database_url))


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="set a site's own operating point on its labelled studies (same ONNX files, new card)",
        description="Score a site's labelled studies with an exported model, fit each population's temperature and "
        "threshold on them, and write a new model folder: the ONNX files unchanged, a card that says where the "
        "operating point came from (the site set's checksum, counts and date) and its figures on the site set. "
        "Too few studies of a class is refused with the counts.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, action="append",
                        help="the site's labelled studies: a NORMAL/PNEUMONIA folder, a labels CSV (path,label[,patient_id,"
                        "age,view]) or a folder with labels.csv, or any dataset --data of train takes; repeat for several")  # fmt: skip
    source.add_argument("--from-audit", action="store_true",
                        help="the radiologists' readings in the audit log instead (their stored answers: no images needed); "
                        "PNEUMOSCAN_DATA_DIR / PNEUMOSCAN_DATABASE_URL apply")  # fmt: skip
    p.add_argument("--since", default=None, metavar="DATE", help="with --from-audit: readings recorded on DATE (YYYY-MM-DD) or later")
    add_audit_database_arguments(p, "with --from-audit: ")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="which part of the data: all of it, or one part of a dataset with parts")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the new model folder, e.g. models/pneumoscan-v3-mysite")
    p.add_argument("--population", choices=POPULATIONS, default=None,
                   help="calibrate this population only (default: every population the site set has)")  # fmt: skip
    p.add_argument("--name", default=None, help="model name (default: the folder name)")
    add_operating_point_arguments(p, " on the site set")
    p.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from pneumoscan.learning.site_calibration import calibrate
    from pneumoscan.running.inference import card_populations

    options = dict(policy=args.policy, target=args.target, population=args.population, name=args.name,
                   command=args.command_line, estimator=args.estimator)
    if args.from_audit:
        card = calibrate_from_audit(args, options)
    else:
        if args.since:
            raise ConfigurationError("--since goes with --from-audit")
        card = calibrate(args.model or DEFAULT_MODEL_DIR, args.data, args.out, split=args.split, **options)
    kept = card.get("site_calibration", {}).get("kept_validation_point", {})
    for population, entry in card_populations(card).items():
        op, site = entry["operating_point"], entry.get("site")
        if population in kept:
            print(f"[{population}] kept its validation point ({op['name']}, threshold {op['threshold']:.4f}): {kept[population]}")
            continue
        if op.get("source") != "site" or site is None or site["date"] != card["site_calibration"]["date"]:
            print(f"[{population}] unchanged: {op['name']}, threshold {op['threshold']:.4f}")
            continue
        f = site["figures"]
        print(f"[{population}] {op['name']}: threshold {op['threshold']:.4f}, temperature {entry['calibration']['temperature']:.3f} | "
              f"site set n={f['n']} ({f['n_pneumonia']} pneumonia, {f['patients']} patients): sensitivity {f['sensitivity']:.4f} "
              f"(95% CI {f['sensitivity_ci'][0]:.3f}-{f['sensitivity_ci'][1]:.3f}), specificity {f['specificity']:.4f} "
              f"({f['specificity_ci'][0]:.3f}-{f['specificity_ci'][1]:.3f}), AUROC {f['auroc']:.4f}")  # fmt: skip
        for warning in f["warnings"]:
            print(f"pneumoscan: warning: {warning}", file=sys.stderr)
    print(f"model folder: {args.out} (serve it with: pneumoscan serve --model {args.out})")
    return 0


def calibrate_from_audit(args: argparse.Namespace, options: dict) -> dict:
    """The site point from the readings in the audit log: the answers of this model's graph that radiologists read."""
    from datetime import UTC, datetime

    from pneumoscan.apps.dicom.pull import parse_since
    from pneumoscan.apps.readings import studies_from_readings
    from pneumoscan.learning.site_calibration import write_site_model
    from pneumoscan.running.inference import Predictor

    predictor = Predictor.load(args.model or DEFAULT_MODEL_DIR)
    since = datetime.combine(parse_since(args.since), datetime.min.time(), UTC) if args.since else None
    studies, provenance = studies_from_readings(open_audit_log(args), predictor, since)
    left_out = ", ".join(f"{n} {why}" for why, n in provenance["left_out"].items())
    if not studies:
        raise TooFewSiteCases(f"the audit log holds no readings of {predictor.card['name']}'s answers"
                              + (f" since {args.since}" if args.since else "") + (f" (left out: {left_out})" if left_out else "")
                              + ": record radiologists' readings first (on the page, POST /api/v1/predictions/{id}/readings "
                              "or pneumoscan readings import)")  # fmt: skip
    print(f"{len(studies)} read answers of {predictor.card['name']} in the audit log" + (f" (left out: {left_out})" if left_out else ""))
    return write_site_model(predictor, studies, args.out, provenance, **options)


def add_site_protocol_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "site-protocol",
        help="show that site calibration transfers: fit on one half of the patients, measure on the other, both ways",
        description="Split a labelled set's patients in two halves (seeded, stratified by pneumonia), calibrate on "
        "one and measure on the other, then the other way round. Both directions are written.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--data", type=Path, action="append", required=True, help="the labelled set (as calibrate takes)")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="test", help="which part of the data")
    p.add_argument("--population", choices=POPULATIONS, required=True, help="the population to calibrate")
    p.add_argument("--seed", type=int, default=0, help="seed of the split in halves")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the figures")
    p.add_argument("--record", action="store_true", help="also record the figures in the model's card (site_protocol)")
    add_operating_point_arguments(p, " on the calibration half")
    p.set_defaults(handler=run_site_protocol)


def run_site_protocol(args: argparse.Namespace) -> int:
    from pneumoscan.learning.site_calibration import halves_protocol

    result = halves_protocol(args.model or DEFAULT_MODEL_DIR, args.data, split=args.split, population=args.population,
                             policy=args.policy, target=args.target, seed=args.seed, estimator=args.estimator)  # fmt: skip
    result["command"] = args.command_line
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        from pneumoscan.learning.site_calibration import record_protocol

        record_protocol(args.model or DEFAULT_MODEL_DIR, result)
    for d in result["directions"]:
        m, v = d["measured_on"], d["validation_threshold_on_the_same_half"]
        print(f"{d['direction']}: threshold {d['fitted_on']['threshold']:.4f} fitted on {d['fitted_on']['n']} images | measured on "
              f"{m['n']} ({m['n_pneumonia']} pneumonia): sensitivity {m['sensitivity']:.4f} ({m['sensitivity_ci'][0]:.3f}-"
              f"{m['sensitivity_ci'][1]:.3f}), specificity {m['specificity']:.4f} ({m['specificity_ci'][0]:.3f}-"
              f"{m['specificity_ci'][1]:.3f}) | validation threshold on the same half: sensitivity {v['sensitivity']:.4f}, "
              f"specificity {v['specificity']:.4f}")  # fmt: skip
    print(f"figures: {args.out}")
    return 0


def add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="replay a site's labelled studies with the model in service and a candidate: promote it or not",
        description="Score a site's labelled studies with both models, calibrate each on them at the site's target, "
        "and compare them per population: both ROC curves, AUROC with patient-bootstrap intervals and their paired "
        "difference, sensitivity and specificity at each one's site point, McNemar's test on the paired errors, and "
        "every study whose decision changes. A stated rule (docs/site-calibration.md) says promote or do not promote. "
        "Writes comparison.json, comparison.html and one ROC figure per population.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", type=Path, default=None, help=f"the model in service (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--candidate", type=Path, required=True, help="the exported model that would replace it")
    p.add_argument("--data", type=Path, action="append", required=True, help="the site's labelled studies (as calibrate takes)")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="which part of the data: all of it, or one part of a dataset with parts")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="a new folder for the report")
    p.add_argument("--resamples", type=int, default=None, help="patient-bootstrap resamples of each interval (default: as evaluate)")
    add_operating_point_arguments(p, " on the site's studies, for both models")
    p.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from pneumoscan.learning.comparison import COMPARISON_HTML, compare
    from pneumoscan.learning.evaluation import BOOTSTRAP_RESAMPLES

    result = compare(args.model or DEFAULT_MODEL_DIR, args.candidate, args.data, args.out, split=args.split, policy=args.policy,
                     target=args.target, estimator=args.estimator, resamples=args.resamples or BOOTSTRAP_RESAMPLES,
                     command=args.command_line)  # fmt: skip
    for population, entry in result["populations"].items():
        for side in ("current", "candidate"):
            f = entry[side]
            print(f"[{population}] {side} {result[side]['name']}: AUROC {f['auroc']:.4f} ({f['auroc_ci'][0]:.3f}-{f['auroc_ci'][1]:.3f}), "
                  f"at its site point {f['threshold']:.4f}: sensitivity {f['sensitivity']:.4f}, specificity {f['specificity']:.4f}")  # fmt: skip
        test = entry["mcnemar"]
        print(f"[{population}] {entry['decisions_changed']} decisions change; McNemar {test['only_current_right']} vs "
              f"{test['only_candidate_right']}, p = {test['p_value']:.3g}")  # fmt: skip
    for population, why in result["not_compared"].items():
        print(f"[{population}] not compared: {why}")
    decision = result["decision"]
    print(f"decision: {decision['decision']}" + "".join(f"\n  - {reason}" for reason in decision["reasons"]))
    print(f"report: {args.out / COMPARISON_HTML}")
    return 0


def add_predictor_arguments(p: argparse.ArgumentParser) -> None:
    """The exported model and the input limits: the same flags for predict and triage."""
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--int8", action="store_true", help="use the int8 model")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--max-file-mb", type=float, default=MAX_INPUT_BYTES / 2**20, help="refuse larger files")
    p.add_argument("--max-pixels", type=int, default=MAX_INPUT_PIXELS, help="refuse images with more pixels (before decoding)")


def load_predictor(args: argparse.Namespace):  # type: ignore[no-untyped-def]  # a Predictor; imported lazily
    from pneumoscan.inputs.imaging import Limits
    from pneumoscan.running.inference import Predictor

    limits = Limits(max_bytes=int(args.max_file_mb * 2**20), max_pixels=args.max_pixels)
    predictor = Predictor.load(args.model, precision="int8" if args.int8 else "fp32", threads=args.threads, limits=limits)
    return predictor


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="score image files with the exported model (no PyTorch needed)",
        description="One record per file: calibrated probability of pneumonia, label at the model's threshold. "
        "Unreadable files get an error record; the exit code is 1 if any file failed.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, help="image files or folders (every image inside)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="write X-ray + heat-map PNGs here")
    add_predictor_arguments(p)
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from pneumoscan.apps.predict import expand_inputs, format_records, predict_files

    predictor = load_predictor(args)
    records = predict_files(predictor, expand_inputs(args.files), args.heatmaps)
    print(format_records(records, args.format))
    failed = sum(1 for r in records if r.error)
    if failed:
        print(f"pneumoscan: {failed} of {len(records)} files could not be scored", file=sys.stderr)
    return 1 if failed else 0


TRIAGE_OUTPUTS = "worklist.csv (ranked), report.html (self-contained) and summary.json"


def add_triage_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triage",
        help="rank a folder of studies: worklist.csv, report.html, summary.json",
        description=f"Score every study and write {TRIAGE_OUTPUTS} into --out, highest probability first. "
        "Files that are not images are listed as skipped. Re-running with the same --out skips studies already "
        "in its worklist. 'pneumoscan triage merge DIR... --out DIR' joins the outputs of --shard runs. "
        "Exit code 1 if an image could not be decoded.",
        epilog="examples:\n  pneumoscan triage studies/ --out triage/today --int8\n"
        "  pneumoscan triage 'archive/**/*.dcm' --out part3 --shard 3/8   # one task of a cluster array\n"
        "  pneumoscan triage merge part1 part2 part3 --out triage/all",
        formatter_class=HelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, folders (recursive) or quoted glob patterns")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; an existing worklist is resumed)")
    p.add_argument("--dicomweb", default=None, metavar="URL",
                   help="pull mode: fetch the CR/DX studies of this DICOMweb server (QIDO-RS, WADO-RS) into OUT/dicomweb "
                   "and triage them, e.g. http://pacs:8042/dicom-web")  # fmt: skip
    p.add_argument("--since", default=None, metavar="DATE", help="with --dicomweb: studies dated DATE (YYYY-MM-DD) or later")
    p.add_argument("--store-results", action="store_true",
                   help="with --dicomweb: store each scored study's structured report and heat map back (STOW-RS)")
    p.add_argument("--max-instances", type=int, default=PullLimits.max_instances,
                   help="with --dicomweb: fetch at most this many instances in one run (the rest: a row saying so)")
    p.add_argument("--request-seconds", type=float, default=PullLimits.request_seconds,
                   help="with --dicomweb: the longest one search or retrieval may take, however slowly the PACS answers")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images while the model runs")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--shard", default=None, metavar="K/N", help="process only the K-th of N disjoint parts of the inputs")
    p.add_argument("--no-report", action="store_true", help="skip report.html (the worklist and summary are still written)")
    p.add_argument("--readings", type=Path, default=None, metavar="FILE.csv",
                   help="radiologists' findings (columns path, finding: pneumonia, no_pneumonia, cannot_tell); the summary "
                   "and report then give the sensitivity, specificity, PPV and NPV they show, with Wilson intervals")  # fmt: skip
    add_predictor_arguments(p)
    p.set_defaults(handler=run_triage)

    m = subparsers.add_parser(  # reached as 'triage merge' (see main); no help= keeps it out of the command list
        "triage-merge",
        prog="pneumoscan triage merge",
        description=f"Join triage output folders (e.g. of --shard runs) into one {TRIAGE_OUTPUTS}.",
        formatter_class=HelpFormatter,
    )
    m.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="triage output folders")
    m.add_argument("--out", type=Path, required=True, help="output folder of the merged worklist and report")
    m.add_argument("--no-report", action="store_true", help="skip report.html")
    m.set_defaults(handler=run_triage_merge)


def run_triage(args: argparse.Namespace) -> int:
    from pneumoscan.apps.triage import Shard, triage

    inputs, failures = list(args.inputs), []
    if args.dicomweb:
        pulled, failures = pull_from_pacs(args)
        inputs += pulled
    elif args.since or args.store_results:
        raise ConfigurationError("--since and --store-results go with --dicomweb URL (pull mode)")
    if not inputs and not args.dicomweb:
        raise ConfigurationError("give the studies to triage (files, folders, patterns) or --dicomweb URL --since DATE")
    shard = Shard.parse(args.shard) if args.shard else None
    findings = None
    if args.readings is not None:
        from pneumoscan.apps.readings import read_findings

        findings = read_findings(args.readings)  # a bad file is refused before any study is scored
    predictor = load_predictor(args)
    summary = triage(inputs, args.out, predictor, workers=args.workers, batch_size=args.batch_size, shard=shard,
                     report=not args.no_report, pull_failures=failures, findings=findings)  # fmt: skip
    print_triage_summary(summary, args.out, not args.no_report)
    if args.store_results:
        from pneumoscan.apps.dicom.pull import store_results
        from pneumoscan.apps.triage import read_worklist

        counts = store_results(args.dicomweb, args.out, read_worklist(args.out), predictor)
        print(f"results stored in the PACS: {counts['stored']} new, {counts['already']} stored before, {counts['failed']} failed"
              + (" (run the same command again to retry them)" if counts["failed"] else ""))  # fmt: skip
        if counts["failed"]:
            return 3
    return 1 if summary["errors"] else 0


def pull_from_pacs(args: argparse.Namespace) -> tuple[list[str], list]:  # type: ignore[type-arg]
    """The folder of what was pulled (to triage), and what could not be (rows of the worklist)."""
    from pneumoscan.apps.dicom.pull import PULL_DIR, parse_since, pull

    if not args.since:
        raise ConfigurationError("--dicomweb needs --since DATE (YYYY-MM-DD): the first study date to fetch")
    limits = PullLimits(max_instances=args.max_instances, request_seconds=args.request_seconds)
    pulled = pull(args.dicomweb, parse_since(args.since), args.out, limits=limits)
    print(f"pulled from {args.dicomweb}: {pulled.series} CR/DX series, {pulled.instances} instances, {pulled.fetched} new"
          + (f", {len(pulled.failures)} could not be fetched (rows with their reason in the worklist)" if pulled.failures else ""))
    return ([str(args.out / PULL_DIR)] if pulled.files else []), pulled.failures


def run_triage_merge(args: argparse.Namespace) -> int:
    from pneumoscan.apps.triage import merge

    summary = merge(args.folders, args.out, report=not args.no_report)
    print_triage_summary(summary, args.out, not args.no_report)
    return 0


def print_triage_summary(summary: dict, out: Path, report: bool) -> None:
    labels, timing = summary["labels"], summary["timing"]
    print(
        f"{summary['scored']} studies scored: {labels['PNEUMONIA']} PNEUMONIA, {labels['NORMAL']} NORMAL "
        f"(threshold {summary['model'].get('threshold', float('nan')):.4f}); "
        f"{summary['out_of_distribution']} flagged as unlike the training X-rays; "
        f"{summary['skipped']} skipped, {summary['errors']} errors; "
        f"{timing['images_per_second']:.1f} images/s"
    )
    performance = summary.get("performance")
    if performance:
        print_read_performance(performance)
    print(f"worklist: {out / 'worklist.csv'}" + (f"\nreport:   {out / 'report.html'}" if report else ""))


def print_read_performance(performance: dict) -> None:
    share = lambda p: "–" if p["value"] is None else f"{p['value']:.3f} ({p['low']:.3f}–{p['high']:.3f}, {p['k']}/{p['n']})"  # noqa: E731
    print(f"against {performance['read']} radiologists' findings:")
    for group in performance["groups"]:
        print(f"  {group['population'] or 'all'} ({group['operating_point']}): sensitivity {share(group['sensitivity'])}, "
              f"specificity {share(group['specificity'])}, PPV {share(group['ppv'])}, NPV {share(group['npv'])}")
    if performance["warning"]:
        print(f"  warning: {performance['message']}")
    if performance["unmatched"]:
        print(f"  {len(performance['unmatched'])} finding(s) matched no study: {'; '.join(performance['unmatched'][:5])}")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the REST API (FastAPI) with the exported model",
        description="Serve the model over HTTP. Every setting can also come from PNEUMOSCAN_* environment variables "
        "(PNEUMOSCAN_DATABASE_URL, PNEUMOSCAN_API_KEY or PNEUMOSCAN_API_KEY_FILE, ...); flags win. On any address but "
        "the loopback one, an API key is required.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--int8", action="store_true", help="serve the int8 model")
    add_audit_database_arguments(p)
    p.add_argument("--unsafe-allow-unauthenticated-network-access", action="store_true",
                   help="serve on a non-loopback --host without an API key (only on a closed network: anyone who "
                   "reaches the port can list and download every X-ray)")  # fmt: skip
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pneumoscan.apps.service.app import serve
    from pneumoscan.apps.settings import ServiceSettings, settings_from

    serve(settings_from(ServiceSettings, host=args.host, port=args.port, model_dir=args.model, data_dir=args.data_dir,
                        database_url=args.database_url, precision="int8" if args.int8 else None,
                        unsafe_allow_unauthenticated_network_access=args.unsafe_allow_unauthenticated_network_access or None))
    return 0


def add_readings_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "readings",
        help="record radiologists' readings of pneumoscan's predictions (e.g. exported from a RIS)",
        description="Radiologists' readings, stored against the predictions in the audit log: what feeds the live "
        "sensitivity and specificity of a site.",
        formatter_class=HelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imported = actions.add_parser(
        "import",
        help="import a CSV of readings: every row or none",
        description="Import readings from a CSV with the columns finding (pneumonia, no_pneumonia, cannot_tell), reader "
        "(the site's reader id) and prediction_id or sop_instance_uid (a study the DICOM node scored, matched through the "
        "hash it stored), optionally read_at (ISO 8601) and comment. Every bad row is named with its line and nothing is "
        "imported until the file is right. PNEUMOSCAN_DATA_DIR / PNEUMOSCAN_DATABASE_URL apply; flags win.",
        formatter_class=HelpFormatter,
    )
    imported.add_argument("file", type=Path, metavar="FILE.csv")
    add_audit_database_arguments(imported)
    imported.set_defaults(handler=run_readings_import)


def run_readings_import(args: argparse.Namespace) -> int:
    from pneumoscan.apps.readings import import_readings

    summary = import_readings(args.file, open_audit_log(args))
    findings = ", ".join(f"{n} {finding.replace('_', ' ')}" for finding, n in summary.by_finding.items())
    keys = ", ".join(f"{n} by {key.replace('_', ' ')}" for key, n in summary.by_key.items() if n)
    print(f"imported {summary.rows} reading(s) from {args.file.name}: {findings} ({keys})")
    return 0


def add_promote_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "promote",
        help="record in the audit log that a candidate replaces the model in service, from its compare report",
        description="Record a promotion in the audit log (model_events): the candidate of a 'pneumoscan compare' report "
        "at its site points, the model it replaces, the report's checksum and decision, and who promoted it. A report "
        "that says 'do not promote' is refused unless --override gives the reason, which is recorded too. Serve the "
        "candidate at those points with 'pneumoscan calibrate --model CANDIDATE --data SITE --out FOLDER' on the same "
        "studies. PNEUMOSCAN_DATA_DIR / PNEUMOSCAN_DATABASE_URL apply; flags win.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("report", type=Path, help="the compare report: its folder or its comparison.json")
    p.add_argument("--by", required=True, help="who promotes it: the site's user id")
    p.add_argument("--override", default=None, metavar="REASON", help="promote against the report's decision, for this reason")
    add_audit_database_arguments(p)
    p.set_defaults(handler=run_promote)


def run_promote(args: argparse.Namespace) -> int:
    import re

    from pneumoscan.apps.audit import promotion_row
    from pneumoscan.apps.readings import READER_PATTERN
    from pneumoscan.files import sha256_file
    from pneumoscan.learning.comparison import read_comparison

    if not re.fullmatch(READER_PATTERN, args.by):
        raise ConfigurationError(f"--by {args.by!r} is not a user id: letters, digits and . _ @ - (at most 64)")
    path, report = read_comparison(args.report)
    decision = report["decision"]
    if not decision["promote"] and not args.override:
        raise ConfigurationError(f"{path} says do not promote ({'; '.join(decision['reasons'])}): promote a candidate its "
                                 "report promotes, or give --override REASON to record why this one goes live anyway")  # fmt: skip
    open_audit_log(args).record_model_event(promotion_row(report, sha256_file(path), args.by, args.override))
    points = ", ".join(f"{p} threshold {e['candidate']['threshold']:.4f}" for p, e in report["populations"].items())
    print(f"recorded: {report['candidate']['name']} replaces {report['current']['name']} ({points}), promoted by {args.by}"
          + (f" against the report's decision: {args.override}" if args.override else ""))  # fmt: skip
    return 0


def add_dicom_node_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dicom-node",
        help="run a DICOM node (Storage SCP) that scores received X-rays and sends results to a PACS",
        description="Receive X-rays over DICOM (C-ECHO, C-STORE), score each with the exported model, and send a "
        "structured report (TID 1500) and a heat-map Secondary Capture to --destination. Refused instances (CT, lateral, "
        "not a chest, undecodable) get an audit row with the reason and no result. Every setting can also come from "
        "PNEUMOSCAN_* environment variables (PNEUMOSCAN_AE_TITLE, PNEUMOSCAN_DICOM_PORT, PNEUMOSCAN_ALLOWED_CALLING_AES, "
        "PNEUMOSCAN_DESTINATION, ...); flags win. Stop with Ctrl-C: what was received is scored first.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ae-title", default=None, help="the node's AE title (default PNEUMOSCAN)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="DICOM port (default 11112)")
    p.add_argument("--allow-ae", action="append", default=None, metavar="AE_TITLE",
                   help="a calling AE title allowed to send (repeat; required beyond loopback)")  # fmt: skip
    p.add_argument("--destination", default=None, metavar="DEST",
                   help="where results go: AE_TITLE@host:port (C-STORE) or a DICOMweb URL (STOW-RS)")
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--int8", action="store_true", help="score with the int8 model")
    p.add_argument("--data-dir", type=Path, default=None, help="spool, outbox and SQLite audit database (default ./data)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")
    p.add_argument("--workers", type=int, default=None, help="instances scored at once (default 2)")
    p.set_defaults(handler=run_dicom_node)


def run_dicom_node(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pneumoscan.apps.dicom.node import run_node
    from pneumoscan.apps.settings import DicomNodeSettings, settings_from

    settings = settings_from(DicomNodeSettings, ae_title=args.ae_title, dicom_host=args.host, dicom_port=args.port,
                             allowed_calling_aes=args.allow_ae, destination=args.destination, model_dir=args.model,
                             data_dir=args.data_dir, database_url=args.database_url,
                             precision="int8" if args.int8 else None, workers=args.workers)  # fmt: skip
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    run_node(settings, stop)
    return 0


def build_parser() -> argparse.ArgumentParser:
    return build_parsers()[0]


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``pneumoscan`` parser and its ``train`` subparser (whose defaults a settings file replaces)."""
    parser = argparse.ArgumentParser(
        prog="pneumoscan",
        description="Pneumonia detection on chest X-rays: train, evaluate, explain and export the model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    train = add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_export_parser(subparsers)
    add_calibrate_parser(subparsers)
    add_fit_regions_parser(subparsers)
    add_fit_operating_points_parser(subparsers)
    add_site_protocol_parser(subparsers)
    add_compare_parser(subparsers)
    add_promote_parser(subparsers)
    add_predict_parser(subparsers)
    add_triage_parser(subparsers)
    add_serve_parser(subparsers)
    add_readings_parser(subparsers)
    add_dicom_node_parser(subparsers)
    return parser, train


def configure_logging(verbose: bool) -> None:
    """Show pneumoscan's own messages; Lightning prints through its own handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pneumoscan")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def route_subcommands(argv: list[str]) -> list[str]:
    """``triage merge ...`` is the hidden command ``triage-merge``; a file named merge can be given as ./merge."""
    for i, token in enumerate(argv):
        if not token.startswith("-"):
            if token == "triage" and argv[i + 1 : i + 2] == ["merge"]:
                return [*argv[:i], "triage-merge", *argv[i + 2 :]]
            break
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser, train_parser = build_parsers()
    arguments = route_subcommands(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(arguments)
    if getattr(args, "config", None) is not None:  # a settings file: its values become defaults, flags still win
        try:
            train_parser.set_defaults(**defaults_from_config(args.config))
        except PneumoscanError as error:
            print(f"pneumoscan: error: {error}", file=sys.stderr)
            return error.exit_code
        args = parser.parse_args(arguments)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    args.command_line = "pneumoscan " + shlex.join(arguments)  # what a card or a record says made it
    try:
        return handler(args)
    except PneumoscanError as error:
        print(f"pneumoscan: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("pneumoscan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
