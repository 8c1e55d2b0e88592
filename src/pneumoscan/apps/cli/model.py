"""``evaluate``, ``export``, ``fit-regions`` and ``fit-operating-points``: measuring and packaging a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan.apps.cli.common import (
    HelpFormatter,
    add_boxes_argument,
    add_data_argument,
    add_operating_point_arguments,
    exported_model_and_sources,
)
from pneumoscan.config import (
    BORDER_PROBE_DEPTH,
    DEFAULT_MODEL_DIR,
)
from pneumoscan.errors import ConfigurationError, ModelNotFoundError


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
    p.add_argument("--blank-borders", type=float, nargs="?", const=BORDER_PROBE_DEPTH, default=None, metavar="DEPTH",
                   help="also score each film with a strip DEPTH of the side deep blanked along every edge (markers, stamps, "
                   f"collimation; default {BORDER_PROBE_DEPTH}), to measure what the borders buy: borders.md beside the report")  # fmt: skip
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from pneumoscan.learning.evaluation import evaluate

    out = args.out or Path("runs") / f"eval-{args.split}"
    borders = {}
    if args.blank_borders is not None:  # first: it refuses a depth or a checkpoint before anything is scored
        from pneumoscan.learning.shortcuts import probe_borders

        if args.held_out_by is not None:
            raise ConfigurationError("--blank-borders scores the whole split: run it without --held-out-by")
        borders = probe_borders(args.model or DEFAULT_MODEL_DIR, args.data, args.split, out, args.blank_borders,
                                "int8" if args.int8 else "fp32", args.boxes)  # fmt: skip
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
            from pneumoscan.learning.evaluation import regions_text
            from pneumoscan.learning.localisation import localisation_table

            print(f"  where the heat map points, on the films with radiologists' boxes:\n{localisation_table(metrics['localisation'])}")
            print(f"  regions: {regions_text(metrics['localisation']['regions'])}")
        probe = borders.get(population) if population else next(iter(borders.values()), None)
        if probe:
            print(f"  borders blanked ({probe['depth']:.0%} of each side): AUROC {probe['auroc']['as_is']:.4f} -> "
                  f"{probe['auroc']['blanked']:.4f}, partial AUROC {probe['partial_auroc_sensitivity_095']['as_is']:.4f} -> "
                  f"{probe['partial_auroc_sensitivity_095']['blanked']:.4f}; heat map peaking in the strips: "
                  f"{probe['heatmap_peak_in_band']['pneumonia']:.1%} of pneumonias")  # fmt: skip
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

