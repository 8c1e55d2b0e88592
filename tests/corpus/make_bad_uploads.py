"""Writes the committed corpus of bad uploads (``bad_uploads/``) and its manifest of expected answers.

    python tests/corpus/make_bad_uploads.py

Every file is made here from a synthetic image (no dataset image is copied);
a few real DICOM files that pydicom ships are named in the manifest instead of
copied. ``tests/test_bad_uploads.py`` posts each one to the service and checks
the status, the error kind and that the answer says why.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "bad_uploads"
sys.path.insert(0, str(HERE.parent))

from dicom_factory import build_dicom


def synthetic(size: int = 96) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    return Image.fromarray((60 + 150 * np.abs(np.sin(6 * x) * np.cos(4 * y))).astype(np.uint8))


def encode(image: Image.Image, kind: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + png_chunk(b"IEND", b"")


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def dicom_variant(source: Path, change: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(build_dicom(source, bits=12)))
    if change == "no_pixels":
        del ds.PixelData
    elif change == "huge":
        ds.Rows, ds.Columns = 65_535, 65_535
    elif change == "short_pixels":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    elif change == "modality_sr":
        ds.Modality = "SR"
        del ds.PixelData
    elif change == "modality_us":
        ds.Modality = "US"
    elif change == "frames":
        ds.NumberOfFrames = 4
    elif change == "bits_zero":
        ds.BitsAllocated = 0
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    image = synthetic()
    jpeg, png = encode(image, "JPEG", quality=90), encode(image, "PNG")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "synthetic.png"
        image.save(source)
        rle = build_dicom(source, bits=16, transfer_syntax="1.2.840.10008.1.2.5")
        cases: list[tuple[str, bytes, int, str]] = [
            # name, bytes, expected status, expected error kind
            ("empty.jpeg", b"", 422, "CorruptImage"),
            ("notes.txt", b"Patient seen in clinic, film to follow.\n", 415, "UnsupportedFormat"),
            ("page.png", b"<!DOCTYPE html><html><body>not an image</body></html>", 415, "UnsupportedFormat"),
            ("report.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", 415, "UnsupportedFormat"),
            ("anim.gif", encode(image, "GIF"), 415, "UnsupportedFormat"),
            ("archive.zip", b"PK\x03\x04" + bytes(26) + b"x.jpeg", 415, "UnsupportedFormat"),
            ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', 415, "UnsupportedFormat"),
            ("program.jpeg", b"\x7fELF\x02\x01\x01" + bytes(57), 415, "UnsupportedFormat"),
            ("noise.bin", bytes((i * 7919 + 13) % 251 for i in range(1024)), 415, "UnsupportedFormat"),
            ("data.json", b'{"image": "scan.jpeg"}', 415, "UnsupportedFormat"),
            ("utf16.txt", "an X-ray\n".encode("utf-16"), 415, "UnsupportedFormat"),
            ("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + bytes(64), 415, "UnsupportedFormat"),
            ("icon.ico", encode(image.resize((32, 32)), "ICO"), 415, "UnsupportedFormat"),
            ("jpeg_header_only.jpeg", jpeg[:12], 422, "CorruptImage"),
            ("jpeg_truncated.jpeg", jpeg[: len(jpeg) // 3], 422, "CorruptImage"),
            ("jpeg_0x0.jpeg", jpeg_claiming(jpeg, 0, 0), 422, "CorruptImage"),
            ("jpeg_65535x65535.jpeg", jpeg_claiming(jpeg, 65_535, 65_535), 413, "ImageTooLarge"),
            ("png_header_only.png", png[:16], 422, "CorruptImage"),
            ("png_truncated.png", png[: len(png) // 2], 422, "CorruptImage"),
            ("png_bad_crc.png", png[:29] + bytes([png[29] ^ 0xFF]) + png[30:], 422, "CorruptImage"),
            ("png_bomb_100000x100000.png", png_claiming(100_000, 100_000), 413, "ImageTooLarge"),
            ("png_0x0.png", png_claiming(0, 0), 422, "CorruptImage"),
            ("tiff_header_only.tif", b"II*\x00\x08\x00\x00\x00", 422, "CorruptImage"),
            ("bmp_header_only.bmp", encode(image, "BMP")[:30], 422, "CorruptImage"),
            ("webp_header_only.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 ", 422, "CorruptImage"),
            ("dicom_no_pixels.dcm", dicom_variant(source, "no_pixels"), 422, "CorruptImage"),  # a DX without pixels: damaged
            ("dicom_65535x65535.dcm", dicom_variant(source, "huge"), 413, "ImageTooLarge"),
            ("dicom_short_pixel_data.dcm", dicom_variant(source, "short_pixels"), 422, "CorruptImage"),
            ("dicom_structured_report.dcm", dicom_variant(source, "modality_sr"), 422, "NotARadiograph"),
            ("dicom_ultrasound.dcm", dicom_variant(source, "modality_us"), 422, "NotARadiograph"),
            ("dicom_four_frames.dcm", dicom_variant(source, "frames"), 422, "NotARadiograph"),
            ("dicom_bits_allocated_0.dcm", dicom_variant(source, "bits_zero"), 422, "CorruptImage"),
            ("dicom_rle_damaged.dcm", rle[:-400] + bytes(range(200)) * 2, 422, "NotARadiograph"),  # pixel data unparsable: no image
            ("dicom_preamble_only.dcm", bytes(128) + b"DICM", 422, "NotARadiograph"),
        ]
    manifest = []
    for name, data, status, kind in cases:
        (OUT / name).write_bytes(data)
        manifest.append({"file": name, "status": status, "error": kind})
    for name, status, kind in (  # real DICOM files shipped by pydicom (not copied)
        ("CT_small.dcm", 422, "NotARadiograph"),
        ("MR_small.dcm", 422, "NotARadiograph"),
        ("MR_truncated.dcm", 422, "NotARadiograph"),
        ("rtplan.dcm", 422, "NotARadiograph"),
        ("rtdose_1frame.dcm", 422, "NotARadiograph"),
        ("SC_rgb_rle_2frame.dcm", 422, "NotARadiograph"),
    ):
        manifest.append({"pydicom": name, "status": status, "error": kind})
    (HERE / "bad_uploads.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest)} bad uploads: {OUT}")


if __name__ == "__main__":
    main()
