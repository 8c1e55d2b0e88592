"""Builds real DICOM files from dataset images with pydicom, for the loader's tests."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def build_dicom(
    source: Path,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    transfer_syntax: str | None = None,
    window: tuple[float, float] | None | str = "full",
    rescale: tuple[float, float] | None = None,
    preamble: bool = True,
    patient_name: str = "Doe^Jane",
) -> bytes:
    """A single-frame DICOM of ``source``'s pixels, stored as a viewer would have to undo it.

    MONOCHROME1 stores inverted values; ``bits`` > 8 spreads 0..255 over the range and,
    by default, writes the window that shows it all; ``rescale`` stores
    ``(value - intercept) / slope`` so the Modality LUT restores it.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    gray = np.asarray(Image.open(source).convert("L"), dtype=np.float64)
    top = 2**bits - 1
    values = gray * (top / 255.0)
    if photometric == "MONOCHROME1":
        values = top - values
    slope, intercept = rescale or (1.0, 0.0)
    stored = np.round((values - intercept) / slope).astype(np.uint16 if bits > 8 else np.uint8)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, "PID-123456", "20200101"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (16 if bits > 8 else 8), bits, bits - 1, 0
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window == "full":  # what a modality writes: the view that shows the whole stored range
        window = (top / 2.0, float(top)) if bits > 8 else None
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.tobytes()
    if transfer_syntax:
        ds.compress(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def compressed_dicom(source: Path, transfer_syntax: str) -> bytes:
    """An 8-bit DX DICOM of ``source`` with its pixel data compressed by a real encoder.

    JPEG-LS, JPEG 2000 and RLE go through pydicom's encoders (pyjpegls, pylibjpeg-openjpeg,
    its own RLE); baseline JPEG, which pydicom does not encode, is Pillow's codestream encapsulated.
    """
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    if transfer_syntax != JPEG_BASELINE:
        return build_dicom(source, bits=8, transfer_syntax=transfer_syntax)
    ds = dcmread(io.BytesIO(build_dicom(source, bits=8)))
    buffer = io.BytesIO()
    Image.open(source).convert("L").save(buffer, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def claiming_codestream_size(dicom: bytes, width: int, height: int) -> bytes:
    """The same DICOM, header untouched, whose codestream now declares ``width``×``height`` (a decompression bomb).

    JPEG and JPEG-LS: the start-of-frame marker's size. JPEG 2000: the SIZ marker's image and
    tile size, so that the decoder allocates the whole declared image in one tile.
    """
    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_frames

    ds = dcmread(io.BytesIO(dicom))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    if frame.startswith(b"\xff\x4f\xff\x51"):
        frame[8:16] = struct.pack(">II", width, height)
        frame[24:32] = struct.pack(">II", width, height)
    else:
        at = 2
        while frame[at + 1] not in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            at += 2 + struct.unpack(">H", frame[at + 2 : at + 4])[0]
        frame[at + 5 : at + 9] = struct.pack(">HH", height, width)
    ds.PixelData = encapsulate([bytes(frame)])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflated_dicom(source: Path, padding: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of ``source``; ``padding`` zero bytes of Data Set Trailing Padding
    are deflated with it, streamed, so a zip bomb of any inflated size costs the test a few hundred kilobytes."""
    import zlib

    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = build_dicom(source, bits=8)
    ds = dcmread(io.BytesIO(plain))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    deflated_file = out.getvalue()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(plain[_meta_end(plain) :])]
    if padding:  # (FFFC,FFFC) OB: the one element allowed after Pixel Data
        parts.append(compressor.compress(b"\xfc\xff\xfc\xffOB\x00\x00" + padding.to_bytes(4, "little")))
        zeros = bytes(2**20)
        for start in range(0, padding, len(zeros)):
            parts.append(compressor.compress(zeros[: min(len(zeros), padding - start)]))
    parts.append(compressor.flush())
    return deflated_file[: _meta_end(deflated_file)] + b"".join(parts)


def _meta_end(data: bytes) -> int:
    """Where the dataset starts: after the preamble and the File Meta group."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_preamble

    buffer = DicomBytesIO(data)
    read_preamble(buffer, True)
    _read_file_meta_info(buffer)
    return buffer.tell()


def dicom_bombs(source: Path) -> dict[str, bytes]:
    """Issue 17's DICOM bombs, with ``source``'s honest header size: a JPEG, JPEG-LS and JPEG 2000 codestream declaring
    25000×25000, and a deflated dataset inflating to 300 MB. Each is a few kilobytes; decoding any costs 0.6–3 GB."""
    bombs = {f"{name} codestream declaring 25000×25000": claiming_codestream_size(compressed_dicom(source, syntax), 25_000, 25_000)
             for name, syntax in (("JPEG", JPEG_BASELINE), ("JPEG-LS", JPEG_LS_LOSSLESS), ("JPEG 2000", JPEG_2000_LOSSLESS))}  # fmt: skip
    bombs["deflated dataset inflating to 300 MB"] = deflated_dicom(source, padding=300 * 2**20)
    return bombs


# --------------------------------------------------------------------------- raw elements, for fuzzing the structure

#: VRs whose explicit-VR header has two reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
UNDEFINED_LENGTH = 0xFFFFFFFF


def raw_element(tag: int, vr: bytes, value: bytes, length: int | None = None, long_header: bool | None = None) -> bytes:
    """One Explicit VR Little Endian element, byte for byte: any VR bytes, any length field, any value."""
    long_header = vr in LONG_VRS if long_header is None else long_header
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    head += b"\x00\x00" + struct.pack("<I", size & 0xFFFFFFFF) if long_header else struct.pack("<H", size & 0xFFFF)
    return head + value


def raw_item(body: bytes, defined: bool = True) -> bytes:
    """A sequence item; undefined length ends with an item delimiter."""
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED_LENGTH) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def raw_sequence(tag: int, items: list[bytes], defined: bool = True) -> bytes:
    body = b"".join(items)
    if defined:
        return raw_element(tag, b"SQ", body)
    return raw_element(tag, b"SQ", body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), length=UNDEFINED_LENGTH)


def raw_dicom(elements: list[bytes]) -> bytes:
    """Preamble, a File Meta group naming Explicit VR Little Endian, then ``elements`` as given (order included)."""
    syntax = b"1.2.840.10008.1.2.1\x00"
    meta = b"".join([
        raw_element(0x00020001, b"OB", b"\x00\x01"),
        raw_element(0x00020002, b"UI", b"1.2.840.10008.5.1.4.1.1.1.1\x00"),
        raw_element(0x00020003, b"UI", b"1.2.826.0.1.3680043.8.498.1\x00"),
        raw_element(0x00020010, b"UI", syntax),
    ])  # fmt: skip
    return b"\x00" * 128 + b"DICM" + raw_element(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta + b"".join(elements)


def radiograph_elements(pixels: np.ndarray) -> list[tuple[int, bytes, bytes]]:
    """(tag, VR, value) of a valid 8-bit DX image: the starting point that the structure fuzzer mutates."""
    rows, columns = pixels.shape
    return [
        (0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.1.1\x00"),
        (0x00080018, b"UI", b"1.2.826.0.1.3680043.8.498.1\x00"),
        (0x00080060, b"CS", b"DX"),
        (0x00100010, b"PN", b"Doe^Jane"),
        (0x0020000D, b"UI", b"1.2.826.0.1.3680043.8.498.2\x00"),
        (0x0020000E, b"UI", b"1.2.826.0.1.3680043.8.498.3\x00"),
        (0x00280002, b"US", struct.pack("<H", 1)),
        (0x00280004, b"CS", b"MONOCHROME2 "),
        (0x00280008, b"IS", b"1 "),
        (0x00280010, b"US", struct.pack("<H", rows)),
        (0x00280011, b"US", struct.pack("<H", columns)),
        (0x00280100, b"US", struct.pack("<H", 8)),
        (0x00280101, b"US", struct.pack("<H", 8)),
        (0x00280102, b"US", struct.pack("<H", 7)),
        (0x00280103, b"US", struct.pack("<H", 0)),
        (0x00281050, b"DS", b"128 "),
        (0x00281051, b"DS", b"256 "),
        (0x00281052, b"DS", b"0 "),
        (0x00281053, b"DS", b"1 "),
        (0x7FE00010, b"OB", pixels.astype(np.uint8).tobytes()),
    ]


def acr_nema_dicom(
    source: Path,
    bits: int = 10,
    photometric: str = "MONOCHROME1",
    modality: str = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    age: str | None = "045Y",
) -> bytes:
    """An old ACR-NEMA style file: no 128-byte preamble, no File Meta group, implicit VR little endian.

    What older CR readers and archives still hand out, e.g. a 10-bit MONOCHROME1 CR.
    The dataset is written element by element, as such files are, so nothing announces
    the transfer syntax: the reader has to infer it.
    """
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import generate_uid

    gray = np.asarray(Image.open(source).convert("L"), dtype=np.float64)
    top = 2**bits - 1
    values = gray * (top / 255.0)
    if photometric == "MONOCHROME1":
        values = top - values
    stored = np.round(values).astype(np.uint16 if bits > 8 else np.uint8)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID = "Doe^John", "PID-654321"
    if age is not None:
        ds.PatientAge = age
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (16 if bits > 8 else 8), bits, bits - 1, 0
    ds.PixelData = stored.tobytes()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def radiograph_dataset(
    source: Path,
    size: int | None = None,
    modality: str = "DX",
    view: str = "PA",
    body_part: str = "CHEST",
    age_years: int | None = None,
    study_uid: str | None = None,
    patient_id: str = "PID-123456",
) -> "Dataset":  # noqa: F821
    """A Digital X-Ray (for presentation) instance of ``source``, as a modality sends it to a PACS.

    ``size`` resamples the image (the node's benchmark sends 1024×1024 films); the
    patient and study modules are filled in, so result objects can copy them.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = Image.open(source).convert("L")
    if size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION if modality == "DX" else "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", patient_id, "19700101", "F"
    if age_years is not None:
        ds.PatientAge = f"{age_years:03d}Y"
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20261120", "101500", "20261120", "101501"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC0001", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer = "pneumoscan tests"
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = body_part, view, ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType, ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "FOR PRESENTATION", "LOG", 1
        ds.ImageLaterality, ds.BurnedInAnnotation, ds.LossyImageCompression = "U", "NO", "00"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.WindowCenter, ds.WindowWidth = 128, 256
        ds.DetectorType, ds.PixelSpacing, ds.ImagerPixelSpacing = "DIRECT", [0.4, 0.4], [0.4, 0.4]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


def radiograph_dicom(source: Path, **options: object) -> bytes:
    """:func:`radiograph_dataset` as the bytes of a DICOM file."""
    buffer = io.BytesIO()
    radiograph_dataset(source, **options).save_as(buffer, enforce_file_format=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def dx_header(width: int, height: int, bits_stored: int = 12) -> "Dataset":  # noqa: F821
    """A 16-bit DX header of ``width``×``height`` pixels, without its pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "Large^Detector", "PID-LARGE"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    return ds


def large_dicom(width: int, height: int, transfer_syntax: str | None = None, bits_stored: int = 12) -> bytes:
    """An honest 16-bit DX of ``width``×``height`` pixels (a smooth ramp, so it compresses to a small file).

    What a modality with a large detector sends: no bomb, its codestream declares what its header says.
    The ramp rises down the rows from 0 to the top stored value, its slope varying across the columns.
    """
    ds = dx_header(width, height, bits_stored)
    top = 2**bits_stored - 1
    rows = np.linspace(0, top, height, dtype=np.float32)[:, None]
    slope = np.linspace(0.5, 1.0, width, dtype=np.float32)[None, :]
    ds.PixelData = (rows * slope).astype(np.uint16).tobytes()
    if transfer_syntax:
        ds.compress(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_huge_dicom(path: Path, side: int = 14_142) -> Path:
    """A DX of ``side``² 16-bit pixels (14142²: 400 MB) written a chunk at a time, never whole in memory."""
    dx_header(side, side).save_as(path, enforce_file_format=True)
    length = side * side * 2
    with open(path, "ab") as handle:
        handle.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", length))
        block = bytes(16 * 2**20)
        for start in range(0, length, len(block)):
            handle.write(block[: min(len(block), length - start)])
    return path
