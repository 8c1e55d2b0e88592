"""A site's own figures: ``calibrate``, ``site-protocol``, ``compare`` and ``promote``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pneumoscan.apps.cli.common import (
    HelpFormatter,
    add_audit_database_arguments,
    add_operating_point_arguments,
    open_audit_log,
)
from pneumoscan.config import (
    DEFAULT_MODEL_DIR,
    POPULATIONS,
)
from pneumoscan.errors import ConfigurationError, TooFewSiteCases


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

