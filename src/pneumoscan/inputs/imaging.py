"""One loader for every entry point: bytes in, an 8-bit grayscale X-ray out, or a typed error.

The format is found from the content, never from the file name. DICOM files go
through their Modality LUT, VOI LUT or window, and MONOCHROME1 inversion, as a
viewer would show them; only projection radiographs (CR, DX, DR) are accepted.
Sizes are checked *before* decoding, so a decompression bomb is refused, not decoded.
"""

from __future__ import annotations

import io
import numbers
import re
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan.config import MAX_INPUT_BYTES, MAX_INPUT_PIXELS
from pneumoscan.errors import (
    CorruptImage,
    ImageTooLarge,
    InputError,
    NotARadiograph,
    UnsupportedFormat,
)
from pneumoscan.inputs.codestream import (
    DEFLATED_SYNTAX,
    JPEG_LS_SYNTAXES,
    NATIVE_SYNTAXES,
    check_frame,
    inflate_bounded,
)

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
PILLOW_FORMATS = {"jpeg": "JPEG", "png": "PNG", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}
#: DICOM fields that may be returned; patient-identifying fields are never copied.
SAFE_DICOM_FIELDS = ("Modality", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PhotometricInterpretation", "BitsStored")


@dataclass(frozen=True)
class Limits:
    """Refuse inputs above these sizes before decoding them."""

    max_bytes: int = MAX_INPUT_BYTES
    max_pixels: int = MAX_INPUT_PIXELS


@dataclass
class LoadedImage:
    image: Image.Image  # mode "L"
    format: str  # jpeg, png, tiff, bmp, webp, dicom
    info: dict[str, object] = field(default_factory=dict)
    # A DICOM's PatientAge in years: it routes the image to its population. Kept apart from ``info``,
    # which may be returned and logged, because it is a patient field.
    age_years: float | None = None


def sniff_format(data: bytes) -> str:
    """The format from the first bytes; ``UnsupportedFormat`` with what it looks like otherwise."""
    if not data:
        raise CorruptImage("the file is empty (0 bytes)")
    head = data[:512]
    if len(data) >= 132 and data[128:132] == b"DICM":  # first: a DICOM preamble may itself look like TIFF
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if describe_unsupported(head) == "this file" and looks_like_dicom(data):  # no preamble, still a dataset
        return "dicom"
    raise UnsupportedFormat(f"{describe_unsupported(head)} is not an X-ray image: upload a JPEG, PNG, TIFF, BMP, WebP or DICOM file")


def looks_like_dicom(data: bytes) -> bool:
    """A bare DICOM dataset (no 128-byte preamble): pydicom parses it and finds DICOM's usual fields."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data[:65536]), force=True, stop_before_pixels=True)
        return len(ds) >= 3 and any(name in ds for name in ("SOPClassUID", "Modality", "StudyInstanceUID", "Rows"))
    except Exception:  # anything pydicom cannot parse is simply not DICOM
        return False


def describe_unsupported(head: bytes) -> str:
    lowered = head.lstrip().lower()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF animation"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "this file"


def load_xray(source: bytes | str | Path, limits: Limits | None = None) -> LoadedImage:
    """Decode any supported input to an 8-bit grayscale image, or raise a typed :class:`InputError`."""
    limits = limits or Limits()
    data = read_bytes(source, limits)
    kind = sniff_format(data)
    if kind == "dicom":
        return load_dicom(data, limits)
    return load_pillow(data, kind, limits)


#: How much of a file :func:`check_head` reads: past any EXIF or ICC block that precedes a JPEG's frame header.
HEAD_BYTES = 256 * 1024


def check_head(head: bytes, limits: Limits | None = None) -> None:
    """Refuse from a file's first bytes alone what its header already condemns (over the pixel limit, unknown format).

    Lets a caller holding a large upload on disk refuse it without reading it into memory. Anything
    the head cannot settle (a DICOM, a header beyond the head, a damaged file) is left to :func:`load_xray`.
    """
    limits = limits or Limits()
    if not head:
        return
    kind = sniff_format(head)  # decided by the first 64 KB, as for the whole file
    if kind in PILLOW_FORMATS:
        try:
            with Image.open(io.BytesIO(head), formats=[PILLOW_FORMATS[kind]]) as opened:
                size = opened.size
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"the image claims more pixels than the limit of {limits.max_pixels:,}; downscale it first") from exc
        except Exception:  # noqa: BLE001  (a header cut by the head, or a damaged one: decided on the whole file)
            return
        check_pixels(*size, limits)


def read_bytes(source: bytes | str | Path, limits: Limits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise CorruptImage(f"{path.name}: no such file" if not path.exists() else f"{path.name} is not a file")
        if path.stat().st_size > limits.max_bytes:
            raise ImageTooLarge(f"the file is larger than the limit of {limits.max_bytes // 2**20} MB")
        data = path.read_bytes()
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the file is larger than the limit of {limits.max_bytes // 2**20} MB")
    return data


def check_pixels(width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {width}×{height} pixels, more than the limit of {limits.max_pixels:,}; downscale it first"
        )


def load_pillow(data: bytes, kind: str, limits: Limits) -> LoadedImage:
    try:
        with Image.open(io.BytesIO(data), formats=[PILLOW_FORMATS[kind]]) as opened:
            check_pixels(*opened.size, limits)  # header only: nothing decoded yet
            opened.load()
            image = ImageOps.exif_transpose(opened)
            gray = to_gray8(image)
    except (ImageTooLarge, UnsupportedFormat):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(
            f"the image claims more pixels than the limit of {limits.max_pixels:,} (a decompression bomb?); downscale it first"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(f"the {kind.upper()} file is damaged or truncated and cannot be decoded") from exc
    return LoadedImage(gray, kind)


def to_gray8(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit grayscale, scaling 16-bit data by its full range (a table, not a float copy of the frame)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        table = np.round(np.arange(65536, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(table[np.asarray(image)])
    if image.mode in ("I", "F"):
        array = np.asarray(image)
        top = 65535.0 if image.mode == "I" and array.max() <= 65535 and array.min() >= 0 else None
        return Image.fromarray(scale_by_bands(array, 0.0, top) if top else scale_by_bands(array))
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L")


def scale_by_bands(array: np.ndarray, low: float | None = None, high: float | None = None, rows: int = 256) -> np.ndarray:
    """:func:`scale_to_uint8` a band of rows at a time: a float64 copy of a band, never of the whole image."""
    low = float(array.min()) if low is None else low
    high = float(array.max()) if high is None else high
    out = np.empty(array.shape, dtype=np.uint8)
    for at in range(0, array.shape[0], rows):
        out[at : at + rows] = scale_to_uint8(array[at : at + rows], low, high)
    return out


def scale_to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linear map of [low, high] (default: the data's range) to 0..255."""
    array = np.asarray(array, dtype=np.float64)
    low = float(array.min()) if low is None else low
    high = float(array.max()) if high is None else high
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.clip((array - low) / (high - low) * 255.0, 0, 255).round().astype(np.uint8)


def load_dicom(data: bytes, limits: Limits) -> LoadedImage:
    """Decode a DICOM file; whatever its header or pixel data hold, only an :class:`InputError` escapes.

    pydicom converts most values lazily, on first access, so a damaged element
    (an unknown VR, two values where one is meant, text in a number) raises
    wherever it is first read: everything from parsing to display values runs
    under one guard. Nothing is decoded before the sizes are checked, the
    compressed data's own size included (see :mod:`pneumoscan.inputs.codestream`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns for each invalid value; the refusal says what matters
            check_deflated_size(data, limits)
            ds = read_dicom_dataset(data)
            info = safe_dicom_fields(ds)
            check_radiograph(ds)
            rows, columns = header_int(ds, "Rows"), header_int(ds, "Columns")
            check_pixels(columns, rows, limits)
            check_pixel_data_size(ds, rows, columns, limits)
            pixels = dicom_display_values(ds)
            age = dicom_age(ds)
    except InputError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        # pydicom's value conversions and pixel handlers raise many kinds, each meaning the same to a user; the Rust
        # RLE decoder (pylibjpeg-rle) even panics with pyo3's PanicException, a BaseException (found by fuzzing)
        raise CorruptImage(f"the DICOM file is damaged and cannot be read ({type(exc).__name__}: {exc})"[:300]) from exc
    return LoadedImage(Image.fromarray(pixels), "dicom", info, age)


def read_dicom_dataset(data: bytes) -> object:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise CorruptImage("the DICOM file is damaged and cannot be read") from exc
    name_transfer_syntax(ds)
    prefer_lean_decoder(ds)
    return ds


def transfer_syntax_of(ds: object) -> str:
    """The dataset's Transfer Syntax UID; implicit VR little endian (DICOM's default) when it names none."""
    file_meta = getattr(ds, "file_meta", None)
    return str(file_meta.get("TransferSyntaxUID", "") if file_meta is not None else "") or "1.2.840.10008.1.2"


def prefer_lean_decoder(ds: object) -> None:
    """JPEG-LS through CharLS (pyjpegls) when it is installed: it decodes into its output, where libjpeg's plugin
    holds about three times the frame (a 40 M-pixel 16-bit film: +157 MB instead of +308 MB)."""
    if transfer_syntax_of(ds) in JPEG_LS_SYNTAXES and find_spec("jpeg_ls") is not None:
        ds.pixel_array_options(decoding_plugin="pyjpegls")  # type: ignore[attr-defined]


def name_transfer_syntax(ds: object) -> None:
    """Give an old ACR-NEMA style file (no preamble, no File Meta group) the transfer syntax it was read with.

    pydicom infers implicit/explicit VR and byte order while parsing such a file
    but cannot decode its pixels without a Transfer Syntax UID; the encoding it
    found is that UID (only the three uncompressed syntaxes can lack a meta group).
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta  # type: ignore[attr-defined]
    meta.TransferSyntaxUID = syntax


def dicom_age(ds: object) -> float | None:
    """PatientAge (``045Y``) in years, or None when absent or not an age."""
    try:
        value = ds.get("PatientAge")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  (a damaged age is no age)
        return None
    return age_in_years(value) if isinstance(value, str) and value.strip() else None


def check_deflated_size(data: bytes, limits: Limits) -> None:
    """A deflated dataset is inflated whole by pydicom: first make sure it inflates to less than the file limit."""
    if DEFLATED_SYNTAX.encode() not in data[:4096]:  # the transfer syntax is named in the small file meta group
        return
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble

    buffer = DicomBytesIO(data)
    read_preamble(buffer, True)
    meta = _read_file_meta_info(buffer)
    if str(meta.get("TransferSyntaxUID", "")) == DEFLATED_SYNTAX:
        inflate_bounded(data[buffer.tell() :], limits.max_bytes)


#: What a DICOM UID may be (PS3.5 9.1): digits and dots, at most 64 characters.
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


def safe_dicom_fields(ds: object) -> dict[str, object]:
    """The fields pneumoscan may return, each only when it reads as what it should be; a damaged one is left out."""
    info: dict[str, object] = {}
    for name in SAFE_DICOM_FIELDS:
        try:
            value = ds.get(name)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001  (a damaged element of a field that is informative only)
            continue
        if not isinstance(value, (str, numbers.Number)):  # absent, several values, or raw bytes
            continue
        text = str(value).strip()
        if name.endswith("UID") and not (len(text) <= 64 and UID_PATTERN.fullmatch(text)):
            continue
        if text and len(text) <= 64 and text.isprintable():
            info[name] = text
    return info


def header_int(ds: object, keyword: str, default: int | None = None) -> int:
    """A whole number from the header, or a :class:`CorruptImage` that names the field."""
    try:
        value = ds.get(keyword)  # type: ignore[attr-defined]
    except Exception as exc:
        raise CorruptImage(f"the DICOM header's {keyword} is damaged and cannot be read") from exc
    if value is None or value == "":
        if default is None:
            raise CorruptImage(f"the DICOM header has no {keyword}: the image size is unknown")
        return default
    try:
        if isinstance(value, (str, bytes, numbers.Integral)) or float(value).is_integer():
            return int(value)
    except (TypeError, ValueError):
        pass
    raise CorruptImage(f"the DICOM header's {keyword} is {str(value)[:40]!r}, not one whole number")


def check_pixel_data_size(ds: object, rows: int, columns: int, limits: Limits) -> None:
    """Before decoding: the stored sample size must be plausible, and compressed data must declare the header's size."""
    samples, bits = header_int(ds, "SamplesPerPixel", 1), header_int(ds, "BitsAllocated", 8)
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise CorruptImage(f"the DICOM header declares {samples} samples of {bits} bits per pixel, which no X-ray image has")
    syntax = transfer_syntax_of(ds)
    if syntax in NATIVE_SYNTAXES or "PixelData" not in ds:  # type: ignore[operator]
        return
    from pydicom.encaps import generate_frames

    try:
        first_frame = next(generate_frames(ds.PixelData, number_of_frames=1))  # type: ignore[attr-defined]
    except Exception as exc:
        raise CorruptImage("the DICOM's compressed pixel data has no readable frame") from exc
    check_frame(syntax, first_frame, rows=rows, columns=columns, samples=samples, bits_allocated=bits, max_pixels=limits.max_pixels)


def check_radiograph(ds: object) -> None:
    """Refuse what the model was not made for: other modalities, clips, files with no image."""
    modality = str(getattr(ds, "Modality", "") or "").upper()
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:  # type: ignore[operator]
        if modality in RADIOGRAPH_MODALITIES:  # an X-ray without its pixels: the structure was damaged before them
            raise CorruptImage(f"this {modality} DICOM file's pixel data cannot be found: the file is damaged or truncated")
        raise NotARadiograph(f"this DICOM file holds no image (modality {modality or 'unknown'}): nothing to score")
    if modality not in RADIOGRAPH_MODALITIES:
        raise NotARadiograph(
            f"this DICOM image is modality {modality or 'unknown'}, not a projection radiograph (CR, DX or DR); "
            "pneumoscan reads chest X-rays only"
        )
    frames = header_int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise NotARadiograph(f"this DICOM file holds {frames} frames; send a single chest X-ray image")
    check_chest_frontal(ds)


#: BodyPartExamined values (DICOM's defined terms and what modalities write) that are the chest.
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "TORAX", "LUNG", "CXR")
#: Values that clearly name another part: the film is of something else.
OTHER_BODY_PARTS = (
    "SKULL", "HEAD", "BRAIN", "FACE", "SINUS", "JAW", "TMJ", "NECK", "CSPINE", "TSPINE", "LSPINE", "SPINE", "SACRUM",
    "COCCYX", "ABDOMEN", "PELVIS", "HIP", "FEMUR", "THIGH", "KNEE", "PATELLA", "LEG", "TIBIA", "FIBULA", "ANKLE",
    "FOOT", "HEEL", "CALCANEUS", "TOE", "SHOULDER", "HUMERUS", "ARM", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER",
    "EXTREMITY", "KUB", "BLADDER", "KIDNEY",
)
#: ViewPosition values of lateral films (the model is validated on frontal AP/PA views only).
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE")


def check_chest_frontal(ds: object) -> None:
    """Refuse a film that says it is not of the chest, or not frontal; chest synonyms and empty values pass."""
    part = text_field(ds, "BodyPartExamined")
    if part and not any(word in part for word in CHEST_WORDS):
        words = set(re.split(r"[^A-Z]+", part))
        if words & set(OTHER_BODY_PARTS) or part.replace(" ", "") in OTHER_BODY_PARTS:
            raise NotARadiograph(
                f"this X-ray is of the {part.lower()} (BodyPartExamined {part!r}), not the chest; "
                "pneumoscan reads frontal chest X-rays only"
            )
    view = text_field(ds, "ViewPosition")
    if view and (view in LATERAL_VIEWS or "LATERAL" in view):
        raise NotARadiograph(
            f"this chest X-ray is a lateral view (ViewPosition {view!r}); pneumoscan is validated on frontal "
            "(PA or AP) views only: send the frontal film of the study"
        )


def text_field(ds: object, keyword: str) -> str:
    """A short text field, upper-case and trimmed; empty when absent, damaged or not text."""
    try:
        value = ds.get(keyword)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return ""
    return value.strip().upper() if isinstance(value, str) else ""


def dicom_display_values(ds: object) -> np.ndarray:
    """Pixels as a viewer shows them, 8-bit: Modality LUT, VOI LUT/window, MONOCHROME1 inverted.

    Memory is what matters here: a 40 M-pixel 16-bit film is 80 MB as stored but was 320 MB
    per float64 copy, and the conversion made four. Stored values of 16 bits or fewer are
    therefore mapped through a table of the 65,536 possible codes (the whole display chain
    computed once per code, then one uint8 lookup per pixel); wider or floating-point data is
    converted a band of rows at a time. The image costs its decoded size plus one byte a pixel.
    """
    raw = ds.pixel_array  # type: ignore[attr-defined]
    if raw.ndim != 2:
        if raw.ndim == 3 and raw.shape[-1] == 3:  # colour (pydicom has already converted YBR to RGB)
            return np.asarray(Image.fromarray(raw.astype(np.uint8, copy=False)).convert("L"))
        raise NotARadiograph("this DICOM image is not a single grayscale frame")
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2:
        return display_through_table(raw, ds)
    return display_by_bands(raw, ds)


def display_through_table(raw: np.ndarray, ds: object) -> np.ndarray:
    """Every possible stored code through the display chain once, then one table lookup per pixel."""
    unsigned = np.dtype(f"u{raw.dtype.itemsize}")
    codes = np.arange(2 ** (8 * raw.dtype.itemsize), dtype=np.int64).astype(unsigned)
    if raw.dtype.kind == "i":  # the table is indexed by the bit pattern: codes as the signed values they stand for
        codes = codes.view(np.dtype(f"i{raw.dtype.itemsize}"))
    mapped = display_float(codes, ds)
    held = (codes >= raw.min()) & (codes <= raw.max())  # the codes this image can hold: its range, when shown whole
    table = to_display_uint8(mapped, ds, float(mapped[held].min()), float(mapped[held].max()))
    return table[raw.view(unsigned.newbyteorder(raw.dtype.byteorder))]


def display_by_bands(raw: np.ndarray, ds: object, rows: int = 256) -> np.ndarray:
    """Data wider than 16 bits (or floating point): the display chain a band of rows at a time, never the whole frame."""
    bands = range(0, raw.shape[0], rows)
    low, high = np.inf, -np.inf
    for at in bands:  # the data's range first (needed when the file has no window), then the conversion
        mapped = display_float(raw[at : at + rows], ds)
        low, high = min(low, float(mapped.min())), max(high, float(mapped.max()))
    out = np.empty(raw.shape, dtype=np.uint8)
    for at in bands:
        out[at : at + rows] = to_display_uint8(display_float(raw[at : at + rows], ds), ds, low, high)
    return out


def display_float(values: np.ndarray, ds: object) -> np.ndarray:
    """Stored values through the Modality LUT and, when the file has one, its VOI LUT (float64: for a table or a band)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    mapped = apply_modality_lut(values, ds).astype(np.float64)
    if "VOILUTSequence" in ds:  # type: ignore[operator]
        mapped = apply_voi_lut(mapped, ds, index=0).astype(np.float64)
    return mapped


def to_display_uint8(mapped: np.ndarray, ds: object, data_low: float, data_high: float) -> np.ndarray:
    """Modality-mapped values to 8 bits through the file's VOI LUT or window, or the data's range; MONOCHROME1 inverted."""
    if "VOILUTSequence" in ds:  # type: ignore[operator]
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)  # type: ignore[attr-defined]
    elif "WindowCenter" in ds and "WindowWidth" in ds:  # type: ignore[operator]
        center, width = first_value(ds.WindowCenter), max(first_value(ds.WindowWidth), 1.0)  # type: ignore[attr-defined]
        low, high = center - width / 2.0, center + width / 2.0
    elif int(getattr(ds, "BitsStored", 8) or 8) <= 8 and data_low >= 0 and data_high <= 255:
        low, high = 0.0, 255.0
    else:  # no window: show the full range of the data, as viewers do
        low, high = float(data_low), float(data_high)
    gray = scale_to_uint8(mapped, low, high)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    return 255 - gray if photometric == "MONOCHROME1" else gray


def first_value(value: object) -> float:
    """WindowCenter/Width may hold several values; the first is the default view."""
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def age_in_years(value: object) -> float | None:
    """A DICOM age string (``045Y``, ``006M``, ``012W``, ``030D``) or a plain number of years; None if it is neither."""
    match = _AGE.match(str(value)) if value is not None else None
    if not match:
        return None
    years = float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
    return years if 0 <= years <= 130 else None
