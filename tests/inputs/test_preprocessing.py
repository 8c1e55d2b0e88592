from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.config import IMAGENET_MEAN, IMAGENET_STD
from pneumoscan.inputs.preprocessing import (
    load_grayscale,
    normalize,
    preprocess,
    preprocess_file,
)
from pneumoscan.learning.data import list_records


def test_model_input_is_three_equal_normalised_channels(data_root: Path) -> None:
    path = list_records(data_root, "test")[0].path
    x = preprocess_file(path)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0  # independent reference
    assert np.array_equal(np.asarray(load_grayscale(path)), np.asarray(Image.open(path).convert("L")))
    for c in range(3):
        np.testing.assert_allclose(x[c], (gray - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rtol=1e-6, atol=1e-6)


def test_the_looked_up_normalisation_is_the_pixel_by_pixel_float32_arithmetic_bit_for_bit() -> None:
    """Every grey level, as training has always computed it: a model's inputs must not move by a rounding."""
    gray = Image.fromarray(np.arange(256 * 3, dtype=np.uint16).reshape(24, 32).astype(np.uint8))
    levels = np.asarray(gray, dtype=np.float32) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    expected = ((np.broadcast_to(levels, (3, 24, 32)) - mean) / std).astype(np.float32)
    x = normalize(gray)
    assert x.dtype == np.float32 and x.shape == (3, 24, 32) and x.flags.c_contiguous
    assert np.array_equal(x, expected)


def test_colour_and_gray_versions_of_an_image_give_the_same_input() -> None:
    gray = Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8) % 251)
    rgb = Image.merge("RGB", (gray, gray, gray))
    np.testing.assert_array_equal(normalize(gray), normalize(rgb))


def test_other_sizes_are_resized_to_the_model_size() -> None:
    image = Image.new("L", (300, 200), color=128)
    assert preprocess(image).shape == (3, 224, 224)
    assert preprocess(image, size=160).shape == (3, 160, 160)


def test_equalisation_spreads_a_washed_out_film_over_the_whole_grey_range(data_root: Path) -> None:
    path = list_records(data_root, "train")[0].path
    film = np.asarray(load_grayscale(path), dtype=np.float32)
    washed_out = Image.fromarray((96 + film * 0.25).astype(np.uint8))  # grey levels squeezed into 96..159
    dark = Image.fromarray((film * 0.4).astype(np.uint8))
    assert np.ptp(preprocess(washed_out)[0]) < 0.3 * np.ptp(preprocess(dark, intensity="equalize")[0])
    equalised = [preprocess(image, intensity="equalize")[0] for image in (washed_out, dark)]
    for x in equalised:
        assert x.min() == pytest.approx((0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], abs=0.05)
        assert x.max() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], abs=1e-6)
    # The two exposures of one film end up close: what equalisation is for.
    plain_gap = np.abs(preprocess(washed_out)[0] - preprocess(dark)[0]).mean()
    assert np.abs(equalised[0] - equalised[1]).mean() < 0.2 * plain_gap


def test_clahe_brings_two_exposures_of_one_film_close_and_keeps_local_detail(data_root: Path) -> None:
    path = list_records(data_root, "train")[0].path
    film = np.asarray(load_grayscale(path), dtype=np.float32)
    washed_out = Image.fromarray((96 + film * 0.25).astype(np.uint8))
    dark = Image.fromarray((film * 0.4).astype(np.uint8))
    plain_gap = np.abs(preprocess(washed_out)[0] - preprocess(dark)[0]).mean()
    adapted = [preprocess(image, intensity="clahe")[0] for image in (washed_out, dark)]
    # The clip limit caps the gain, so CLAHE closes only part of the gap that global
    # equalisation closes (measured: about a quarter of it on these films).
    assert np.abs(adapted[0] - adapted[1]).mean() < 0.85 * plain_gap
    # Local contrast (differences between neighbouring pixels) grows on the washed-out film.
    assert np.abs(np.diff(adapted[0], axis=1)).mean() > 2 * np.abs(np.diff(preprocess(washed_out)[0], axis=1)).mean()
    # Not the same as global equalisation.
    assert not np.allclose(adapted[0], preprocess(washed_out, intensity="equalize")[0], atol=0.05)


def test_every_intensity_mode_has_its_recipe_text_for_the_model_card() -> None:
    from pneumoscan.config import INTENSITY_MODES
    from pneumoscan.inputs.preprocessing import INTENSITY_STEP_TEXT

    assert set(INTENSITY_STEP_TEXT) == set(INTENSITY_MODES)
    for mode in INTENSITY_MODES:
        preprocess(Image.new("L", (40, 30), color=100), intensity=mode)  # every mode runs


def test_unknown_intensity_normalisation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown intensity normalisation 'clahe2'"):
        preprocess(Image.new("L", (32, 32)), intensity="clahe2")


def test_morphology_wipes_a_thin_burnt_in_marker_and_keeps_the_film(data_root: Path) -> None:
    path = list_records(data_root, "train")[0].path
    film = np.asarray(load_grayscale(path)).copy()
    marked = film.copy()
    marked[20:60, 30:32] = 255  # a 2-pixel-wide bright stroke, like a burnt-in "L"
    marked[58:60, 30:50] = 255
    stroke = np.zeros_like(film, dtype=bool)
    stroke[20:60, 30:32] = stroke[58:60, 30:50] = True
    plain = preprocess(Image.fromarray(marked))[0]
    cleaned = preprocess(Image.fromarray(marked), intensity="morphology")[0]
    reference = preprocess(Image.fromarray(film), intensity="morphology")[0]
    # The stroke stands out in the plain input and is nearly gone after morphology
    # (measured: 14 % of it is left, at its ends and in the corner the closing fills).
    assert np.abs(plain - reference)[stroke].mean() > 1.0
    assert np.abs(cleaned - reference)[stroke].mean() < 0.2 * np.abs(plain - reference)[stroke].mean()
    # Away from the stroke the film changes little: morphology is not a blur of everything.
    away = np.ones_like(stroke)
    away[10:70, 20:60] = False
    assert np.abs(cleaned - preprocess(Image.fromarray(film))[0])[away].mean() < 0.1
