"""Property-based tests of the input loader: whatever the bytes, only pneumoscan's typed errors escape.

Inputs: arbitrary bytes; valid JPEG, PNG and DICOM files mutated (bit flips,
truncation, inserted bytes, overwritten length fields); headers that claim
absurd dimensions. The examples are derandomised, so CI runs the same ones.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dicom_factory import (
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    build_dicom,
    claiming_codestream_size,
    compressed_dicom,
    deflated_dicom,
)
from pneumoscan.data import list_records
from pneumoscan.errors import InputError
from pneumoscan.imaging import Limits, LoadedImage, load_xray

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
LIMITS = Limits(max_bytes=8 * 2**20, max_pixels=4_000_000)


def synthetic_xray(size: int = 96) -> Image.Image:
    """A chest-like gradient (not a dataset image: nothing from ../shared is embedded in examples)."""
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = 200 - 120 * np.exp(-(((x - 0.3) / 0.12) ** 2 + ((y - 0.5) / 0.3) ** 2))
    lungs -= 120 * np.exp(-(((x - 0.7) / 0.12) ** 2 + ((y - 0.5) / 0.3) ** 2))
    return Image.fromarray(np.clip(lungs, 0, 255).astype(np.uint8))


def encoded(kind: str) -> bytes:
    buffer = io.BytesIO()
    synthetic_xray().save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("fuzz") / "synthetic.png"
    synthetic_xray().save(source)
    return source


@pytest.fixture(scope="module")
def valid_files(data_root: Path, synthetic_source: Path) -> dict[str, bytes]:
    source = synthetic_source
    return {
        "jpeg": encoded("JPEG"),
        "png": encoded("PNG"),
        "dicom": build_dicom(source, bits=12),
        "dicom_rle": build_dicom(source, bits=16, transfer_syntax="1.2.840.10008.1.2.5"),
    }


def load_or_typed_error(data: bytes) -> LoadedImage | InputError:
    """The property: a decoded 8-bit grayscale image, or an InputError; any other exception fails the test."""
    try:
        loaded = load_xray(data, LIMITS)
    except InputError as error:
        assert str(error), "every refusal says why"
        return error
    assert loaded.image.mode == "L" and loaded.image.width * loaded.image.height <= LIMITS.max_pixels
    return loaded


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    load_or_typed_error(data)


@FUZZ
@given(st.binary(min_size=1, max_size=600))
def test_arbitrary_bytes_behind_each_known_signature(tail: bytes) -> None:
    for head in (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
                 b"\x00" * 128 + b"DICM"):  # fmt: skip
        load_or_typed_error(head + tail)


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.integers(1, 64)),
        st.tuples(st.just("length"), st.floats(0, 1), st.integers(0, 2**32 - 1)),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, steps: list[tuple[str, float, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, where, value in steps:
        at = min(int(where * len(buffer)), max(len(buffer) - 1, 0))
        if kind == "flip" and buffer:
            buffer[at] ^= 1 << value
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = bytes((at * 31 + i) % 256 for i in range(value))
        elif kind == "length" and len(buffer) >= at + 4:
            buffer[at : at + 4] = struct.pack(">I", value)
    return bytes(buffer)


@pytest.mark.parametrize("kind", ["jpeg", "png", "dicom", "dicom_rle"])
@FUZZ
@given(steps=mutations)
def test_mutated_valid_files(valid_files: dict[str, bytes], kind: str, steps: list[tuple[str, float, int]]) -> None:
    load_or_typed_error(mutate(valid_files[kind], steps))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (valid CRC) claims ``width``×``height`` over a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded("JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


ABSURD = {
    "png 100000x100000": lambda files: png_claiming(100_000, 100_000),
    "png 2^31x1": lambda files: png_claiming(2**31 - 1, 1),
    "png 0x0": lambda files: png_claiming(0, 0),
    "jpeg 65535x65535": lambda files: jpeg_claiming(65_535, 65_535),
    "jpeg 0x0": lambda files: jpeg_claiming(0, 0),
}


def test_absurd_dimensions_are_refused_before_decoding(valid_files: dict[str, bytes], synthetic_source: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    """Refused with a typed error, in a fresh process whose peak memory shows nothing big was allocated.

    The DICOM bombs keep an honest 96×96 header and lie only in their codestream (JPEG, JPEG-LS,
    JPEG 2000) or in what their deflated dataset inflates to: today's decoders would allocate 0.6–3 GB.
    """
    from pydicom import dcmread

    cases = {name: make(valid_files) for name, make in ABSURD.items()}
    for syntax, name in ((JPEG_BASELINE, "jpeg"), (JPEG_LS_LOSSLESS, "jpeg-ls"), (JPEG_2000_LOSSLESS, "jpeg2000")):
        cases[f"dicom {name} codestream 25000x25000"] = claiming_codestream_size(compressed_dicom(synthetic_source, syntax),
                                                                                 25_000, 25_000)  # fmt: skip
    cases["dicom deflated to 300 MB"] = deflated_dicom(synthetic_source, padding=300 * 2**20)
    ds = dcmread(io.BytesIO(valid_files["dicom"]), force=True)
    ds.Rows, ds.Columns = 65_535, 65_535  # the header lies; the pixel data is 96×96
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    cases["dicom 65535x65535"] = buffer.getvalue()
    for name, data in cases.items():
        (tmp_path / name.replace(" ", "_")).write_bytes(data)
    script = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from pneumoscan.errors import InputError\n"
        "from pneumoscan.imaging import load_xray\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = {}\n"
        "for path in sorted(Path(sys.argv[1]).iterdir()):\n"
        "    try:\n"
        "        load_xray(path.read_bytes()); out[path.name] = 'decoded'\n"
        "    except InputError as e:\n"
        "        out[path.name] = type(e).__name__\n"
        "out['growth_mb'] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    growth = outcome.pop("growth_mb")
    assert set(outcome) == {name.replace(" ", "_") for name in cases}
    assert all(kind in ("ImageTooLarge", "CorruptImage") for kind in outcome.values()), outcome
    assert outcome["png_100000x100000"] == "ImageTooLarge" and outcome["dicom_65535x65535"] == "ImageTooLarge"
    bombs = {name: kind for name, kind in outcome.items() if "codestream" in name or "deflated" in name}
    assert len(bombs) == 4 and set(bombs.values()) == {"ImageTooLarge"}, bombs
    assert growth < 100, f"peak memory grew by {growth:.0f} MB while refusing"


def test_the_dataset_images_still_load(data_root: Path) -> None:
    """The control: the fuzz properties hold because bad input is refused, not because everything is."""
    for record in list_records(data_root, "test")[::100]:
        assert isinstance(load_or_typed_error(record.path.read_bytes()), LoadedImage)
