"""The heat map exported in the ONNX graph equals Grad-CAM computed by pytorch-grad-cam."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def test_onnx_heatmap_equals_grad_cam(smoke_checkpoint: Path, data_root: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pneumoscan.inputs.preprocessing import preprocess_file
    from pneumoscan.learning.data import list_records
    from pneumoscan.learning.export import export_onnx
    from pneumoscan.learning.training import PneumoniaClassifier

    module = PneumoniaClassifier.load_from_checkpoint(smoke_checkpoint, map_location="cpu", pretrained=False).eval()
    onnx_path = export_onnx([module], tmp_path / "model.onnx", 224)
    records = list_records(data_root, "test")[::60]
    batch = np.stack([preprocess_file(r.path) for r in records])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, heatmaps = session.run(["logit", "heatmap"], {"image": batch})
    assert heatmaps.shape == (len(records), 224, 224)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0 + 1e-6

    model = module.model.float().eval()
    with GradCAM(model=model, target_layers=[model.bn2]) as cam:
        reference = cam(input_tensor=torch.from_numpy(batch), targets=[ClassifierOutputTarget(0)] * len(records))
    for ours, theirs in zip(heatmaps, reference):
        assert theirs.std() > 0, "degenerate Grad-CAM: pick other images"
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.99
    # and a heat map is not just the same picture for every image
    assert np.corrcoef(heatmaps[0].ravel(), heatmaps[1].ravel())[0, 1] < 0.99


def test_the_overlay_table_gives_the_pixel_by_pixel_blend() -> None:
    """The 256×256 table is a speed-up only: the same bytes as blending each pixel (the on-device page does that)."""
    import numpy as np
    from PIL import Image

    from pneumoscan.running.explanation import colorize, overlay

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (301, 517), dtype=np.uint8))
    heatmap = rng.random((7, 7)).astype(np.float32)
    heat = Image.fromarray((heatmap * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    values = np.asarray(heat, dtype=np.float32) / 255.0
    weight = (0.45 * (0.3 + 0.7 * values))[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    expected = (base * (1 - weight) + colorize(values).astype(np.float32) * weight).round().astype(np.uint8)
    assert np.array_equal(np.asarray(overlay(image, heatmap)), expected)
