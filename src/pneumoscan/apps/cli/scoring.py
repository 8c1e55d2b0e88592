"""Scoring files: ``predict`` and ``triage`` (with ``triage merge`` and the DICOMweb pull)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumoscan.apps.cli.common import HelpFormatter, add_predictor_arguments, load_predictor
from pneumoscan.config import (
    PullLimits,
)
from pneumoscan.errors import ConfigurationError


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

