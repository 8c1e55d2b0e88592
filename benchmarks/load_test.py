"""Load test of `pneumoscan serve`: valid X-rays (JPEG, PNG, DICOM) mixed with bad uploads.

    python benchmarks/load_test.py                          # 16 clients, 60 s, writes docs/reliability.md
    python benchmarks/load_test.py --clients 16 --seconds 10 --out -   # a short run, table to stdout

The server is started here on a free port of 127.0.0.1 with its own SQLite
audit log, and stopped with SIGTERM at the end. The load is bounded in time and
in requests and goes nowhere but the loopback address. It checks, and reports:
no 5xx, no dropped connection, one audit row per 201 answer, and the growth of
the server's resident memory between the first and the last tenth of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"


@dataclass
class Server:
    base: str
    process: subprocess.Popen
    data_dir: Path
    log: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "pneumoscan.db"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")


@contextlib.contextmanager
def running_server(data_dir: Path, *extra: str, ready_timeout: float = 60, env: dict[str, str] | None = None,
                   preexec_fn=None) -> Iterator[Server]:  # type: ignore[no-untyped-def]  # fmt: skip
    """``pneumoscan serve`` on a free port; its output goes to a file (a pipe could fill and block it).

    ``env`` adds ``PNEUMOSCAN_*`` settings to the server's environment; ``preexec_fn`` runs in the child before it starts.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "server.log"
    with log.open("w") as output:
        command = [sys.executable, "-m", "pneumoscan.apps.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   preexec_fn=preexec_fn)  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, data_dir, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def workload(limit: int = 40) -> dict[str, list[tuple[str, bytes]]]:
    """Uploads by kind: test-set X-rays as JPEG, PNG and DICOM, and bad uploads from the committed corpus."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dicom_factory import build_dicom

    from pneumoscan.config import default_data_root
    from pneumoscan.learning.data import list_records

    paths = [r.path for r in list_records(default_data_root(), "test")][::15][:limit]
    pngs = []
    for path in paths:
        buffer = io.BytesIO()
        Image.open(path).convert("L").save(buffer, format="PNG")
        pngs.append((path.stem + ".png", buffer.getvalue()))
    manifest = json.loads((CORPUS / "bad_uploads.json").read_text())
    bad = [(c["file"], (CORPUS / "bad_uploads" / c["file"]).read_bytes()) for c in manifest if "file" in c]
    return {
        "jpeg": [(p.name, p.read_bytes()) for p in paths],
        "png": pngs,
        "dicom": [(p.stem + ".dcm", build_dicom(p, bits=12)) for p in paths[:10]],
        "bad": bad,
    }


#: Share of requests per kind: mostly X-rays, a steady trickle of bad uploads.
MIX = {"jpeg": 0.45, "png": 0.2, "dicom": 0.15, "bad": 0.2}


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)  # ids of 201 answers
    dropped: int = 0

    def add(self, kind: str, seconds: float, status: int) -> None:
        self.latencies.setdefault(kind, []).append(seconds)
        counts = self.statuses.setdefault(kind, {})
        counts[status] = counts.get(status, 0) + 1


async def drive(base: str, uploads: dict[str, list[tuple[str, bytes]]], clients: int, seconds: float,
                max_requests: int, tally: Tally, seed: int = 0) -> None:  # fmt: skip
    """``clients`` closed-loop clients for ``seconds`` (or until ``max_requests``), each upload drawn from MIX."""
    stop = time.monotonic() + seconds
    kinds, weights = list(MIX), np.array(list(MIX.values()))
    sent = 0

    async def client(http: httpx.AsyncClient, rng: np.random.Generator) -> None:
        nonlocal sent
        while time.monotonic() < stop and sent < max_requests:
            sent += 1
            kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
            name, data = uploads[kind][rng.integers(len(uploads[kind]))]
            start = time.perf_counter()
            try:
                response = await http.post(f"{base}/api/v1/predictions", files={"file": (name, data, "application/octet-stream")})
            except httpx.TransportError:
                tally.dropped += 1
                continue
            tally.add(kind, time.perf_counter() - start, response.status_code)
            if response.status_code == 201:
                tally.created.append(response.json()["id"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http, np.random.default_rng(seed + i)) for i in range(clients)))


def audit_rows(database: Path) -> tuple[int, str]:
    """Rows in the audit log, and SQLite's integrity check."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return (connection.execute("select count(*) from predictions").fetchone()[0],
                connection.execute("pragma integrity_check").fetchone()[0])  # fmt: skip


def run_load(clients: int = 16, seconds: float = 60, max_requests: int = 50_000, precision: str = "fp32") -> dict:
    """One bounded load run against a fresh server; every figure the reliability report quotes."""
    uploads = workload()
    tally = Tally()
    rss: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), *(["--int8"] if precision == "int8" else [])) as server:
        done = threading.Event()

        def sample_memory() -> None:
            start = time.monotonic()
            while not done.is_set():
                rss.append((time.monotonic() - start, server.rss_mb()))
                done.wait(1.0)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        asyncio.run(drive(server.base, uploads, 2, 2, 40, Tally()))  # warm-up, not counted
        rows_before, _ = audit_rows(server.database)
        sampler.start()
        started = time.perf_counter()
        asyncio.run(drive(server.base, uploads, clients, seconds, max_requests, tally))
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=30)
        rows, integrity = audit_rows(server.database)
        rows -= rows_before
    window = max(1, len(rss) // 10)
    first, last = np.mean([m for _, m in rss[:window]]), np.mean([m for _, m in rss[-window:]])
    statuses = [s for kind in tally.statuses.values() for s in kind.items()]
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "precision": precision,
        "requests": sum(len(v) for v in tally.latencies.values()),
        "requests_per_second": sum(len(v) for v in tally.latencies.values()) / elapsed,
        "by_kind": {
            kind: {
                "requests": len(values),
                "p50_ms": float(np.percentile(values, 50) * 1000),
                "p95_ms": float(np.percentile(values, 95) * 1000),
                "p99_ms": float(np.percentile(values, 99) * 1000),
                "statuses": {str(k): v for k, v in sorted(tally.statuses[kind].items())},
            }
            for kind, values in sorted(tally.latencies.items())
        },
        "server_errors": sum(count for status, count in statuses if status >= 500),
        "dropped_connections": tally.dropped,
        "created": len(tally.created),
        "audit_rows": rows,
        "sqlite_integrity": integrity,
        "rss_first_mb": float(first),
        "rss_last_mb": float(last),
        "rss_growth": float(last / first - 1.0),
        "server_exit_code": exit_code,
    }


OTHER_CHECKS = """
## What the other reliability tests check (all run by `make test`)

| test | what it asserts |
|---|---|
| `tests/test_fuzz.py` | Hypothesis (derandomised): arbitrary bytes, arbitrary bytes behind every known file signature, and valid JPEG/PNG/DICOM (uncompressed and RLE) files mutated by bit flips, truncation, insertions and overwritten length fields (150 examples per property) only ever give a decoded 8-bit image or a typed `InputError`. DICOM *structure* (400 examples on the loader, 25 runs of 1–4 files through `predict` and `triage`, 120 uploads to the service): VR bytes (valid and arbitrary), value multiplicity, value types, length fields, short or long element headers, nested sequences of defined and undefined length down to six levels, dropped, repeated and reordered elements: the loader gives an image or a typed error, `predict` and `triage` give every file its record and finish, the service never answers 5xx. On the code before issue 17 this fuzzer found an escaping `BytesLengthException` at once. Headers claiming 100000×100000, 2³¹×1, 65535×65535 or 0×0 pixels, and DICOM bombs with an honest 96×96 header (JPEG, JPEG-LS and JPEG 2000 codestreams declaring 25000×25000; a deflated dataset inflating to 300 MB) are refused before decoding, in a fresh process whose peak memory grows by less than 100 MB. |
| `tests/test_codestream.py` | Each codec (Pillow's JPEG, pyjpegls, OpenJPEG, pydicom's RLE) still decodes; a codestream over the pixel limit is refused as too large, one that disagrees with the header as inconsistent, an RLE segment table that needs more segments than the header allows is refused, a zip bomb is refused a megabyte at a time. The issue's damaged headers (a changed VR byte of StudyInstanceUID, `Rows` with two values, `NumberOfFrames` = "abc") give a typed error naming the field, or an image without the damaged informative field. |
| `tests/test_predict.py`, `tests/test_triage.py` | `predict` over 48 images of 3000×3000 px grows peak memory by less than 100 MB (47 MB measured; 305 MB before it streamed). A bug of ours on one file (a `RuntimeError`, a `KeyError`) is that file's error row, and the run finishes; a batch that fails is scored one input at a time. Worklist cells starting with `=`, `+`, `-`, `@` or `'` are escaped and read back exactly; `triage merge` refuses a `sha256` of `../../../planted` and writes nothing. |
| `tests/test_admission.py` | At the ASGI level, counting every body byte the app pulls: a `Content-Length` of 1 GB is refused with 413 before one byte is read; a body streamed past the limit (no length, or a lying one) is cut at the limit plus the multipart envelope; beyond capacity an upload gets 503 before its body is read. |
| `tests/test_bad_uploads.py` | 40 kinds of bad upload (`tests/corpus/bad_uploads.json`, made by `tests/corpus/make_bad_uploads.py`) each get their expected 413, 415 or 422 with a reason, and leave no audit row. |
| `tests/test_api_schema.py` | Schemathesis generates requests from the live server's `/openapi.json` (602 in the last run): no 5xx, every answer conforms to the documented status codes, content types, headers and schemas. |
| `tests/test_reliability.py` | A model file tampered (one bit), truncated or missing stops `pneumoscan serve` with exit code 2 and a message. Over capacity (running + queued > `max_concurrent + max_queue`), predictions are refused at once with 503 and `Retry-After`. A PostgreSQL stopped under the running app, and then made read-only: predictions get 503 (no answer without a record), `/readyz` says why, and both recover when it is started again or made writable; an unreachable database at start is a one-line error. `kill -9` under load: the SQLite file passes `integrity_check` and every 201 the clients received has its row. SIGTERM: requests in flight finish with 201, then exit code 0. With an API key, every `/api` route of the OpenAPI schema answers 401 without it. The page and the API send a Content-Security-Policy without inline scripts, `frame-ancestors 'none'` and `nosniff`; CORS stays closed unless `PNEUMOSCAN_CORS_ORIGINS` names origins. DICOM patient name, id and birth date appear in no answer, log line or database byte. Triage outputs stay inside `--out` whatever the input names, and the report escapes them. A short form of this load test. Since issue 17: `serve` on 0.0.0.0 or another non-loopback address without a key exits 2 with a message (nothing is bound), an empty or unreadable key is an error, and `compose.yaml` requires `PNEUMOSCAN_API_KEY`; a bug of ours is a JSON 500 with the security headers, and 401s and 500s are counted in `/metrics`; pictures are `no-store`; 300 noise pictures of 1024² stay within an 8 MB picture cache; `/readyz` says not ready when the disk is short; with `KEEP_UPLOADS` and a real write failure (the server may write files of 300 KB at most, `RLIMIT_FSIZE`) a 700 KB upload gets 503 and leaves no file and no row; the audit log runs `synchronous=FULL`; against the live server the DICOM bombs and a 1 GB upload (refused from its `Content-Length`, before any body byte) grow its peak memory (VmHWM) by less than 100 MB. |
| `tests/test_web.py` | In Chromium, with an API key set, the page asks for the key on the first 401, refuses a wrong one, goes on with the waiting upload once given the right one, shows the X-ray and heat map from `blob:` URLs fetched with the key, keeps the key in `sessionStorage` only, and a new tab asks again. |

## Hardening: what each attack of issue 17 costs the server

Command: `python benchmarks/bench_hardening.py` (then the same script with `PYTHONPATH` at a checkout of 25bb96c, the code before issue 17) on x86_64, Intel(R) Xeon(R) Processor, 2 cores, 2026-11-23. Each attack goes to a fresh `pneumoscan serve` (default settings, 127.0.0.1) warmed up with one upload; the growth is that of the server's peak resident memory (VmHWM). Goal: under 100 MB for each.

| attack | before issue 17 (25bb96c): answer | peak growth MB | now: answer | peak growth MB |
|---|---|---|---|---|
| DICOM, JPEG codestream declaring 25000×25000 (3 KB) | 422 CorruptImage | 2994 | 413 ImageTooLarge | **12** |
| DICOM, JPEG-LS codestream declaring 25000×25000 (3 KB) | 422 CorruptImage | 2996 | 413 ImageTooLarge | **12** |
| DICOM, JPEG 2000 codestream declaring 25000×25000 (4 KB) | 422 CorruptImage | 668 | 413 ImageTooLarge | **12** |
| DICOM, deflated dataset inflating to 300 MB (304 KB) | 201 | 618 | 413 ImageTooLarge | **15** |
| 1 GB upload, announced by Content-Length | no answer (within 10 s) after 0 body bytes were sent | 1 | 413 (within 10 s) after 0 body bytes were sent | **0** |
| 1 GB upload, streamed without Content-Length | no answer after 1024 MB were sent | 1 | 413 after 69 MB were sent | **0** |
| 40 concurrent uploads of 57 MB (60 M pixels, over the pixel limit) | 40× 413 | 465 | 34× 413, 6× 503 | **7** |

Before, the 1 GB uploads were read to their end (the streamed one: all 1024 MB) and the announced one waited for its body; now the announced one is refused from its `Content-Length` alone, and the streamed one is cut at the 64 MB limit plus the multipart envelope (the 69 MB the client sent include the sockets' buffers). Of the 40 concurrent uploads, 6 (beyond 2 running + 32 waiting) get 503 before their body is read, and the others are refused from their first 256 KB, without being read into memory.

Not done here: `pip-audit` cannot reach a vulnerability database from this machine (only the package registry is reachable), so dependencies are not audited for known vulnerabilities.
"""


def markdown(result: dict, command: str) -> str:
    lines = [
        "# Reliability: load test",
        "",
        f"Command: `{command}` on {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
        f"{result['clients']} closed-loop clients for {result['seconds']} s against `pneumoscan serve` ({result['precision']}, "
        "default settings, SQLite audit log) on 127.0.0.1, client and server on this machine. Uploads drawn at random: "
        + ", ".join(f"{share:.0%} {kind}" for kind, share in MIX.items())
        + " (bad = the committed corpus of bad uploads in `tests/corpus`).",
        "",
        "| kind | requests | p50 ms | p95 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|",
        *(f"| {kind} | {r['requests']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
          f"{', '.join(f'{s}: {n}' for s, n in r['statuses'].items())} |" for kind, r in result["by_kind"].items()),  # fmt: skip
        "",
        f"- Requests: {result['requests']} in {result['seconds']} s, **{result['requests_per_second']:.1f} requests/s**.",
        f"- 5xx answers: **{result['server_errors']}**; dropped connections: **{result['dropped_connections']}**.",
        f"- 201 answers: {result['created']}; audit rows written during the run: {result['audit_rows']} "
        f"({'equal' if result['created'] == result['audit_rows'] else '**not equal**'}); SQLite integrity check: {result['sqlite_integrity']}.",
        f"- Server resident memory: {result['rss_first_mb']:.0f} MB in the first tenth of the run, "
        f"{result['rss_last_mb']:.0f} MB in the last: {result['rss_growth']:+.1%} (goal: under +10 %).",
        f"- The server exited with code {result['server_exit_code']} on SIGTERM.",
    ]
    return "\n".join(lines) + "\n" + OTHER_CHECKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=50_000)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"), help="markdown file, or - for stdout only")
    args = parser.parse_args()
    result = run_load(args.clients, args.seconds, args.max_requests, "int8" if args.int8 else "fp32")
    command = "python benchmarks/load_test.py" + ("" if (args.clients, args.seconds) == (16, 60) else
                                                   f" --clients {args.clients} --seconds {args.seconds:g}")  # fmt: skip
    command += " --int8" if args.int8 else ""
    text = markdown(result, command)
    print(json.dumps(result, indent=1))
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
