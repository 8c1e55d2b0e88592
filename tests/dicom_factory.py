"""Builds real DICOM files from dataset images with pydicom, for the loader's tests."""

from __future__ import annotations

import io
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
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

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
