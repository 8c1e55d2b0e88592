"""Replay before an upgrade: ``pneumoscan compare`` says whether a candidate model should replace the one a site runs.

A newer model can rank better and still do worse at the threshold it was validated at, until it is
calibrated at the site. So both models score the same labelled studies of the site, each is calibrated on
them at the site's target (as ``pneumoscan calibrate`` would), and they are compared where that point lives:
per population, both ROC curves, AUROC with patient-bootstrap intervals and their paired difference,
sensitivity and specificity at each one's site point, McNemar's test on the paired errors, and every study
whose decision would change. :data:`PROMOTION_RULE`, fixed before any comparison is run, says "promote" or
"do not promote". A population the site set has too few studies of is named, not compared.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from pneumoscan.config import portable_path
from pneumoscan.errors import ConfigurationError, TooFewSiteCases
from pneumoscan.learning.data import Record
from pneumoscan.learning.evaluation import BOOTSTRAP_RESAMPLES, fit_calibration, patient_resamples
from pneumoscan.learning.plots import plot_roc_pair
from pneumoscan.learning.site_calibration import (
    SiteStudy,
    check_new_folder,
    figures_at,
    score_site,
    short_of_minimum,
    site_set,
    where,
)
from pneumoscan.running.calibration import DEFAULT_ESTIMATOR, DEFAULT_POLICY, DEFAULT_TARGET_SENSITIVITY, calibrated_probability
from pneumoscan.running.inference import Predictor, to_grayscale_image

#: The candidate may rank this much worse (AUROC, lower end of the paired 95 % interval) and still be promoted:
#: sampling noise of a few hundred studies, not a loss a site would notice.
AUROC_MARGIN = 0.01
PROMOTION_RULE = (
    "Promote only if, in every population with enough studies to compare: (1) the candidate ranks no worse, the lower "
    f"end of the patient-bootstrap 95 % interval of its AUROC minus the current model's being above −{AUROC_MARGIN}; "
    "(2) at the site's target, each model calibrated on these studies, it misses no more pneumonias; and (3) it clears "
    "at least as many normal studies. McNemar's test on the paired decisions says whether a difference is more than "
    "chance; it does not decide. At least one population must be compared."
)
COMPARISON_JSON = "comparison.json"
COMPARISON_HTML = "comparison.html"
MAX_THUMBNAILS = 500
THUMBNAIL_SIZE = 96


@dataclass(frozen=True)
class PairedStudy:
    """One labelled study as both models saw it; its population is the one the current model routes it to."""

    record: Record
    population: str
    current: SiteStudy
    candidate: SiteStudy


def compare(
    current_dir: Path, candidate_dir: Path, sources: list[Path], out: Path, *, split: str = "all",
    policy: str = DEFAULT_POLICY, target: float = DEFAULT_TARGET_SENSITIVITY, estimator: str = DEFAULT_ESTIMATOR,
    resamples: int = BOOTSTRAP_RESAMPLES, progress: bool = True, command: str | None = None,
) -> dict:
    """Score ``sources`` with both models, compare them per population, write ``out``/comparison.{json,html}."""
    current_dir, candidate_dir, out = Path(current_dir), Path(candidate_dir), Path(out)
    check_new_folder(out, current_dir)
    current, candidate = Predictor.load(current_dir), Predictor.load(candidate_dir)
    if current.model_sha256 == candidate.model_sha256:
        raise ConfigurationError(f"{current_dir} and {candidate_dir} run the same ONNX graph: nothing to compare "
                                 "(a site calibration of one model is compared with the halves protocol, site-protocol)")  # fmt: skip
    records = site_set(current, sources, split)
    studies = paired_studies(current, candidate, records, progress)
    populations, not_compared = {}, {}
    for population in current.populations:
        mine = [s for s in studies if s.population == population]
        if not mine:
            continue
        try:
            populations[population] = compare_population(mine, current, policy, target, estimator, resamples)
        except TooFewSiteCases as exc:
            not_compared[population] = str(exc)
    result = {
        "date": datetime.now(UTC).date().isoformat(), "command": command,
        "current": model_identity(current, current_dir), "candidate": model_identity(candidate, candidate_dir),
        "data": [portable_path(Path(s).expanduser().resolve()) for s in sources], "split": split, "n": len(studies),
        "policy": policy, "target": target, "estimator": estimator,
        "populations": populations, "not_compared": not_compared,
        "decision": promotion_decision(populations, not_compared),
        "studies": [study_row(s, populations.get(s.population)) for s in studies],
    }  # fmt: skip
    write_comparison(out, result, studies)
    return result


def read_comparison(report: Path) -> tuple[Path, dict]:
    """A compare report by its folder or its comparison.json; a file that is not one is refused with what to give."""
    path = Path(report) / COMPARISON_JSON if Path(report).is_dir() else Path(report)
    try:
        result = json.loads(path.read_text())
        missing = [key for key in ("date", "current", "candidate", "populations", "decision") if key not in result]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path} is not a report of 'pneumoscan compare' ({type(exc).__name__}): give the folder "
                                 "that compare --out wrote, or its comparison.json") from exc  # fmt: skip
    return path, result


def model_identity(predictor: Predictor, folder: Path) -> dict:
    return {"name": predictor.card["name"], "folder": folder.name, "onnx_sha256": predictor.model_sha256,
            "points_in_force": {p: s.operating_point for p, s in predictor.populations.items()}}  # fmt: skip


def paired_studies(current: Predictor, candidate: Predictor, records: list[Record], progress: bool) -> list[PairedStudy]:
    """Both models' answers on every study, grouped by the current model's routing (or the study's stated population)."""
    by_current = score_site(current, records, progress)
    by_candidate = score_site(candidate, records, progress)
    return [PairedStudy(r, a.population, a, b) for r, a, b in zip(records, by_current, by_candidate, strict=True)]


def check_enough(studies: list[PairedStudy], population: str, policy: str, target: float) -> None:
    short = short_of_minimum([s.record.label for s in studies], policy, target)
    if short:
        have = ", ".join(f"{have} {c.lower()} of the {n} needed" for c, (have, n) in short.items())
        raise TooFewSiteCases(f"too few {population} studies to compare at a site point: {have}")


def compare_population(studies: list[PairedStudy], current: Predictor, policy: str, target: float, estimator: str,
                       resamples: int) -> dict:  # fmt: skip
    """Both models at their site points on one population's studies, and how their decisions differ."""
    population = studies[0].population
    check_enough(studies, population, policy, target)
    labels = np.asarray([s.record.label for s in studies])
    patients = [s.record.patient for s in studies]
    sides, decisions = {}, {}
    for side in ("current", "candidate"):
        logits = np.asarray([getattr(s, side).logit for s in studies])
        calibration = fit_calibration(logits, labels, policy, target, estimator)
        probabilities = calibrated_probability(logits, calibration.temperature)
        decisions[side] = probabilities >= calibration.operating_point.threshold
        sides[side] = {
            "temperature": calibration.temperature, "threshold": calibration.operating_point.threshold,
            "operating_point": calibration.operating_point.name,
            **figures_at(labels, probabilities, patients, calibration.operating_point.threshold, resamples),
            "counts": confusion_counts(labels, decisions[side]),
            "flagged_by_gate": sum(1 for s in studies if getattr(s, side).in_distribution is False),
            "probabilities": probabilities,
        }  # fmt: skip
    in_force = current.populations[population]
    served = calibrated_probability(np.asarray([s.current.logit for s in studies]), in_force.temperature) >= in_force.threshold
    return {
        "n": len(studies), "n_pneumonia": int(labels.sum()), "n_normal": int((labels == 0).sum()), "patients": len(set(patients)),
        **sides,
        "current_at_its_point_in_force": {"operating_point": in_force.operating_point, "threshold": in_force.threshold,
                                          **confusion_counts(labels, served)},
        "auroc_difference": paired_auroc_difference(labels, sides["current"]["probabilities"],
                                                    sides["candidate"]["probabilities"], patients, resamples),
        "mcnemar": mcnemar(decisions["current"] == labels.astype(bool), decisions["candidate"] == labels.astype(bool)),
        "decisions_changed": int((decisions["current"] != decisions["candidate"]).sum()),
    }  # fmt: skip


def confusion_counts(labels: np.ndarray, flagged: np.ndarray) -> dict[str, int]:
    positive = labels == 1
    return {"true_positive": int((flagged & positive).sum()), "false_negative": int((~flagged & positive).sum()),
            "true_negative": int((~flagged & ~positive).sum()), "false_positive": int((flagged & ~positive).sum())}  # fmt: skip


def paired_auroc_difference(labels: np.ndarray, current: np.ndarray, candidate: np.ndarray, patients: list[str],
                            resamples: int, seed: int = 0) -> dict:  # fmt: skip
    """Candidate's AUROC minus the current's, with the 95 % interval of the same patient resamples applied to both."""
    differences = []
    for weights in patient_resamples(patients, resamples, seed):
        chosen = weights > 0
        if len(np.unique(labels[chosen])) < 2:
            continue
        y, w = labels[chosen], weights[chosen]
        differences.append(roc_auc_score(y, candidate[chosen], sample_weight=w) - roc_auc_score(y, current[chosen], sample_weight=w))
    low, high = np.quantile(differences, [0.025, 0.975])
    return {"value": float(roc_auc_score(labels, candidate) - roc_auc_score(labels, current)), "ci": [float(low), float(high)],
            "method": f"percentile bootstrap over patients, {len(differences)} resamples, both models on each resample"}  # fmt: skip


def mcnemar(current_right: np.ndarray, candidate_right: np.ndarray) -> dict:
    """McNemar's exact test: of the studies exactly one model gets right, is the split more uneven than chance?"""
    only_current = int((current_right & ~candidate_right).sum())
    only_candidate = int((~current_right & candidate_right).sum())
    discordant = only_current + only_candidate
    p_value = binomtest(only_candidate, discordant, 0.5).pvalue if discordant else 1.0
    return {"only_current_right": only_current, "only_candidate_right": only_candidate, "p_value": float(p_value),
            "method": "exact (binomial) McNemar test, two-sided, on the decisions at each model's site point"}


def promotion_decision(populations: dict[str, dict], not_compared: dict[str, str]) -> dict:
    """:data:`PROMOTION_RULE` applied: the decision and, for each population, what held and what did not."""
    reasons = []
    for population, entry in populations.items():
        current, candidate = entry["current"]["counts"], entry["candidate"]["counts"]
        low = entry["auroc_difference"]["ci"][0]
        if low <= -AUROC_MARGIN:
            reasons.append(f"{population}: the candidate may rank worse (AUROC difference's interval reaches {low:+.3f})")
        if candidate["false_negative"] > current["false_negative"]:
            reasons.append(f"{population}: the candidate misses {candidate['false_negative']} pneumonias, the current model "
                           f"{current['false_negative']}")  # fmt: skip
        if candidate["true_negative"] < current["true_negative"]:
            reasons.append(f"{population}: the candidate clears {candidate['true_negative']} normal studies, the current "
                           f"model {current['true_negative']}")  # fmt: skip
    if not populations:
        reasons.append("no population has enough studies to compare")
    promote = not reasons
    return {"promote": promote, "decision": "promote" if promote else "do not promote", "rule": PROMOTION_RULE,
            "reasons": reasons, "populations_compared": list(populations), "not_compared": list(not_compared)}  # fmt: skip


def study_row(study: PairedStudy, entry: dict | None) -> dict:
    """One study in comparison.json: its label and both answers (at the site points where its population was compared)."""
    row: dict[str, object] = {"study": where(study.record), "patient": study.record.patient, "label": study.record.class_name,
                              "population": study.population}  # fmt: skip
    for side in ("current", "candidate"):
        answer = getattr(study, side)
        row[f"{side}_logit"] = answer.logit
        row[f"{side}_in_distribution"] = answer.in_distribution
        if entry is not None:
            probability = float(calibrated_probability(answer.logit, entry[side]["temperature"]))
            row[f"{side}_probability"] = probability
            row[f"{side}_flags"] = bool(probability >= entry[side]["threshold"])
    return row


# --------------------------------------------------------------------------- the report


def write_comparison(out: Path, result: dict, studies: list[PairedStudy]) -> None:
    """comparison.json (every figure and every study), one ROC figure per population, and comparison.html."""
    out.mkdir(parents=True, exist_ok=True)
    for population, entry in result["populations"].items():
        labels = np.asarray([s.record.label for s in studies if s.population == population])
        curves = [(f"{side}: {result[side]['name']}", entry[side]["probabilities"], entry[side]) for side in ("current", "candidate")]
        plot_roc_pair(labels, curves, f"{population}: {entry['n']} studies ({entry['n_pneumonia']} pneumonia)",
                      out / f"roc_{population}.png")  # fmt: skip
    for entry in result["populations"].values():
        for side in ("current", "candidate"):
            entry[side]["probabilities"] = [float(p) for p in entry[side].pop("probabilities")]
    (out / COMPARISON_JSON).write_text(json.dumps(result, indent=2) + "\n")
    by_name = {where(s.record): s for s in studies}
    (out / COMPARISON_HTML).write_text(render_comparison(result, by_name))


def render_comparison(result: dict, studies: dict[str, PairedStudy]) -> str:
    current, candidate = (html.escape(result[s]["name"]) for s in ("current", "candidate"))
    decision = result["decision"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{candidate} against {current}</title>",
             f"<style>{STYLE}</style></head><body><h1>Replay: {candidate} against {current}</h1>",
             f"<p>{result['n']} labelled studies of the site ({html.escape(', '.join(result['data']))}, {result['split']}), "
             f"{result['date']}. Each model calibrated on them at {result['target']:.0%} sensitivity ({result['policy']}, "
             f"{result['estimator']}): both points are fitted on the studies they are measured on, alike for both models.</p>",
             f"<p class='decision {'yes' if decision['promote'] else 'no'}'><strong>{decision['decision']}</strong></p>",
             "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in decision["reasons"]) + "</ul>",
             f"<p class='rule'>Rule: {html.escape(decision['rule'])}</p>"]  # fmt: skip
    for population, why in result["not_compared"].items():
        parts.append(f"<p><strong>{population}</strong>: not compared ({html.escape(why)}).</p>")
    for population, entry in result["populations"].items():
        parts.append(population_section(population, entry, result, studies))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def population_section(population: str, entry: dict, result: dict, studies: dict[str, PairedStudy]) -> str:
    rows = []
    for side in ("current", "candidate"):
        f = entry[side]
        rows.append(f"<tr><th>{html.escape(result[side]['name'])}</th><td>{f['auroc']:.4f} ({f['auroc_ci'][0]:.3f}–{f['auroc_ci'][1]:.3f})</td>"
                    f"<td>{f['threshold']:.4f}</td><td>{f['sensitivity']:.3f} ({f['sensitivity_ci'][0]:.3f}–{f['sensitivity_ci'][1]:.3f})</td>"
                    f"<td>{f['specificity']:.3f} ({f['specificity_ci'][0]:.3f}–{f['specificity_ci'][1]:.3f})</td>"
                    f"<td>{f['counts']['false_negative']}</td><td>{f['counts']['false_positive']}</td><td>{f['flagged_by_gate']}</td></tr>")  # fmt: skip
    difference, test, served = entry["auroc_difference"], entry["mcnemar"], entry["current_at_its_point_in_force"]
    changed = [row for row in result["studies"] if row["population"] == population and row["current_flags"] != row["candidate_flags"]]
    return (f"<h2>{population}: {entry['n']} studies, {entry['n_pneumonia']} pneumonia, {entry['patients']} patients</h2>"
            f"<img src='roc_{population}.png' alt='ROC curves of both models, {population}' width='480'>"
            "<table><tr><th>model</th><th>AUROC (95 % CI)</th><th>site threshold</th><th>sensitivity</th><th>specificity</th>"
            "<th>missed</th><th>false alarms</th><th>flagged by its gate</th></tr>" + "".join(rows) + "</table>"
            f"<p>AUROC difference (candidate − current) {difference['value']:+.4f} (95 % CI {difference['ci'][0]:+.4f} to "
            f"{difference['ci'][1]:+.4f}). McNemar: {test['only_current_right']} studies only the current model gets right, "
            f"{test['only_candidate_right']} only the candidate, p = {test['p_value']:.3g}. Today the current model runs at "
            f"{html.escape(served['operating_point'])} (threshold {served['threshold']:.4f}): {served['false_negative']} missed, "
            f"{served['false_positive']} false alarms on these studies.</p>"
            f"<h3>{len(changed)} decisions change</h3>" + changed_table(changed, studies))  # fmt: skip


def changed_table(changed: list[dict], studies: dict[str, PairedStudy]) -> str:
    if not changed:
        return "<p>None.</p>"
    rows = []
    for i, row in enumerate(changed):
        picture = thumbnail(studies[row["study"]].record.path) if i < MAX_THUMBNAILS else ""
        image = f"<img src='{picture}' alt='' width='{THUMBNAIL_SIZE}'>" if picture else ""
        rows.append(f"<tr><td>{image}</td><td>{html.escape(row['study'])}</td><td>{row['label']}</td>"
                    f"<td>{row['current_probability']:.3f} {'flags' if row['current_flags'] else 'clears'}</td>"
                    f"<td>{row['candidate_probability']:.3f} {'flags' if row['candidate_flags'] else 'clears'}</td></tr>")  # fmt: skip
    return ("<table><tr><th></th><th>study</th><th>label</th><th>current</th><th>candidate</th></tr>" + "".join(rows)
            + "</table>")


def thumbnail(path: Path) -> str:
    """A small PNG of the study as a data URI ('' for a file that no longer reads: the row stays)."""
    try:
        image = to_grayscale_image(path)
    except Exception:  # noqa: BLE001 - a thumbnail never stops a report
        return ""
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 70rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; } td, th { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
.decision { font-size: 1.4rem; padding: 0.5rem 1rem; display: inline-block; border-radius: 4px; }
.decision.yes { background: #d9f2d9; } .decision.no { background: #f9dada; } .rule { color: #555; font-size: 0.9rem; }
"""
