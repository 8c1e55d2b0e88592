"""Load on `pneumoscan serve`: POST /api/v1/predictions with a 224×224 JPEG from N concurrent clients.

    python benchmarks/bench_service.py                  # 8 clients, 30 s, writes benchmarks/service_results.md
    python benchmarks/bench_service.py --clients 16 --seconds 60 --precisions int8

Each precision is measured with dynamic batching (the default) and without (``PNEUMOSCAN_BATCH_SIZE=1``: one
image per model call, as before batching), at N clients and at one, beside what the same Predictor scores
in-process on the two cores, one image per call, heat map on (decoding included): the service's ratio to it
is the figure the throughput issue asks for (≥ 0.8).

The server is started by this script on a free port of 127.0.0.1 and stopped at the end; the
load is bounded in time and in requests, and goes nowhere but the loopback address.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become ready")


async def load(base: str, image: bytes, clients: int, seconds: float, max_requests: int) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop and len(latencies) < max_requests:
            start = time.perf_counter()
            response = await http.post(f"{base}/api/v1/predictions", files={"file": ("x.jpeg", image, "image/jpeg")})
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, statuses


def measure(image: bytes, precision: str, clients: int, seconds: float, max_requests: int, batching: bool,
            in_process: float) -> tuple[str, float]:  # fmt: skip
    """One table row and its rate: a fresh server with ``precision``, a warm-up, then the timed load."""
    import os

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = os.environ | ({} if batching else {"PNEUMOSCAN_BATCH_SIZE": "1"})
    with tempfile.TemporaryDirectory() as data_dir:
        cmd = [sys.executable, "-m", "pneumoscan.apps.cli", "serve", "--port", str(port), "--data-dir", data_dir]
        process = subprocess.Popen(cmd + (["--int8"] if precision == "int8" else []), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env)  # fmt: skip
        try:
            wait_ready(base, process)
            asyncio.run(load(base, image, 2, 3, 50))  # warm-up
            start, client_cpu = time.perf_counter(), time.process_time()
            latencies, statuses = asyncio.run(load(base, image, clients, seconds, max_requests))
            elapsed, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    ms = np.asarray(latencies) * 1000
    rate = len(ms) / elapsed
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    return (
        f"| {precision} | {'on' if batching else 'off'} | {clients} | {len(ms)} | {rate:.1f} | {rate / in_process:.2f} | "
        f"{p50:.1f} | {np.percentile(ms, 95):.1f} | {p99:.1f} | {p99 / p50:.2f} | {client_cpu / elapsed:.2f} | {statuses} |"
    ), rate


def in_process_rate(image: bytes, precision: str, seconds: float) -> float:
    """Images per second the Predictor scores in this process on two threads, one image per call, heat map on."""
    from concurrent.futures import ThreadPoolExecutor

    from pneumoscan.inputs.imaging import load_xray
    from pneumoscan.running.inference import Predictor

    predictor = Predictor.load(precision=precision, threads=1)
    predictor.predict_loaded(load_xray(image), heatmap=True)  # warm-up
    stop = time.monotonic() + seconds

    def score_until_stop() -> int:
        done = 0
        while time.monotonic() < stop:
            predictor.predict_loaded(load_xray(image), heatmap=True)
            done += 1
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        done = sum(pool.map(lambda _: score_until_stop(), range(2)))
    return done / (time.perf_counter() - start)


def audit_write_cost(rows: int) -> list[str]:
    """Table rows: the audit log's commits alone, SQLite synchronous=FULL (what the service runs) against NORMAL.

    FULL syncs the write-ahead log at every commit, so an answered prediction survives a power loss;
    NORMAL would lose the commits since the last checkpoint. Same code path as the service (AuditLog.record).
    """
    import uuid

    from pneumoscan.apps.audit import AuditLog, connect, now

    lines = []
    for synchronous in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory() as folder:
            audit = AuditLog(connect(f"sqlite:///{folder}/audit.db", synchronous=synchronous))
            seconds = []
            for _ in range(rows):
                row = {"id": uuid.uuid4().hex, "created_at": now(), "upload_sha256": "0" * 64, "file_type": "jpeg",
                       "model_name": "bench", "model_version": "0", "model_sha256": "0" * 64, "probability": 0.5,
                       "threshold": 0.5, "label": "NORMAL", "in_distribution": True, "ood_score": 1.0}  # fmt: skip
                start = time.perf_counter()
                audit.record(row)
                seconds.append(time.perf_counter() - start)
            audit.engine.dispose()
        ms = np.asarray(seconds) * 1000
        lines.append(f"| {synchronous} | {rows} | {rows / sum(seconds):.0f} | {np.percentile(ms, 50):.2f} | "
                     f"{np.percentile(ms, 99):.2f} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--precisions", default="fp32,int8", help="comma-separated: one fresh server per precision")
    parser.add_argument("--audit-rows", type=int, default=2000, help="commits timed for each SQLite synchronous mode")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "service_results.md")
    args = parser.parse_args()

    from pneumoscan.config import default_data_root
    from pneumoscan.learning.data import list_records

    image = list_records(default_data_root(), "test")[0].path.read_bytes()
    rows, in_process = [], {}
    for precision in args.precisions.split(","):
        in_process[precision] = in_process_rate(image, precision, min(args.seconds, 15))
        print(f"{precision}: in-process {in_process[precision]:.1f} images/s", flush=True)
        for batching in (True, False):
            for clients in (args.clients, 1):
                row, _ = measure(image, precision, clients, args.seconds if clients > 1 else min(args.seconds, 10),
                                 args.max_requests, batching, in_process[precision])  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    text = "\n".join([
        "# Service benchmark",
        "",
        f"Command: `python benchmarks/bench_service.py --clients {args.clients} --seconds {args.seconds:g} "
        f"--precisions {args.precisions}` on {platform.machine()}, 2 cores, {time.strftime('%Y-%m-%d')}: "
        "`POST /api/v1/predictions` with a 224×224 JPEG, client and server on this machine (127.0.0.1), "
        "each answer written to the SQLite audit log; default service settings (2 decoding slots, dynamic batching of up "
        "to 8 images within 5 ms on 2 model workers, 1 ONNX Runtime thread each). In-process: the same Predictor on two "
        "threads, one image per call, heat map on, decoding included: "
        + ", ".join(f"{p} {rate:.1f} images/s" for p, rate in in_process.items()) + f"; CPU: {cpu_name()}.",
        "",
        "| model | batching | clients | requests | requests/s | of in-process | p50 ms | p95 ms | p99 ms | p99 / p50 | "
        "client's cores | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Goals of the throughput issue: at 8 clients ≥ 0.8 of the in-process rate, p99 ≤ 2 × p50, no error; one "
        "client's p50 no more than 1.2 × what it was without batching. The load's client runs on the same two cores "
        "(its share: \"client's cores\", CPU seconds per second), which the in-process figure does not pay.",
        "",
        "## The audit log's durability",
        "",
        f"The same machine and run: {args.audit_rows} audit rows committed one by one to a SQLite file in WAL mode through "
        "`AuditLog.record`, with `synchronous=FULL` (the service's setting since issue 17: every commit is synced, so an "
        "answered prediction's row survives a power loss) and with `NORMAL` (the earlier setting: commits since the last "
        "checkpoint can be lost).",
        "",
        "| synchronous | commits | commits/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
        *audit_write_cost(args.audit_rows),
    ])  # fmt: skip
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
