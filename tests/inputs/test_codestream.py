"""DICOM pixel data is sized from its own codestream before it is decoded; a damaged header is a typed error.

Every compressed file here is made by a real encoder (Pillow's JPEG, pyjpegls, OpenJPEG,
pydicom's RLE) from a dataset image; the bombs are those files with only their
codestream's declared size changed, as an attacker would.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from dicom_factory import (
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    build_dicom,
    claiming_codestream_size,
    compressed_dicom,
    deflated_dicom,
)
from PIL import Image

from pneumoscan.errors import CorruptImage, ImageTooLarge, InputError, UnsupportedFormat
from pneumoscan.inputs.codestream import (
    inflate_bounded,
    j2k_declared_size,
    jpeg_declared_size,
)
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.learning.data import list_records

CODECS = [JPEG_BASELINE, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS]


@pytest.fixture(scope="module")
def small_xray(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset X-ray at 64×64: the size of the issue's bomb header."""
    path = tmp_path_factory.mktemp("codestream") / "small.png"
    Image.open(next(r.path for r in list_records(data_root, "test"))).convert("L").resize((64, 64)).save(path)
    return path


def resaved(data: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [*CODECS, RLE_LOSSLESS])
def test_each_codec_still_decodes(small_xray: Path, syntax: str) -> None:
    loaded = load_xray(compressed_dicom(small_xray, syntax))
    assert loaded.format == "dicom" and loaded.image.size == (64, 64)


@pytest.mark.parametrize("syntax", CODECS)
def test_a_codestream_larger_than_the_limit_is_refused_before_decoding(small_xray: Path, syntax: str) -> None:
    bomb = claiming_codestream_size(compressed_dicom(small_xray, syntax), 25_000, 25_000)
    assert len(bomb) < 20_000  # the bomb: a few kilobytes that declare 625 million pixels
    with pytest.raises(ImageTooLarge, match=r"declares 25000×25000 pixels.*header says 64×64"):
        load_xray(bomb)


@pytest.mark.parametrize("syntax", CODECS)
def test_a_codestream_that_disagrees_with_the_header_is_refused(small_xray: Path, syntax: str) -> None:
    with pytest.raises(CorruptImage, match=r"declares 64×65 pixels but its header says 64×64"):
        load_xray(claiming_codestream_size(compressed_dicom(small_xray, syntax), 64, 65))


def test_rle_with_more_segments_than_its_header_allows_is_refused(small_xray: Path) -> None:
    data = compressed_dicom(small_xray, RLE_LOSSLESS)
    ds = pydicom.dcmread(io.BytesIO(data))
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    frame[0:4] = struct.pack("<I", 15)  # 15 byte planes for an 8-bit image
    with pytest.raises(CorruptImage, match="RLE data has 15 segments where its header .* needs 1"):
        load_xray(resaved(data, lambda d: setattr(d, "PixelData", pydicom.encaps.encapsulate([bytes(frame)]))))


def test_an_unknown_compression_is_refused_by_name(small_xray: Path) -> None:
    data = resaved(compressed_dicom(small_xray, JPEG_BASELINE), lambda d: setattr(d.file_meta, "TransferSyntaxUID", "1.2.3.4"))
    with pytest.raises((UnsupportedFormat, CorruptImage)):
        load_xray(data)


def test_a_deflated_dicom_decodes_and_a_zip_bomb_is_refused(small_xray: Path) -> None:
    assert load_xray(deflated_dicom(small_xray)).image.size == (64, 64)
    bomb = deflated_dicom(small_xray, padding=300 * 2**20)
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLarge, match="inflates to more than the limit"):
        load_xray(bomb)


def test_inflation_is_counted_not_kept() -> None:
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(bytes(10 * 2**20)) + compressor.flush()
    assert inflate_bounded(stream, 11 * 2**20) == 10 * 2**20
    with pytest.raises(ImageTooLarge):
        inflate_bounded(stream, 9 * 2**20)
    with pytest.raises(CorruptImage):
        inflate_bounded(b"\xff" * 100, 2**20)


def test_marker_parsers_refuse_what_has_no_size() -> None:
    with pytest.raises(CorruptImage, match="start-of-image"):
        jpeg_declared_size(b"\x00\x01")
    with pytest.raises(CorruptImage, match="no frame header"):
        jpeg_declared_size(b"\xff\xd8\xff\xda\x00\x02")
    with pytest.raises(CorruptImage, match="codestream header"):
        j2k_declared_size(b"\xff\x4f\x00\x00" + bytes(60))
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">8I", 60_000, 60_000, 0, 0, 1, 1, 0, 0) + b"\x00\x01"
    with pytest.raises(ImageTooLarge, match="tiles"):  # one-pixel tiles: billions of tile structures
        j2k_declared_size(siz)


# --------------------------------------------------------------------------- damaged headers (the examples)


def test_a_changed_vr_byte_in_study_instance_uid_is_not_an_escape(small_xray: Path) -> None:
    data = build_dicom(small_xray, bits=12)
    at = data.find(b"\x20\x00\x0d\x00UI")
    for vr in (b"UJ", b"US", b"SQ", b"OB", b"\x00I"):
        damaged = bytearray(data)
        damaged[at + 4 : at + 6] = vr
        try:
            loaded = load_xray(bytes(damaged))
        except InputError as error:  # the rest of the file no longer parses: refused with the reason
            assert "DICOM" in str(error)
        else:  # a damaged informative field is left out; the pixels are intact
            assert "StudyInstanceUID" not in loaded.info and loaded.image.size == (64, 64)


def test_rows_with_two_values_names_the_field(small_xray: Path) -> None:
    data = resaved(build_dicom(small_xray, bits=12), lambda d: setattr(d, "Rows", [64, 64]))
    with pytest.raises(CorruptImage, match=r"Rows is .*not one whole number"):
        load_xray(data)


def test_number_of_frames_that_is_not_a_number_names_the_field(small_xray: Path) -> None:
    data = resaved(build_dicom(small_xray, bits=12), lambda d: d.add_new(0x00280008, "IS", "1"))
    data = data.replace(b"\x08\x00IS\x02\x001 ", b"\x08\x00IS\x04\x00abc ")
    with pytest.raises(CorruptImage, match="NumberOfFrames is 'abc'"):
        load_xray(data)


def test_implausible_sample_sizes_are_refused_before_decoding(small_xray: Path) -> None:
    data = resaved(build_dicom(small_xray, bits=12), lambda d: setattr(d, "SamplesPerPixel", 200))
    with pytest.raises(CorruptImage, match="200 samples"):
        load_xray(data)
