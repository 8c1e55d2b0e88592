"""End to end in a real headless Chromium (Debian's), driven by Playwright, against `pneumoscan serve`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import skimage
from test_server import live_server

from pneumoscan.config import PROJECT_ROOT
from pneumoscan.learning.data import list_records

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = PROJECT_ROOT / "test-output"
pytestmark = pytest.mark.slow


def test_upload_in_the_browser_shows_label_probability_heatmap_and_errors(shipped_model: Path, data_root: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install chromium (.ci/run installs it)")
    xray = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    notes = tmp_path / "notes.jpg"
    notes.write_text("this is not an X-ray")
    OUTPUT.mkdir(exist_ok=True)
    with live_server(tmp_path / "service") as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        response = page.goto(base + "/")
        assert "script-src 'self'" in response.headers["content-security-policy"]  # the page runs under its CSP
        page.set_input_files("#file", str(xray))
        expect(page.locator("#decision")).to_contain_text("Pneumonia suspected", timeout=30_000)
        expect(page.locator("#decision")).to_contain_text("98% sensitivity on validation")
        expect(page.locator("#probability-text")).to_contain_text("Calibrated probability of pneumonia")
        # polled from outside: the page's Content-Security-Policy forbids the eval that wait_for_function needs
        deadline = time.monotonic() + 30
        while page.evaluate("document.getElementById('heatmap').naturalWidth") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
        assert page.evaluate("document.getElementById('xray').naturalWidth") > 0
        expect(page.locator("#recent tr")).to_have_count(1)
        expect(page.locator("#recent tr").first).to_contain_text("child")
        page.screenshot(path=str(OUTPUT / "web-result.png"), full_page=True)

        photo = Path(skimage.__file__).parent / "data" / "astronaut.png"  # a photo: the gate flags it
        page.set_input_files("#file", str(photo))
        expect(page.locator("#decision")).to_have_text("Not validated for this image", timeout=30_000)
        assert page.get_attribute("#decision", "class") == "decision unvalidated"  # no red or green verdict
        expect(page.locator("#probability-text")).to_contain_text("For reference only")
        expect(page.locator("#ood")).to_be_visible()
        expect(page.locator("#recent tr").first).to_contain_text("Not validated for this image")
        deadline = time.monotonic() + 30  # the photo's own pictures replace the previous study's
        while page.evaluate("document.getElementById('xray').naturalWidth") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert page.evaluate("document.getElementById('xray').naturalWidth") > 0
        page.screenshot(path=str(OUTPUT / "web-not-validated.png"), full_page=True)

        page.set_input_files("#file", str(notes))
        expect(page.locator("#error")).to_contain_text("a text file is not an X-ray image", timeout=30_000)
        page.screenshot(path=str(OUTPUT / "web-error.png"), full_page=True)

        phone = browser.new_page(viewport={"width": 375, "height": 740})
        phone.goto(base + "/")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 375
        browser.close()
    assert not [e for e in console_errors if "415" not in e], console_errors


def test_with_an_api_key_the_page_asks_for_it_and_shows_the_pictures(shipped_model: Path, data_root: Path, tmp_path: Path) -> None:
    """The key is asked for on the first 401, kept in this tab's sessionStorage only, and sent for the pictures too."""
    from playwright.sync_api import expect, sync_playwright

    xray = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    with live_server(tmp_path / "service", env={"PNEUMOSCAN_API_KEY": "tab-only-key"}) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1000, "height": 1100})
        page = context.new_page()
        page.goto(base + "/")
        expect(page.locator("#key-form")).to_be_visible(timeout=30_000)  # the recent list got a 401: the page asks
        expect(page.locator("#key-message")).to_contain_text("API key")
        page.fill("#key", "wrong-key")
        page.click("#key-form button")
        page.set_input_files("#file", str(xray))
        expect(page.locator("#key-form")).to_be_visible(timeout=30_000)  # refused: asked again, nothing shown
        assert page.locator("#result").is_hidden()
        page.fill("#key", "tab-only-key")
        page.click("#key-form button")  # the upload waiting for the key goes ahead
        expect(page.locator("#decision")).to_contain_text("Pneumonia suspected", timeout=30_000)
        deadline = time.monotonic() + 30
        while page.evaluate("document.getElementById('heatmap').naturalWidth") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
        assert page.evaluate("document.getElementById('xray').naturalWidth") > 0
        assert page.evaluate("document.getElementById('xray').src").startswith("blob:")
        expect(page.locator("#recent tr")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('pneumoscan-api-key')") == "tab-only-key"
        assert page.evaluate("localStorage.length") == 0
        page.screenshot(path=str(OUTPUT / "web-api-key.png"), full_page=True)

        other_tab = context.new_page()  # sessionStorage belongs to one tab: a new one asks again
        other_tab.goto(base + "/")
        expect(other_tab.locator("#key-form")).to_be_visible(timeout=30_000)
        browser.close()


def test_the_page_shows_the_operating_point_in_force_and_warns_of_drift(site_model: Path, data_root: Path, tmp_path: Path) -> None:
    """A site-calibrated model: the header names its operating points; a shifted stream brings the drift warning."""
    from playwright.sync_api import expect, sync_playwright

    pneumonias = [r.path for r in list_records(data_root, "test") if r.label == 1][:3]
    env = {"PNEUMOSCAN_MODEL_DIR": str(site_model), "PNEUMOSCAN_DRIFT_WINDOW": "3", "PNEUMOSCAN_DRIFT_MIN_PREDICTIONS": "3"}
    OUTPUT.mkdir(exist_ok=True)
    with live_server(tmp_path / "service", env=env) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        page.goto(base + "/")
        points = page.locator("#operating-points")
        expect(points).to_contain_text("children: 98% sensitivity on the site set of 2026-11-20", timeout=30_000)
        expect(points).to_contain_text("site calibration of 2026-11-20")
        expect(points).to_contain_text("adults: 98% sensitivity on validation")
        expect(page.locator("#drift")).to_be_hidden()
        for n, path in enumerate(pneumonias, start=1):
            page.set_input_files("#file", str(path))
            expect(page.locator("#recent tr")).to_have_count(n, timeout=30_000)
        expect(page.locator("#decision")).to_contain_text("[site calibration of 2026-11-20]")
        expect(page.locator("#drift")).to_be_visible(timeout=30_000)
        expect(page.locator("#drift")).to_contain_text("Recent studies do not look like those the operating point was set on")
        page.screenshot(path=str(OUTPUT / "web-drift.png"), full_page=True)
        browser.close()


def test_the_api_docs_load_from_this_origin_under_the_csp(shipped_model: Path, tmp_path: Path) -> None:
    """Swagger UI comes from the installed package, not a CDN; it runs under the page's Content-Security-Policy
    (no inline script) and sends the tab's key with its requests (issue 27: /docs had no CSP and a CDN without integrity)."""
    from playwright.sync_api import expect, sync_playwright

    env = {"PNEUMOSCAN_API_KEY": "docs-key", "PNEUMOSCAN_REQUIRE_KEY_FOR_METRICS_AND_SCHEMA": "true"}
    with live_server(tmp_path / "service", env) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking", "--disable-component-update"])  # fmt: skip
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        foreign: list[str] = []
        page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(base) else None)
        response = page.goto(base + "/docs")
        policy = response.headers["content-security-policy"]
        assert "script-src 'self' 'wasm-unsafe-eval'" in policy and "frame-ancestors 'none'" in policy
        page.evaluate("sessionStorage.setItem('pneumoscan-api-key', 'docs-key')")
        page.reload()
        expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=30_000)
        expect(page.get_by_text("/api/v1/predictions", exact=True).first).to_be_visible()
        page.screenshot(path=str(OUTPUT / "web-docs.png"))
        browser.close()
    assert foreign == [] and not [m for m in problems if "Content Security Policy" in m or "Refused" in m], (foreign, problems)


def green_pixels(png: bytes) -> int:
    """Pixels of the regions' green (#39ff14) in a screenshot."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(np.sum((np.abs(rgb - np.array([57, 255, 20])) <= 12).all(axis=-1)))


def test_the_page_draws_the_regions_over_the_xray_with_a_switch(shipped_model: Path, adult_root: Path, tmp_path: Path) -> None:
    """An adult pneumonia that gets regions: the page draws each one where the API puts it; the switch hides them."""
    from playwright.sync_api import expect, sync_playwright

    from pneumoscan.learning.data import records_of
    from pneumoscan.running.inference import Predictor

    predictor = Predictor.load(shipped_model)
    film, prediction = next((r.path, p) for r in records_of([adult_root], "test") if r.label == 1
                            and (p := predictor.predict(r.path)).regions)  # fmt: skip
    OUTPUT.mkdir(exist_ok=True)
    with live_server(tmp_path / "service") as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        page.goto(base + "/")
        page.set_input_files("#file", str(film))
        expect(page.locator("#decision")).to_contain_text("Pneumonia suspected", timeout=30_000)
        expect(page.locator("#regions .region")).to_have_count(len(prediction.regions), timeout=30_000)
        expect(page.locator("#regions-text")).to_contain_text("where the model sees the pneumonia")
        page.uncheck("#show-heatmap")  # the film and its regions alone
        width, height = page.evaluate("[document.getElementById('xray').naturalWidth, document.getElementById('xray').naturalHeight]")
        first = prediction.regions[0]
        left = page.evaluate("parseFloat(document.querySelector('#regions .region').style.left)")
        top = page.evaluate("parseFloat(document.querySelector('#regions .region').style.top)")
        assert abs(left - 100 * first.x / width) < 0.01 and abs(top - 100 * first.y / height) < 0.01
        expect(page.locator("#regions .region span").first).to_have_text(f"{first.score:.2f}")
        drawn = page.locator(".stack").screenshot()
        page.screenshot(path=str(OUTPUT / "web-regions.png"), full_page=True)
        page.uncheck("#show-regions")
        hidden = page.locator(".stack").screenshot()
        browser.close()
    assert green_pixels(drawn) > 100 and green_pixels(hidden) == 0


def test_a_reading_is_recorded_on_the_page_with_the_keyboard_and_supersedes(shipped_model: Path, data_root: Path,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    """Under the result, with an API key: the finding, reader id and comment typed and sent with the keyboard only;
    the API then holds the reading (source page) and a second one is shown as superseding the first."""
    import httpx
    from playwright.sync_api import expect, sync_playwright

    xray = next(r.path for r in list_records(data_root, "test") if r.label == 1)
    with live_server(tmp_path / "service", env={"PNEUMOSCAN_API_KEY": "reading-key"}) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 1300})
        page.goto(base + "/")
        expect(page.locator("#key-form")).to_be_visible(timeout=30_000)
        page.fill("#key", "reading-key")
        page.keyboard.press("Enter")
        page.set_input_files("#file", str(xray))
        expect(page.locator("#decision")).to_contain_text("Pneumonia suspected", timeout=30_000)
        expect(page.locator("#reading-form")).to_be_visible()
        page.focus("#reading-form input[value='pneumonia']")  # radios: arrow keys move the choice
        page.keyboard.press("ArrowRight")  # -> no pneumonia
        page.keyboard.press("Tab")
        page.keyboard.type("dr.lee")
        page.keyboard.press("Tab")
        page.keyboard.type("left base clear")
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")  # the submit button
        expect(page.locator("#reading-status")).to_contain_text("Recorded. Reading in force: no pneumonia, by dr.lee", timeout=15_000)
        prediction = httpx.get(f"{base}/api/v1/predictions?limit=1", headers={"X-API-Key": "reading-key"}).json()[0]
        readings = httpx.get(f"{base}/api/v1/predictions/{prediction['id']}/readings", headers={"X-API-Key": "reading-key"}).json()
        assert [(r["finding"], r["reader"], r["source"], r["comment"]) for r in readings] == [
            ("no_pneumonia", "dr.lee", "page", "left base clear")]
        assert page.input_value("#reader") == "dr.lee"  # kept for the next study (this tab only)
        page.check("#reading-form input[value='pneumonia']")
        page.click("#reading-form button")
        expect(page.locator("#reading-status")).to_contain_text("pneumonia, by dr.lee", timeout=15_000)
        expect(page.locator("#reading-status")).to_contain_text("supersedes 1 earlier")
        expect(page.locator("#performance tr")).to_have_count(1)  # the child point in force, one read study
        expect(page.locator("#performance tr td").nth(2)).to_have_text("1")
        expect(page.locator("#performance tr td").nth(3)).to_contain_text("100.0 %")  # read pneumonia, answered pneumonia
        page.fill("#reader", "Jane Doe")  # not a reader id: the browser refuses before anything is sent
        page.click("#reading-form button")
        assert len(httpx.get(f"{base}/api/v1/predictions/{prediction['id']}/readings",
                             headers={"X-API-Key": "reading-key"}).json()) == 2  # fmt: skip
        page.screenshot(path=str(OUTPUT / "web-reading.png"), full_page=True)
        browser.close()
