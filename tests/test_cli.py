from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.cli import batches, main


def test_help_lists_train_and_its_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--epochs", "--limit-train-batches", "--freeze-epochs", "--strategy", "--num-nodes"):
        assert flag in text


def test_bad_data_root_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "pneumoscan: error: no chest X-ray dataset" in result.stderr
    assert "Traceback" not in result.stderr


def test_limit_batches_takes_counts_and_fractions() -> None:
    assert batches("4") == 4 and isinstance(batches("4"), int)
    assert batches("0.25") == 0.25
    assert batches("1.0") == 1.0 and isinstance(batches("1.0"), float)


def test_the_inference_path_imports_no_torch_scipy_or_sklearn() -> None:
    """Serving installs only the `serve` extra: none of these may be needed there."""
    code = (
        "import sys, pneumoscan, pneumoscan.preprocessing, pneumoscan.data, pneumoscan.config, "
        "pneumoscan.inference, pneumoscan.predict, pneumoscan.explanation, pneumoscan.cli; "
        "print(sorted(m for m in ('torch', 'scipy', 'sklearn', 'matplotlib', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
