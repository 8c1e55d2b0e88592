"""A site's own operating point: ``pneumoscan calibrate``, and the halves protocol that shows it works.

The ranking of a model travels to a new hospital better than its threshold does.
``calibrate(model, site, out)`` scores the site's labelled studies with the
exported model, fits each population's temperature and threshold on them, and
writes a model folder that reuses the ONNX files unchanged, with a card that says
where the operating point came from (the site set's checksum and counts, the date)
and what it gives on the site set, with patient-bootstrap intervals.
``halves_protocol`` shows whether that transfers: fit on one half of a labelled
set's patients, measure on the other, both ways round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import date as Date
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscan.files import sha256_file
from pneumoscan.config import CLASS_NAMES, portable_path
from pneumoscan.errors import ConfigurationError, InputError, LabelsFileError, TooFewSiteCases
from pneumoscan.learning.data import (
    Record,
    content_checksum,
    dataset_kind,
    labels_file_of,
    site_records,
    split_in_halves,
)
from pneumoscan.learning.evaluation import (
    BOOTSTRAP_RESAMPLES,
    Calibration,
    bootstrap_auroc_ci,
    fit_calibration,
    rates_with_intervals,
    write_evaluation,
)
from pneumoscan.learning.model_card import render_card
from pneumoscan.running.calibration import (
    DEFAULT_ESTIMATOR,
    DEFAULT_POLICY,
    DEFAULT_TARGET_SENSITIVITY,
    calibrated_probability,
)
from pneumoscan.running.drift import Observation, build_reference
from pneumoscan.running.inference import (
    CARD_FILE,
    Predictor,
    batched,
    card_populations,
    read_card,
)

log = logging.getLogger(__name__)

#: Fewest studies of each class a site set needs. 50 normals put a specificity near 0.85 within about ±0.10 (95 %);
#: pneumonias need 1 / (1 − target) as well: below that a 98 % target may miss none, so one case sets the threshold.
MIN_PER_CLASS = 50
#: The sensitivity's interval is called wide (a warning: the threshold is not yet firm) when its lower end lies more than
#: this below the target; for a policy without a target, when it is wider than WIDE_INTERVAL.
SENSITIVITY_MARGIN = 0.03
WIDE_INTERVAL = 0.10
SITE_FOLDER = "site"
#: Files of a model folder that belong to its card, not to the model: rewritten, never copied.
CARD_FILES = (CARD_FILE, "MODEL_CARD.md")
PROTOCOL_SEED = 0
#: The most studies one calibration takes (a site's labelled set is hundreds to a few thousand): a labels file past it is
#: refused before it is read to its end.
MAX_SITE_ROWS = 100_000


def minimum_cases(policy: str, target: float) -> dict[str, int]:
    """Pneumonias and normals a site set needs for ``policy`` (see :data:`MIN_PER_CLASS`)."""
    pneumonia = MIN_PER_CLASS
    if policy == "sensitivity":
        pneumonia = max(pneumonia, math.ceil(1.0 / (1.0 - target) - 1e-9) if target < 1 else 10**9)
    return {"PNEUMONIA": pneumonia, "NORMAL": MIN_PER_CLASS}


def short_of_minimum(labels: list[int], policy: str, target: float) -> dict[str, tuple[int, int]]:
    """Each class with fewer studies than :func:`minimum_cases` asks: (how many there are, how many are needed)."""
    counts = Counter(CLASS_NAMES[label] for label in labels)
    return {c: (counts.get(c, 0), n) for c, n in minimum_cases(policy, target).items() if counts.get(c, 0) < n}


@dataclass(frozen=True)
class SiteStudy:
    """One labelled study of the site as the model saw it."""

    record: Record
    logit: float
    population: str
    in_distribution: bool | None
    ood_score: float | None


def score_site(predictor: Predictor, records: list[Record], progress: bool = True) -> list[SiteStudy]:
    """Every study through the exported model, routed as it would be when served (a stated age wins)."""
    studies: list[SiteStudy] = []
    chunks = list(batched(records, 32))
    for chunk in tqdm(chunks, desc="scoring the site set", unit="batch", disable=not progress):
        for record, prediction in zip(chunk, predict_naming_the_file(predictor, chunk)):
            population = record.population if record.population in predictor.populations else prediction.population
            studies.append(SiteStudy(record, prediction.logit, str(population), prediction.in_distribution, prediction.ood_score))
    return studies


def predict_naming_the_file(predictor: Predictor, records: list[Record]) -> list:
    """Predictions for a chunk; a file that cannot be scored stops the calibration with its path (a label without
    its study would bias the fit silently)."""
    try:
        return predictor.predict([r.path for r in records])
    except InputError:
        for record in records:
            try:
                predictor.predict(record.path)
            except InputError as exc:
                raise InputError(f"{record.relative}: {exc}. Remove it from the site set or replace the file, then run "
                                 "calibrate again") from exc  # fmt: skip
        raise


def fit_population(studies: list[SiteStudy], population: str, policy: str, target: float, on: str,
                   resamples: int = BOOTSTRAP_RESAMPLES, estimator: str = DEFAULT_ESTIMATOR) -> tuple[Calibration, dict]:  # fmt: skip
    """Temperature and threshold of one population on its site studies, and the site figures with intervals.

    Studies the gate flags are left out: they get no verdict when served either.
    """
    mine = [s for s in studies if s.population == population]
    used = [s for s in mine if s.in_distribution is not False]
    needed = minimum_cases(policy, target)
    short = short_of_minimum([s.record.label for s in used], policy, target)
    if short:
        have = ", ".join(f"{have} {c.lower()} of the {n} needed" for c, (have, n) in short.items())
        raise TooFewSiteCases(
            f"the site set has too few {population} studies to set an operating point: {have} "
            f"({len(mine)} {population} studies in all, {len(mine) - len(used)} left out as not validated). "
            f"At least {MIN_PER_CLASS} of each class keep the specificity within about ±0.10"
            + (f", and a {target:.0%} sensitivity target needs {needed['PNEUMONIA']} pneumonias (1 / (1 − target)): with fewer, "
               "it may miss none and the single least certain case sets the threshold" if policy == "sensitivity" else "")
            + ". Label more studies, or calibrate another population with --population."
        )
    logits = np.asarray([s.logit for s in used])
    labels = np.asarray([s.record.label for s in used])
    patients = [s.record.patient for s in used]
    fitted = fit_calibration(logits, labels, policy, target, estimator)
    calibration = Calibration(fitted.temperature, dataclasses.replace(fitted.operating_point, name=site_point_name(fitted.operating_point.name, on)))
    probabilities = calibrated_probability(logits, calibration.temperature)
    figures = {**figures_at(labels, probabilities, patients, calibration.operating_point.threshold, resamples),
               "left_out_not_validated": len(mine) - len(used)}
    warnings = []
    low, high = figures["sensitivity_ci"]
    if (low < target - SENSITIVITY_MARGIN) if policy == "sensitivity" else (high - low > WIDE_INTERVAL):
        warnings.append(f"{population}: the sensitivity's 95 % interval on the site set is wide ({low:.3f}–{high:.3f}, "
                        f"{figures['n_pneumonia']} pneumonias); label more pneumonia studies for a firmer threshold")  # fmt: skip
    figures["warnings"] = warnings
    return calibration, figures


def figures_at(labels: np.ndarray, probabilities: np.ndarray, patients: list[str], threshold: float, resamples: int) -> dict:
    """Counts, AUROC, sensitivity and specificity at ``threshold``, each rate with its patient-bootstrap interval."""
    from sklearn.metrics import roc_auc_score

    return {
        "n": len(labels), "n_pneumonia": int(labels.sum()), "n_normal": int((labels == 0).sum()), "patients": len(set(patients)),
        "auroc": float(roc_auc_score(labels, probabilities)),
        "auroc_ci": list(bootstrap_auroc_ci(labels, probabilities, patients, resamples)),
        **rates_with_intervals(labels, probabilities, threshold, patients, resamples),
    }  # fmt: skip


def site_point_name(validation_name: str, on: str) -> str:
    """'98% sensitivity on validation' -> '98% sensitivity on the site set of 2026-11-23'."""
    return validation_name.replace("on validation", f"on {on}") if "on validation" in validation_name else f"{validation_name}, {on}"


def calibrated_card(
    card: dict, studies: list[SiteStudy], populations: list[str], policy: str, target: float, today: str,
    provenance: dict, resamples: int = BOOTSTRAP_RESAMPLES, estimator: str = DEFAULT_ESTIMATOR, required: bool = True,
) -> tuple[dict, dict[str, Calibration]]:
    """A copy of ``card`` whose ``populations`` use the site's temperature and threshold, with where they came from.

    ``required`` False: a population with too few studies keeps its validation point, and the card says why with
    the counts (``site_calibration.kept_validation_point``); only none calibrated at all is an error.
    """
    card = copy.deepcopy(card)
    entries = card_populations(card)
    on = f"the site set of {today}"
    calibrations: dict[str, Calibration] = {}
    kept: dict[str, str] = {}
    for population in populations:
        try:
            calibration, figures = fit_population(studies, population, policy, target, on, resamples, estimator)
        except TooFewSiteCases as exc:
            if required:
                raise
            kept[population] = str(exc)
            continue
        calibrations[population] = calibration
        entry = entries[population]
        entry.setdefault("validation_operating_point", {  # the first calibration's is kept through later ones
            "calibration": entry["calibration"], "operating_point": entry["operating_point"],
        })
        entry["calibration"] = {"method": f"temperature scaling fitted on {on} (NLL)", "temperature": calibration.temperature}
        entry["operating_point"] = {**calibration.operating_point.to_dict(), "source": "site", "date": today}
        entry["site"] = {"date": today, "set_sha256": provenance["set_sha256"], "figures": figures,
                         "note": "figures on the studies the threshold was set on: see the halves protocol for how it transfers"}  # fmt: skip
    if not calibrations:
        raise TooFewSiteCases("no population has enough studies to set a site operating point: " + "; ".join(kept.values()))
    temperatures = {p: e["calibration"]["temperature"] for p, e in entries.items()}
    observations = [
        Observation(s.population, float(calibrated_probability(s.logit, temperatures[s.population])), s.ood_score)
        for s in studies if s.population in temperatures
    ]
    reference = build_reference(observations, f"{on} ({len(observations)} studies)")
    previous = card.get("drift_reference") or {}
    for population in entries:  # a population the site did not calibrate (too few studies too) keeps its reference
        if population not in calibrations and population in (previous.get("populations") or {}):
            reference["populations"][population] = previous["populations"][population]
    card["drift_reference"] = reference
    card["site_calibration"] = {**provenance, "date": today, "populations": list(calibrations), "policy": policy, "target": target,
                                "estimator": estimator, "kept_validation_point": kept}
    return card, calibrations


def site_provenance(sources: list[Path], split: str, records: list[Record], studies: list[SiteStudy]) -> dict:
    """What the card says about the site set: the sources, its checksum and its counts per population and class."""
    data = []
    for source in sources:
        source = Path(source).expanduser().resolve()
        entry: dict[str, object] = {"source": portable_path(source), "split": split}
        if dataset_kind(source) != "folder":
            entry["labels_file_sha256"] = sha256_file(labels_file_of(source))
        data.append(entry)
    counts: dict[str, dict[str, int]] = {}
    for study in studies:
        counts.setdefault(study.population, {c: 0 for c in CLASS_NAMES})[CLASS_NAMES[study.record.label]] += 1
    return {"data": data, "set_sha256": content_checksum(records, with_labels=True), "checksum_method": "sha256 over sorted lines "
            "'<dataset>/<relative path> <label> <sha256 of file>'", "counts": counts, "n": len(records)}  # fmt: skip


def calibrate(
    model_dir: Path, sources: list[Path], out: Path, *, split: str = "all", policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY, population: str | None = None, name: str | None = None,
    command: str | None = None, today: str | None = None, resamples: int = BOOTSTRAP_RESAMPLES, progress: bool = True,
    estimator: str = DEFAULT_ESTIMATOR,
) -> dict:
    """Fit the site's operating point and write the model folder ``out``; return its card.

    Every population with enough studies in the site set is calibrated, the others keep their validation
    point (the card says so with the counts); ``population`` given: only that one, and too few of its studies
    is refused with the counts. The ONNX files, gates and population classifier are copied unchanged.
    """
    model_dir, out = Path(model_dir), Path(out)
    check_new_folder(out, model_dir)
    predictor = Predictor.load(model_dir)
    if population is not None and population not in predictor.populations:
        raise ConfigurationError(f"{model_dir.name} has no population {population!r} (it has {', '.join(predictor.populations)})")
    records = site_set(predictor, sources, split)
    studies = score_site(predictor, records, progress)
    provenance = site_provenance(list(sources), split, records, studies)
    return write_site_model(predictor, studies, out, provenance, policy=policy, target=target, population=population,
                            name=name, command=command, today=today, resamples=resamples, estimator=estimator)


def write_site_model(
    predictor: Predictor, studies: list[SiteStudy], out: Path, provenance: dict, *, policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY, population: str | None = None, name: str | None = None,
    command: str | None = None, today: str | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
    estimator: str = DEFAULT_ESTIMATOR,
) -> dict:
    """The site model folder from already-scored studies (images scored now, or answers read back from the audit log).

    ``population`` given: that one must be calibrated; else every population with enough studies is, and the
    others keep their validation point.
    """
    model_dir, out = Path(predictor.model_dir), Path(out)
    check_new_folder(out, model_dir)
    populations = [population] if population else sorted({s.population for s in studies}, key=list(predictor.populations).index)
    today = today or Date.today().isoformat()
    provenance = {**provenance, "command": command,
                  "base_model": {"name": predictor.card["name"], "folder": model_dir.name, "onnx_sha256": predictor.model_sha256}}
    card, calibrations = calibrated_card(predictor.card, studies, populations, policy, target, today, provenance, resamples,
                                         estimator, required=population is not None)  # fmt: skip
    card["name"] = name or out.name
    copy_model_files(model_dir, out)
    for population_name, calibration in calibrations.items():
        chosen = [s for s in studies if s.population == population_name]
        write_evaluation(out / SITE_FOLDER / population_name, [s.record for s in chosen], np.asarray([s.logit for s in chosen]),
                         calibration, "site", None, f"{card['name']} ({population_name}, site set)",
                         protocol=SITE_PROTOCOL_TEXT)  # fmt: skip
    write_card(out, card)
    return card


def check_new_folder(out: Path, model_dir: Path) -> None:
    """``--out`` is a new (or empty) folder: calibrate never writes over a model, its own or another's."""
    if out.resolve() == model_dir.resolve():
        raise ConfigurationError("--out must be a new folder: the model calibrated on validation stays as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        holds = "a model" if (out / CARD_FILE).exists() or any(out.glob("*.onnx")) else "files"
        raise ConfigurationError(f"--out {out} already holds {holds}: give a new folder (calibrate never overwrites one)")


def site_set(predictor: Predictor, sources: list[Path], split: str) -> list[Record]:
    """The site's labelled studies, each once, with one label (see :func:`each_study_once`)."""
    split_settings = predictor.card["validation"]["split"]
    records = site_records(list(sources), split, split_settings["seed"], split_settings["val_fraction"], MAX_SITE_ROWS)
    return each_study_once(records)


def each_study_once(records: list[Record]) -> list[Record]:
    """A study listed twice (by the same path, or another file with the same bytes) counts once; with two labels, refused.

    One normal and one pneumonia film listed 60 times each would pass the 50-per-class minimum and set
    a threshold from two images; a file labelled both ways has no label at all.
    """
    first_of: dict[str, Record] = {}
    digest_of: dict[Path, str] = {}
    kept: list[Record] = []
    for record in records:
        if record.path not in digest_of:  # a path listed 100,000 times is read once
            digest_of[record.path] = sha256_file(record.path)
        first = first_of.setdefault(digest_of[record.path], record)
        if first is record:
            kept.append(record)
        elif first.label != record.label:
            raise LabelsFileError(f"{where(first)} and {where(record)} are the same image, labelled {first.class_name} and "
                                  f"{record.class_name}: give it one label, then run again")  # fmt: skip
    if len(kept) < len(records):
        log.warning("%d rows of the site set repeat a study listed before (the same file, or the same bytes): each study "
                    "is counted once (%d studies)", len(records) - len(kept), len(kept))  # fmt: skip
    return kept


def where(record: Record) -> str:
    return f"{record.relative} (line {record.line})" if record.line else record.relative


SITE_PROTOCOL_TEXT = (
    "the temperature and the threshold were fitted on these very studies (the site set), so these figures show the "
    "fit, not how it transfers; the halves protocol (docs/site-calibration.md) measures that. The AUROC interval "
    "resamples patients."
)


def copy_model_files(model_dir: Path, out: Path) -> None:
    """The model's own files, byte for byte (their sha256 stay the card's); the card and its reports are not copied."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in CARD_FILES:
            shutil.copy2(path, out / path.name)


def write_card(out: Path, card: dict) -> None:
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(render_card(card))


# --------------------------------------------------------------------------- the halves protocol


def halves_protocol(
    model_dir: Path, sources: list[Path], *, split: str = "test", population: str, policy: str = DEFAULT_POLICY,
    target: float = DEFAULT_TARGET_SENSITIVITY, seed: int = PROTOCOL_SEED, resamples: int = BOOTSTRAP_RESAMPLES,
    progress: bool = True, estimator: str = DEFAULT_ESTIMATOR,
) -> dict:
    """Calibrate on one half of the patients, measure on the other, and the other way round; both are returned.

    The measuring half is scored at the fitted threshold over all its studies of the
    population (flagged ones too, as ``evaluate`` does).
    """
    predictor = Predictor.load(model_dir)
    records = site_set(predictor, sources, split)
    studies = [s for s in score_site(predictor, records, progress) if s.population == population]
    halves = split_in_halves([s.record for s in studies], seed)
    by_path = {s.record.path: s for s in studies}
    directions = []
    for name, (fit_half, measure_half) in (("A → B", halves), ("B → A", halves[::-1])):
        fit_studies, measured = [by_path[r.path] for r in fit_half], [by_path[r.path] for r in measure_half]
        calibration, fit_figures = fit_population(fit_studies, population, policy, target, "half", resamples, estimator)
        logits = np.asarray([s.logit for s in measured])
        labels = np.asarray([s.record.label for s in measured])
        patients = [s.record.patient for s in measured]
        probabilities = calibrated_probability(logits, calibration.temperature)
        validation_threshold = predictor.populations[population].threshold
        validation_probabilities = calibrated_probability(logits, predictor.populations[population].temperature)
        directions.append({
            "direction": name,
            "fitted_on": {"n": fit_figures["n"], "patients": fit_figures["patients"], "n_pneumonia": fit_figures["n_pneumonia"],
                          "temperature": calibration.temperature, "threshold": calibration.operating_point.threshold,
                          "sensitivity_on_fit_half": fit_figures["sensitivity"]},
            "measured_on": figures_at(labels, probabilities, patients, calibration.operating_point.threshold, resamples),
            "validation_threshold_on_the_same_half": rates_with_intervals(
                labels, validation_probabilities, validation_threshold, patients, resamples),
        })
    return {
        "model": predictor.card["name"], "model_onnx_sha256": predictor.model_sha256, "population": population,
        "data": [portable_path(Path(s).expanduser().resolve()) for s in sources], "split": split,
        "kinds": [dataset_kind(Path(s).expanduser().resolve()) for s in sources],
        "halves": {"seed": seed, "by": "patient, stratified by whether a patient has any pneumonia image",
                   "patients": [len({r.patient for r in h}) for h in halves], "images": [len(h) for h in halves]},
        "policy": policy, "target": target, "estimator": estimator, "directions": directions,
    }


def record_protocol(model_dir: Path, result: dict) -> None:
    """Keep a protocol's figures in the model's card (``site_protocol``, one entry per population) and re-render it."""
    card = read_card(model_dir)
    card.setdefault("site_protocol", {})[result["population"]] = result
    write_card(Path(model_dir), card)
