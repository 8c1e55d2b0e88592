from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from pneumoscan.config import PROJECT_ROOT, DataConfig, TrainConfig
from pneumoscan.errors import ConfigurationError
from pneumoscan.learning.training import (
    PneumoniaClassifier,
    fit,
    read_history,
    run_history,
)

pytestmark = pytest.mark.slow


def smoke_configs(data_root: Path, out: Path, **train: object) -> tuple[DataConfig, TrainConfig]:
    data = DataConfig(root=data_root, batch_size=8, num_workers=0)
    settings = dict(epochs=1, limit_train_batches=3, limit_val_batches=2, out=out)
    settings.update(train)
    return data, TrainConfig(**settings)


def test_smoke_training_writes_a_complete_run(data_root: Path, tmp_path: Path) -> None:
    best = fit(*smoke_configs(data_root, tmp_path / "run"), command="test")
    run = tmp_path / "run"
    assert best == run / "best.ckpt" and best.is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["arch"] == "efficientnet_lite0"
    assert (PROJECT_ROOT / config["data_root"]).resolve() == data_root.resolve()
    assert not Path(config["data_root"]).is_absolute()  # run records travel: no absolute paths of this machine
    assert len(config["train_file_list_sha256"]) == 64
    assert config["counts"]["train"]["NORMAL"] + config["counts"]["val"]["NORMAL"] == 1341
    assert config["class_weights"][0] > 1 > config["class_weights"][1]
    png = (run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    history = read_history(run / "metrics.csv")
    assert len(history) == 1 and {"train_loss", "val_loss", "val_auroc", "train_auroc"} <= history[0].keys()

    restored = PneumoniaClassifier.load_from_checkpoint(best, pretrained=False).eval()
    with torch.no_grad():
        assert restored(torch.zeros(2, 3, 224, 224)).shape == (2,)


def test_simple_cnn_learns_in_a_few_steps(data_root: Path, tmp_path: Path) -> None:
    data, train = smoke_configs(data_root, tmp_path / "cnn", arch="simple_cnn", pretrained=False, limit_train_batches=4)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in PneumoniaClassifier(arch="simple_cnn", pretrained=False).state_dict().items()}
    best = fit(data, train)
    after = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    changed = [k for k, v in before.items() if k.endswith("weight") and not torch.equal(v, after[k])]
    assert changed, "no weight changed: the optimiser did not step"
    assert read_history(tmp_path / "cnn" / "metrics.csv")[0]["train_loss"] > 0


def test_frozen_backbone_stays_fixed(data_root: Path, tmp_path: Path) -> None:
    data, train = smoke_configs(data_root, tmp_path / "frozen", freeze_epochs=1, limit_train_batches=2)
    L.seed_everything(data.seed)  # the same initial head as fit() will build
    module = PneumoniaClassifier(pretrained=True)
    stem_before = module.model.conv_stem.weight.detach().clone()
    head_before = module.model.classifier.weight.detach().clone()
    best = fit(data, train)
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["model.conv_stem.weight"], stem_before)
    assert torch.equal(state["model.bn1.running_mean"], module.model.bn1.running_mean)
    assert not torch.equal(state["model.classifier.weight"], head_before)


def test_two_process_cpu_ddp(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "pneumoscan", "train", "--data", str(data_root), "--out", str(out),
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--epochs", "1",
        "--batch-size", "4", "--workers", "0", "--limit-train-batches", "2", "--limit-val-batches", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Starting with 2 processes" in log
    assert "gloo" in log
    assert (out / "best.ckpt").is_file() and (out / "curves.png").is_file()


def test_ablation_knobs_do_what_they_say(data_root: Path) -> None:
    from PIL import Image

    from pneumoscan.learning.data import list_records
    from pneumoscan.learning.datamodule import PhotometricAugment

    image = Image.open(list_records(data_root, "train")[0].path).convert("L")
    torch.manual_seed(0)
    augmented = [PhotometricAugment()(image) for _ in range(8)]
    assert all(a.mode == "L" and a.size == image.size for a in augmented)
    assert sum(a.tobytes() != image.tobytes() for a in augmented) >= 4

    confident = torch.tensor([12.0, -12.0])
    labels = torch.tensor([1.0, 0.0])
    plain = PneumoniaClassifier(pretrained=False, label_smoothing=0.0).train()
    smoothed = PneumoniaClassifier(pretrained=False, label_smoothing=0.1).train()
    assert plain.weighted_loss(confident, labels) < 1e-4 < smoothed.weighted_loss(confident, labels)
    assert smoothed.eval().weighted_loss(confident, labels) < 1e-4  # validation loss is never smoothed

    cosine = PneumoniaClassifier(pretrained=False, schedule="cosine", epochs=4).configure_optimizers()
    scheduler = cosine["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(4):
        rates.append(scheduler.get_last_lr()[1])
        cosine["optimizer"].step()
        scheduler.step()
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.5 * rates[0]


def test_mixup_trains_on_blends_of_two_films_with_the_same_blend_of_their_losses() -> None:
    module = PneumoniaClassifier(pretrained=False, mixup_alpha=0.4, channels_last=False).train()
    seen: list[torch.Tensor] = []
    module.model.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach().clone()))
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    torch.manual_seed(3)
    loss = module.training_step((images, labels), 0)

    torch.manual_seed(3)  # the same draws as inside the step: the share, then the pairing
    share = float(torch.distributions.Beta(0.4, 0.4).sample())
    order = torch.randperm(6)
    assert 0 < share < 1 and not torch.equal(order, torch.arange(6))
    torch.testing.assert_close(seen[0], share * images + (1 - share) * images[order])
    with torch.no_grad():
        logits = module(seen[0])
    expected = share * module.weighted_loss(logits, labels) + (1 - share) * module.weighted_loss(logits, labels[order])
    torch.testing.assert_close(loss.detach(), expected)
    # Without mixup the network sees the batch itself.
    seen.clear()
    module.hparams.mixup_alpha = 0.0
    module.training_step((images, labels), 0)
    torch.testing.assert_close(seen[0], images)


def test_weight_averaging_saves_the_averaged_model_and_validates_it(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "swa"
    swa = fit(*smoke_configs(data_root, run, epochs=3, swa_epochs=2), command="test")
    assert swa == run / "swa.ckpt" and swa.is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 4  # 3 epochs and Lightning's batch-norm epoch for the averaged weights
    assert summary["swa_val_auroc"] is not None and 0 <= summary["swa_val_auroc"] <= 1
    saved = torch.load(swa, map_location="cpu", weights_only=False)
    swa_state = saved["callbacks"]["StochasticWeightAveraging"]
    assert int(swa_state["n_averaged"]) == 2  # the last two epochs were averaged ...
    average = swa_state["average_model_state"]
    weights = [k for k in saved["state_dict"] if k.endswith("conv_stem.weight") or k.endswith("classifier.weight")]
    assert weights and all(torch.equal(saved["state_dict"][k], average[k]) for k in weights)  # ... and saved
    restored = PneumoniaClassifier.load_from_checkpoint(swa, pretrained=False).eval()  # loads as a plain classifier
    with torch.no_grad():
        assert restored(torch.zeros(1, 3, 224, 224)).shape == (1,)

    with pytest.raises(ConfigurationError, match="swa_epochs must lie between 1 and epochs - 1"):
        fit(*smoke_configs(data_root, tmp_path / "bad", epochs=2, swa_epochs=2))


def test_a_moving_average_of_the_weights_is_what_the_best_checkpoint_keeps(data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "ema"
    best = fit(*smoke_configs(data_root, run, ema_decay=0.5), command="test")
    saved = torch.load(best, map_location="cpu", weights_only=False)
    assert int(saved["averaging_state"]["n_averaged"]) == 3  # one update per optimiser step
    average, trained = saved["state_dict"], saved["current_model_state"]
    stem = next(k for k in average if k.endswith("conv_stem.weight"))
    assert not torch.equal(average[stem], trained[stem])  # the checkpoint's weights are the average, not the last step's
    restored = PneumoniaClassifier.load_from_checkpoint(best, pretrained=False).eval()
    torch.testing.assert_close(restored.state_dict()[stem], average[stem])  # export reads the average
    assert json.loads((run / "config.json").read_text())["train"]["ema_decay"] == 0.5

    with pytest.raises(ConfigurationError, match="choose one"):
        fit(*smoke_configs(data_root, tmp_path / "both", epochs=3, swa_epochs=1, ema_decay=0.9))
    with pytest.raises(ConfigurationError, match="between 0 and 1"):
        fit(*smoke_configs(data_root, tmp_path / "bad", ema_decay=1.5))


def test_an_interrupted_run_resumes_from_its_last_checkpoint(small_data_root: Path, tmp_path: Path) -> None:
    """Kill a real training process after its first epoch; --resume finishes it with the same split and settings."""
    import signal
    import time

    run = tmp_path / "run"
    command = [sys.executable, "-m", "pneumoscan", "train", "--data", str(small_data_root), "--out", str(run), "--epochs", "3",
               "--limit-train-batches", "2", "--limit-val-batches", "2", "--batch-size", "8", "--workers", "0", "--seed", "5"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (run / "last.ckpt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint be written whole (Lightning writes it atomically, then moves on)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epoch_done = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] + 1  # the epoch reached, not the best
    assert 1 <= epoch_done < 3, "the run was not interrupted in the middle"
    split_before = json.loads((run / "config.json").read_text())["counts"]

    resumed = subprocess.run([sys.executable, "-m", "pneumoscan", "train", "--resume", str(run)], capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["counts"] == split_before and config["data"]["seed"] == 5 and config["train"]["epochs"] == 3
    assert config["resumed"][0]["epochs_done_before"] == epoch_done and "--resume" in config["resumed"][0]["command"]
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2  # the third epoch ran
    assert [row["epoch"] for row in run_history(run)] == [0, 1, 2]  # the epochs before the interruption are kept


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from pneumoscan.learning.training import resume_configs

    with pytest.raises(ConfigurationError, match="cannot be resumed"):
        resume_configs(tmp_path)
