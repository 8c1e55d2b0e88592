from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pneumoscan.config import IMAGENET_MEAN, IMAGENET_STD
from pneumoscan.data import list_records
from pneumoscan.preprocessing import load_grayscale, normalize, preprocess, preprocess_file


def test_model_input_is_three_equal_normalised_channels(data_root: Path) -> None:
    path = list_records(data_root, "test")[0].path
    x = preprocess_file(path)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0  # independent reference
    assert np.array_equal(np.asarray(load_grayscale(path)), np.asarray(Image.open(path).convert("L")))
    for c in range(3):
        np.testing.assert_allclose(x[c], (gray - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rtol=1e-6, atol=1e-6)


def test_colour_and_gray_versions_of_an_image_give_the_same_input() -> None:
    gray = Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8) % 251)
    rgb = Image.merge("RGB", (gray, gray, gray))
    np.testing.assert_array_equal(normalize(gray), normalize(rgb))


def test_other_sizes_are_resized_to_the_model_size() -> None:
    image = Image.new("L", (300, 200), color=128)
    assert preprocess(image).shape == (3, 224, 224)
    assert preprocess(image, size=160).shape == (3, 160, 160)
