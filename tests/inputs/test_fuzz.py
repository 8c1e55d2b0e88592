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
from dicom_factory import (
    build_dicom,
    dicom_bombs,
    radiograph_elements,
    raw_dicom,
    raw_element,
    raw_item,
    raw_sequence,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumoscan.errors import InputError
from pneumoscan.inputs.imaging import Limits, LoadedImage, load_xray
from pneumoscan.learning.data import list_records

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
    cases |= {f"dicom bomb {i}": data for i, data in enumerate(dicom_bombs(synthetic_source).values())}
    ds = dcmread(io.BytesIO(valid_files["dicom"]), force=True)
    ds.Rows, ds.Columns = 65_535, 65_535  # the header lies; the pixel data is 96×96
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    cases["dicom 65535x65535"] = buffer.getvalue()
    for name, data in cases.items():
        (tmp_path / name.replace(" ", "_")).write_bytes(data)
    script = (
        "import json, sys\n"
        "def hwm():  # this process's own peak: ru_maxrss would keep pytest's, inherited across exec\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])\n"
        "from pathlib import Path\n"
        "from pneumoscan.errors import InputError\n"
        "from pneumoscan.inputs.imaging import load_xray\n"
        "base = hwm()\n"
        "out = {}\n"
        "for path in sorted(Path(sys.argv[1]).iterdir()):\n"
        "    try:\n"
        "        load_xray(path.read_bytes()); out[path.name] = 'decoded'\n"
        "    except InputError as e:\n"
        "        out[path.name] = type(e).__name__\n"
        "out['growth_mb'] = (hwm() - base) / 1024\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    growth = outcome.pop("growth_mb")
    assert set(outcome) == {name.replace(" ", "_") for name in cases}
    assert all(kind in ("ImageTooLarge", "CorruptImage") for kind in outcome.values()), outcome
    assert outcome["png_100000x100000"] == "ImageTooLarge" and outcome["dicom_65535x65535"] == "ImageTooLarge"
    bombs = {name: kind for name, kind in outcome.items() if name.startswith("dicom_bomb")}
    assert len(bombs) == 4 and set(bombs.values()) == {"ImageTooLarge"}, bombs
    assert growth < 100, f"peak memory grew by {growth:.0f} MB while refusing"


def test_the_dataset_images_still_load(data_root: Path) -> None:
    """The control: the fuzz properties hold because bad input is refused, not because everything is."""
    for record in list_records(data_root, "test")[::100]:
        assert isinstance(load_or_typed_error(record.path.read_bytes()), LoadedImage)


# --------------------------------------------------------------------------- DICOM structure
# Not bytes flipped at random but the header's own structure changed the ways archives and attackers change it: VR
# bytes, value multiplicity, value types, length fields, nested sequences, missing, repeated or reordered elements.

SEQUENCE_TAGS = [0x00283010, 0x00081140, 0x00400275, 0x00091010]  # VOI LUT, referenced images, request attributes, private
VALID_VRS = [b"AE", b"AS", b"CS", b"DA", b"DS", b"FD", b"FL", b"IS", b"LO", b"OB", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS",
             b"ST", b"UI", b"UL", b"UN", b"US", b"UT"]  # fmt: skip
ODD_VALUES = [b"", b"abc", b"-1", b"1e309", b"NaN", b"\x00\x00", b"99999999999999", b"1\\2", b"\\\\\\", b"\xff\xfe\xfd",
              b"MONOCHROME1", b"YBR_FULL_422", b"0", b"65535", b"4294967296"]  # fmt: skip

vr_bytes = st.one_of(st.sampled_from(VALID_VRS), st.binary(min_size=2, max_size=2))
lengths = st.one_of(st.sampled_from([0, 1, 2, 3, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF]), st.integers(0, 2**32 - 1))


@st.composite
def nested_sequence(draw, depth: int = 0) -> bytes:  # type: ignore[no-untyped-def]
    """A sequence of items holding elements and, down to six levels, sequences; lengths defined or undefined."""
    items = []
    for _ in range(draw(st.integers(0, 3))):
        body = b""
        for _ in range(draw(st.integers(0, 3))):
            if depth < 6 and draw(st.booleans()):
                body += draw(nested_sequence(depth + 1))
            else:
                descriptor = struct.pack("<3H", *draw(st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535))))
                body += draw(st.sampled_from([raw_element(0x00283002, b"US", descriptor),
                                              raw_element(0x00283006, b"OW", draw(st.binary(max_size=64))),
                                              raw_element(0x00281050, b"DS", draw(st.sampled_from(ODD_VALUES)))]))  # fmt: skip
        items.append(raw_item(body, defined=draw(st.booleans())))
    return raw_sequence(draw(st.sampled_from(SEQUENCE_TAGS)), items, defined=draw(st.booleans()))


mutation_kinds = st.sampled_from(["vr", "multiplicity", "type", "length", "long_header", "sequence", "drop", "duplicate", "swap"])


@st.composite
def dicom_structures(draw) -> bytes:  # type: ignore[no-untyped-def]
    """A valid 64×64 DX file with one to four structural changes."""
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    elements = [[tag, vr, value, None, None] for tag, vr, value in radiograph_elements(pixels)]
    extra: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind, at = draw(mutation_kinds), draw(st.integers(0, len(elements) - 1))
        element = elements[at]
        if kind == "vr":
            element[1] = draw(vr_bytes)
        elif kind == "multiplicity":
            element[2] = b"\\".join([element[2]] * draw(st.integers(2, 5))) if element[1] not in (b"US", b"OB") else element[2] * 2
        elif kind == "type":
            element[2] = draw(st.one_of(st.sampled_from(ODD_VALUES), st.binary(max_size=32)))
        elif kind == "length":
            element[3] = draw(lengths)
        elif kind == "long_header":
            element[4] = draw(st.booleans())
        elif kind == "sequence":
            extra.append((draw(st.integers(0, len(elements))), draw(nested_sequence())))
        elif kind == "drop" and len(elements) > 1:
            elements.pop(at)
        elif kind == "duplicate":
            elements.insert(at, list(element))
        elif kind == "swap":
            other = draw(st.integers(0, len(elements) - 1))
            elements[at], elements[other] = elements[other], elements[at]
    encoded = [raw_element(tag, vr, value, length, long_header) for tag, vr, value, length, long_header in elements]
    for position, sequence in sorted(extra, reverse=True):
        encoded.insert(position, sequence)
    return raw_dicom(encoded)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(dicom_structures())
def test_dicom_structure_gives_an_image_or_a_typed_error(data: bytes) -> None:
    load_or_typed_error(data)


PIPELINE = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_predictor(shipped_model: Path):  # type: ignore[no-untyped-def]
    from pneumoscan.running.inference import Predictor

    return Predictor.load(shipped_model, threads=1, limits=LIMITS)


@PIPELINE
@given(st.lists(dicom_structures(), min_size=1, max_size=4))
def test_dicom_structures_never_abort_predict_or_triage(fuzz_predictor, files: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    """Every file gets its record (a score or the reason), and the run goes on to the end."""
    import tempfile

    from pneumoscan.apps.predict import predict_files
    from pneumoscan.apps.triage import triage

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, data in enumerate(files):
            paths.append(Path(folder) / "in" / f"{i:02d}.dcm")
            paths[-1].parent.mkdir(exist_ok=True)
            paths[-1].write_bytes(data)
        records = predict_files(fuzz_predictor, paths, progress=False)
        assert [r.path for r in records] == [str(p) for p in paths]
        assert all((r.error is None) != (r.probability is None) for r in records)
        assert not any("internal error" in (r.error or "") for r in records), [r.error for r in records]
        summary = triage([Path(folder) / "in"], Path(folder) / "out", fuzz_predictor, progress=False, report=True)
        assert summary["rows"] == len(files) and summary["scored"] + summary["skipped"] + summary["errors"] == len(files)


@pytest.fixture(scope="module")
def fuzz_client(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from pneumoscan.apps.service.app import create_app
    from pneumoscan.apps.settings import ServiceSettings

    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path_factory.mktemp("fuzz-service"),
                               max_upload_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels)  # fmt: skip
    return TestClient(create_app(settings), raise_server_exceptions=False)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(dicom_structures())
def test_dicom_structures_never_give_the_service_a_5xx(fuzz_client, data: bytes) -> None:  # type: ignore[no-untyped-def]
    response = fuzz_client.post("/api/v1/predictions", files={"file": ("x.dcm", data, "application/dicom")})
    assert response.status_code in (201, 413, 415, 422), response.text
    assert response.json().get("detail") or response.status_code == 201
