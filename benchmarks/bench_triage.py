"""Triage throughput: the 624 test images as they are, and upscaled to 2048×2048 PNG (decode-bound).

    python benchmarks/bench_triage.py            # writes benchmarks/triage_results.md
    python benchmarks/bench_triage.py --quick    # 64 images, for a smoke check

Each configuration is a fresh ``pneumoscan triage`` run (report on) into an
empty folder; the figure is the run's own ``summary.json`` rate (scored images
per second of wall time, from the first file read to the last row written,
report excluded) and the command's whole wall time (report included). The
upscaled copies are written to a temporary folder, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_inference import test_images  # the same 624 test images (or an even sample)
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def upscale(paths: list[Path], folder: Path, size: int = 2048) -> list[Path]:
    """PNG copies at ``size``×``size`` (bicubic), the size of a real digital radiograph."""

    def one(path: Path) -> Path:
        target = folder / (path.stem + ".png")
        Image.open(path).convert("L").resize((size, size), Image.Resampling.BICUBIC).save(target, compress_level=6)
        return target

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor() as pool:
        return list(pool.map(one, paths))


def run_triage(inputs: Path, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "pneumoscan.apps.cli", "triage", str(inputs), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"rate": summary["timing"]["images_per_second"], "scored": summary["scored"], "wall_s": wall,
            "report_mb": (out / "report.html").stat().st_size / 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "triage_results.md")
    args = parser.parse_args()
    images = test_images(64 if args.quick else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = tmp / "as_is"
        small.mkdir()
        for path in images:
            (small / path.name).symlink_to(path.resolve())
        large = tmp / "2048"
        upscale(images, large)
        configs = [
            ("224×224 JPEG (the test set as is)", small, ["--int8"], "int8"),
            ("224×224 JPEG (the test set as is)", small, [], "fp32"),
            ("2048×2048 PNG (the test set upscaled)", large, ["--int8"], "int8"),
        ]
        for name, folder, extra, precision in configs:
            result = run_triage(folder, tmp / f"out-{len(rows)}", extra)
            rows.append((name, precision, result))
            print(rows[-1], flush=True)
    lines = [
        "# Triage benchmark",
        "",
        f"Command: `python benchmarks/bench_triage.py{' --quick' if args.quick else ''}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
        "Each row is one `pneumoscan triage FOLDER --out EMPTY_DIR` run with the defaults (2 decoding workers, "
        "batch 32, report on).",
        "",
        "| inputs | model | images | images/s (summary.json) | command wall time s (report included) | report.html MB |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {precision} | {r['scored']} | {r['rate']:.1f} | {r['wall_s']:.1f} | {r['report_mb']:.1f} |"
          for name, precision, r in rows),  # fmt: skip
        "",
        "Goal of the triage issue: ≥ 200 images/s with `--int8`, report on, on the 624 test images: "
        + ("**met**." if rows[0][2]["rate"] >= 200 else "**not met** by this run."),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
