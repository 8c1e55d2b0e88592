"""What the issue-27 attacks cost: the loader, the server, the DICOM node, pull mode and calibrate, before and after.

    python benchmarks/bench_hostile_input.py                      # this checkout; table to stdout
    PYTHONPATH=OTHER_CHECKOUT/src python benchmarks/bench_hostile_input.py   # another version, same attacks

Each attack runs against a fresh process (the loader in a subprocess, `pneumoscan serve`, `pneumoscan
dicom-node`, pull mode in a subprocess, `pneumoscan calibrate`) on 127.0.0.1, started here; memory is
the growth of that process's peak resident memory (VmHWM) over its own value after a warm-up. Pull
mode is stopped after 90 s if it has not ended (the goal: it ends by itself within 90 s). The hostile
DICOMweb server is the tests' own (tests/hostile_dicomweb.py); every loop of it is bounded.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_hardening import peak_mb, print_results  # noqa: E402
from dicom_factory import (  # noqa: E402
    JPEG_2000_LOSSLESS,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    large_dicom,
    radiograph_dataset,
    write_huge_dicom,
)

PULL_BOUND_SECONDS = 90
Row = tuple[str, str, str]  # attack, outcome, cost


def python_env() -> dict[str, str]:
    return dict(os.environ)


# --------------------------------------------------------------------------- the loader


def loader_growth(data: bytes) -> tuple[str, float]:
    script = (
        "import sys\n"
        "def hwm():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])\n"
        "from pneumoscan.errors import InputError\n"
        "from pneumoscan.inputs.imaging import load_xray\n"
        "import pydicom.pixels, numpy\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "base = hwm()\n"
        "try:\n"
        "    image = load_xray(data).image; outcome = f'decoded {image.width}×{image.height}'\n"
        "except InputError as e:\n"
        "    outcome = type(e).__name__\n"
        "print(outcome, (hwm() - base) / 1024)\n"
    )
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        out = subprocess.run([sys.executable, "-c", script, handle.name], capture_output=True, text=True, timeout=300,
                             env=python_env()).stdout.split()  # fmt: skip
    return " ".join(out[:-1]), float(out[-1])


def loader_attacks() -> list[Row]:
    cases = [("JPEG 2000", 6000, 6600, JPEG_2000_LOSSLESS), ("RLE", 6000, 6600, RLE_LOSSLESS), ("JPEG-LS", 6000, 6600, JPEG_LS_LOSSLESS),
             ("uncompressed", 5600, 5600, None), ("JPEG 2000", 5744, 5222, JPEG_2000_LOSSLESS), ("RLE", 5744, 5222, RLE_LOSSLESS),
             ("JPEG-LS", 5744, 5222, JPEG_LS_LOSSLESS), ("uncompressed", 5477, 5477, None)]  # fmt: skip
    rows = []
    for name, width, height, syntax in cases:
        data = large_dicom(width, height, syntax)
        outcome, growth = loader_growth(data)
        rows.append((f"loader: {name} {width}×{height} 16-bit ({width * height / 1e6:.1f} M pixels, {len(data) / 1e6:.1f} MB)",
                     outcome, f"+{growth:.0f} MB"))  # fmt: skip
    return rows


# --------------------------------------------------------------------------- the server


def server_attacks(folder: Path) -> list[Row]:
    from load_test import running_server

    rows = []
    warm = large_dicom(256, 256, JPEG_2000_LOSSLESS)
    for width, height in ((6000, 6600), (5744, 5222)):
        data = large_dicom(width, height, JPEG_2000_LOSSLESS)
        with running_server(folder / f"service-{width}") as server:
            for _ in range(2):
                httpx.post(f"{server.base}/api/v1/predictions", files={"file": ("w.dcm", warm, "application/dicom")}, timeout=60)
            before = peak_mb(server.process.pid)
            answer = httpx.post(f"{server.base}/api/v1/predictions", files={"file": ("x.dcm", data, "application/dicom")}, timeout=300)
            rows.append((f"server: one upload, JPEG 2000 {width}×{height} ({len(data) / 1e6:.1f} MB)",
                         f"{answer.status_code} {answer.json().get('error', '')}".strip(), f"+{peak_mb(server.process.pid) - before:.0f} MB"))
    return rows


# --------------------------------------------------------------------------- the DICOM node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def node_process(folder: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {**python_env(), "PNEUMOSCAN_ALLOWED_CALLING_AES": "MODALITY"}
    node = subprocess.Popen([sys.executable, "-m", "pneumoscan", "dicom-node", "--port", str(port), "--data-dir", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        assert node.stdout.readline().startswith("pneumoscan DICOM node")
        yield node, port
    finally:
        node.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.communicate(timeout=60)
        if node.poll() is None:
            node.kill()


def c_store(port: int, datasets: list, chunked: bool = False) -> list[str]:  # type: ignore[type-arg]
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, StoragePresentationContexts, _config
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    ae = AE(ae_title="MODALITY")
    if chunked:
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    else:
        ae.requested_contexts = StoragePresentationContexts
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    try:
        association = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
        if not association.is_established:
            return ["association rejected"]
        answers = []
        for dataset in datasets:
            status = association.send_c_store(dataset)
            answers.append(f"0x{int(status.Status):04X}" if status else "no answer (aborted)")
        association.release()
        return answers
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def echo_seconds(port: int, bound: float = 40.0) -> tuple[str, float]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    started = time.monotonic()
    tries = 0
    while time.monotonic() - started < bound:
        tries += 1
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        association = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
        if association.is_established:
            association.send_c_echo()
            association.release()
            return f"C-ECHO answered after {tries} tries", time.monotonic() - started
        time.sleep(0.5)
    return "C-ECHO never answered", time.monotonic() - started


def audit_rows(folder: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(folder / "pneumoscan.db") as db:
        return list(db.execute("select outcome, coalesce(reason, '') from dicom_instances order by received_at"))


def wait_rows(folder: Path, n: int, bound: float = 60.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            if len(rows := audit_rows(folder)) >= n:
                return rows
        time.sleep(0.2)
    return audit_rows(folder)


def node_attacks(folder: Path, film: Path) -> list[Row]:
    rows = []
    huge = write_huge_dicom(folder / "huge.dcm")
    with node_process(folder / "n1") as (node, port):
        c_store(port, [radiograph_dataset(film, size=512)])
        time.sleep(3)
        before = peak_mb(node.pid)
        statuses = c_store(port, [huge], chunked=True)
        time.sleep(2)
        rows.append(("node: one 400 MB instance (C-STORE, streamed by the sender)", f"status {statuses[0]}",
                     f"+{peak_mb(node.pid) - before:.0f} MB"))  # fmt: skip
    huge.unlink()
    with node_process(folder / "n2") as (node, port):
        idle = []
        for _ in range(50):
            connection = socket.socket()
            connection.bind(("127.0.0.2", 0))
            connection.connect(("127.0.0.1", port))
            idle.append(connection)
        time.sleep(0.5)
        outcome, seconds = echo_seconds(port)
        rows.append(("node: 50 idle TCP connections (from 127.0.0.2), then a listed sender's C-ECHO", outcome, f"{seconds:.1f} s"))
        for connection in idle:
            connection.close()
    with node_process(folder / "n3") as (node, port):
        hand = radiograph_dataset(film, body_part="HAND", modality="CR")
        chest = radiograph_dataset(film)
        chest.SOPInstanceUID = chest.file_meta.MediaStorageSOPInstanceUID = hand.SOPInstanceUID
        c_store(port, [hand])
        wait_rows(folder / "n3", 1)
        c_store(port, [chest])
        outcomes = [outcome for outcome, _ in wait_rows(folder / "n3", 2)]
        rows.append(("node: a HAND CR, then the chest DX with the same SOP Instance UID", " → ".join(outcomes), ""))
    with node_process(folder / "n4") as (node, port):
        odd = radiograph_dataset(film)
        odd.PatientSex = "Q"
        c_store(port, [odd])
        (outcome, reason), = wait_rows(folder / "n4", 1)[:1]
        results = len(list((folder / "n4" / "dicom" / "outbox").glob("*/*.dcm")))
        rows.append(("node: PatientSex 'Q'", f"{outcome}, {results} result objects", reason[:80]))
    return rows


# --------------------------------------------------------------------------- pull mode


PULL = (
    "import sys\n"
    "from datetime import date\n"
    "from pathlib import Path\n"
    "try:\n"
    "    import pneumoscan.apps.dicom.pull as pull_mode\n"
    "except ImportError:  # before issue 27 the module was apps/dicomweb_pull.py\n"
    "    import pneumoscan.apps.dicomweb_pull as pull_mode\n"
    "import requests, numpy\n"
    "print('ready', flush=True); sys.stdin.readline()\n"
    "try:\n"
    "    pulled = pull_mode.pull(sys.argv[1], date(2026, 1, 1), Path(sys.argv[2]), progress=False)\n"
    "    print(f'ended: {pulled.fetched} fetched, {len(getattr(pulled, \"failures\", []))} failure rows', flush=True)\n"
    "except Exception as exc:\n"
    "    print(f'ended: {type(exc).__name__}', flush=True)\n"
)


def pull_attack(mode: str, folder: Path, good: bytes, trickle: float = 20.0) -> Row:
    from hostile_dicomweb import HostileDicomweb

    server = HostileDicomweb(mode, good_instance=good, trickle_seconds=trickle).start()
    process = subprocess.Popen([sys.executable, "-c", PULL, server.url, str(folder / mode)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=python_env())  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "ready"
        before = peak_mb(process.pid)
        started = time.monotonic()
        process.stdin.write("\n")
        process.stdin.flush()
        peak = before
        while process.poll() is None and time.monotonic() - started < PULL_BOUND_SECONDS:
            with contextlib.suppress(OSError, StopIteration):
                peak = peak_mb(process.pid)
            time.sleep(0.2)
        seconds = time.monotonic() - started
        if process.poll() is None:
            process.kill()
            outcome = f"still running after {PULL_BOUND_SECONDS} s ({server.requests} requests); stopped"
        else:
            outcome = (process.stdout.read().strip().splitlines() or ["ended"])[-1].removeprefix("ended: ")
            outcome += f" in {seconds:.0f} s, {server.requests} requests"
    finally:
        server.stop()
    return (f"pull: {mode}" + (f" (1 byte every {trickle:.0f} s)" if "trickle" in mode else ""), outcome, f"+{peak - before:.0f} MB")


# --------------------------------------------------------------------------- calibrate


def calibrate_attack(folder: Path, data_root: Path) -> Row:
    import shutil

    from pneumoscan.learning.data import list_records

    records = list_records(data_root, "train")
    site = folder / "site"
    site.mkdir()
    for record in (next(r for r in records if r.label == 0), next(r for r in records if r.label == 1)):
        shutil.copy(record.path, site / f"{record.class_name.lower()}.jpeg")
    (site / "labels.csv").write_text("path,label\n" + "normal.jpeg,NORMAL\npneumonia.jpeg,PNEUMONIA\n" * 60)
    result = subprocess.run([sys.executable, "-m", "pneumoscan", "calibrate", "--data", str(site / "labels.csv"),
                             "--out", str(folder / "calibrated")], capture_output=True, text=True, timeout=600, env=python_env())  # fmt: skip
    said = (result.stderr.strip().splitlines() or [""])[-1][:120]
    return ("calibrate: one normal and one pneumonia film, each listed 60 times", f"exit {result.returncode}", said)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="loader,server,node,pull,calibrate", help="which attacks (comma-separated)")
    chosen = parser.parse_args().steps.split(",")
    from pneumoscan.config import default_data_root

    data_root = default_data_root()
    film = next((data_root / "test" / "PNEUMONIA").iterdir())
    good = io.BytesIO()
    radiograph_dataset(film).save_as(good, enforce_file_format=True)
    rows: list[Row] = []
    steps: dict[str, Callable[[Path], list[Row]]] = {
        "loader": lambda folder: loader_attacks(),
        "server": lambda folder: server_attacks(folder),
        "node": lambda folder: node_attacks(folder, film),
        "pull": lambda folder: [pull_attack(mode, folder, good.getvalue())
                                for mode in ("endless", "huge", "endless-chunked", "trickle", "malformed")],
        "calibrate": lambda folder: [calibrate_attack(folder, data_root)],
    }
    for step in (steps[name] for name in chosen):
        with tempfile.TemporaryDirectory() as folder:
            rows += step(Path(folder))
            print(f"... {rows[-1]}", file=sys.stderr, flush=True)
    import pneumoscan

    print_results("python benchmarks/bench_hostile_input.py", f"the code of {Path(pneumoscan.__file__).parent}; every "
                  "process on 127.0.0.1, started here", ("attack", "outcome", "cost"), rows)  # fmt: skip


if __name__ == "__main__":
    main()
