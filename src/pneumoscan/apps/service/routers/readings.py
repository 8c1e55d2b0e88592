"""``/api/v1/predictions/{id}/readings``: a radiologist's reading recorded against a prediction, and read back.

The audit log and the model come in as dependencies, so the router holds no state of its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from pneumoscan.apps.audit import AuditLog, reading_row
from pneumoscan.apps.readings import MAX_COMMENT_CHARS, READER_PATTERN
from pneumoscan.apps.service.dependencies import get_audit, get_predictor, get_service, require_api_key
from pneumoscan.apps.service.schemas import API, API_ERRORS, documented
from pneumoscan.apps.service.state import Service
from pneumoscan.running.inference import Predictor
from pneumoscan.running.performance import ReadAnswer, live_performance

Finding = Literal["pneumonia", "no_pneumonia", "cannot_tell"]


class ReadingIn(BaseModel):
    """What the radiologist found on the study this prediction answered."""

    model_config = ConfigDict(extra="forbid")

    finding: Finding = Field(description="pneumonia, no_pneumonia, or cannot_tell (kept, but confirms nothing)")
    reader: str = Field(pattern=READER_PATTERN, description="who read it: the site's reader id, never a patient field")
    read_at: datetime | None = Field(None, description="when the study was read (ISO 8601; without a zone: UTC); default now")
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS,
                                description="free text, stored with the reading only (never logged)")  # fmt: skip
    source: Literal["api", "page"] = Field("api", description="where the reading was entered")

    @field_validator("read_at")
    @classmethod
    def not_in_the_future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        if value > datetime.now(UTC):
            raise ValueError("read_at lies in the future")
        return value


class ReadingBody(BaseModel):
    id: str
    prediction_id: str
    finding: Finding
    reader: str
    read_at: str
    recorded_at: str = Field(description="when pneumoscan stored it; the latest reading of a prediction is the one in force")
    source: str = Field(description="page, api or import")
    comment: str | None = None


class ProportionBody(BaseModel):
    k: int
    n: int
    value: float | None
    low: float | None = Field(description="Wilson 95 % interval")
    high: float | None


class PerformanceGroupBody(BaseModel):
    population: str | None
    operating_point: str
    operating_point_source: str | None
    in_force: bool = Field(description="the operating point answering now; only it is checked against its target")
    n: int = Field(description="read studies with a decision (cannot_tell and not-validated answers apart)")
    counts: dict[str, int]
    cannot_tell: int
    not_validated: int = Field(description="answers 'not validated for this image' that a radiologist read: no decision to judge")
    sensitivity: ProportionBody
    specificity: ProportionBody
    ppv: ProportionBody
    npv: ProportionBody
    target_sensitivity: float | None
    allowed_misses: int | None = Field(description="missed pneumonias a point keeping its target makes in 95 % of windows")
    warning: bool
    message: str | None


class PerformanceBody(BaseModel):
    """What the radiologists' readings say of the answers, per population and operating point."""

    window: int = Field(description="at most this many read predictions, the most recently read")
    since: str | None
    n: int = Field(description="read predictions in the window")
    groups: list[PerformanceGroupBody]
    warning: bool
    message: str | None


def performance_figures(audit: AuditLog, predictor: Predictor, window: int, since: datetime | None = None) -> dict:
    """Live performance over the last ``window`` read predictions (see :mod:`pneumoscan.running.performance`)."""
    since = (since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)) if since else None
    rows = audit.readings_in_force(window, since)
    answers = [ReadAnswer(r["population"], r["operating_point"] or predictor.operating_point, r["operating_point_source"],
                          r["label"] == "PNEUMONIA", r["in_distribution"] is not False, r["finding"]) for r in rows]  # fmt: skip
    in_force = {name: (p.operating_point, p.in_force, p.target_sensitivity) for name, p in predictor.populations.items()}
    return {"window": window, "since": since.isoformat() if since else None, "n": len(rows), **live_performance(answers, in_force)}


def public_reading(row: dict) -> dict:
    utc = lambda moment: (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()  # noqa: E731 (SQLite drops zones)
    return {**{k: row[k] for k in ("id", "prediction_id", "finding", "reader", "source", "comment")},
            "read_at": utc(row["read_at"]), "recorded_at": utc(row["recorded_at"])}


router = APIRouter(prefix=API, tags=["readings"], dependencies=[Depends(require_api_key)])
ERRORS = documented(*API_ERRORS, 404, 422)


async def known_prediction(prediction_id: str, audit: AuditLog) -> None:
    if await run_in_threadpool(audit.get, prediction_id) is None:
        raise HTTPException(404, "no such prediction")


@router.post("/predictions/{prediction_id}/readings", status_code=201, response_model=ReadingBody, responses=ERRORS)
async def create_reading(prediction_id: str, reading: ReadingIn, audit: AuditLog = Depends(get_audit)) -> dict:
    """Record what the radiologist found. A later reading supersedes an earlier one; all are kept."""
    await known_prediction(prediction_id, audit)
    row = reading_row(prediction_id, reading.finding, reading.reader, reading.source, reading.read_at, reading.comment)
    await run_in_threadpool(audit.record_readings, [row])
    return public_reading(row)


@router.get("/predictions/{prediction_id}/readings", response_model=list[ReadingBody], responses=ERRORS)
async def list_readings(prediction_id: str, audit: AuditLog = Depends(get_audit)) -> list[dict]:
    """Every reading of the prediction, oldest first: the last is the one in force."""
    await known_prediction(prediction_id, audit)
    return [public_reading(r) for r in await run_in_threadpool(audit.readings_of, prediction_id)]


@router.get("/performance", response_model=PerformanceBody, responses=ERRORS, tags=["performance"])
async def get_performance(window: int | None = Query(None, ge=1, le=100_000), since: datetime | None = Query(None),
                          audit: AuditLog = Depends(get_audit), predictor: Predictor = Depends(get_predictor),
                          service: Service = Depends(get_service)) -> dict:  # fmt: skip
    """Sensitivity, specificity, PPV and NPV of the answers radiologists have read, per population and operating point,
    with Wilson 95 % intervals and counts: the reading in force of each of the last ``window`` read predictions
    (default: the service's setting) recorded from ``since`` on. ``warning``: the point in force falls short of
    the sensitivity it promises."""
    window = window or service.settings.performance_window
    return await run_in_threadpool(performance_figures, audit, predictor, window, since)
