"""On-device mode: parity with the Python Predictor, latency and first-load bytes, in headless Chromium.

    python benchmarks/bench_device.py                 # 100 Kermany test images and 100 adult test images, int8 and fp32
    python benchmarks/bench_device.py --images 20     # a quick look

Starts `pneumoscan serve` on 127.0.0.1, opens the page in Debian's Chromium (Playwright), switches to "on this
device", cuts the network once the model is loaded, and uploads every image; the page's own result (probability,
decision, population, gate, heat map, time from file to heat map) is compared with `Predictor` on the same files.
Writes ``benchmarks/device_results.md``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_test import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RESULTS = ROOT / "benchmarks" / "device_results.md"


def wait_for_result(page, previous: str | None, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    """The page's last on-device result once it is a new one (polled: the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        name, error = page.evaluate("[window.pneumoscanLast ? window.pneumoscanLast.name : null, "
                                    "document.getElementById('error').hidden ? '' : document.getElementById('error').textContent]")
        if error:
            raise AssertionError(error)
        if name is not None and name != previous:  # the whole result (its heat map) is read once
            return page.evaluate("window.pneumoscanLast")
        time.sleep(0.02)
    raise AssertionError("no on-device result")


def score_in_the_browser(page, paths: list[Path]) -> list[dict]:  # type: ignore[no-untyped-def]
    """Upload each file in turn (names must differ) and collect the page's results."""
    results, previous = [], page.evaluate("window.pneumoscanLast ? window.pneumoscanLast.name : null")
    for path in paths:
        page.set_input_files("#file", str(path))
        last = wait_for_result(page, previous)
        previous = last["name"]
        results.append(last)
    return results


def open_device_mode(browser, base: str, precision: str) -> tuple:  # type: ignore[no-untyped-def]
    """A fresh context with the page in on-device mode, the model loaded; returns (context, page, requests, seconds)."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1000, "height": 1200})
    requests: list = []
    context.on("request", lambda r: requests.append(r))
    page = context.new_page()
    started = time.perf_counter()
    page.goto(base + "/")
    page.select_option("#precision", precision)
    page.check('input[name="mode"][value="device"]')
    expect(page.locator("#status")).to_contain_text("runs on this device", timeout=180_000)
    return context, page, requests, time.perf_counter() - started


#: The page's model alone: ``session.run`` (every output) on a fixed input, median ms, and the threads the page gave it.
RUNTIME_ALONE = """async ([precision, runs]) => {
  const ort = await import('/static/vendor/onnxruntime-web/ort.wasm.min.mjs');
  const model = await (await import('/static/device.js')).load(precision);
  const size = model.settings.input.size;
  const feed = { image: new ort.Tensor('float32', new Float32Array(3 * size * size).fill(0.3), [1, 3, size, size]) };
  for (let i = 0; i < 3; i++) await model.session.run(feed);
  const times = [];
  for (let i = 0; i < runs; i++) { const started = performance.now(); await model.session.run(feed); times.push(performance.now() - started); }
  times.sort((a, b) => a - b);
  return [times[Math.floor(runs / 2)], ort.env.wasm.numThreads];
}"""


def runtime_alone(page, model: Path, precision: str, runs: int = 30) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The model's forward pass alone in the page (onnxruntime-web) and natively (ONNX Runtime, as many threads as the
    page has), median ms: what no JavaScript around the model can win back."""
    from bench_inference import bare_forward_ms

    from pneumoscan.running.inference import PRECISIONS

    browser_ms, threads = page.evaluate(RUNTIME_ALONE, [precision, runs])
    native = bare_forward_ms(model / PRECISIONS[precision], int(threads))
    return float(browser_ms), native


def loaded_bytes(requests: list, prefixes: tuple[str, ...]) -> int:
    """Bytes that came over the network for paths starting with one of ``prefixes``, each URL once."""
    seen: dict[str, int] = {}
    for request in requests:
        path = "/" + request.url.split("://", 1)[-1].split("/", 1)[-1]
        response = request.response()
        if any(path.startswith(p) for p in prefixes) and response is not None and not response.from_service_worker:
            seen[request.url] = request.sizes()["responseBodySize"]  # as transferred (gzipped where it was)
    return sum(seen.values())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:  # an empty map (nothing positive): equal maps agree
        return 1.0 if np.allclose(a, b, atol=1e-3) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def native_self_agreement(model: Path, paths: list[Path]) -> np.ndarray:
    """Heat-map correlation of the int8 model between two native ONNX Runtime paths (fused and unfused QDQ):
    how much the int8 map and probability move with rounding alone, without any browser."""
    import onnxruntime as ort

    from pneumoscan.running.inference import Predictor

    predictor = Predictor.load(model, precision="int8")
    batch = np.stack([predictor.preprocess(p) for p in paths])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(model / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
    fused = predictor.run(batch, ["logit", "heatmap"])
    logits, maps = unfused.run(["logit", "heatmap"], {"image": batch})
    temperature = predictor.temperature
    delta = np.abs(1 / (1 + np.exp(-fused["logit"].ravel() / temperature)) - 1 / (1 + np.exp(-logits.ravel() / temperature)))
    return np.asarray([correlation(x, y) for x, y in zip(fused["heatmap"], maps)]), delta


def python_end_to_end(model: Path, precision: str, paths: list[Path]) -> list[float]:
    """The Predictor, file to heat map, one image at a time (as the page does)."""
    from pneumoscan.running.inference import Predictor

    predictor = Predictor.load(model, precision=precision)
    predictor.predict(paths[0], heatmap=True)  # warm
    seconds = []
    for path in paths:
        started = time.perf_counter()
        predictor.predict(path, heatmap=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def adult_data_root() -> Path:
    """``PNEUMOSCAN_ADULT_DATA``, else ``../shared/data/rsna_adult`` beside the project (as the tests read it)."""
    import os

    from pneumoscan.config import PROJECT_ROOT

    return Path(os.environ.get("PNEUMOSCAN_ADULT_DATA", PROJECT_ROOT.parent / "shared" / "data" / "rsna_adult"))


def sample_files(folder: Path, images: int) -> dict[str, list[Path]]:
    """Evenly spread test images of each population, linked under unique names (the page tells results apart by name)."""
    from pneumoscan.config import default_data_root
    from pneumoscan.learning.data import list_records, records_of

    sets = {"children (Kermany test/)": list_records(default_data_root(), "test"),
            "adults (rsna_adult test part)": records_of([adult_data_root()], "test")}
    out = {}
    for n, (name, records) in enumerate(sets.items()):
        chosen = records[:: max(1, len(records) // images)][:images]
        links = []
        for i, record in enumerate(chosen):
            link = folder / f"{n}-{i:03d}{record.path.suffix}"
            link.symlink_to(record.path)
            links.append(link)
        out[name] = links
    return out


def main() -> None:
    from playwright.sync_api import sync_playwright

    from pneumoscan.config import DEFAULT_MODEL_DIR
    from pneumoscan.running.inference import Predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="per population")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    rows, latency, loads, alone = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        samples = sample_files(Path(folder), args.images)
        every = [p for paths in samples.values() for p in paths]
        self_agreement, self_delta = native_self_agreement(args.model, every)
        with running_server(Path(folder) / "service", env={"PNEUMOSCAN_MODEL_DIR": str(args.model)}) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            for precision in ("int8", "fp32"):
                context, page, requests, seconds = open_device_mode(browser, server.base, precision)
                runtime = loaded_bytes(requests, ("/static/vendor/",))
                model = loaded_bytes(requests, ("/model/",))
                shell = loaded_bytes(requests, ("/static/app.js", "/static/device.js", "/static/style.css"))
                loads.append(f"| {precision} | {runtime / 1e6:.1f} MB | {model / 1e6:.1f} MB | {(runtime + model + shell) / 1e6:.1f} MB | {seconds:.1f} s |")
                context.set_offline(True)
                browser_ms, native_ms = runtime_alone(page, args.model, precision)
                alone.append(f"| {precision} | {browser_ms:.1f} ms | {native_ms:.1f} ms | {browser_ms / native_ms:.2f}× |")
                predictor = Predictor.load(args.model, precision=precision)
                for name, paths in samples.items():
                    browser_results = score_in_the_browser(page, paths)
                    expected = predictor.predict(paths, heatmap=True)
                    delta = [abs(r["probability"] - e.probability) for r, e in zip(browser_results, expected)]
                    same = sum(r["label"] == e.label and r["in_distribution"] == e.in_distribution and r["population"] == e.population
                               for r, e in zip(browser_results, expected))  # fmt: skip
                    corr = np.asarray([correlation(r["heatmap"], e.heatmap) for r, e in zip(browser_results, expected)])
                    rows.append(f"| {name} | {precision} | {len(paths)} | {max(delta):.4f} | {same}/{len(paths)} | "
                                f"{corr.min():.4f} / {np.median(corr):.4f} / {np.mean(corr >= 0.99):.0%} |")  # fmt: skip
                    browser_p50 = statistics.median(r["total_seconds"] for r in browser_results)
                    python_p50 = statistics.median(python_end_to_end(args.model, precision, paths[:50]))
                    latency.append(f"| {name} | {precision} | {browser_p50 * 1000:.0f} ms | {python_p50 * 1000:.0f} ms | "
                                   f"{browser_p50 / python_p50:.2f}× |")  # fmt: skip
                context.close()
            browser.close()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    text = f"""# On-device mode (onnxruntime-web in headless Chromium)

Machine: {platform.machine()}, {cpu}, {len(__import__('os').sched_getaffinity(0))} cores; model `{args.model.name}`;
Chromium from Debian, headless; onnxruntime-web (WebAssembly, SIMD, threads: the page is cross-origin isolated).
Command: `python benchmarks/bench_device.py --images {args.images}`.

## Parity with the Python `Predictor` (same files, same precision; network cut after the first load)

| images | precision | n | max abs Δ probability | same decision, population and gate | heat-map correlation min / median / share ≥ 0.99 |
|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

The int8 heat map moves with rounding alone: between two native ONNX Runtime paths of the same int8 file (QDQ
fused and unfused), on the same {len(self_agreement)} images, its correlation is min {self_agreement.min():.4f},
median {np.median(self_agreement):.4f}, ≥ 0.99 on {np.mean(self_agreement >= 0.99):.0%}; the probability (children's
temperature) moves by up to {self_delta.max():.4f} (median {np.median(self_delta):.4f}).

## Latency, file to heat map, p50 (one image at a time; Python on 50 of the same images, in the same run)

| images | precision | browser | Python `Predictor` | browser / Python |
|---|---|---|---|---|
""" + "\n".join(latency) + """

The model alone, `session.run` of every output on a fixed input (median of 30 in the page; natively, ONNX Runtime's
bare forward of the logit, median of 200, as many threads as the page has): no JavaScript around the model can bring
the page below this ratio.

| precision | browser (onnxruntime-web, WebAssembly) | native (ONNX Runtime) | browser / native |
|---|---|---|---|
""" + "\n".join(alone) + """

## First load (bytes as transferred)

| precision | runtime (onnxruntime-web .mjs + .wasm) | model, settings and gates | with the page's own scripts | time to "runs on this device" |
|---|---|---|---|---|
""" + "\n".join(loads) + "\n"
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
