"""End-to-end inference benchmark of pneumoscan against the architectures of the demos it competes with.

Each configuration runs in its own process, so that its peak resident memory is
its own (importing PyTorch alone costs ~700 MB; ONNX Runtime ~45 MB).

    python benchmarks/bench_inference.py                 # full run, writes benchmarks/results.md
    python benchmarks/bench_inference.py --quick         # fewer images, for a smoke check

End to end = read the file + decode + preprocess + forward pass (+ heat map for
pneumoscan), per image, on the 624 test images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMPETITORS = ("vgg16", "resnet50", "mobilenet_v2", "densenet121")


def test_images(limit: int | None) -> list[Path]:
    from pneumoscan.config import default_data_root
    from pneumoscan.data import list_records

    paths = [r.path for r in list_records(default_data_root(), "test")]
    return paths[:: max(1, len(paths) // limit)][:limit] if limit else paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean())}


def run_pneumoscan(precision: str, threads: int, images: list[Path], model: Path | None) -> dict:
    from pneumoscan.inference import Predictor

    predictor = Predictor.load(model, precision=precision, threads=threads)
    blobs = [p.read_bytes() for p in images]  # the file system is not what we measure
    for blob in blobs[:10]:
        predictor.predict(blob, heatmap=True)
    latencies = []
    for blob in blobs:
        start = time.perf_counter()
        predictor.predict(blob, heatmap=True)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(blobs), 32):
        predictor.predict(blobs[i : i + 32], heatmap=True)
    throughput = len(blobs) / (time.perf_counter() - start)
    return {**percentiles(latencies), "images_per_s_batch32": throughput, "n": len(blobs), "peak_rss_mb": peak_rss_mb(),
            "torch_imported": "torch" in sys.modules}  # fmt: skip


def run_competitor(arch: str, threads: int, images: list[Path]) -> dict:
    import torch
    import torchvision

    from pneumoscan.inference import to_grayscale_image
    from pneumoscan.preprocessing import preprocess

    torch.set_num_threads(threads)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=2).eval()
    blobs = [p.read_bytes() for p in images]
    latencies = []
    with torch.no_grad():
        for blob in blobs[:3]:
            model(torch.from_numpy(preprocess(to_grayscale_image(blob))[None]))
        for blob in blobs:
            start = time.perf_counter()
            model(torch.from_numpy(preprocess(to_grayscale_image(blob))[None])).softmax(-1)
            latencies.append(time.perf_counter() - start)
    return {**percentiles(latencies), "n": len(blobs), "peak_rss_mb": peak_rss_mb()}


def child(args: argparse.Namespace) -> None:
    images = test_images(args.limit)
    kind, name, threads = args.one.split(":")
    if kind == "pneumoscan":
        result = run_pneumoscan(name, int(threads), images, args.model)
    else:
        result = run_competitor(name, int(threads), images)
    print(json.dumps(result))


def measure(config: str, limit: int | None, model: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--one", config] + (["--limit", str(limit)] if limit else [])
    if model:
        cmd += ["--model", str(model)]
    env = {**os.environ, "OMP_NUM_THREADS": config.rsplit(":", 1)[1]}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help="images per pneumoscan configuration (default: all 624)")
    parser.add_argument("--competitor-images", type=int, default=40, help="images per competitor (they are slow)")
    parser.add_argument("--model", type=Path, default=None, help="exported model folder (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="64 images, 8 per competitor")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    if args.one:
        return child(args)
    if args.quick:
        args.limit, args.competitor_images = 64, 8

    rows = []
    for precision in ("int8", "fp32"):
        for threads in (1, 2):
            config = f"pneumoscan:{precision}:{threads}"
            rows.append((f"pneumoscan {precision}, {threads} thread(s), ONNX Runtime", measure(config, args.limit, args.model)))
            print(rows[-1], flush=True)
    for arch in COMPETITORS:
        rows.append((f"{arch}, PyTorch eager, 2 threads", measure(f"torch:{arch}:2", args.competitor_images, None)))
        print(rows[-1], flush=True)
    reference = rows[1][1]["p50_ms"]  # pneumoscan int8, 2 threads
    lines = [
        "# Inference benchmark",
        "",
        f"Command: `python benchmarks/bench_inference.py{' --quick' if args.quick else ''}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "End to end per image: decode the JPEG bytes + preprocess + forward pass (+ heat map for pneumoscan), batch 1.",
        "Each row runs in its own process; peak RSS is that process's maximum resident memory.",
        "",
        "| configuration | images | p50 ms | p95 ms | images/s (batch 32) | peak RSS MB | p50 / pneumoscan int8 (2 threads) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        throughput = f"{r['images_per_s_batch32']:.0f}" if "images_per_s_batch32" in r else "–"
        lines.append(f"| {name} | {r['n']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {throughput} | {r['peak_rss_mb']:.0f} | {r['p50_ms'] / reference:.1f}× |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
