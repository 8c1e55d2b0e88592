"""The human-readable model card (``MODEL_CARD.md``), rendered from ``model_card.json``.

Kept apart from :mod:`pneumoscan.learning.export` so that a command which rewrites a card
without exporting (``pneumoscan calibrate``) needs no PyTorch.
"""

from __future__ import annotations

from pathlib import Path


def _fmt_split(metrics: dict) -> str:
    low, high = metrics["auroc_ci"]
    cm = metrics["confusion_matrix"]
    return (
        f"| {metrics['n']} | {metrics['auroc']:.4f} ({low:.4f}–{high:.4f}) | {metrics['sensitivity']:.4f} | "
        f"{metrics['specificity']:.4f} | {metrics['precision']:.4f} | {metrics['accuracy']:.4f} | {cm['fn']} | {cm['fp']} | "
        f"{metrics['ece']['after_calibration']:.4f} |"
    )


def _gate_text(gate: dict | None) -> str:
    if not gate:
        return "none"
    return (
        f"{gate['method']} (threshold {gate['threshold']:.1f}, `{gate['file']}`). Kept: "
        f"{gate['kept_validation_share']:.1%} of validation"
        + (f" ({gate['kept_shifted_validation_share']:.1%} of its shifted copies)" if "kept_shifted_validation_share" in gate else "")
        + f" and {gate['kept_test_share']:.1%} of test images. "
        f"Rejected: {gate['non_xray_rejected_share']:.1%} of {gate['non_xray_n']} images that are not chest X-rays "
        f"(scikit-image's sample photos, CT/MR/US images from pydicom's test files, blank and noise images)"
        + (f"; not rejected: {', '.join(gate['non_xray_kept'])}." if gate["non_xray_kept"] else ".")
    )


def _view_rows(metrics: dict, split: str) -> str:
    """Rows within each view, with the reversed view mix and the view-only baseline beside."""
    views = metrics.get("by_view")
    if not views:
        return ""
    rows = []
    for view in ("AP", "PA"):
        if view in views:
            v = views[view]
            low, high = v["auroc_ci"]
            rows.append(f"| {split}, {view} only | {v['n']} ({v['n_pneumonia']} pneumonia) | {v['auroc']:.4f} ({low:.4f}–{high:.4f}) | "
                        f"{v['sensitivity']:.4f} | {v['specificity']:.4f} |")
    baseline = views["view_only_baseline"]
    rows.append(f"| {split}, view mix reversed (weighted) | {metrics['n']} | {views['reversed_view_mix']['auroc']:.4f} | | |")
    rows.append(f"| {split}, view-only baseline (AP = pneumonia) | {metrics['n']} | {baseline['auroc']:.4f} "
                f"(reversed mix: {baseline['auroc_reversed_view_mix']:.4f}) | | |")
    return "\n".join(rows)


def _cell(figure: dict | None) -> str:
    return "–" if figure is None else f"{figure['value']:.3f} ({figure['ci'][0]:.3f}–{figure['ci'][1]:.3f})"


def _localisation_text(entry: dict) -> str:
    """Where the heat map and regions point, against radiologists' boxes (test part), beside the fixed baselines."""
    rule, figures = entry.get("regions"), entry.get("localisation")
    if rule is None:
        return ("\n\nRegions: none. No radiologists' boxes in this population's validation part, so where its pneumonias "
                "lie was never measured; the heat map is shown for reference only.")  # fmt: skip
    text = (f"\n\nRegions: the heat map's cells at or above {rule['level']} × its maximum, grouped, those covering at least "
            f"{rule['min_area']:.0%} of the film, at most {rule['max_regions']}; chosen on validation by RSNA mAP@[0.40:0.75] "
            f"({rule['validation_map']:.3f} over {rule['validation_films']} films, {rule['validation_films_with_boxes']} with boxes).")  # fmt: skip
    if not figures:
        return text
    rows = "\n".join(
        f"| {name} | {g.get('n', '–')} | {_cell(g.get('pointing_game'))} | {_cell(g.get('pointing_game_fixed_point'))} | "
        f"{_cell(g.get('mass_inside'))} | {_cell(g.get('mass_inside_fixed_map'))} | {_cell(g.get('iou'))} | "
        f"{_cell(g.get('iou_fixed_region'))} | {_cell(g.get('map'))} | {_cell(g.get('map_fixed_boxes'))} |"
        for name, g in figures["groups"].items()
    )  # fmt: skip
    return text + (
        "\n\nAgainst the radiologists' boxes of the test part (pneumonia films with boxes; mAP over all films, normals "
        "included), each beside what needs no model, learnt from the training part's boxes (95 % intervals resample patients):"
        "\n\n| films | n with boxes | pointing game | fixed point | mass inside | fixed map | IoU | fixed region IoU | "
        f"regions mAP | fixed boxes mAP |\n|---|---|---|---|---|---|---|---|---|---|\n{rows}")


def _estimator_text(op: dict) -> str:
    names = {"harrell-davis": "Harrell–Davis estimate of the pneumonias' quantile, in logits",
             "order-statistic": "the pneumonias' order statistic"}
    return f", {names.get(op['estimator'], op['estimator'])}" if op.get("estimator") else ""


def _spread_text(entry: dict) -> str:
    """How far the point would move with other validation patients, and what it keeps on films it never saw."""
    spread = entry.get("operating_point_spread")
    if not spread:
        return ""
    low, high = spread["threshold_interval"]
    specificity = spread["out_of_bag_specificity"]
    return (f" Had validation drawn other patients ({spread['method']}), the threshold would lie in {low:.4f}–{high:.4f} "
            f"(sd {spread['threshold_sd_logit']:.3f} in logits) and would find {spread['out_of_bag_sensitivity']:.3f} of the "
            f"pneumonias it was not set on (5th percentile of the resamples {spread['out_of_bag_sensitivity_p05']:.3f})"
            + (f", clearing {specificity:.3f} of the normals" if specificity is not None else "") + ".")


def _population_section(title: str, entry: dict, int8: dict | None) -> str:
    op, val, test = entry["operating_point"], entry["validation"]["metrics"], entry["test"]["metrics"]
    int8_rows = ""
    if int8:
        int8_rows = (
            f"| validation, int8 | {_fmt_split(int8['validation']['metrics'])[2:]}\n"
            f"| test, int8 | {_fmt_split(int8['test']['metrics'])[2:]}\n"
        )
    view_rows = "\n".join(r for r in (_view_rows(val, "validation"), _view_rows(test, "test")) if r)
    views = ("\n\nBy view, at the same operating point:\n\n| part | n | AUROC (95% CI) | sensitivity | specificity |\n"
             f"|---|---|---|---|---|\n{view_rows}") if view_rows else ""
    inv = entry.get("invariance")
    invariance = (f"\n\nSame film, equalised or not ({inv['n']} test images): median |Δprobability| "
                  f"{inv['median_abs_delta_probability']:.4f}, 95th percentile {inv['p95_abs_delta_probability']:.4f}, "
                  f"max {inv['max_abs_delta_probability']:.4f}.") if inv else ""
    return f"""## {title}

Temperature {entry['calibration']['temperature']:.4f}; operating point **{op['name']}**: threshold {op['threshold']:.4f}
on the calibrated probability (policy `{op['policy']}`, target {op['target']}{_estimator_text(op)}).{_spread_text(entry)}{_site_text(entry)}

| split | n | AUROC (95% CI, by patient) | sensitivity | specificity | precision | accuracy | missed pneumonias | false alarms | ECE |
|---|---|---|---|---|---|---|---|---|---|
| validation | {_fmt_split(val)[2:]}
| test | {_fmt_split(test)[2:]}
{int8_rows}{views}{invariance}{_localisation_text(entry)}

Out-of-distribution gate: {_gate_text(entry.get('ood_gate'))}
"""


def _interval(figures: dict, name: str) -> str:
    low, high = figures[f"{name}_ci"]
    return f"{figures[name]:.4f} ({low:.3f}–{high:.3f})"


def _site_text(entry: dict) -> str:
    """A site-calibrated population: where its operating point came from, and what it replaced."""
    site = entry.get("site")
    if not site:
        return ""
    f, before = site["figures"], entry["validation_operating_point"]
    return (
        f"\n\n**Site calibration of {site['date']}** (site set sha256 `{site['set_sha256'][:16]}…`): fitted on {f['n']} studies "
        f"({f['n_pneumonia']} pneumonia, {f['n_normal']} normal; {f['patients']} patients; {f['left_out_not_validated']} left out "
        f"as not validated). On those studies: sensitivity {_interval(f, 'sensitivity')}, specificity "
        f"{_interval(f, 'specificity')}, AUROC {_interval(f, 'auroc')} (95 % intervals over patients, at the fitted threshold). "
        f"It replaces {before['operating_point']['name']} (threshold {before['operating_point']['threshold']:.4f}, temperature "
        f"{before['calibration']['temperature']:.4f}); the validation and test figures below were measured at that one."
        + "".join(f"\n\nWarning: {w}." for w in f.get("warnings", []))
    )


def _protocol_section(protocols: dict) -> str:
    """The halves protocol: calibrate on one half of a test part's patients, measure on the other, both ways."""
    rows = []
    for population, result in protocols.items():
        for d in result["directions"]:
            m, v, fit = d["measured_on"], d["validation_threshold_on_the_same_half"], d["fitted_on"]
            rows.append(f"| {population} | {', '.join(Path(p).name for p in result['data'])} `{result['split']}` | {d['direction']} | "
                        f"{fit['n']} | {fit['threshold']:.4f} | {m['n']} ({m['n_pneumonia']} pneumonia) | "
                        f"{_interval(m, 'sensitivity')} | {_interval(m, 'specificity')} | {v['sensitivity']:.4f} / {v['specificity']:.4f} |")
    first = next(iter(protocols.values()))
    return (
        "\n## Site calibration, shown on held-out halves\n\n"
        f"Each test part's patients split in two halves (seed {first['halves']['seed']}, {first['halves']['by']}); "
        f"`pneumoscan calibrate` at {first['target']:.0%} sensitivity on one half, measured on the other, both ways "
        "(docs/site-calibration.md). Intervals: 95 %, patient bootstrap.\n\n"
        "| population | data | direction | fitted on | threshold | measured on | sensitivity | specificity | "
        "validation threshold on the same half: sens. / spec. |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
        + "".join(f"\nCommand ({p}): `{r.get('command')}`" for p, r in protocols.items()) + "\n"
    )


def _drift_text(card: dict) -> str:
    reference = card.get("drift_reference")
    if not reference:
        return ""
    mix = ", ".join(f"{p} {share:.0%}" for p, share in reference.get("mix", {}).items())
    return (f"\n## Drift reference\n\nA running service compares its recent predictions with {reference['source']} "
            f"(mix: {mix}): {reference['method']}.\n")


def _site_calibration_text(card: dict) -> str:
    site = card.get("site_calibration")
    if not site:
        return ""
    counts = "; ".join(f"{p}: {c['NORMAL']} normal, {c['PNEUMONIA']} pneumonia" for p, c in site["counts"].items())
    sources = ", ".join(f"`{d['source']}` ({d['split'] if 'split' in d else 'readings since ' + str(d.get('since') or 'the start')})"
                        for d in site["data"])  # fmt: skip
    kept = "".join(f" {p.capitalize()} kept the validation point: {why}." for p, why in (site.get("kept_validation_point") or {}).items())
    left_out = ", ".join(f"{n} {why}" for why, n in (site.get("left_out") or {}).items())
    return (f"\n## Site calibration\n\nOperating point set on {sources} on {site['date']} for {', '.join(site['populations'])} "
            f"(`{site.get('command') or 'pneumoscan calibrate'}`), from `{site['base_model']['folder']}` (ONNX sha256 "
            f"`{site['base_model']['onnx_sha256'][:16]}…`, unchanged). Site set: {site['n']} studies ({counts}), sha256 "
            f"`{site['set_sha256']}` ({site['checksum_method']}).{kept}" + (f" Left out: {left_out}." if left_out else "") + "\n")


def render_card(card: dict) -> str:
    """The human-readable model card: one section per population."""
    limits = "\n".join(f"- {item}" for item in card["limitations"])
    int8 = card.get("int8")
    if "populations" in card:
        sections = "\n".join(
            _population_section(f"{population.capitalize()}ren" if population == "child" else f"{population.capitalize()}s",
                                entry, (int8 or {}).get("populations", {}).get(population))
            for population, entry in card["populations"].items()
        )
        classifier = card["population_classifier"]
        right = ", ".join(f"{p} {v['right_share']:.1%} of {v['n']}" for p, v in classifier["test"].items())
        routing = f"\n## Population\n\n{classifier['method']}. Right on the test parts: {right}.\n"
        operating = "per population, below"
        temperature = "per population, below"
    else:
        entry = {k: card[k] for k in ("calibration", "operating_point", "ood_gate", "site", "validation_operating_point", "regions",
                                    "localisation") if k in card}
        entry.update(validation=card["validation"], test=card["test"], invariance=card.get("invariance"))
        sections = _population_section("Figures at the operating point", entry, int8)
        routing = ""
        op = card["operating_point"]
        operating = f"**{op['name']}**: threshold {op['threshold']:.4f} on the calibrated probability"
        temperature = f"{card['calibration']['temperature']:.4f} ({card['calibration']['method']})"
    int8_text = (f"\nint8 (`{int8['file']}`, sha256 `{int8['sha256']}`): {int8['method']}; same temperatures and "
                 "thresholds as fp32.\n") if int8 else ""
    datasets = card["data"].get("datasets", [])
    data_rows = "\n".join(
        f"| {d['name']} ({d['kind']}) | " + " | ".join(
            f"{d['counts'][s]['NORMAL']} / {d['counts'][s]['PNEUMONIA']} ({d['patients'][s]} patients)" for s in ("train", "val", "test")
        ) + f" | {d.get('labels_file_sha256', '—')[:16]} |"
        for d in datasets
    )
    data_table = ("\n## Data\n\n| dataset | train NORMAL / PNEUMONIA | validation | test | labels file sha256 |\n"
                  f"|---|---|---|---|---|\n{data_rows}\n\nTest patients of each dataset: sha256 of their sorted ids in "
                  "`model_card.json` (`data.datasets[].test_patients_sha256`).\n") if datasets else ""
    return f"""# Model card: {card['name']}

{card['intended_use']}

| | |
|---|---|
| architecture | `{card['architecture']}` (timm), ImageNet-pretrained, one pneumonia logit |
| input | `{card['input']['name']}` float32 {card['input']['shape']}: {card['input']['preprocessing']} |
| labels | {', '.join(card['labels'])} |
| output | {card['output']} |
| temperature | {temperature} |
| operating point | {operating} |
| ONNX | `{card['onnx']['file']}`, opset {card['onnx']['opset']}, sha256 `{card['onnx']['sha256']}` |
| training command | `{card['training']['command']}` (commit `{card['training']['git_commit']}`) |
| data | train+validation sha256 `{card['data']['train_sha256']}`, test sha256 `{card['data']['test_sha256']}` ({card['data']['checksum_method']}) |
{int8_text}{data_table}{routing}{_site_calibration_text(card)}{_drift_text(card)}
{sections}{_protocol_section(card["site_protocol"]) if card.get("site_protocol") else ""}
Thresholds and temperatures were fitted on validation parts (by patient); test parts were
scored once, afterwards. Reports with plots: `evaluation/`.

## Limitations

{limits}
"""
