"""What the API answers, as pydantic models: each route's OpenAPI entry is made of these."""

from __future__ import annotations

from pydantic import BaseModel, Field

#: Every API route lives under this prefix.
API = "/api/v1"


class ErrorBody(BaseModel):
    """Every refusal: a machine-readable kind and a sentence for the user."""

    error: str
    detail: str


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str


class RegionBody(BaseModel):
    x: float = Field(description="left edge, in pixels of the uploaded image")
    y: float = Field(description="top edge, in pixels of the uploaded image")
    width: float
    height: float
    score: float = Field(description="the calibrated probability × the heat map's peak inside the region, in [0, 1]")


class PredictionBody(BaseModel):
    id: str
    probability: float
    label: str
    threshold: float
    operating_point: str
    operating_point_source: str | None = Field(None, description="which operating point answered: 'validation', or 'site calibration of <date>'")
    population: str | None = Field(None, description="child or adult: whose temperature, threshold and gate were used")
    population_source: str | None = Field(None, description="what decided the population: the image, the DICOM PatientAge, or the model's only population")
    population_note: str | None = Field(None, description="set when the image and the DICOM PatientAge disagree")
    validated: bool = Field(True, description="false: not validated for this image (the gate flagged it); show no verdict")
    in_distribution: bool | None
    ood_score: float | None
    regions: list[RegionBody] = Field(default_factory=list, description=(
        "where the model sees the pneumonia: boxes from the heat map by the rule fitted on radiologists' boxes of the "
        "population's validation part (see the model card). Empty below the threshold, for an image not validated, and "
        "for a population without a rule (regions_note says so)"))
    regions_note: str | None = Field(None, description="why a pneumonia has no regions, when its population has no rule")
    model: ModelInfo
    created_at: str
    heatmap_url: str
    image_url: str


class OperatingPointBody(BaseModel):
    population: str
    name: str = Field(description="how the threshold was chosen, e.g. '98% sensitivity on validation'")
    threshold: float
    temperature: float
    source: str = Field(description="'validation' or 'site' (pneumoscan calibrate)")
    date: str | None = Field(None, description="when a site calibration set it")
    in_force: str = Field(description="in words: 'validation' or 'site calibration of <date>'")


class ModelBody(ModelInfo):
    operating_points: list[OperatingPointBody]


class DriftIndicatorBody(BaseModel):
    name: str = Field(description="probability, ood_score or mix")
    population: str | None
    n: int = Field(description="predictions it was computed on")
    psi: float | None
    judged: bool = Field(description="false until the window holds min_predictions of the population")
    drifted: bool


class DriftBody(BaseModel):
    """Recent predictions against the reference distributions of the model card (population stability index)."""

    available: bool
    reference: str | None = Field(None, description="what the recent predictions are compared with")
    window: int
    n: int = Field(description="predictions in the window")
    threshold: float
    min_predictions: int
    method: str
    indicators: list[DriftIndicatorBody]
    mix: dict | None = None
    warning: bool
    message: str | None = Field(None, description="the warning in plain words, when there is one")
    reason: str | None = Field(None, description="why drift is not available")


def documented(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route can answer (checked by the schemathesis test)."""
    return {status: {"model": ErrorBody} for status in statuses}


API_ERRORS = (401, 503)
