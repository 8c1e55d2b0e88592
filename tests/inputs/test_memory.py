"""Memory in proportion to the image: an honest large film, at the pixel limit, costs its decoded size and little more.

Before issue 27 a 0.14 MB JPEG 2000 of 6000×6600 16-bit pixels (under the limit, so no bomb check fired)
grew the loader's peak memory by about 1 GB: every step of the display chain made a float64 copy of
the frame. Each case here runs in a fresh process, and its peak resident memory is compared with the
same process's after a small warm-up file of the same kind.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS, RLE_LOSSLESS, large_dicom
from PIL import Image

from pneumoscan.config import MAX_INPUT_BYTES, MAX_INPUT_PIXELS
from pneumoscan.inputs.imaging import load_xray

#: The goal of issue 27: peak growth for any image the limits admit.
GROWTH_LIMIT_MB = 250
#: The largest frame the default limit admits with this aspect ratio (a portrait film, 10:11).
WIDTH = int((MAX_INPUT_PIXELS * 10 / 11) ** 0.5)
HEIGHT = MAX_INPUT_PIXELS // WIDTH

LOAD_AND_MEASURE = """
import json, sys
def hwm():  # VmHWM in kB: this process's own peak (ru_maxrss keeps the parent's peak across exec)
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])
import numpy as np
from pneumoscan.inputs.imaging import load_xray
big, warm = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read()
load_xray(warm)  # the decoders' libraries loaded, so only the large image's own memory is measured
base = hwm()
image = load_xray(big).image
growth = (hwm() - base) / 1024
pixels = np.asarray(image)
print(json.dumps({'growth_mb': growth, 'size': image.size, 'mode': image.mode, 'top_row': float(pixels[0].mean()),
                  'bottom_left': int(pixels[-1, 0]), 'bottom_right': int(pixels[-1, -1])}))
"""


def measure(tmp_path: Path, big: bytes, warm: bytes) -> dict:
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "warm").write_bytes(warm)
    result = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path / "big"), str(tmp_path / "warm")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("syntax", [None, RLE_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_LS_LOSSLESS], ids=["uncompressed", "rle", "jpeg2000", "jpegls"])
def test_a_film_at_the_pixel_limit_costs_its_size_not_a_gigabyte(syntax: str | None, tmp_path: Path) -> None:
    width, height = WIDTH, HEIGHT
    if syntax is None:  # stored as is, two bytes a pixel: the largest that the file limit admits too
        width = height = int(min(MAX_INPUT_BYTES / 2 - 65536, MAX_INPUT_PIXELS) ** 0.5)
    big = large_dicom(width, height, syntax)
    outcome = measure(tmp_path, big, large_dicom(64, 64, syntax))
    assert outcome["size"] == [width, height] and outcome["mode"] == "L"
    # the ramp shown whole (no window in the file): black on top, white at the bottom right, mid-grey bottom left
    assert outcome["top_row"] == 0 and outcome["bottom_right"] == 255 and abs(outcome["bottom_left"] - 128) <= 1
    assert outcome["growth_mb"] <= GROWTH_LIMIT_MB, f"{len(big) / 1e6:.2f} MB file of {width}×{height}: +{outcome['growth_mb']:.0f} MB"


@pytest.mark.slow
def test_a_16_bit_png_at_the_pixel_limit_costs_its_size(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 65535, HEIGHT, dtype=np.float32)[:, None] * np.ones((1, WIDTH), np.float32)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG", compress_level=1)
    small = io.BytesIO()
    Image.fromarray(ramp[::100, ::100].copy()).save(small, format="PNG")
    outcome = measure(tmp_path, buffer.getvalue(), small.getvalue())
    assert outcome["size"] == [WIDTH, HEIGHT] and outcome["top_row"] == 0 and outcome["bottom_right"] == 255
    assert outcome["growth_mb"] <= GROWTH_LIMIT_MB, f"+{outcome['growth_mb']:.0f} MB"


def test_signed_and_rescaled_16_bit_pixels_show_as_before() -> None:
    """The code table gives what the float chain gave: signed values, a rescale and MONOCHROME1, windowed or not."""
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut

    from pneumoscan.inputs.imaging import scale_to_uint8

    for signed, photometric, window in [(True, "MONOCHROME2", None), (True, "MONOCHROME1", (100.0, 900.0)),
                                        (False, "MONOCHROME1", None), (False, "MONOCHROME2", (2000.0, 1000.0))]:  # fmt: skip
        ds = dcmread(io.BytesIO(large_dicom(64, 48)))
        values = (np.arange(64 * 48).reshape(48, 64) * 7 - 9000).astype(np.int16 if signed else np.uint16)
        if not signed:
            values = (np.arange(64 * 48).reshape(48, 64) * 13).astype(np.uint16)
        ds.PixelRepresentation = int(signed)
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = values.tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1.5, -100.0
        ds.PhotometricInterpretation = photometric
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        mapped = apply_modality_lut(values, ds).astype(np.float64)
        low, high = (window[0] - window[1] / 2, window[0] + window[1] / 2) if window else (mapped.min(), mapped.max())
        expected = scale_to_uint8(mapped, low, high)
        expected = 255 - expected if photometric == "MONOCHROME1" else expected
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        shown = np.asarray(load_xray(buffer.getvalue()).image)
        assert np.array_equal(shown, expected), (signed, photometric, window)
