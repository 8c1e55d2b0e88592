"""The size a compressed DICOM image declares in its own markers, read before anything is decoded.

A DICOM header's ``Rows`` and ``Columns`` are only a claim: the JPEG, JPEG-LS or
JPEG 2000 decoder allocates what the *codestream* declares, so a 19 KB file
whose header says 64×64 can carry a codestream of 25000×25000 and take gigabytes
to decode. Each codestream is therefore parsed here, marker by marker (a few
hundred bytes at most), and refused when it is over the pixel limit or
disagrees with the header. RLE has no size of its own (the decoder writes
Rows × Columns bytes per segment); its segment table is checked instead.
Deflated datasets (the whole dataset zlib-compressed) are inflated with a bound.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pneumoscan.errors import CorruptImage, ImageTooLarge, UnsupportedFormat

JPEG_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
})  # fmt: skip
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG_2000_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
})  # fmt: skip
RLE_SYNTAX = "1.2.840.10008.1.2.5"
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
#: The transfer syntaxes whose pixel data is stored as is (no codestream to inspect).
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED_SYNTAX})

#: JPEG start-of-frame markers (ITU T.81 B.1.1.3): every SOFn but DHT (C4), JPG (C8) and DAC (CC); F7 is JPEG-LS's SOF55.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
#: Markers that stand alone, with no length field: RSTn, SOI, EOI, TEM.
STANDALONE_MARKERS = frozenset({*range(0xD0, 0xD8), 0xD8, 0xD9, 0x01})
#: JPEG 2000 allows at most 65535 tiles (Isot is 16 bits); decoders allocate a structure per tile.
MAX_J2K_TILES = 65_535
MAX_COMPONENTS = 4


@dataclass(frozen=True)
class DeclaredSize:
    """What a codestream says it holds."""

    width: int
    height: int
    components: int
    kind: str  # JPEG, JPEG-LS, JPEG 2000


def jpeg_declared_size(stream: bytes, kind: str = "JPEG") -> DeclaredSize:
    """Width, height and components from the first start-of-frame marker (JPEG and JPEG-LS)."""
    if not stream.startswith(b"\xff\xd8"):
        raise CorruptImage(f"the DICOM's {kind} data does not start with a JPEG start-of-image marker")
    at = 2
    while at + 4 <= len(stream):
        if stream[at] != 0xFF:
            raise CorruptImage(f"the DICOM's {kind} data is damaged (no marker where one must be)")
        marker = stream[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in STANDALONE_MARKERS:
            at += 2
            continue
        (length,) = struct.unpack(">H", stream[at + 2 : at + 4])
        if marker in SOF_MARKERS:
            if length < 8 or at + 10 > len(stream):
                break
            height, width = struct.unpack(">HH", stream[at + 5 : at + 9])
            return DeclaredSize(width, height, stream[at + 9], "JPEG-LS" if marker == 0xF7 else kind)
        if marker == 0xDA or length < 2:  # start of scan before any frame header, or a length that cannot be
            break
        at += 2 + length
    raise CorruptImage(f"the DICOM's {kind} data has no frame header, so its size is unknown; it is not decoded")


def j2k_declared_size(stream: bytes) -> DeclaredSize:
    """Width, height and components from the SIZ marker of a JPEG 2000 codestream (or of a JP2 file's codestream)."""
    if stream[4:8] == b"jP  ":  # the JP2 file format: the codestream is in the jp2c box
        stream = jp2_codestream(stream)
    if not stream.startswith(b"\xff\x4f\xff\x51") or len(stream) < 42:
        raise CorruptImage("the DICOM's JPEG 2000 data does not start with a codestream header (SOC, SIZ); it is not decoded")
    xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz = struct.unpack(">8I", stream[8:40])
    (components,) = struct.unpack(">H", stream[40:42])
    width, height = xsiz - xosiz, ysiz - yosiz
    if width <= 0 or height <= 0 or xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz or ytosiz > yosiz:
        raise CorruptImage("the DICOM's JPEG 2000 header declares an impossible image or tile grid; it is not decoded")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    if tiles > MAX_J2K_TILES:
        raise ImageTooLarge(f"the DICOM's JPEG 2000 data declares {tiles:,} tiles, more than the standard's {MAX_J2K_TILES:,}")
    return DeclaredSize(width, height, components, "JPEG 2000")


def jp2_codestream(data: bytes) -> bytes:
    """The contents of the ``jp2c`` box of a JP2 file."""
    at = 0
    while at + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        header = 8
        if length == 1 and at + 16 <= len(data):
            (length,), header = struct.unpack(">Q", data[at + 8 : at + 16]), 16
        if kind == b"jp2c":
            return data[at + header : at + length] if length else data[at + header :]
        if length < header:
            break
        at += length
    raise CorruptImage("the DICOM's JPEG 2000 file has no codestream box; it is not decoded")


def check_rle_segments(stream: bytes, samples: int, bits_allocated: int) -> None:
    """An RLE frame holds one segment per byte plane; more would be decoded to more than the header's size."""
    if len(stream) < 64:
        raise CorruptImage("the DICOM's RLE data is shorter than its 64-byte header")
    segments = struct.unpack("<16I", stream[:64])
    expected = samples * -(-bits_allocated // 8)
    if segments[0] != expected or not 1 <= expected <= 15:
        raise CorruptImage(
            f"the DICOM's RLE data has {segments[0]} segments where its header (samples, bits allocated) needs {expected}"
        )
    offsets = segments[1 : 1 + expected]
    if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= len(stream):
        raise CorruptImage("the DICOM's RLE segment table points outside its data")


def declared_size(transfer_syntax: str, first_frame: bytes) -> DeclaredSize | None:
    """The codestream's own size for the compressed syntaxes that have one; None for RLE; refused for the unknown."""
    if transfer_syntax in JPEG_SYNTAXES:
        return jpeg_declared_size(first_frame)
    if transfer_syntax in JPEG_LS_SYNTAXES:
        return jpeg_declared_size(first_frame, "JPEG-LS")
    if transfer_syntax in JPEG_2000_SYNTAXES:
        return j2k_declared_size(first_frame)
    if transfer_syntax == RLE_SYNTAX:
        return None
    raise UnsupportedFormat(f"the DICOM's pixel data is compressed with transfer syntax {transfer_syntax}, "
                            "which pneumoscan does not read; send it uncompressed, JPEG, JPEG-LS, JPEG 2000 or RLE")  # fmt: skip


def check_declared_size(size: DeclaredSize, rows: int, columns: int, max_pixels: int) -> None:
    """Over the limit: refused as too large; different from the header: refused as inconsistent. Nothing is decoded."""
    if size.width * size.height > max_pixels:
        raise ImageTooLarge(
            f"the DICOM's {size.kind} data declares {size.width}×{size.height} pixels, more than the limit of "
            f"{max_pixels:,} (its header says {columns}×{rows}: a decompression bomb?); it is not decoded"
        )
    if (size.width, size.height) != (columns, rows):
        raise CorruptImage(
            f"the DICOM's {size.kind} data declares {size.width}×{size.height} pixels but its header says "
            f"{columns}×{rows}; the file is inconsistent and is not decoded"
        )
    if not 1 <= size.components <= MAX_COMPONENTS:
        raise CorruptImage(f"the DICOM's {size.kind} data declares {size.components} colour components; it is not decoded")


def check_frame(transfer_syntax: str, first_frame: bytes, *, rows: int, columns: int, samples: int, bits_allocated: int,
                max_pixels: int) -> None:  # fmt: skip
    """Everything a compressed frame must satisfy before a decoder sees it, whatever its transfer syntax."""
    size = declared_size(transfer_syntax, first_frame)
    if size is None:
        check_rle_segments(first_frame, samples, bits_allocated)
    else:
        check_declared_size(size, rows, columns, max_pixels)


def inflate_bounded(compressed: bytes, max_bytes: int, chunk: int = 2**20) -> int:
    """The inflated size of a deflated dataset, counted a megabyte at a time and refused past ``max_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = 0, compressed
    try:
        while pending or not inflater.eof:
            size += len(inflater.decompress(pending, chunk))
            pending = inflater.unconsumed_tail
            if size > max_bytes:
                raise ImageTooLarge(f"the DICOM's deflated dataset inflates to more than the limit of "
                                    f"{max_bytes // 2**20} MB (a zip bomb?); it is not read")  # fmt: skip
            if not pending and not inflater.eof:
                break  # a truncated stream: pydicom's own inflation refuses it
    except zlib.error as exc:
        raise CorruptImage("the DICOM's deflated dataset is damaged and cannot be inflated") from exc
    return size
