"""``/api/v1/predictions``: score an uploaded X-ray, and read back recent answers and their pictures.

Every answered prediction is written to the audit log before the answer leaves; anything a client
sends that cannot be scored is a 4xx with a JSON reason, never a 500. Reading and decoding run off
the event loop, bounded by the service's slots, so the loop keeps answering; the model then scores
the image together with whatever else arrived within the batch window (:mod:`pneumoscan.running.batching`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Depends, File, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from pneumoscan.apps.audit import AuditLog, prediction_row
from pneumoscan.apps.service.dependencies import get_audit, get_service, require_api_key
from pneumoscan.apps.service.responses import error
from pneumoscan.apps.service.schemas import API, API_ERRORS, PredictionBody, documented
from pneumoscan.apps.service.state import Service
from pneumoscan.errors import InputError
from pneumoscan.files import write_atomically
from pneumoscan.inputs.imaging import HEAD_BYTES, LoadedImage, check_head, load_xray
from pneumoscan.running.batching import Preprocessed
from pneumoscan.running.drift import Observation

log = logging.getLogger(__name__)
router = APIRouter(prefix=f"{API}/predictions", tags=["predictions"], dependencies=[Depends(require_api_key)])


@router.post("", status_code=201, response_model=PredictionBody, responses=documented(*API_ERRORS, 413, 415, 422))
async def create_prediction(file: UploadFile = File(...), service: Service = Depends(get_service)) -> JSONResponse:
    # Admitted already (UploadGuard); the bytes are read only once a slot is free, so waiting uploads stay spooled.
    settings = service.settings
    try:
        async with service.slots:
            check_head(await file.read(HEAD_BYTES), service.limits)  # a header over the limit: refused without reading the rest
            await file.seek(0)
            data = await file.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                return error(413, "ImageTooLarge", f"the upload is larger than {settings.max_upload_bytes // 2**20} MB")
            loaded, ready = await run_in_threadpool(decode, data, service)
        prediction = await asyncio.wrap_future(service.batcher.submit(ready))
    except InputError as exc:
        return error(exc.http_status, type(exc).__name__, str(exc))
    row = prediction_row(prediction, data, loaded.format, service.model_info)
    kept = None
    if settings.keep_uploads:  # kept whole, before the record, or neither: no truncated file, no row without it
        try:
            kept = await run_in_threadpool(keep_upload, settings.data_dir / "uploads", f"{row['id']}.{loaded.format}", data)
        except OSError as exc:
            log.error("the upload could not be kept: %s", exc.strerror or type(exc).__name__)
            return error(503, "UploadStoreUnavailable", "the upload cannot be stored (PNEUMOSCAN_KEEP_UPLOADS is set "
                         f"and the disk refused it: {exc.strerror or 'write error'}); no prediction is given. Retry "
                         "once the disk has room.", {"Retry-After": "30"})  # fmt: skip
    try:
        await asyncio.wrap_future(service.recorder.submit(row))  # committed with the rows of requests beside it
    except SQLAlchemyError as exc:  # no answer without a record: the client may retry
        log.error("audit log write failed: %s", type(exc).__name__)
        if kept is not None:
            kept.unlink(missing_ok=True)
        return error(503, "AuditLogUnavailable", "the audit database cannot be written; no prediction is given "
                     "without a record. Retry shortly.", {"Retry-After": "5"})  # fmt: skip
    service.metrics.by_label.labels(prediction.label, str(prediction.in_distribution)).inc()
    service.drift.add(Observation(prediction.population, prediction.probability, prediction.ood_score))
    service.pictures.put(row["id"], loaded.image, prediction.heatmap)
    return JSONResponse(status_code=201, content=public(row, service.predictor.operating_point))


@router.get("/{prediction_id}", response_model=PredictionBody, responses=documented(*API_ERRORS, 404, 422))
async def get_prediction(prediction_id: str, audit: AuditLog = Depends(get_audit), service: Service = Depends(get_service)) -> dict:
    row = await run_in_threadpool(audit.get, prediction_id)
    if row is None:
        raise HTTPException(404, "no such prediction")
    return public(row, service.predictor.operating_point)


@router.get("/{prediction_id}/{picture}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **documented(*API_ERRORS, 404, 422)})  # fmt: skip
async def get_picture(prediction_id: str, picture: str, service: Service = Depends(get_service)) -> Response:
    """``heatmap.png``: the X-ray with the heat map overlaid; ``image.png``: the X-ray as it was read."""
    png = await run_in_threadpool(service.pictures.png, prediction_id, picture)
    if png is None:
        raise HTTPException(404, "no such picture (pictures are kept in memory for recent predictions only)")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})  # a patient's image: never kept


@router.get("", response_model=list[PredictionBody], responses=documented(*API_ERRORS, 422))
async def list_predictions(limit: int = Query(20, ge=1, le=500), audit: AuditLog = Depends(get_audit),
                           service: Service = Depends(get_service)) -> list[dict]:  # fmt: skip
    return [public(r, service.predictor.operating_point) for r in await run_in_threadpool(audit.recent, limit)]


def decode(data: bytes, service: Service) -> tuple[LoadedImage, Preprocessed]:
    """The upload read as every entry point reads it, and the model's input made from it (in a worker thread)."""
    loaded = load_xray(data, service.limits)
    return loaded, Preprocessed.of(service.predictor, loaded)


def public(row: dict, default_operating_point: str) -> dict:
    """An audit row as the API shows it."""
    return {
        "id": row["id"],
        "probability": row["probability"],
        "label": row["label"],
        "threshold": row["threshold"],
        "operating_point": row.get("operating_point") or default_operating_point,
        "operating_point_source": row.get("operating_point_source"),
        "population": row.get("population"),
        "population_source": row.get("population_source"),
        "population_note": row.get("population_note"),
        "validated": row["in_distribution"] is not False,
        "in_distribution": row["in_distribution"],
        "ood_score": row["ood_score"],
        "regions": json.loads(row.get("regions") or "[]"),
        "regions_note": row.get("regions_note"),
        "model": {"name": row["model_name"], "version": row["model_version"], "sha256": row["model_sha256"]},
        "created_at": as_utc(row["created_at"]).isoformat(),
        "heatmap_url": f"{API}/predictions/{row['id']}/heatmap.png",
        "image_url": f"{API}/predictions/{row['id']}/image.png",
    }


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; every time here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def keep_upload(folder: Path, name: str, data: bytes) -> Path:
    """Written whole or not at all: a failed write leaves nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomically(folder / name, data)
