"""``/model/...``: the model, its settings and gates for the page's on-device mode (onnxruntime-web). No image comes here."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from pneumoscan.apps.service.dependencies import get_service
from pneumoscan.apps.service.device import MODEL_ROUTE, gate_bytes
from pneumoscan.apps.service.state import Service
from pneumoscan.running.inference import INT8_MODEL_FILE, MODEL_FILE

router = APIRouter(prefix=MODEL_ROUTE, include_in_schema=False)


@router.get("/device.json")
async def model_for_device(service: Service = Depends(get_service)) -> dict:
    return service.device


@router.get("/{name}")
async def model_file(name: str, service: Service = Depends(get_service)) -> Response:
    predictor = service.predictor
    if name in (MODEL_FILE, INT8_MODEL_FILE) and (predictor.model_dir / name).is_file():
        return FileResponse(predictor.model_dir / name, media_type="application/octet-stream")
    population = name.removeprefix("gate.").removesuffix(".bin")
    point = predictor.populations.get(population)
    if name.startswith("gate.") and name.endswith(".bin") and point is not None and point.gate is not None:
        return Response(await run_in_threadpool(gate_bytes, point.gate), media_type="application/octet-stream")
    raise HTTPException(404, "no such model file")
