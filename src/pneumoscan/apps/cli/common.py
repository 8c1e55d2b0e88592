"""Arguments and helpers that several command groups share: data, operating points, the audit database, the model."""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan.config import (
    DEFAULT_MODEL_DIR,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    default_data_root,
)
from pneumoscan.errors import ModelNotFoundError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def add_boxes_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                   help="radiologists' boxes, a CSV of path,x,y,width,height (pixels of each file, paths relative to the CSV) "
                   "(default: a boxes.csv beside each dataset's labels file, if there is one)")  # fmt: skip


def exported_model_and_sources(args: argparse.Namespace) -> tuple:
    """The exported model folder a refitting command works on (a ModelUnderTest) and its datasets (``--data`` or its own)."""
    from pneumoscan.learning.evaluation import ModelUnderTest

    model = ModelUnderTest(args.model or DEFAULT_MODEL_DIR)
    if model.onnx is None:
        raise ModelNotFoundError(f"{model.path} is not an exported model folder: export the checkpoint first")
    chosen = data_sources(args.data) if args.data else model.sources
    return model, [chosen] if isinstance(chosen, Path) else list(chosen)


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

