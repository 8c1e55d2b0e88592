"""The one loader: every common image form, DICOM done right, and clear typed errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import build_dicom
from PIL import Image

from pneumoscan.errors import (
    CorruptImage,
    ImageTooLarge,
    InputError,
    NotARadiograph,
    UnsupportedFormat,
)
from pneumoscan.inputs.imaging import Limits, load_xray, sniff_format
from pneumoscan.learning.data import list_records

PYDICOM_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"


@pytest.fixture(scope="module")
def xray(data_root: Path) -> Path:
    return next(r.path for r in list_records(data_root, "test") if r.label == 1)


@pytest.fixture(scope="module")
def xray_pixels(xray: Path) -> np.ndarray:
    return np.asarray(Image.open(xray).convert("L"), dtype=np.int16)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_jpeg_from_the_dataset(xray: Path, xray_pixels: np.ndarray) -> None:
    loaded = load_xray(xray)
    assert loaded.format == "jpeg" and loaded.image.mode == "L"
    assert np.array_equal(np.asarray(loaded.image, dtype=np.int16), xray_pixels)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "WEBP"])
def test_lossless_formats_give_the_same_pixels(fmt: str, xray_pixels: np.ndarray) -> None:
    gray = Image.fromarray(xray_pixels.astype(np.uint8))
    extra = {"lossless": True} if fmt == "WEBP" else {}
    loaded = load_xray(encode(gray, fmt, **extra))
    assert loaded.format == fmt.lower()
    assert np.array_equal(np.asarray(loaded.image, dtype=np.int16), xray_pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_palette_and_alpha_pngs_become_gray(mode: str, xray_pixels: np.ndarray) -> None:
    image = Image.fromarray(xray_pixels.astype(np.uint8)).convert(mode)
    loaded = np.asarray(load_xray(encode(image, "PNG")).image, dtype=np.int16)
    assert np.abs(loaded - xray_pixels).max() <= 2


def test_16_bit_png_is_scaled_by_its_full_range(xray_pixels: np.ndarray) -> None:
    sixteen = Image.fromarray((xray_pixels.astype(np.uint16) * 257).astype(np.uint16))
    loaded = load_xray(encode(sixteen, "PNG"))
    assert np.array_equal(np.asarray(loaded.image, dtype=np.int16), xray_pixels)


def test_cmyk_jpeg_is_read(xray_pixels: np.ndarray) -> None:
    cmyk = Image.fromarray(xray_pixels.astype(np.uint8)).convert("CMYK")
    loaded = np.asarray(load_xray(encode(cmyk, "JPEG", quality=95)).image, dtype=np.int16)
    assert np.corrcoef(loaded.ravel(), xray_pixels.ravel())[0, 1] > 0.98


def test_exif_orientation_is_applied(xray_pixels: np.ndarray) -> None:
    image = Image.fromarray(xray_pixels.astype(np.uint8)).rotate(90, expand=True)  # stored turned left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    loaded = np.asarray(load_xray(encode(image, "PNG", exif=exif)).image, dtype=np.int16)
    assert np.array_equal(loaded, xray_pixels)


def test_format_comes_from_content_not_name(xray: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "scan.dcm"
    disguised.write_bytes(xray.read_bytes())
    assert load_xray(disguised).format == "jpeg"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    with pytest.raises(UnsupportedFormat, match="a text file"):
        load_xray(text)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", CorruptImage, "empty"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", UnsupportedFormat, "HTML page"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", UnsupportedFormat, "PDF"),
        (b"GIF89a\x01\x00\x01\x00", UnsupportedFormat, "GIF"),
        (b"\x00\x01\x02\x03" * 64 + b"\xff\xfe", UnsupportedFormat, "not an X-ray image"),
    ],
)
def test_non_images_are_refused_with_the_reason(data: bytes, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        load_xray(data)


def test_truncated_jpeg_is_corrupt(xray: Path) -> None:
    with pytest.raises(CorruptImage, match="damaged or truncated"):
        load_xray(xray.read_bytes()[:2000])


def forge_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    header = encode(Image.new("L", (8, 8)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return header[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + header[33:]


def test_decompression_bomb_is_refused_before_decoding() -> None:
    """Tiny PNGs whose headers claim huge pixel counts: refused from the header alone."""
    bomb = forge_png(30000, 30000)  # 900 M pixels in under 200 bytes
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="limit"):
        load_xray(bomb)
    with pytest.raises(ImageTooLarge, match="30000×3000"):
        load_xray(forge_png(30000, 3000), Limits(max_pixels=10**6))


def test_file_size_limit(xray: Path) -> None:
    with pytest.raises(ImageTooLarge, match="larger than the limit"):
        load_xray(xray, Limits(max_bytes=1000))
    with pytest.raises(ImageTooLarge):
        load_xray(xray.read_bytes(), Limits(max_pixels=1000))


# --- DICOM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_built_dicoms_show_the_source_pixels(xray: Path, xray_pixels: np.ndarray, bits: int, photometric: str) -> None:
    loaded = load_xray(build_dicom(xray, bits=bits, photometric=photometric))
    assert loaded.format == "dicom" and loaded.info["Modality"] == "DX"
    assert np.abs(np.asarray(loaded.image, dtype=np.int16) - xray_pixels).max() <= 1


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"])  # RLE, JPEG 2000 lossless
@pytest.mark.parametrize("bits", [8, 16])
def test_compressed_dicoms_decode(xray: Path, xray_pixels: np.ndarray, syntax: str, bits: int) -> None:
    data = build_dicom(xray, bits=bits, transfer_syntax=syntax)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    assert np.abs(np.asarray(load_xray(data).image, dtype=np.int16) - xray_pixels).max() <= 1


def test_modality_lut_and_window_are_applied(xray: Path, xray_pixels: np.ndarray) -> None:
    rescaled = load_xray(build_dicom(xray, bits=12, rescale=(2.0, -1024.0)))
    assert np.abs(np.asarray(rescaled.image, dtype=np.int16) - xray_pixels).max() <= 1
    # a window over the lower half of the range saturates the upper half
    windowed = np.asarray(load_xray(build_dicom(xray, bits=12, window=(1024.0, 2048.0))).image, dtype=np.int16)
    bright = xray_pixels >= 140
    assert (windowed[bright] == 255).all()
    assert np.abs(windowed[xray_pixels < 100] - xray_pixels[xray_pixels < 100] * 2).max() <= 2


def test_dicom_without_a_window_shows_its_full_data_range(xray: Path, xray_pixels: np.ndarray) -> None:
    shown = np.asarray(load_xray(build_dicom(xray, bits=16, window=None)).image, dtype=np.float64)
    assert shown.min() == 0 and shown.max() == 255
    assert np.corrcoef(shown.ravel(), xray_pixels.ravel())[0, 1] > 0.999


def test_dicom_without_preamble_is_read(xray: Path, xray_pixels: np.ndarray) -> None:
    data = build_dicom(xray, preamble=False)
    assert data[128:132] != b"DICM"
    assert sniff_format(data) == "dicom"
    assert np.abs(np.asarray(load_xray(data).image, dtype=np.int16) - xray_pixels).max() <= 1


def test_patient_fields_are_never_returned(xray: Path) -> None:
    loaded = load_xray(build_dicom(xray, patient_name="Recognisable^Name"))
    text = repr(loaded.info)
    assert "Recognisable" not in text and "PID-123456" not in text and "20200101" not in text
    assert "StudyInstanceUID" in loaded.info


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("CT_small.dcm", "modality CT"),
        ("MR_small.dcm", "modality MR"),
        ("MR_small_jpeg_ls_lossless.dcm", "modality MR"),
        ("MR_small_RLE.dcm", "modality MR"),
        ("examples_rgb_color.dcm", "modality US"),
        ("examples_ybr_color.dcm", "modality US"),
        ("JPEG2000.dcm", "modality NM"),
        ("rtplan.dcm", "holds no image"),
        ("test-SR.dcm", "holds no image"),
        ("waveform_ecg.dcm", "holds no image"),
    ],
)
def test_pydicom_files_that_are_not_radiographs_are_refused(name: str, words: str) -> None:
    with pytest.raises(NotARadiograph, match=words):
        load_xray(PYDICOM_FILES / name)


def test_multi_frame_dicom_is_refused(xray: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "examples_ybr_color.dcm")
    ds.Modality = "DX"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(NotARadiograph, match="30 frames"):
        load_xray(buffer.getvalue())


@pytest.mark.parametrize("compressed", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicom_compressed_files_decode_like_their_uncompressed_original(compressed: str) -> None:
    """The JPEG-LS, RLE and JPEG 2000 handlers give the pixels of the uncompressed file."""

    def as_radiograph(path: Path) -> bytes:
        ds = pydicom.dcmread(path)
        ds.Modality = "CR"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return buffer.getvalue()

    reference = np.asarray(load_xray(as_radiograph(PYDICOM_FILES / "MR_small.dcm")).image)
    decoded = np.asarray(load_xray(as_radiograph(PYDICOM_FILES / compressed)).image)
    assert np.array_equal(decoded, reference)


def test_truncated_dicom_is_corrupt(xray: Path) -> None:
    data = build_dicom(xray, bits=16)
    with pytest.raises(CorruptImage):
        load_xray(data[: len(data) // 2])


def test_every_error_is_an_input_error_with_an_http_status() -> None:
    for error in (UnsupportedFormat, CorruptImage, ImageTooLarge, NotARadiograph):
        assert issubclass(error, InputError) and error.http_status in (413, 415, 422)


def test_the_head_of_a_file_condemns_what_its_header_condemns(xray: Path) -> None:
    """The service refuses an over-limit upload from its first bytes, without reading the rest into memory."""
    import struct
    import zlib

    from pneumoscan.inputs.imaging import HEAD_BYTES, check_head

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    huge_png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(bytes(2 * HEAD_BYTES))))  # fmt: skip
    with pytest.raises(ImageTooLarge, match="9000×9000"):
        check_head(huge_png[:HEAD_BYTES])
    with pytest.raises(UnsupportedFormat):
        check_head(b"%PDF-1.7 not an image")
    data = xray.read_bytes()
    check_head(data[:HEAD_BYTES])  # a good X-ray passes
    check_head(data[:40])  # a head too short to tell is left to the loader
    check_head(b"")


# --- real adult inputs: old ACR-NEMA files, body part and view ------------------------------


@pytest.fixture(scope="module")
def adult_film(adult_root: Path) -> Path:
    return sorted((adult_root / "images").glob("*.jpeg"))[0]


def test_an_acr_nema_file_without_preamble_or_meta_decodes(adult_film: Path) -> None:
    from dicom_factory import acr_nema_dicom

    data = acr_nema_dicom(adult_film, bits=10, photometric="MONOCHROME1")
    assert data[128:132] != b"DICM" and b"\x02\x00\x10\x00" not in data[:256]  # no preamble, no File Meta group
    loaded = load_xray(data)
    source = np.asarray(Image.open(adult_film).convert("L"), dtype=np.float64)
    decoded = np.asarray(loaded.image, dtype=np.float64)
    assert loaded.format == "dicom" and decoded.shape == source.shape
    assert np.corrcoef(source.ravel(), decoded.ravel())[0, 1] > 0.999  # MONOCHROME1 inverted back, 10 bits scaled to 8
    assert np.abs(source - decoded).mean() < 2.0
    assert loaded.age_years == 45 and loaded.info["Modality"] == "CR"


@pytest.mark.parametrize("part", ["SKULL", "HAND", "KNEE", "ABDOMEN", "PELVIS", "L SPINE", "FOOT"])
def test_a_film_of_another_body_part_is_refused(adult_film: Path, part: str) -> None:
    from dicom_factory import acr_nema_dicom

    with pytest.raises(NotARadiograph, match=f"BodyPartExamined '{part}'.*not the chest"):
        load_xray(acr_nema_dicom(adult_film, body_part=part))


@pytest.mark.parametrize("part", ["CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_PA", "", None, "UNKNOWN"])
def test_chest_synonyms_and_empty_body_parts_are_scored(adult_film: Path, part: str | None) -> None:
    from dicom_factory import acr_nema_dicom

    assert load_xray(acr_nema_dicom(adult_film, body_part=part)).image.size == (256, 256)


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LAT"])
def test_a_lateral_view_is_refused(adult_film: Path, view: str) -> None:
    from dicom_factory import acr_nema_dicom

    with pytest.raises(NotARadiograph, match=f"lateral view \\(ViewPosition '{view}'\\)"):
        load_xray(acr_nema_dicom(adult_film, view=view))


@pytest.mark.parametrize(("age", "years"), [("045Y", 45.0), ("006M", 0.5), ("012W", 12 * 7 / 365.25), ("", None), ("abc", None)])
def test_patient_age_is_read_in_years(adult_film: Path, age: str, years: float | None) -> None:
    from dicom_factory import acr_nema_dicom

    loaded = load_xray(acr_nema_dicom(adult_film, age=age))
    assert loaded.age_years == (pytest.approx(years) if years is not None else None)
    assert "PatientAge" not in loaded.info  # a patient field: never returned or logged
