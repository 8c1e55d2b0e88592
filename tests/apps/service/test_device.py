"""On-device mode in a real headless Chromium: onnxruntime-web in the page, the network cut after the first load."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from PIL import Image
from test_server import live_server

from pneumoscan.files import sha256_file
from pneumoscan.config import PROJECT_ROOT
from pneumoscan.learning.data import list_records
from pneumoscan.running.inference import Predictor
from pneumoscan.running.regions import DEFAULT_GRID

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_device import (
    correlation,
    native_self_agreement,
    open_device_mode,
    score_in_the_browser,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = PROJECT_ROOT / "test-output"
VENDOR = PROJECT_ROOT / "src" / "pneumoscan" / "apps" / "static" / "vendor" / "onnxruntime-web"
pytestmark = pytest.mark.slow


def test_the_vendored_runtime_matches_its_checksums_and_carries_its_licence() -> None:
    record = json.loads((VENDOR / "vendor.json").read_text())
    assert record["package"] == "onnxruntime-web" and record["version"]
    for name, digest in record["files"].items():
        assert sha256_file(VENDOR / name) == digest, name
    assert "MIT License" in (VENDOR / "LICENSE").read_text()


def sample(data_root: Path, adult_root: Path, folder: Path) -> list[Path]:
    """12 children's and 6 adults' test images under unique names (the page tells results apart by name)."""
    from pneumoscan.learning.data import records_of

    children = list_records(data_root, "test")
    adults = records_of([adult_root], "test")
    chosen = children[:: len(children) // 12][:12] + adults[:: len(adults) // 6][:6]
    links = []
    for i, record in enumerate(chosen):
        links.append(folder / f"{i:02d}{record.path.suffix}")
        links[-1].symlink_to(record.path)
    return links


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_on_the_device_the_answer_is_the_servers_and_nothing_leaves(shipped_model: Path, data_root: Path, adult_root: Path,
                                                                     tmp_path: Path, precision: str) -> None:  # fmt: skip
    """Switch to the mode, cut the network, score; reload offline and score again; compare with the Python Predictor."""
    from playwright.sync_api import expect, sync_playwright

    paths = sample(data_root, adult_root, tmp_path)
    expected = Predictor.load(shipped_model, precision=precision).predict(paths, heatmap=True)
    OUTPUT.mkdir(exist_ok=True)
    with live_server(tmp_path / "service") as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        context, page, requests, _ = open_device_mode(browser, base, precision)
        expect(page.locator("#device-note")).to_contain_text("never leaves it")
        assert page.evaluate("crossOriginIsolated") is True  # several threads for onnxruntime-web
        loaded = len(requests)
        context.set_offline(True)  # the network is cut: everything from here runs on the device
        results = score_in_the_browser(page, paths)
        expect(page.locator("#where")).to_contain_text("did not leave it")
        page.screenshot(path=str(OUTPUT / f"device-{precision}.png"), full_page=True)
        scored_offline = [r for r in requests[loaded:] if r.response() is None or not r.response().from_service_worker]
        page.reload()  # offline: the service worker serves the page, the runtime and the model
        page.select_option("#precision", precision)
        page.check('input[name="mode"][value="device"]')
        expect(page.locator("#status")).to_contain_text("runs on this device", timeout=120_000)
        again = score_in_the_browser(page, paths[:1])
        assert page.evaluate("navigator.serviceWorker.controller !== null")  # the page came from the service worker
        expect(page.locator("#operating-points")).to_contain_text("Operating point in force")  # offline too, from the model
        page.screenshot(path=str(OUTPUT / f"device-{precision}-offline.png"), full_page=True)
        browser.close()
    assert not [r.url for r in requests if r.method != "GET"], "a request other than GET left the page"
    assert not [r.url for r in scored_offline if not r.url.startswith(("blob:", "data:"))], "scoring fetched something"
    assert again[0]["probability"] == results[0]["probability"]
    assert [r["label"] for r in results] == [e.label for e in expected]
    assert [r["population"] for r in results] == [e.population for e in expected]
    assert [r["in_distribution"] for r in results] == [e.in_distribution for e in expected]
    deltas = np.asarray([abs(r["probability"] - e.probability) for r, e in zip(results, expected)])
    correlations = np.asarray([correlation(r["heatmap"], e.heatmap) for r, e in zip(results, expected)])
    if precision == "fp32":
        assert deltas.max() <= 0.01, deltas
        assert correlations.min() >= 0.99, correlations
        assert any(e.regions for e in expected)  # the sample holds flagged adults: the comparison below is not empty
        for got, want, path in zip(results, expected, paths):  # the same regions: each edge within one cell of the rule's grid
            assert len(got["regions"]) == len(want.regions), (got["regions"], want.regions)
            assert got["regions_note"] == want.regions_note
            with Image.open(path) as image:
                cell = max(image.size) / DEFAULT_GRID + 0.1
            for region, reference in zip(got["regions"], want.regions):
                assert all(abs(region[k] - getattr(reference, k)) <= cell for k in ("x", "y", "width", "height"))
                assert abs(region["score"] - reference.score) <= 0.01
    else:  # int8 kernels round differently in WebAssembly; so do ONNX Runtime's own two int8 paths (native_self_agreement)
        native_correlations, native_deltas = native_self_agreement(shipped_model, paths)
        assert deltas.max() <= max(0.01, 2 * native_deltas.max()), (deltas, native_deltas)
        assert np.mean(correlations >= 0.99) >= np.mean(native_correlations >= 0.99) - 0.2, (correlations, native_correlations)
        assert [bool(r["regions"]) for r in results] == [bool(e.regions) for e in expected]  # the same films get regions
    engine = create_engine(f"sqlite:///{(tmp_path / 'service' / 'pneumoscan.db').as_posix()}")
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from predictions")).scalar_one() == 0  # nothing recorded


def test_the_gate_the_browser_gets_scores_like_the_python_gate(shipped_model: Path) -> None:
    """Mean and upper triangle of each precision matrix, float32: the same distance as the Python gate."""
    from pneumoscan.apps.service.device import gate_bytes
    from pneumoscan.running.ood import OodGate

    gate = OodGate.load(shipped_model, "child")
    packed = np.frombuffer(gate_bytes(gate), dtype="<f4")
    dim = gate.mean.size
    assert packed.size == 2 * (dim + dim * (dim + 1) // 2)
    x = np.random.default_rng(0).normal(size=(3, dim)).astype(np.float32) + gate.mean.astype(np.float32)
    upper = np.zeros((dim, dim), np.float64)
    upper[np.triu_indices(dim)] = packed[dim : dim + dim * (dim + 1) // 2]
    full = upper + upper.T - np.diag(np.diag(upper))
    centered = x - packed[:dim]
    assert np.allclose(np.einsum("ij,jk,ik->i", centered, full, centered), gate.distances(x), rtol=1e-4)


def test_the_runtime_is_served_gzipped_to_browsers_that_accept_it(service_client) -> None:
    wasm = "/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm"
    packed = service_client.get(wasm, headers={"Accept-Encoding": "gzip"})
    assert packed.status_code == 200 and packed.headers["content-encoding"] == "gzip"
    assert packed.headers["content-type"] == "application/wasm" and packed.content[:4] == b"\0asm"  # httpx decodes it
    plain = service_client.get(wasm, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == packed.content
    assert service_client.get("/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm.gz").status_code == 404
    settings = service_client.get("/model/device.json").json()
    assert settings["files"]["int8"]["url"].endswith(settings["files"]["int8"]["sha256"])
    assert service_client.get("/").headers["cross-origin-embedder-policy"] == "require-corp"


@pytest.fixture(scope="module")
def service_client(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from pneumoscan.apps.service.app import create_app
    from pneumoscan.apps.settings import ServiceSettings

    return TestClient(create_app(ServiceSettings(model_dir=shipped_model, data_dir=tmp_path_factory.mktemp("device"))))


def test_a_model_file_unlike_its_card_is_refused_on_the_device(shipped_model: Path, tmp_path: Path) -> None:
    """The browser checks the model's sha256 against the card before use: a swapped file never answers."""
    from playwright.sync_api import expect, sync_playwright

    with live_server(tmp_path / "service") as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_context(service_workers="block").new_page()  # page.route sees what a service worker would not
        page.route("**/model/model*.onnx*", lambda route: route.fulfill(status=200, body=b"not the model" * 1000,
                                                                           content_type="application/octet-stream"))  # fmt: skip
        page.goto(base + "/")
        page.check('input[name="mode"][value="device"]')
        expect(page.locator("#error")).to_contain_text("does not match its card", timeout=60_000)
        expect(page.locator("#error")).to_contain_text("Use the server mode")
        browser.close()


def test_the_page_can_be_installed(service_client) -> None:
    manifest = service_client.get("/static/manifest.webmanifest").json()
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
    sizes = {icon["sizes"] for icon in manifest["icons"]}
    assert {"192x192", "512x512"} <= sizes
    for icon in manifest["icons"]:
        assert service_client.get(icon["src"]).content.startswith(b"\x89PNG")
    worker = service_client.get("/sw.js")
    assert worker.status_code == 200 and worker.headers["content-type"].startswith("text/javascript")
    assert 'rel="manifest"' in service_client.get("/").text
