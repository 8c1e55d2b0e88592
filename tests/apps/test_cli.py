from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.apps.cli import main
from pneumoscan.apps.cli.training import batches
from pneumoscan.config import PROJECT_ROOT


def test_help_lists_train_and_its_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--epochs", "--limit-train-batches", "--freeze-epochs", "--strategy", "--num-nodes"):
        assert flag in text


def test_bad_data_root_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pneumoscan", "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "pneumoscan: error: no dataset at" in result.stderr
    assert "Traceback" not in result.stderr


def test_limit_batches_takes_counts_and_fractions() -> None:
    assert batches("4") == 4 and isinstance(batches("4"), int)
    assert batches("0.25") == 0.25
    assert batches("1.0") == 1.0 and isinstance(batches("1.0"), float)


def test_the_inference_path_imports_no_torch_scipy_or_sklearn() -> None:
    """Serving installs only the `serve` extra: none of these may be needed there."""
    code = (
        "import sys, pneumoscan, pneumoscan.inputs.preprocessing, pneumoscan.learning.data, pneumoscan.config, "
        "pneumoscan.running.inference, pneumoscan.apps.predict, pneumoscan.running.explanation, pneumoscan.apps.cli; "
        "print(sorted(m for m in ('torch', 'scipy', 'sklearn', 'matplotlib', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_train_settings_files_set_defaults_and_flags_win(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import argparse

    from pneumoscan.apps.cli import training

    config = tmp_path / "run.toml"
    config.write_text('[data]\nseed = 7\nintensity = "equalize"\nstrong_photometric = true\ncrop_scale = [0.9, 1.0]\n'
                      '[train]\nschedule = "cosine"\nlabel_smoothing = 0.1\nepochs = 3\n')  # fmt: skip
    captured: dict[str, argparse.Namespace] = {}
    monkeypatch.setattr(training, "run_train", lambda args: captured.setdefault("args", args) and 0)  # no training here
    main(["train", "--config", str(config), "--epochs", "5"])
    args = captured["args"]
    assert (args.seed, args.strong_photometric, args.schedule, args.label_smoothing) == (7, True, "cosine", 0.1)
    assert args.intensity == "equalize" and args.epochs == 5 and list(args.crop_scale) == [0.9, 1.0]  # the flag wins over the file

    (tmp_path / "bad.toml").write_text("[train]\nlearning_rate = 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "has no setting 'learning_rate'" in capsys.readouterr().err


def test_the_shipped_configs_are_valid() -> None:
    from pneumoscan.apps.cli.training import defaults_from_config
    from pneumoscan.config import PROJECT_ROOT

    configs = sorted((PROJECT_ROOT / "configs").glob("*.toml"))
    assert len(configs) >= 2
    for config in configs:
        assert defaults_from_config(config)


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[2] / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_settings_file_in_configs_is_accepted_by_train(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/ablations.md promises one command per run: a typo in a settings file must fail here, not an hour into a run."""
    import argparse
    import tomllib

    from pneumoscan.apps.cli import training

    captured: dict[str, argparse.Namespace] = {}
    monkeypatch.setattr(training, "run_train", lambda args: captured.setdefault("args", args) and 0)
    assert main(["train", "--config", str(config)]) == 0
    for table in tomllib.loads(config.read_text()).values():
        for key, value in table.items():
            if key == "root":  # dataset paths are relative to the project root, like the settings files
                assert [p.resolve() for p in captured["args"].data] == [(PROJECT_ROOT / v).resolve() for v in value]
                continue
            got = getattr(captured["args"], key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key
