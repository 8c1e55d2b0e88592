"""On-device mode in a real headless Chromium: onnxruntime-web in the page, the network cut after the first load."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from pneumoscan.config import PROJECT_ROOT
from pneumoscan.data import list_records, sha256_file
from pneumoscan.inference import Predictor
from test_server import live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = PROJECT_ROOT / "test-output"
VENDOR = PROJECT_ROOT / "src" / "pneumoscan" / "static" / "vendor" / "onnxruntime-web"
pytestmark = pytest.mark.slow


def test_the_vendored_runtime_matches_its_checksums_and_carries_its_licence() -> None:
    record = json.loads((VENDOR / "vendor.json").read_text())
    assert record["package"] == "onnxruntime-web" and record["version"]
    for name, digest in record["files"].items():
        assert sha256_file(VENDOR / name) == digest, name
    assert "MIT License" in (VENDOR / "LICENSE").read_text()


def wait_for_result(page, previous: str | None, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    """The page's last on-device result once it is a new one (polled: the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = page.evaluate("window.pneumoscanLast || null")
        error = page.evaluate("document.getElementById('error').hidden ? '' : document.getElementById('error').textContent")
        assert not error, error
        if last and last["name"] != previous:
            return last
        time.sleep(0.05)
    raise AssertionError("no on-device result")


def score_in_the_browser(page, paths: list[Path]) -> list[dict]:  # type: ignore[no-untyped-def]
    results, previous = [], None
    for path in paths:
        page.set_input_files("#file", str(path))
        last = wait_for_result(page, previous)
        previous = last["name"]
        results.append(last)
    return results


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_on_the_device_the_answer_is_the_servers_and_nothing_leaves(shipped_model: Path, data_root: Path, tmp_path: Path,
                                                                     precision: str) -> None:  # fmt: skip
    from playwright.sync_api import expect, sync_playwright

    records = list_records(data_root, "test")
    sample = [r.path for r in records[:: max(1, len(records) // 12)][:12]]
    for i, path in enumerate(sample):  # unique names: the page tells results apart by name
        (tmp_path / f"{i:02d}-{path.name}").symlink_to(path)
    sample = sorted(tmp_path.glob("*.jpeg"))
    predictor = Predictor.load(shipped_model, precision=precision)
    expected = predictor.predict(sample, heatmap=True)
    OUTPUT.mkdir(exist_ok=True)
    with live_server(tmp_path / "service") as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1000, "height": 1200})
        page = context.new_page()
        requests: list = []
        context.on("request", lambda r: requests.append(r))  # the page's and its service worker's
        page.goto(base + "/")
        page.select_option("#precision", precision)
        page.check('input[name="mode"][value="device"]')
        expect(page.locator("#status")).to_contain_text("runs on this device", timeout=120_000)
        expect(page.locator("#device-note")).to_contain_text("never leaves it")
        loaded = len(requests)
        context.set_offline(True)  # the network is cut: everything from here runs on the device
        results = score_in_the_browser(page, sample)
        expect(page.locator("#where")).to_contain_text("did not leave it")
        page.screenshot(path=str(OUTPUT / f"device-{precision}.png"), full_page=True)
        after = requests[loaded:]
        browser.close()
    assert not [r for r in requests if r.method != "GET"], "a request other than GET left the page"
    assert not [r.url for r in after if not r.url.startswith(("blob:", "data:"))], "a request left the page after loading"
    deltas = [abs(r["probability"] - e.probability) for r, e in zip(results, expected)]
    assert max(deltas) <= 0.01, deltas
    assert [r["label"] for r in results] == [e.label for e in expected]
    assert [r["population"] for r in results] == [e.population for e in expected]
    assert [r["in_distribution"] for r in results] == [e.in_distribution for e in expected]
    correlations = [np.corrcoef(np.asarray(r["heatmap"]), e.heatmap.reshape(-1))[0, 1] for r, e in zip(results, expected)]
    assert min(correlations) >= 0.99, correlations
    engine = create_engine(f"sqlite:///{(tmp_path / 'service' / 'pneumoscan.db').as_posix()}")
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from predictions")).scalar_one() == 0  # nothing recorded
