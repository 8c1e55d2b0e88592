"""``/api/v1/model``: which model answers, at which operating point for each population."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from pneumoscan.apps.service.dependencies import get_service, require_api_key
from pneumoscan.apps.service.schemas import API, API_ERRORS, ModelBody, documented
from pneumoscan.apps.service.state import Service

router = APIRouter(prefix=API, tags=["model"], dependencies=[Depends(require_api_key)])


@router.get("/model", response_model=ModelBody, responses=documented(*API_ERRORS))
async def get_model(service: Service = Depends(get_service)) -> dict:
    """The model that answers and the operating point in force for each population (validation or site)."""
    return {**service.model_info, "operating_points": [
        {"population": population, "name": p.operating_point, "threshold": p.threshold, "temperature": p.temperature,
         "source": p.source, "date": p.date, "in_force": p.in_force}
        for population, p in service.predictor.populations.items()
    ]}  # fmt: skip
