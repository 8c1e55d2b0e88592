"""The ``pneumoscan`` command: one parser with every command group's sub-commands, and the routing to their runners.

Sub-commands import their heavy libraries (PyTorch, Lightning) only when they
run, so ``pneumoscan --help`` answers at once. Every :class:`PneumoscanError`
becomes a one-line message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence

from pneumoscan import __version__
from pneumoscan.apps.cli.model import (
    add_evaluate_parser,
    add_export_parser,
    add_fit_operating_points_parser,
    add_fit_regions_parser,
)
from pneumoscan.apps.cli.scoring import add_predict_parser, add_triage_parser
from pneumoscan.apps.cli.serving import add_dicom_node_parser, add_readings_parser, add_serve_parser
from pneumoscan.apps.cli.site import (
    add_calibrate_parser,
    add_compare_parser,
    add_promote_parser,
    add_site_protocol_parser,
)
from pneumoscan.apps.cli.training import add_train_parser, defaults_from_config
from pneumoscan.errors import PneumoscanError

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

