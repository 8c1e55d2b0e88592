"""Ensembles and test-time augmentation exported as one ONNX graph (single-model export: test_evaluation.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.errors import ConfigurationError
from pneumoscan.learning.data import list_records


def test_an_ensemble_with_tta_is_one_graph_that_averages_its_members_views(
    smoke_checkpoint: Path, small_data_root: Path, data_root: Path, tmp_path: Path
) -> None:
    import torch

    from pneumoscan.inputs.preprocessing import preprocess_file
    from pneumoscan.learning.export import export
    from pneumoscan.learning.training import PneumoniaClassifier
    from pneumoscan.running.inference import Predictor

    card = export([smoke_checkpoint, smoke_checkpoint], tmp_path / "ens", small_data_root, tta_zoom=0.9)
    assert card["architecture"] == "efficientnet_lite0 + efficientnet_lite0" and len(card["training"]["members"]) == 2
    assert card["tta"]["combined"] == "mean of the logits" and 0 < card["calibration"]["temperature"]
    ensemble = Predictor.load(tmp_path / "ens")

    paths = [r.path for r in list_records(data_root, "test")[::100]]
    module = PneumoniaClassifier.load_from_checkpoint(smoke_checkpoint, map_location="cpu", pretrained=False).eval()
    x = torch.from_numpy(np.stack([preprocess_file(p) for p in paths]))
    zoomed = torch.nn.functional.interpolate(x[:, :, 11:213, 11:213], size=(224, 224), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        expected = ((module(x) + module(zoomed)) / 2).numpy()  # two identical members: their mean is one of them
    outputs = ensemble.outputs(paths, ["logit", "heatmap", "embedding"])
    np.testing.assert_allclose(outputs["logit"], expected, atol=2e-4)
    assert outputs["embedding"].shape == (len(paths), 2 * 1280)
    assert outputs["heatmap"].min() >= 0 and outputs["heatmap"].max() <= 1 and np.isfinite(outputs["heatmap"]).all()


def test_members_of_different_splits_or_int8_ensembles_are_refused(smoke_checkpoint: Path, small_data_root: Path, tmp_path: Path) -> None:
    from pneumoscan.learning.export import export

    other = tmp_path / "other_run"
    shutil.copytree(smoke_checkpoint.parent, other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["seed"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigurationError, match="must share the validation split"):
        export([smoke_checkpoint, other / smoke_checkpoint.name], tmp_path / "m", small_data_root)
    with pytest.raises(ConfigurationError, match="--int8 quantises single models only"):
        export([smoke_checkpoint], tmp_path / "m", small_data_root, int8=True, tta_zoom=0.9)
    assert not (tmp_path / "m").exists()


def test_the_gates_shifted_copies_are_seeded_and_really_shifted(data_root: Path) -> None:
    from pneumoscan.inputs.imaging import load_xray
    from pneumoscan.learning.export import shifted_copies

    records = list_records(data_root, "train")[::400][:6]
    first, again = shifted_copies(records, copies=2, seed=3), shifted_copies(records, copies=2, seed=3)
    assert len(first) == 2 * len(records)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again)), "the same seed gives the same films"
    originals = [np.asarray(load_xray(r.path).image) for r in records for _ in range(2)]
    changed = [not np.array_equal(np.asarray(s), o) for s, o in zip(first, originals)]
    assert sum(changed) >= len(changed) // 2, "most copies differ from their film"
    assert all(s.size == load_xray(r.path).image.size for s, r in zip(first[::2], records))


class NegativeEverywhere(torch.nn.Module):
    """A network whose class activation map is below zero in every cell, highest in one known cell."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(self.classifier.weight, -1.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.full((len(x), 1, 7, 7), 2.0)
        features[:, :, 4, 5] = 0.5  # the least negative cell: where the map must peak
        return features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features.mean(dim=(2, 3)))

    def get_classifier(self) -> torch.nn.Module:
        return self.classifier


def test_a_box_guided_map_below_zero_everywhere_still_peaks_where_its_cells_do() -> None:
    """ReLU'd (Grad-CAM), such a map is blank and its peak the top-left pixel; a box-guided export shows each cell's
    sigmoid, which keeps the cells' order."""
    from pneumoscan.learning.export import LogitAndHeatmap

    x = torch.zeros(2, 3, 224, 224)
    _, rectified, _ = LogitAndHeatmap(NegativeEverywhere(), 224).eval()(x)
    assert float(rectified.max()) == 0.0
    _, kept, _ = LogitAndHeatmap(NegativeEverywhere(), 224, cell_probabilities=True).eval()(x)
    assert torch.allclose(kept.amax(dim=(1, 2)), torch.ones(2), atol=1e-5)
    row, column = divmod(int(kept[0].argmax()), 224)
    assert (row // 32, column // 32) == (4, 5)


def test_only_box_guided_runs_export_cell_probabilities(smoke_checkpoint: Path) -> None:
    from pneumoscan.learning.export import heatmap_text, is_box_guided
    from pneumoscan.learning.training import PneumoniaClassifier

    module = PneumoniaClassifier.load_from_checkpoint(smoke_checkpoint, map_location="cpu", pretrained=False)
    assert not is_box_guided(module)
    assert "Grad-CAM" in heatmap_text([module])
    module.hparams.box_loss_weight = 1.0
    assert is_box_guided(module) and "sigmoid" in heatmap_text([module])
