"""``/api/v1/drift``: do recent predictions still look like the studies the operating point was set on?"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from pneumoscan.apps.service.dependencies import get_service, require_api_key
from pneumoscan.apps.service.schemas import API, API_ERRORS, DriftBody, documented
from pneumoscan.apps.service.state import Service

router = APIRouter(prefix=API, tags=["drift"], dependencies=[Depends(require_api_key)])


@router.get("/drift", response_model=DriftBody, responses=documented(*API_ERRORS))
async def get_drift(service: Service = Depends(get_service)) -> dict:
    """Do the last predictions still look like the studies the operating point was set on?

    Population stability index (PSI) per population of the calibrated probability and of the
    out-of-distribution score, and of the population mix, against the reference distributions of
    the model card (its validation parts, or the site set after ``pneumoscan calibrate``).
    ``warning`` is true once an indicator with enough predictions reaches the threshold.
    """
    return service.drift.figures()
