"""What the issue-17 attacks cost `pneumoscan serve`: status and growth of its peak resident memory (VmHWM) per attack.

    python benchmarks/bench_hardening.py                 # table to stdout (docs/reliability.md quotes it)
    PYTHONPATH=OTHER_CHECKOUT/src python benchmarks/bench_hardening.py --skip-concurrent   # the same, another version

The server is started here on a free port of 127.0.0.1 with default settings, warmed up with one
upload, then sent, in order: DICOM bombs (an honest 64×64 header, a codestream declaring 25000×25000
in JPEG, JPEG-LS and JPEG 2000; a deflated dataset inflating to 300 MB), a 1 GB upload announced by
its Content-Length, a 1 GB upload streamed without one, and 40 concurrent 60 MB uploads. VmHWM only
grows, so each row's growth is what that attack added to the peak so far. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import io
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402  (found through the path above when imported by a test)


def peak_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def raw_post(base: str, headers: bytes, body_chunks=(), timeout: float = 60) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """A hand-written HTTP request; returns the answer and how many body bytes the server let us send."""
    host, port = base.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(b"POST /api/v1/predictions HTTP/1.1\r\nHost: bench\r\n" + headers + b"\r\n")
        try:
            for chunk in body_chunks:
                connection.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        try:
            while part := connection.recv(65536):
                answer += part
        except OSError:
            pass
    return answer, sent


def chunked_gigabyte():  # type: ignore[no-untyped-def]
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    yield b"%x\r\n%s\r\n" % (len(head), head)
    block = bytes(2**20)
    for _ in range(1024):
        yield b"%x\r\n%s\r\n" % (len(block), block)


def concurrent_uploads(base: str, data: bytes, n: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one() -> None:
        try:
            status = httpx.post(f"{base}/api/v1/predictions", files={"file": ("big.png", data, "image/png")}, timeout=600).status_code
        except httpx.HTTPError:
            status = 0
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(sorted(statuses.items()))


def status_of(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"


def upload_status(base: str, data: bytes) -> str:
    answer = httpx.post(f"{base}/api/v1/predictions", files={"file": ("x.dcm", data, "application/dicom")}, timeout=600)
    return f"{answer.status_code} {answer.json().get('error', '')}".strip()


def announced_gigabyte(base: str) -> str:
    answer, sent = raw_post(base, b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1073741824\r\n", timeout=10)
    return f"{status_of(answer)} (within 10 s) after {sent} body bytes were sent"


def streamed_gigabyte(base: str) -> str:
    answer, sent = raw_post(base, b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n",
                            chunked_gigabyte())  # fmt: skip
    return f"{status_of(answer)} after {sent / 2**20:.0f} MB were sent"


def forty_uploads(base: str) -> str:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7000, 8600), dtype=np.uint8))  # 60 M pixels
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    statuses = concurrent_uploads(base, buffer.getvalue(), 40)
    return ", ".join(f"{n}× {status}" for status, n in statuses.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-concurrent", action="store_true", help="leave out the 40 concurrent 60 MB uploads")
    args = parser.parse_args()
    from dicom_factory import dicom_bombs
    from load_test import running_server

    from pneumoscan.config import default_data_root
    from pneumoscan.learning.data import list_records

    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        small = Path(folder) / "small.png"
        Image.open(next(r.path for r in list_records(default_data_root(), "test"))).convert("L").resize((64, 64)).save(small)
        attacks = [(f"DICOM, {name} ({len(data) / 1024:.0f} KB)", lambda base, data=data: upload_status(base, data))
                   for name, data in dicom_bombs(small).items()]  # fmt: skip
        attacks.append(("1 GB upload, announced by Content-Length", announced_gigabyte))
        attacks.append(("1 GB upload, streamed without Content-Length", streamed_gigabyte))
        if not args.skip_concurrent:
            attacks.append(("40 concurrent uploads of 57 MB (60 M pixels, over the pixel limit)", forty_uploads))
        for i, (name, attack) in enumerate(attacks):  # a fresh server each: VmHWM would hide a smaller peak after a larger one
            with running_server(Path(folder) / f"service{i}") as server:
                warm = httpx.post(f"{server.base}/api/v1/predictions", files={"file": ("w.png", small.read_bytes(), "image/png")},
                                  timeout=60)  # fmt: skip
                assert warm.status_code == 201, warm.text
                before = peak_mb(server.process.pid)
                outcome = attack(server.base)
                rows.append((name, outcome, peak_mb(server.process.pid) - before))
    print_results("python benchmarks/bench_hardening.py", "server with default settings on 127.0.0.1",
                  ("attack", "answer", "growth of the server's peak memory (MB)"),
                  [(name, outcome, f"{growth:.0f}") for name, outcome, growth in rows])  # fmt: skip


def print_results(command: str, where: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The command and the machine it ran on, then the rows as a Markdown table (what docs/reliability.md quotes)."""
    print(f"Command: `{command}` on {platform.machine()}, {cpu_name()}, {time.strftime('%Y-%m-%d')}; {where}.\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
