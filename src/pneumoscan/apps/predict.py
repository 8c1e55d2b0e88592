"""``pneumoscan predict``: score files with the exported model, one record per file.

A file that cannot be read gives a record with an ``error`` and the others are
still scored, because one bad file in a folder of studies must not hide the rest.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from pneumoscan.errors import InputError
from pneumoscan.inputs.imaging import Limits, LoadedImage, load_xray
from pneumoscan.inputs.preprocessing import preprocess
from pneumoscan.running.explanation import save_side_by_side
from pneumoscan.running.inference import Prediction, Predictor

T = TypeVar("T")


NOT_VALIDATED = "not validated for this image"


@dataclass
class Record:
    path: str
    decision: str | None = None  # the label, or NOT_VALIDATED when the gate flags the image
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    operating_point: str | None = None
    operating_point_source: str | None = None  # validation, or the site calibration's date
    population: str | None = None
    population_source: str | None = None
    population_note: str | None = None
    in_distribution: bool | None = None
    ood_score: float | None = None
    warning: str | None = None
    heatmap: str | None = None
    error: str | None = None
    regions: list[dict[str, float]] | None = None  # where the pneumonia is, in the file's pixels (flagged films only)
    regions_note: str | None = None

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


def read_image(path: Path, limits: Limits | None = None) -> LoadedImage:
    """Decode a file with the one loader; its typed errors carry the plain message."""
    if not path.exists():
        raise InputError("file not found")
    if path.is_dir():
        raise InputError("is a folder, not an image")
    try:
        return load_xray(path, limits)
    except PermissionError as exc:
        raise InputError("cannot be read: permission denied") from exc


def failure_message(exc: BaseException, doing: str = "reading this file") -> str:
    """What a record says when a file failed: the user's reason, or the name of pneumoscan's own bug to report."""
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or exc}"
    return f"internal error while {doing} ({type(exc).__name__}: {exc}); please report it"[:300]


def guarded(action: Callable[[], T]) -> T | BaseException:
    """Run ``action``; whatever a file makes it raise comes back as a value, so one file never ends a run."""
    try:
        return action()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001  (decoders can even panic with a BaseException)
        return exc


@dataclass
class Pending:
    """A decoded input waiting for its batch: the model's tensor and, for heat maps only, the picture."""

    index: int
    tensor: np.ndarray
    image: Image.Image | None
    age_years: float | None = None  # a DICOM's PatientAge: it routes the image to its population
    size: tuple[int, int] | None = None  # the file's width and height: regions are given in its pixels


def predict_files(predictor: Predictor, paths: list[Path], heatmap_dir: Path | None = None, batch_size: int = 16,
                  progress: bool | None = None) -> list[Record]:  # fmt: skip
    """One record per path, in order; see :func:`iter_predictions` (``progress`` None: a bar on a terminal only)."""
    return list(iter_predictions(predictor, paths, heatmap_dir, batch_size, progress))


def iter_predictions(predictor: Predictor, paths: list[Path], heatmap_dir: Path | None = None, batch_size: int = 16,
                     progress: bool | None = None) -> Iterator[Record]:  # fmt: skip
    """Records in input order, ``batch_size`` files at a time.

    Memory stays bounded whatever the folder's size: a file is decoded, reduced
    to the model's input tensor at once (its full picture is kept only when a
    heat map is drawn), and scored with at most ``batch_size - 1`` others.
    """
    with tqdm(total=len(paths), unit="file", desc="predict", disable=None if progress is None else not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = range(start, min(start + batch_size, len(paths)))
            records = {i: Record(str(paths[i])) for i in chunk}
            pending: list[Pending] = []
            for i in chunk:
                decoded = guarded(lambda: decode_for_model(predictor, paths[i], keep_image=heatmap_dir is not None))
                if isinstance(decoded, BaseException):
                    records[i].error = failure_message(decoded)
                else:
                    pending.append(Pending(i, *decoded))
            scored = score_each(predictor, [p.tensor for p in pending], heatmap_dir is not None, [p.age_years for p in pending],
                                [p.size for p in pending])  # fmt: skip
            for item, prediction in zip(pending, scored):
                record = records[item.index]
                if isinstance(prediction, BaseException):
                    record.error = failure_message(prediction, "scoring")
                    continue
                fill(record, prediction)
                if heatmap_dir is not None and item.image is not None and prediction.heatmap is not None:
                    target = heatmap_dir / f"{item.index:05d}-{Path(record.path).stem}.png"
                    caption = heatmap_caption(prediction)
                    drawn = guarded(lambda: save_side_by_side(item.image, prediction.heatmap, target, caption, prediction.regions))
                    if isinstance(drawn, BaseException):
                        record.warning = f"the heat map could not be written: {failure_message(drawn)}"
                    else:
                        record.heatmap = str(drawn)
            bar.update(len(chunk))
            yield from (records[i] for i in chunk)


def heatmap_caption(prediction: Prediction) -> str:
    """The picture's caption: a flagged image gets no verdict, only the reason and the muted probability."""
    if not prediction.validated:
        return f"{NOT_VALIDATED}  (p={prediction.probability:.3f}, for reference)"
    return f"{prediction.label}  p={prediction.probability:.3f}  (threshold {prediction.threshold:.3f}, {prediction.population})"


def decode_for_model(predictor: Predictor, path: Path, keep_image: bool
                     ) -> tuple[np.ndarray, Image.Image | None, float | None, tuple[int, int]]:  # fmt: skip
    loaded = read_image(path, predictor.limits)
    tensor = preprocess(loaded.image, predictor.image_size, predictor.intensity)
    return tensor, loaded.image if keep_image else None, loaded.age_years, loaded.image.size


def score_each(predictor: Predictor, tensors: list[np.ndarray], heatmap: bool, ages: list[float | None] | None = None,
               sizes: list[tuple[int, int] | None] | None = None) -> list[Prediction | BaseException]:  # fmt: skip
    """One batched forward pass; if the batch fails, each input alone, so only the input at fault gets an error."""
    if not tensors:
        return []
    ages = ages or [None] * len(tensors)
    sizes = [size or (predictor.image_size, predictor.image_size) for size in (sizes or [None] * len(tensors))]
    batch = guarded(lambda: predictor.predict_tensors(np.stack(tensors), heatmap=heatmap, ages=ages, sizes=sizes))
    if not isinstance(batch, BaseException):
        return list(batch)
    alone = [guarded(lambda: predictor.predict_tensors(tensor[None], heatmap=heatmap, ages=[age], sizes=[size]))
             for tensor, age, size in zip(tensors, ages, sizes)]  # fmt: skip
    return [outcome if isinstance(outcome, BaseException) else outcome[0] for outcome in alone]


def fill(record: Record, prediction: Prediction) -> None:
    record.probability, record.label, record.threshold = prediction.probability, prediction.label, prediction.threshold
    record.decision = prediction.label if prediction.validated else NOT_VALIDATED
    record.operating_point, record.operating_point_source = prediction.operating_point, prediction.operating_point_source
    record.population, record.population_source = prediction.population, prediction.population_source
    record.population_note = prediction.population_note
    record.in_distribution, record.ood_score, record.warning = prediction.in_distribution, prediction.ood_score, prediction.warning
    record.regions, record.regions_note = [r.to_dict() for r in prediction.regions], prediction.regions_note


def regions_in_words(regions: list[dict[str, float]] | None) -> str:
    """``region 312,140 220×180`` for each region (pixels of the file), for the table people read."""
    return ", ".join(f"region {r['x']:.0f},{r['y']:.0f} {r['width']:.0f}×{r['height']:.0f}" for r in regions or [])


def format_records(records: list[Record], fmt: str) -> str:
    """``table`` for people, ``json`` and ``csv`` for programs."""
    if fmt == "json":
        return json.dumps([r.to_dict() for r in records], indent=2)
    columns = ["path", "decision", "probability", "label", "threshold", "population", "population_source", "operating_point",
               "operating_point_source", "in_distribution", "ood_score", "heatmap", "error", "population_note", "regions",
               "regions_note"]  # fmt: skip
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in records:
            row = {k: ("" if getattr(r, k) is None else getattr(r, k)) for k in columns}
            row["regions"] = "" if r.regions is None else json.dumps(r.regions, separators=(",", ":"))
            writer.writerow(row)
        return buffer.getvalue().rstrip("\n")
    width = max([len(r.path) for r in records] + [4])
    lines = [f"{'path':<{width}}  {'decision':<29}  {'probability':>11}  {'threshold':<9}  {'population':<10}  note"]
    for r in records:
        if r.error:
            lines.append(f"{r.path:<{width}}  {'ERROR':<29}  {'-':>11}  {'-':<9}  {'-':<10}  {r.error}")
        elif r.decision == NOT_VALIDATED:  # no verdict: the probability in brackets, for reference only
            note = "; ".join(n for n in (r.warning, r.population_note) if n)
            lines.append(f"{r.path:<{width}}  {NOT_VALIDATED:<29}  {f'({r.probability:.4f})':>11}  {'-':<9}  {r.population or '-':<10}  {note}")
        else:
            note = "; ".join(n for n in (regions_in_words(r.regions), r.population_note) if n)
            lines.append(f"{r.path:<{width}}  {r.decision or r.label:<29}  {r.probability:>11.4f}  {r.threshold:<9.4f}  {r.population or '-':<10}  {note}")
    in_force = sorted({(r.population or "-", r.operating_point, r.operating_point_source) for r in records if r.operating_point})
    lines += [f"operating point in force ({population}): {name} [{source}]" for population, name, source in in_force]
    return "\n".join(lines)


__all__ = ["Record", "expand_inputs", "format_records", "iter_predictions", "predict_files"]
