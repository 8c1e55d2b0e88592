"""Pull mode against a broken or hostile DICOMweb server of the tests' own (issue 27): it ends, in bounded memory.

Before issue 27 pull mode read every QIDO page the server offered (3.6 GB in 60 s against endless
pages), whole WADO bodies (a 500 MB part: 2 GB; an endless chunked answer: still growing after
90 s), waited for ever on an answer trickling one byte at a time, and one malformed answer (a
search result without StudyInstanceUID, HTML instead of DICOM, a UID of "..") ended the whole
pull with a traceback and exit 1, on every re-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dicom_factory import radiograph_dicom
from hostile_dicomweb import GOOD_SOP, HostileDicomweb

from pneumoscan.apps.triage import read_worklist

pytestmark = pytest.mark.slow

PULL_AND_MEASURE = """
import json, sys, time
def hwm():  # VmHWM in kB: this process's own peak (ru_maxrss keeps the parent's peak across exec)
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])
from datetime import date
from pathlib import Path
from pneumoscan.apps.dicom.pull import pull
from pneumoscan.errors import PacsUnavailable
base = hwm()
started = time.monotonic()
try:
    pulled = pull(sys.argv[1], date(2026, 1, 1), Path(sys.argv[2]), progress=False)
    outcome = {"fetched": pulled.fetched, "instances": pulled.instances, "series": pulled.series,
               "failures": [f.reason for f in pulled.failures]}
except PacsUnavailable as exc:
    outcome = {"unavailable": str(exc)}
outcome["seconds"] = time.monotonic() - started
outcome["growth_mb"] = (hwm() - base) / 1024
print(json.dumps(outcome))
"""


def pull_in_a_fresh_process(url: str, out: Path) -> dict:
    """Pull mode's own memory and time, with its default limits."""
    warm = "import pneumoscan.apps.dicom.pull, requests, numpy, PIL.Image\n"  # imported before the baseline
    result = subprocess.run([sys.executable, "-c", warm + PULL_AND_MEASURE, url, str(out)], capture_output=True, text=True,
                            timeout=150)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("mode", ["endless", "huge", "endless-chunked"])
def test_pull_ends_within_90_s_and_300_mb_against_a_hostile_server(mode: str, tmp_path: Path) -> None:
    server = HostileDicomweb(mode).start()
    try:
        outcome = pull_in_a_fresh_process(server.url, tmp_path / "out")
    finally:
        server.stop()
    assert outcome["seconds"] < 90 and outcome["growth_mb"] <= 300, outcome | {"failures": outcome["failures"][:3]}
    assert outcome["fetched"] == 0 and outcome["failures"], outcome
    if mode == "endless":  # bounded by the default maximum count, the rest reported
        assert outcome["instances"] == 2000 and outcome["series"] == 1000 and server.requests < 2200, server.requests
        assert any("more than 2000 instances" in reason for reason in outcome["failures"])
    else:
        assert outcome["failures"] == ["not fetched: the PACS's answer is larger than the limit of 65 MB; not read further"]


def triage_command(url: str, out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumoscan", "triage", "--dicomweb", url, "--since", "2026-01-01",
                           "--out", str(out), "--model", str(model), "--no-report", *extra],
                          capture_output=True, text=True, timeout=150)  # fmt: skip


@pytest.mark.parametrize("trickle, deadline", [(1.0, 4), (3.0, 2)], ids=["past-the-deadline", "past-the-read-timeout"])
def test_a_pacs_that_trickles_every_answer_is_unreachable_exit_3_within_the_deadline(trickle: float, deadline: int, tmp_path: Path,
                                                                                      shipped_model: Path) -> None:  # fmt: skip
    server = HostileDicomweb("trickle", trickle_seconds=trickle).start()
    try:
        started = time.monotonic()
        result = triage_command(server.url, tmp_path / "out", shipped_model, "--request-seconds", str(deadline))
        took = time.monotonic() - started
    finally:
        server.stop()
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "cannot be searched" in result.stderr and "did not answer in time" in result.stderr
    assert took < 30, f"{took:.0f} s"


def test_retrievals_that_trickle_become_rows_and_the_rest_is_not_tried(tmp_path: Path, shipped_model: Path) -> None:
    server = HostileDicomweb("trickle-wado", trickle_seconds=1.0).start()
    try:
        started = time.monotonic()
        result = triage_command(server.url, tmp_path / "out", shipped_model, "--request-seconds", "3")
        took = time.monotonic() - started
    finally:
        server.stop()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr  # errors in the worklist
    rows = read_worklist(tmp_path / "out")
    reasons = sorted(row.error for row in rows)
    assert len(rows) == 3 and all(row.status == "error" for row in rows)
    assert sum("did not answer in time" in reason for reason in reasons) == 2  # two tries, then the PACS is taken as down
    assert sum("2 requests in a row" in reason for reason in reasons) == 1
    assert took < 40, f"{took:.0f} s"


def test_malformed_answers_are_rows_with_their_reason_and_the_good_study_is_scored(tmp_path: Path, data_root: Path,
                                                                                    shipped_model: Path) -> None:  # fmt: skip
    film = next((data_root / "test" / "PNEUMONIA").iterdir())
    server = HostileDicomweb("malformed", good_instance=radiograph_dicom(film)).start()
    try:
        first = triage_command(server.url, tmp_path / "out", shipped_model)
        again = triage_command(server.url, tmp_path / "out", shipped_model)
    finally:
        server.stop()
    for result in (first, again):
        assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    rows = read_worklist(tmp_path / "out")
    scored = [row for row in rows if row.status == "scored"]
    assert len(scored) == 1 and scored[0].path.endswith(f"{GOOD_SOP}.dcm")
    reasons = " | ".join(row.error or "" for row in rows if row.status == "error")
    assert len([row for row in rows if row.status == "error"]) == 6, reasons  # the same rows after the re-run, not twice
    for words in ("no StudyInstanceUID", "'..'", "'1.2\\n3'", "text/html, not DICOM", "not a DICOM file", "'../../etc'"):
        assert words in reasons, (words, reasons)
    assert "1 new" in first.stdout and "0 new" in again.stdout
    assert not any(p.name == "etc" for p in (tmp_path / "out").rglob("*"))  # a UID never names a path


def test_a_search_that_finds_nothing_with_204_is_no_new_study_not_an_error(tmp_path: Path, shipped_model: Path) -> None:
    server = HostileDicomweb("no-content").start()
    try:
        result = triage_command(server.url, tmp_path / "out", shipped_model)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "0 CR/DX series, 0 instances, 0 new" in result.stdout and read_worklist(tmp_path / "out") == []
