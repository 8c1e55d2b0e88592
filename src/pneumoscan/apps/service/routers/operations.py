"""For the people and tools running the service: liveness, readiness and Prometheus figures (not in OpenAPI's API)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pneumoscan.apps.service.dependencies import get_service
from pneumoscan.apps.service.metrics import CONTENT_TYPE_LATEST
from pneumoscan.apps.service.routers.readings import performance_figures
from pneumoscan.apps.service.state import Service
from pneumoscan.apps.settings import ServiceSettings

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
async def metrics(service: Service = Depends(get_service)) -> Response:
    service.metrics.set_drift(service.drift.figures())
    performance = await run_in_threadpool(performance_figures, service.audit, service.predictor, service.settings.performance_window)
    service.metrics.set_performance(performance)
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Service = Depends(get_service)) -> JSONResponse:
    try:
        await run_in_threadpool(service.audit.ping)
    except Exception as exc:  # any database failure means "not ready", with the reason
        return JSONResponse(status_code=503, content={"status": "unavailable", "reason": f"database: {exc}"[:300]})
    short = disk_short_of_room(service.settings)
    if short:
        return JSONResponse(status_code=503, content={"status": "unavailable", "reason": short})
    return JSONResponse(content={"status": "ready", "model": service.model_info})


def disk_short_of_room(settings: ServiceSettings) -> str | None:
    """Why the service would fail on the next upload for want of disk, or None."""
    need = settings.min_free_disk_mb * 2**20
    for what, folder in (("data folder", settings.data_dir), ("temporary folder (uploads are spooled there)", Path(tempfile.gettempdir()))):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue  # a folder that does not exist yet is created on the first write
        if free < need:
            return f"disk: the {what} has {free / 2**20:.0f} MB free, less than the {settings.min_free_disk_mb:.0f} MB needed"
    return None
