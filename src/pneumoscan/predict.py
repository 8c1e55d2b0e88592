"""``pneumoscan predict``: score files with the exported model, one record per file.

A file that cannot be read gives a record with an ``error`` and the others are
still scored, because one bad file in a folder of studies must not hide the rest.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pneumoscan.errors import InputError
from pneumoscan.explanation import save_side_by_side
from pneumoscan.imaging import Limits, load_xray
from pneumoscan.inference import Predictor, batched

@dataclass
class Record:
    path: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    in_distribution: bool | None = None
    ood_score: float | None = None
    warning: str | None = None
    heatmap: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k in ("path", "error", "in_distribution")}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; a directory means every file in it (recursively, hidden ones aside), sorted.

    Folder contents are not filtered by name: DICOM files often have no
    extension, and the loader tells images from the rest by their content.
    """
    files: list[Path] = []
    for item in inputs:
        files += files_in_folder(item) if item.is_dir() else [item]
    return files


def files_in_folder(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted; hidden files and folders (``.name``) are not inputs."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_image(path: Path, limits: Limits | None = None) -> Image.Image:
    """Decode a file with the one loader; its typed errors carry the plain message."""
    if not path.exists():
        raise InputError("file not found")
    if path.is_dir():
        raise InputError("is a folder, not an image")
    try:
        return load_xray(path, limits).image
    except PermissionError as exc:
        raise InputError("cannot be read: permission denied") from exc


def predict_files(predictor: Predictor, paths: list[Path], heatmap_dir: Path | None = None, batch_size: int = 16) -> list[Record]:
    """One record per path, in order."""
    records = [Record(str(p)) for p in paths]
    readable: list[tuple[int, Image.Image]] = []
    for i, path in enumerate(paths):
        try:
            readable.append((i, read_image(path, predictor.limits)))
        except InputError as exc:
            records[i].error = str(exc)
    for chunk in batched(readable, batch_size):
        predictions = predictor.predict([image for _, image in chunk], heatmap=heatmap_dir is not None)
        for (i, image), prediction in zip(chunk, predictions):
            record = records[i]
            record.probability, record.label, record.threshold = prediction.probability, prediction.label, prediction.threshold
            record.in_distribution, record.ood_score, record.warning = (
                prediction.in_distribution, prediction.ood_score, prediction.warning,
            )  # fmt: skip
            if heatmap_dir is not None and prediction.heatmap is not None:
                target = heatmap_dir / f"{i:05d}-{Path(record.path).stem}.png"
                caption = f"{prediction.label}  p={prediction.probability:.3f}  (threshold {prediction.threshold:.3f})"
                record.heatmap = str(save_side_by_side(image, prediction.heatmap, target, caption))
    return records


def format_records(records: list[Record], fmt: str) -> str:
    """``table`` for people, ``json`` and ``csv`` for programs."""
    if fmt == "json":
        return json.dumps([r.to_dict() for r in records], indent=2)
    columns = ["path", "probability", "label", "threshold", "in_distribution", "ood_score", "heatmap", "error"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if getattr(r, k) is None else getattr(r, k)) for k in columns})
        return buffer.getvalue().rstrip("\n")
    width = max([len(r.path) for r in records] + [4])
    lines = [f"{'path':<{width}}  {'probability':>11}  {'label':<9}  {'threshold':<9}  note"]
    for r in records:
        if r.error:
            lines.append(f"{r.path:<{width}}  {'-':>11}  {'ERROR':<9}  {'-':<9}  {r.error}")
        else:
            note = r.warning or ""
            lines.append(f"{r.path:<{width}}  {r.probability:>11.4f}  {r.label:<9}  {r.threshold:<9.4f}  {note}")
    return "\n".join(lines)


__all__ = ["Record", "expand_inputs", "format_records", "predict_files"]
