"""Drift: does replaying a test part raise the warning, and how often does replaying validation images raise it falsely?

    python benchmarks/drift_replay.py --part validation   # false alarms: validation images only
    python benchmarks/drift_replay.py --part test         # the test parts, run once the settings are fixed

Writes ``benchmarks/drift_results.md`` (one section per part). Validation, in three ways:

- *in sample*: the validation images (children and adults) in random orders through the drift monitor of the shipped
  card, judged after every prediction as the service does; a replay raises a false alarm if the warning appears once;
- *out of sample*: the validation patients split in two halves; the reference is built from one half, the other half
  replayed: the reference's own sampling noise is in it, as it is for fresh studies of the same hospitals;
- *through the service*: ``pneumoscan serve`` on 127.0.0.1, every validation image posted once, ``/api/v1/drift`` read
  after each.

Test: Kermany ``test/`` (and the adult test part) in a seeded random order through the service; when the warning
first appears and which indicators.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_test import running_server
from machine import cpu_name

from pneumoscan.config import DEFAULT_MODEL_DIR, PROJECT_ROOT
from pneumoscan.learning.data import Record, records_of, split_in_halves
from pneumoscan.running.drift import (
    DEFAULT_WINDOW,
    DRIFT_THRESHOLD,
    MIN_PREDICTIONS,
    DriftMonitor,
    Observation,
    build_reference,
)
from pneumoscan.running.inference import Predictor

RESULTS = ROOT / "benchmarks" / "drift_results.md"


def observe(predictor: Predictor, records: list[Record]) -> list[Observation]:
    out = []
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        for record, p in zip(chunk, predictor.predict([r.path for r in chunk])):
            out.append(Observation(p.population, p.probability, p.ood_score))
    return out


def replay_alarms(observations: list[Observation], reference: dict, rng: np.random.Generator, every: int = 1) -> tuple[bool, int | None]:
    """One replay in a random order; (warned at least once, after how many predictions it first did)."""
    monitor = DriftMonitor(reference, DEFAULT_WINDOW, DRIFT_THRESHOLD, MIN_PREDICTIONS)
    for n, index in enumerate(rng.permutation(len(observations)), start=1):
        monitor.add(observations[index])
        if n % every == 0 and monitor.figures()["warning"]:
            return True, n
    return False, None


def through_the_service(model: Path, records: list[Record], seed: int) -> dict:
    """Every record posted once in a seeded order; the drift figures read after each answer."""
    order = np.random.default_rng(seed).permutation(len(records))
    first_warning, last = None, {}
    with (tempfile.TemporaryDirectory() as folder, running_server(Path(folder), env={"PNEUMOSCAN_MODEL_DIR": str(model)}) as server,
          httpx.Client(base_url=server.base, timeout=60) as client):  # fmt: skip
        for n, index in enumerate(order, start=1):
            path = records[index].path
            response = client.post("/api/v1/predictions", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
            response.raise_for_status()
            last = client.get("/api/v1/drift").json()
            if last["warning"] and first_warning is None:
                first_warning = {"after": n, "drifted": [(i["name"], i["population"], i["psi"]) for i in last["indicators"] if i["drifted"]]}
    return {"n": len(records), "first_warning": first_warning, "final": last}


def describe(indicators: list[tuple[str, str | None, float | None]]) -> str:
    return ", ".join(f"{name} ({population or 'all'}) {psi}" for name, population, psi in indicators)


def validation_part(model: Path, repeats: int) -> str:
    predictor = Predictor.load(model)
    card = predictor.card
    sources = [PROJECT_ROOT / d["source"] for d in card["data"]["datasets"]]
    split = card["validation"]["split"]
    val = records_of(sources, "val", split["seed"], split["val_fraction"])
    observed = observe(predictor, val)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    in_sample = [replay_alarms(observed, card["drift_reference"], rng) for _ in range(repeats)]
    by_path = {r.path: o for r, o in zip(val, observed)}
    out_of_sample = []
    for seed in range(repeats):
        half_a, half_b = split_in_halves(val, seed)
        reference = build_reference([by_path[r.path] for r in half_a], "half of validation")
        out_of_sample.append(replay_alarms([by_path[r.path] for r in half_b], reference, rng))
    seconds = time.perf_counter() - started
    served = through_the_service(model, val, seed=0)
    rate = lambda runs: sum(w for w, _ in runs) / len(runs)
    final = served["final"]
    return f"""## Validation images: false alarms

{len(val)} validation images ({sum(o.population == 'child' for o in observed)} routed to children, {sum(o.population == 'adult' for o in observed)} to adults),
window {DEFAULT_WINDOW}, PSI threshold {DRIFT_THRESHOLD}, {MIN_PREDICTIONS} predictions of a population before it is judged, judged after every prediction.

| replay | replays | raised the warning at least once |
|---|---|---|
| in sample: all validation images, random order, against the card's reference | {repeats} | {rate(in_sample):.1%} |
| out of sample: half of the validation patients against a reference built from the other half | {repeats} | {rate(out_of_sample):.1%} |
| through `pneumoscan serve`: every validation image posted once (seed 0) | 1 | {'yes, after ' + str(served['first_warning']['after']) if served['first_warning'] else 'no'} |

PSI at the end of the served replay: {describe([(i["name"], i["population"], i["psi"]) for i in final["indicators"]])}.
Replays took {seconds:.0f} s (the monitor alone).
"""


def test_part(model: Path) -> str:
    predictor = Predictor.load(model)
    card = predictor.card
    split = card["validation"]["split"]
    rows = []
    for dataset in card["data"]["datasets"]:
        records = records_of([PROJECT_ROOT / dataset["source"]], "test", split["seed"], split["val_fraction"])
        served = through_the_service(model, records, seed=0)
        warning = served["first_warning"]
        final = served["final"]
        raised = f"yes, after {warning['after']} studies: {describe(warning['drifted'])}" if warning else "no"
        final_psi = describe([(i["name"], i["population"], i["psi"]) for i in final["indicators"]])
        rows.append(f"| {dataset['name']} test part | {served['n']} | {raised} | {final_psi} |")
    return f"""## Test parts, replayed once through `pneumoscan serve` (after the settings were fixed)

| replay | studies | warning raised | PSI at the end (window {DEFAULT_WINDOW}) |
|---|---|---|---|
""" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("validation", "test"), required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    text = validation_part(args.model, args.repeats) if args.part == "validation" else test_part(args.model)
    header = f"# Drift replays\n\nMachine: {platform.machine()}, {cpu_name()}; model `{args.model.name}`.\n"
    previous = RESULTS.read_text() if RESULTS.is_file() else header
    marker = text.splitlines()[0]
    kept = previous.split(marker)[0].rstrip() + "\n\n" if marker in previous else previous.rstrip() + "\n\n"
    RESULTS.write_text(kept + text + f"\nCommand: `python benchmarks/drift_replay.py --part {args.part}`\n")
    print(text)


if __name__ == "__main__":
    main()
