"""Batch triage on real images: worklist, report (opened in headless Chromium), resume, shards and merge."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import build_dicom
from PIL import Image

from pneumoscan.apps.triage import (
    COLUMNS,
    Shard,
    discover,
    merge,
    read_worklist,
    triage,
)
from pneumoscan.config import PROJECT_ROOT
from pneumoscan.learning.data import list_records
from pneumoscan.running.inference import Predictor

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = PROJECT_ROOT / "test-output"


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


def sample_images(data_root: Path, n: int) -> list[Path]:
    """``n`` real test images, both classes alternating."""
    records = list_records(data_root, "test")
    normal, pneumonia = [r.path for r in records if r.label == 0], [r.path for r in records if r.label == 1]
    return [group[i // 2] for i, group in zip(range(n), [normal, pneumonia] * n)]


def png_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def mixed_folder(data_root: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Good JPEGs and PNGs, a DICOM with a patient name, a CT, corrupt and non-image files, nested folders.

    Returns the folder and the expected status of each file (by path relative to it).
    """
    import pydicom

    folder = tmp_path / "studies"
    (folder / "ward_a" / "day1").mkdir(parents=True)
    (folder / "ward_b").mkdir()
    (folder / ".cache").mkdir()
    images = sample_images(data_root, 6)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, status: str) -> None:
        (folder / name).write_bytes(data)
        expected[name] = status

    for i, image in enumerate(images[:4]):
        put(f"ward_a/day1/{image.name}" if i % 2 else image.name, image.read_bytes(), "scored")
    put("ward_b/chest.png", png_bytes(images[4]), "scored")
    put("ward_b/IM000001", build_dicom(images[5], bits=12, photometric="MONOCHROME1", patient_name="Doe^Jane"), "scored")
    put("ward_b/ct.dcm", (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes(), "skipped")
    put("ward_a/notes.txt", b"patient seen, film to follow", "skipped")
    put("ward_a/truncated.jpeg", images[0].read_bytes()[:1500], "error")
    put("ward_a/day1/empty.png", b"", "error")
    (folder / ".cache" / "ignored.jpeg").write_bytes(images[0].read_bytes())  # hidden: not an input
    return folder, expected


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "worklist.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_mixed_folder_gives_a_complete_ranked_worklist(mixed_folder: tuple[Path, dict[str, str]], predictor: Predictor,
                                                         data_root: Path, tmp_path: Path) -> None:  # fmt: skip
    folder, expected = mixed_folder
    out = tmp_path / "triage"
    summary = triage([folder], out, predictor, progress=False)

    rows = read_rows(out)
    assert list(rows[0]) == COLUMNS
    by_name = {Path(r["path"]).relative_to(folder).as_posix(): r for r in rows}
    assert {name: r["status"] for name, r in by_name.items()} == expected  # every input once, hidden ones excluded
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    probabilities = [float(r["probability"]) for r in rows if r["probability"]]
    assert len(probabilities) == 6 and probabilities == sorted(probabilities, reverse=True)
    assert all(not r["probability"] for r in rows[6:]), "unscored inputs come after every scored one"
    for name, row in by_name.items():
        if expected[name] == "scored":
            assert row["label"] == ("PNEUMONIA" if float(row["probability"]) >= predictor.threshold else "NORMAL")
            assert row["in_distribution"] in ("True", "False") and not row["error"]
            assert (out / "thumbnails" / f"{row['sha256'][:32]}.jpg").is_file()
        else:
            assert row["error"] and not row["label"], name
    assert "modality CT" in by_name["ward_b/ct.dcm"]["error"]
    assert "text file" in by_name["ward_a/notes.txt"]["error"]

    # the DICOM's probability is the source image's; its UIDs are kept, the patient's name is not
    dicom = by_name["ward_b/IM000001"]
    source = predictor.predict(sample_images(data_root, 6)[5])
    assert float(dicom["probability"]) == pytest.approx(source.probability, abs=0.01)
    assert dicom["format"] == "dicom" and dicom["study_instance_uid"].startswith("1.") and dicom["series_instance_uid"]
    everything = "".join(p.read_text() for p in (out / "worklist.csv", out / "summary.json", out / "report.html"))
    assert "Doe^Jane" not in everything and "PID-123456" not in everything

    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 6 and summary["skipped"] == 2 and summary["errors"] == 2
    assert sum(summary["labels"].values()) == 6 - summary["not_validated"] and summary["model"]["threshold"] == predictor.threshold
    assert all(row["population"] in predictor.populations and float(row["threshold"]) > 0 for row in rows if row["probability"])
    assert summary["timing"]["images_per_second"] > 0


def test_the_report_opens_in_headless_chromium(mixed_folder: tuple[Path, dict[str, str]], predictor: Predictor,
                                               tmp_path: Path) -> None:  # fmt: skip
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install chromium (.ci/run installs it)")
    folder, expected = mixed_folder
    out = tmp_path / "triage"
    triage([folder], out, predictor, progress=False)
    # the report is self-contained: it must open with the thumbnails folder gone, and nothing fetched
    shutil.rmtree(out / "thumbnails")
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "report.html").as_uri())
        rows = page.locator("#worklist tbody tr")
        expect(rows).to_have_count(len(expected))
        expect(page.locator(".cards")).to_contain_text("6studies scored")
        images = page.locator("#worklist img")
        expect(images).to_have_count(6)
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("svg[role=img] rect").count() == 20
        first = rows.first.locator("td").nth(3).get_attribute("data-value")
        page.get_by_role("button", name="probability").click()  # ascending: the least likely first
        assert rows.first.locator("td").nth(3).get_attribute("data-value") in ("", None) or float(
            rows.first.locator("td").nth(3).get_attribute("data-value")
        ) <= float(first)
        page.get_by_role("button", name="probability").click()  # descending: back to the worklist order
        assert rows.first.locator("td").nth(3).get_attribute("data-value") == first
        page.fill("#filter", "ct.dcm")
        expect(page.locator("#worklist tbody tr:visible")).to_have_count(1)
        page.fill("#filter", "")
        page.screenshot(path=str(OUTPUT / "triage-report.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def test_resume_skips_studies_already_in_the_worklist(data_root: Path, predictor: Predictor, tmp_path: Path) -> None:
    folder, out = tmp_path / "studies", tmp_path / "triage"
    folder.mkdir()
    images = sample_images(data_root, 6)
    for image in images[:4]:
        shutil.copy(image, folder / image.name)
    first = triage([folder], out, predictor, progress=False)
    assert first["timing"]["scored_this_run"] == 4 and first["resumed_from_worklist"] == 0

    for image in images[4:]:
        shutil.copy(image, folder / image.name)
    (folder / images[0].name).write_bytes(images[5].read_bytes())  # same path, new content: scored again
    second = triage([folder], out, predictor, progress=False)
    assert second["resumed_from_worklist"] == 3 and second["timing"]["scored_this_run"] == 3
    rows = read_worklist(out)
    assert sorted(r.path for r in rows) == sorted((folder / i.name).as_posix() for i in images)
    changed = next(r for r in rows if r.path.endswith(images[0].name))
    twin = next(r for r in rows if r.path.endswith(images[5].name))
    assert changed.sha256 == twin.sha256 and changed.probability == pytest.approx(twin.probability, abs=1e-6)

    third = triage([folder], out, predictor, progress=False)
    assert third["timing"]["scored_this_run"] == 0 and third["rows"] == 6


def test_two_shards_merged_equal_one_unsharded_run(data_root: Path, predictor: Predictor, tmp_path: Path) -> None:
    images = [str(p) for p in sample_images(data_root, 40)]
    whole = triage(images, tmp_path / "whole", predictor, progress=False)
    parts = [triage(images, tmp_path / f"part{k}", predictor, shard=Shard(k, 2), progress=False) for k in (1, 2)]
    assert all(part["rows"] > 0 for part in parts) and sum(part["rows"] for part in parts) == 40
    shard_paths = [{r.path for r in read_worklist(tmp_path / f"part{k}")} for k in (1, 2)]
    assert not shard_paths[0] & shard_paths[1]

    merged = merge([tmp_path / "part1", tmp_path / "part2"], tmp_path / "merged")
    expected, got = read_worklist(tmp_path / "whole"), read_worklist(tmp_path / "merged")
    assert [(r.rank, r.path, r.label, r.sha256) for r in got] == [(r.rank, r.path, r.label, r.sha256) for r in expected]
    np.testing.assert_allclose([r.probability for r in got], [r.probability for r in expected], atol=1e-6)
    assert {k: merged[k] for k in ("rows", "scored", "labels", "errors")} == {k: whole[k] for k in ("rows", "scored", "labels", "errors")}
    assert (tmp_path / "merged" / "report.html").stat().st_size > 40 * 1000  # thumbnails of all 40 embedded


def test_shards_are_stable_and_disjoint() -> None:
    paths = [f"archive/{i:05d}.dcm" for i in range(1000)]
    shards = [Shard.parse(f"{k}/4") for k in range(1, 5)]
    owners = [[s.holds(p) for s in shards].index(True) for p in paths]
    assert all(sum(s.holds(p) for s in shards) == 1 for p in paths)
    assert min(owners.count(k) for k in range(4)) > 200  # roughly even
    assert [Shard(2, 4).holds(p) for p in paths[:50]] == [Shard.parse("2/4").holds(p) for p in paths[:50]]


def test_inputs_may_be_files_folders_and_glob_patterns(data_root: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import ConfigurationError

    folder = tmp_path / "studies"
    (folder / "a").mkdir(parents=True)
    for i, image in enumerate(sample_images(data_root, 3)):
        shutil.copy(image, folder / "a" / f"{i}.jpeg")
    (folder / "a" / "x.dcm").write_bytes(b"")
    found = discover([str(folder / "**" / "*.jpeg"), folder / "a" / "0.jpeg", folder])
    assert [p.name for p in found] == ["0.jpeg", "1.jpeg", "2.jpeg", "x.dcm"]
    with pytest.raises(ConfigurationError, match="matches no file"):
        discover([str(folder / "*.png")])


def test_triage_command_end_to_end(mixed_folder: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    folder, expected = mixed_folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pneumoscan", *args], capture_output=True, text=True, timeout=300, env=env)

    result = run("triage", str(folder), "--out", str(tmp_path / "a"), "--int8", "--shard", "1/2")
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr
    result_b = run("triage", str(folder), "--out", str(tmp_path / "b"), "--int8", "--shard", "2/2")
    assert "Traceback" not in result_b.stderr
    assert 1 in (result.returncode, result_b.returncode), "a corrupt image makes the exit code 1"
    merged = run("triage", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "all"))
    assert merged.returncode == 0, merged.stderr
    assert "6 studies scored" in merged.stdout and "2 skipped, 2 errors" in merged.stdout
    assert len(read_rows(tmp_path / "all")) == len(expected)
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["model"]["precision"] == "int8"

    bad = run("triage", str(folder), "--out", str(tmp_path / "c"), "--shard", "3/2")
    assert bad.returncode == 2 and "K must be between 1 and N" in bad.stderr and "Traceback" not in bad.stderr
    not_a_worklist = tmp_path / "d"
    not_a_worklist.mkdir()
    (not_a_worklist / "worklist.csv").write_text("name,score\nx,1\n")
    clash = run("triage", str(folder), "--out", str(not_a_worklist))
    assert clash.returncode == 2 and "not a pneumoscan worklist" in clash.stderr


# --------------------------------------------------------------------------- hardening (issue 17)


def test_a_bug_on_one_study_is_that_studys_error_row(data_root: Path, predictor: Predictor, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import pneumoscan.apps.triage as triage_module

    folder = tmp_path / "studies"
    folder.mkdir()
    images = sample_images(data_root, 4)
    for image in images:
        shutil.copy(image, folder / image.name)
    real = triage_module.load_xray

    def flaky(data, limits=None):  # type: ignore[no-untyped-def]
        if data == images[1].read_bytes():
            raise KeyError("a bug in pneumoscan")
        return real(data, limits)

    monkeypatch.setattr(triage_module, "load_xray", flaky)
    summary = triage([folder], tmp_path / "out", predictor, progress=False)
    assert summary["scored"] == 3 and summary["errors"] == 1
    failed = next(r for r in read_worklist(tmp_path / "out") if r.status == "error")
    assert failed.path.endswith(images[1].name) and "internal error" in failed.error and "KeyError" in failed.error


def test_worklist_cells_cannot_run_as_spreadsheet_formulas(data_root: Path, predictor: Predictor, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Run from inside the studies folder with a glob, the worklist's paths are the bare file names."""
    folder = tmp_path / "studies"
    folder.mkdir()
    image = sample_images(data_root, 1)[0]
    names = ["=HYPERLINK(1).jpeg", "+1.jpeg", "-2.jpeg", "@SUM(A1).jpeg", "'quoted.jpeg", "plain.jpeg", "=cmd.txt"]
    for name in names:
        (folder / name).write_bytes(b"=cmd|' /C calc'!A0" if name.endswith(".txt") else image.read_bytes())
    monkeypatch.chdir(folder)
    triage(["*"], tmp_path / "out", predictor, progress=False, report=False)
    written = sorted(row["path"] for row in read_rows(tmp_path / "out"))
    assert written == sorted(["'=HYPERLINK(1).jpeg", "'+1.jpeg", "'-2.jpeg", "'@SUM(A1).jpeg", "''quoted.jpeg", "plain.jpeg",
                              "'=cmd.txt"])  # fmt: skip
    assert sorted(r.path for r in read_worklist(tmp_path / "out")) == sorted(names)  # read back exactly
    again = triage(["*"], tmp_path / "out", predictor, progress=False, report=False)
    assert again["timing"]["scored_this_run"] == 0  # escaped paths resume like any other


def test_merge_refuses_a_worklist_whose_sha256_is_not_a_digest(data_root: Path, predictor: Predictor, tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    folder.mkdir()
    shutil.copy(sample_images(data_root, 1)[0], folder / "a.jpeg")
    triage([folder], tmp_path / "part", predictor, progress=False, report=False)
    worklist = tmp_path / "part" / "worklist.csv"
    rows = read_rows(tmp_path / "part")
    rows[0]["sha256"] = "../../../planted"
    with worklist.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    from pneumoscan.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="line 2: the sha256 column holds '../../../planted'"):
        merge([tmp_path / "part"], tmp_path / "merged" / "deep" / "out")
    assert not list(tmp_path.rglob("planted*"))


def test_a_flagged_study_is_listed_as_not_validated_never_as_a_verdict(predictor: Predictor, data_root: Path, tmp_path: Path) -> None:
    import skimage

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(Path(skimage.__file__).parent / "data" / "camera.png", folder / "photo.png")
    shutil.copy(sample_images(data_root, 1)[0], folder / "xray.jpeg")
    out = tmp_path / "triage"
    summary = triage([folder], out, predictor, progress=False)
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert rows["photo.png"]["in_distribution"] == "False" and summary["not_validated"] == 1
    assert sum(summary["labels"].values()) == 1  # the flagged study counts as neither PNEUMONIA nor NORMAL
    report = (out / "report.html").read_text()
    photo_row = next(line for line in report.split("<tr>") if "photo.png" in line)
    assert "not validated for this image" in photo_row and 'class="pos"' not in photo_row and 'class="neg"' not in photo_row
    assert "child operating point" in report


def test_the_summary_and_report_say_the_operating_point_in_force_and_the_drift(site_model: Path, data_root: Path, tmp_path: Path) -> None:
    """120 pneumonia films against a site set of half normals: the children's probability has shifted."""
    pneumonias = [r.path for r in list_records(data_root, "test") if r.label == 1][:120]
    summary = triage(pneumonias, tmp_path / "out", Predictor.load(site_model), progress=False)
    assert summary["model"]["operating_points"]["child"]["in_force"] == "site calibration of 2026-11-20"
    assert summary["model"]["operating_points"]["adult"]["in_force"] == "validation"
    drift = summary["drift"]
    assert drift["available"] and drift["reference"].startswith("the site set of 2026-11-20")
    child = next(i for i in drift["indicators"] if i["name"] == "probability" and i["population"] == "child")
    assert child["n"] >= 100 and child["judged"] and child["drifted"] and drift["warning"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["drift"]["warning"] is True
    report = (tmp_path / "out" / "report.html").read_text()
    assert 'id="drift"' in report and "Recent studies do not look like those the operating point was set on" in report
    assert "site calibration of 2026-11-20" in report


def test_findings_given_with_the_run_give_its_sensitivity_and_specificity(data_root: Path, tmp_path: Path, capsys) -> None:
    """``triage --readings``: findings matched by the end of each study's path, figures equal to counting by hand,
    a finding that names no study listed, and a bad findings file refused before anything is scored."""
    from pneumoscan.apps.cli import main

    folder = tmp_path / "studies"
    records = [r for r in list_records(data_root, "test") if r.label == 1][:6] + [r for r in list_records(data_root, "test") if r.label == 0][:6]
    for record in records:
        (folder / record.class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(record.path, folder / record.class_name / record.path.name)
    findings = tmp_path / "findings.csv"
    findings.write_text("path,finding\n" + "".join(f"{r.class_name}/{r.path.name},{'pneumonia' if r.label else 'normal'}\n" for r in records)
                        + "NORMAL/not-there.jpeg,normal\n")  # fmt: skip
    assert main(["triage", str(folder), "--out", str(tmp_path / "out"), "--readings", str(findings)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    performance = summary["performance"]
    rows = {Path(r.path).name: r for r in read_worklist(tmp_path / "out")}
    counted = [(r.label, rows[r.path.name].label == "PNEUMONIA") for r in records
               if rows[r.path.name].in_distribution is not False]  # fmt: skip
    tp, fn = sum(t and s for t, s in counted), sum(t and not s for t, s in counted)
    tn, fp = sum(not t and not s for t, s in counted), sum(not t and s for t, s in counted)
    totals = {k: sum(g["counts"][k] for g in performance["groups"]) for k in ("true_positive", "false_negative", "true_negative", "false_positive")}
    assert totals == {"true_positive": tp, "false_negative": fn, "true_negative": tn, "false_positive": fp}
    assert performance["read"] == 12 and performance["unmatched"] == ["line 14: 'NORMAL/not-there.jpeg' names no study of the run"]
    assert "against 12 radiologists' findings" in printed and "sensitivity" in printed
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Against radiologists' findings (12 studies)" in report

    findings.write_text("path,finding\nNORMAL/a.jpeg,maybe\n")
    assert main(["triage", str(folder), "--out", str(tmp_path / "refused"), "--readings", str(findings)]) == 2
    assert "line 2: finding 'maybe'" in capsys.readouterr().err and not (tmp_path / "refused").exists()
