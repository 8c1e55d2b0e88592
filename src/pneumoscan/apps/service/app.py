"""The web service: ``pneumoscan serve`` (FastAPI + uvicorn), REST API over the shared ONNX model.

Every answered prediction is written to the audit log before the answer
leaves; anything a client sends that cannot be scored is a 4xx with a JSON
reason, never a 500. Inference runs in a worker thread, bounded by a semaphore,
so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import pneumoscan
from pneumoscan.apps import readings_api
from pneumoscan.apps.admission import Admission, UploadGuard
from pneumoscan.apps.audit import AuditLog, connect, prediction_row, started_row
from pneumoscan.apps.device import MODEL_ROUTE, device_settings, gate_bytes
from pneumoscan.apps.settings import ServiceSettings, is_loopback
from pneumoscan.errors import ConfigurationError, InputError
from pneumoscan.files import write_atomically
from pneumoscan.inputs.imaging import HEAD_BYTES, Limits, check_head, load_xray
from pneumoscan.running.drift import (
    DriftMonitor,
    Observation,
)
from pneumoscan.running.explanation import overlay
from pneumoscan.running.inference import INT8_MODEL_FILE, MODEL_FILE, Predictor

API = "/api/v1"
STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor" / "onnxruntime-web"


def check_exposure(settings: ServiceSettings) -> None:
    """Refuse to serve patients' X-rays to a network without a key, unless told so by the unsafe setting's name."""
    key = settings.resolved_api_key()  # an empty or unreadable key is an error wherever the service listens
    if key or is_loopback(settings.host) or settings.unsafe_allow_unauthenticated_network_access:
        return
    raise ConfigurationError(
        f"refusing to serve on {settings.host} without an API key: anyone who reaches the port could list and download "
        "every X-ray. Set PNEUMOSCAN_API_KEY (or PNEUMOSCAN_API_KEY_FILE), serve on 127.0.0.1 behind an authenticating "
        "proxy, or, if the network is closed, say so with --unsafe-allow-unauthenticated-network-access"
    )


log = logging.getLogger(__name__)


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

#: Pictures are kept (in memory) at most this many pixels on their long side: enough for a screen.
PICTURE_MAX_SIDE = 1024


class PictureCache:
    """The X-ray and heat map of recent predictions, in memory only (they show the patient's image), bounded in bytes.

    PNGs are drawn on the first request for them, off the event loop, then
    kept: an API client that never asks for the picture costs no encoding.
    The oldest predictions leave first once the pictures and PNGs held pass ``max_bytes``.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[Image.Image, np.ndarray]] = OrderedDict()
        self.drawn: dict[tuple[str, str], bytes] = {}
        self.costs: dict[str, int] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def put(self, prediction_id: str, image: Image.Image, heatmap: np.ndarray) -> None:
        if max(image.size) > PICTURE_MAX_SIDE:
            image = image.copy()
            image.thumbnail((PICTURE_MAX_SIDE, PICTURE_MAX_SIDE))
        heatmap = heatmap.astype(np.float16)
        with self.lock:
            self.items[prediction_id] = (image, heatmap)
            self.charge(prediction_id, image.width * image.height * len(image.getbands()) + heatmap.nbytes)
            self.evict()

    def charge(self, prediction_id: str, cost: int) -> None:
        self.costs[prediction_id] = self.costs.get(prediction_id, 0) + cost
        self.bytes += cost

    def evict(self) -> None:
        while self.bytes > self.max_bytes and self.items:
            gone, _ = self.items.popitem(last=False)
            self.bytes -= self.costs.pop(gone, 0)
            self.drawn.pop((gone, "heatmap"), None)
            self.drawn.pop((gone, "image"), None)

    def png(self, prediction_id: str, picture: str) -> bytes | None:
        """``heatmap``: the overlay; ``image``: the X-ray as read. None once the prediction has left the cache."""
        with self.lock:
            entry, png = self.items.get(prediction_id), self.drawn.get((prediction_id, picture))
        if entry is None or picture not in ("heatmap", "image"):
            return None
        if png is None:
            image, heatmap = entry
            png = png_bytes(overlay(image, heatmap.astype(np.float32)) if picture == "heatmap" else image)
            with self.lock:
                if prediction_id in self.items and (prediction_id, picture) not in self.drawn:
                    self.drawn[(prediction_id, picture)] = png
                    self.charge(prediction_id, len(png))
                    self.evict()
        return png


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; every time here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


#: Everything the page needs comes from the app itself; no inline script, no framing by other sites.
#: 'wasm-unsafe-eval' lets the on-device mode compile onnxruntime-web's WebAssembly (no JavaScript eval).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: Cross-origin isolation: onnxruntime-web may then run on several threads (SharedArrayBuffer) in the on-device mode.
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: Swagger UI's files that the docs page loads, from the installed package (never a CDN): served under /docs/static/.
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def create_app(settings: ServiceSettings | None = None, predictor: Predictor | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    api_key = settings.resolved_api_key()
    limits = Limits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    predictor = predictor or Predictor.load(settings.model_dir, settings.precision, settings.threads, limits)
    audit = AuditLog(connect(settings.resolved_database_url))
    audit.record_model_event(started_row(predictor, "serve"))
    pictures = PictureCache(int(settings.picture_cache_mb * 2**20))
    slots = asyncio.Semaphore(settings.max_concurrent)
    admitted = Admission(settings.max_concurrent + settings.max_queue)  # receiving, waiting or running
    card = predictor.card
    model_info = {
        "name": card["name"],
        "version": card["pneumoscan_version"],
        "sha256": predictor.model_sha256,
    }
    drift = DriftMonitor(card.get("drift_reference"), settings.drift_window, settings.drift_threshold, settings.drift_min_predictions)
    for row in reversed(audit.recent(settings.drift_window)):  # a restart keeps watching: only rows of this model and operating point
        if row["model_sha256"] == predictor.model_sha256 and answered_by(predictor, row):
            drift.add(Observation(row.get("population"), row["probability"], row.get("ood_score")))
    app = FastAPI(title="pneumoscan", version=pneumoscan.__version__, description="Pneumonia detection on chest X-rays",
                  docs_url=None, redoc_url=None)  # the docs page is ours: Swagger UI from this origin, under the CSP
    app.state.predictor = predictor
    app.state.audit = audit
    app.state.settings = settings
    app.include_router(readings_api.router(API, documented(*API_ERRORS, 404, 422)))
    @app.get("/static/vendor/onnxruntime-web/{name}", include_in_schema=False)
    async def runtime_file(name: str, request: Request) -> FileResponse:
        """onnxruntime-web's files; the WebAssembly gzipped ahead (vendored so) for browsers that accept it: 14 → 4 MB."""
        path = VENDOR / name
        if "/" in name or name.startswith(".") or not path.is_file() or name.endswith(".gz"):
            raise HTTPException(404, "no such file")
        media = {".mjs": "text/javascript", ".wasm": "application/wasm"}.get(path.suffix, "application/octet-stream")
        packed = path.with_name(name + ".gz")
        if packed.is_file() and "gzip" in request.headers.get("accept-encoding", ""):
            return FileResponse(packed, media_type=media, headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return FileResponse(path, media_type=media, headers={"Vary": "Accept-Encoding"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    registry = CollectorRegistry()
    requests_total = Counter("pneumoscan_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("pneumoscan_http_request_seconds", "Request latency", ["route"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))  # fmt: skip
    # Requests whose headers arrived and whose answer has not left: what a shutdown waits for.
    in_flight = Gauge("pneumoscan_http_requests_in_flight", "Requests being handled (a scrape counts itself)", registry=registry)
    shed = Counter("pneumoscan_shed_requests", "Predictions refused with 503 at capacity", registry=registry)
    by_label = Counter("pneumoscan_predictions", "Answered predictions", ["label", "in_distribution"], registry=registry)
    drift_psi = Gauge("pneumoscan_drift_psi", "Population stability index of recent predictions against the card's reference",
                      ["indicator", "population"], registry=registry)  # fmt: skip
    drift_warning = Gauge("pneumoscan_drift_warning", "1 when an indicator's PSI passes the drift threshold", registry=registry)
    drift_window = Gauge("pneumoscan_drift_window_predictions", "Predictions in the drift window", registry=registry)
    live = Gauge("pneumoscan_live_performance", "Figures of the operating point in force from radiologists' readings "
                 "(value and Wilson 95 % bounds)", ["population", "figure", "bound"], registry=registry)  # fmt: skip
    live_read = Gauge("pneumoscan_live_read_studies", "Read studies with a decision, per population (point in force)",
                      ["population"], registry=registry)  # fmt: skip
    live_warning = Gauge("pneumoscan_live_performance_warning", "1 when the point in force falls short of its promised "
                         "sensitivity by the readings", registry=registry)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        return error(exc.status_code, kinds.get(exc.status_code, "HTTPError"), str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(422, "InvalidRequest", f"the request is not valid: {problems}"[:500])

    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("audit database error on %s: %s", request.url.path, type(exc).__name__)
        return error(503, "AuditLogUnavailable", "the audit database cannot be reached; retry shortly", {"Retry-After": "5"})

    def public(row: dict) -> dict:
        return {
            "id": row["id"],
            "probability": row["probability"],
            "label": row["label"],
            "threshold": row["threshold"],
            "operating_point": row.get("operating_point") or predictor.operating_point,
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

    def score(data: bytes) -> tuple[object, object, str]:
        loaded = load_xray(data, limits)
        return loaded, predictor.predict_loaded(loaded, heatmap=True), loaded.format

    @app.post(f"{API}/predictions", status_code=201, response_model=PredictionBody,
              responses=documented(*API_ERRORS, 413, 415, 422))  # fmt: skip
    async def create_prediction(file: UploadFile = File(...)) -> JSONResponse:
        # Admitted already (UploadGuard); the bytes are read only once a slot is free, so waiting uploads stay spooled.
        try:
            async with slots:
                check_head(await file.read(HEAD_BYTES), limits)  # a header over the limit: refused without reading the rest
                await file.seek(0)
                data = await file.read(settings.max_upload_bytes + 1)
                if len(data) > settings.max_upload_bytes:
                    return error(413, "ImageTooLarge", f"the upload is larger than {settings.max_upload_bytes // 2**20} MB")
                loaded, prediction, kind = await run_in_threadpool(score, data)
        except InputError as exc:
            return error(exc.http_status, type(exc).__name__, str(exc))
        row = prediction_row(prediction, data, kind, model_info)
        kept = None
        if settings.keep_uploads:  # kept whole, before the record, or neither: no truncated file, no row without it
            try:
                kept = await run_in_threadpool(keep_upload, settings.data_dir / "uploads", f"{row['id']}.{kind}", data)
            except OSError as exc:
                log.error("the upload could not be kept: %s", exc.strerror or type(exc).__name__)
                return error(503, "UploadStoreUnavailable", "the upload cannot be stored (PNEUMOSCAN_KEEP_UPLOADS is set "
                             f"and the disk refused it: {exc.strerror or 'write error'}); no prediction is given. Retry "
                             "once the disk has room.", {"Retry-After": "30"})  # fmt: skip
        try:
            await run_in_threadpool(audit.record, row)
        except SQLAlchemyError as exc:  # no answer without a record: the client may retry
            log.error("audit log write failed: %s", type(exc).__name__)
            if kept is not None:
                kept.unlink(missing_ok=True)
            return error(503, "AuditLogUnavailable", "the audit database cannot be written; no prediction is given "
                         "without a record. Retry shortly.", {"Retry-After": "5"})  # fmt: skip
        by_label.labels(prediction.label, str(prediction.in_distribution)).inc()
        drift.add(Observation(prediction.population, prediction.probability, prediction.ood_score))
        pictures.put(row["id"], loaded.image, prediction.heatmap)
        return JSONResponse(status_code=201, content=public(row))

    @app.get(f"{API}/predictions/{{prediction_id}}", response_model=PredictionBody, responses=documented(*API_ERRORS, 404, 422))
    async def get_prediction(prediction_id: str) -> dict:
        row = await run_in_threadpool(audit.get, prediction_id)
        if row is None:
            raise HTTPException(404, "no such prediction")
        return public(row)

    @app.get(f"{API}/predictions/{{prediction_id}}/{{picture}}.png", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, **documented(*API_ERRORS, 404, 422)})  # fmt: skip
    async def get_picture(prediction_id: str, picture: str) -> Response:
        """``heatmap.png``: the X-ray with the heat map overlaid; ``image.png``: the X-ray as it was read."""
        png = await run_in_threadpool(pictures.png, prediction_id, picture)
        if png is None:
            raise HTTPException(404, "no such picture (pictures are kept in memory for recent predictions only)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})  # a patient's image: never kept

    @app.get(f"{API}/predictions", response_model=list[PredictionBody], responses=documented(*API_ERRORS, 422))
    async def list_predictions(limit: int = Query(20, ge=1, le=500)) -> list[dict]:
        return [public(r) for r in await run_in_threadpool(audit.recent, limit)]

    @app.get(f"{API}/model", response_model=ModelBody, responses=documented(*API_ERRORS))
    async def get_model() -> dict:
        """The model that answers and the operating point in force for each population (validation or site)."""
        return {**model_info, "operating_points": [
            {"population": population, "name": p.operating_point, "threshold": p.threshold, "temperature": p.temperature,
             "source": p.source, "date": p.date, "in_force": p.in_force}
            for population, p in predictor.populations.items()
        ]}  # fmt: skip

    @app.get(f"{API}/drift", response_model=DriftBody, responses=documented(*API_ERRORS))
    async def get_drift() -> dict:
        """Do the last predictions still look like the studies the operating point was set on?

        Population stability index (PSI) per population of the calibrated probability and of the
        out-of-distribution score, and of the population mix, against the reference distributions of
        the model card (its validation parts, or the site set after ``pneumoscan calibrate``).
        ``warning`` is true once an indicator with enough predictions reaches the threshold.
        """
        return drift.figures()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # On-device mode: the model, its settings and gates, for onnxruntime-web in the page. No image comes here.
    settings_for_device = device_settings(predictor)

    @app.get(f"{MODEL_ROUTE}/device.json", include_in_schema=False)
    async def model_for_device() -> dict:
        return settings_for_device

    @app.get(f"{MODEL_ROUTE}/{{name}}", include_in_schema=False)
    async def model_file(name: str) -> Response:
        if name in (MODEL_FILE, INT8_MODEL_FILE) and (predictor.model_dir / name).is_file():
            return FileResponse(predictor.model_dir / name, media_type="application/octet-stream")
        population = name.removeprefix("gate.").removesuffix(".bin")
        point = predictor.populations.get(population)
        if name.startswith("gate.") and name.endswith(".bin") and point is not None and point.gate is not None:
            return Response(await run_in_threadpool(gate_bytes, point.gate), media_type="application/octet-stream")
        raise HTTPException(404, "no such model file")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    @app.get("/docs/static/{name}", include_in_schema=False)
    async def docs_file(name: str) -> FileResponse:
        from swagger_ui_bundle import swagger_ui_path

        if name not in SWAGGER_FILES:
            raise HTTPException(404, "no such file")
        return FileResponse(Path(str(swagger_ui_path)) / name, media_type=SWAGGER_FILES[name])

    @app.get("/sw.js", include_in_schema=False)
    async def service_worker() -> FileResponse:
        """At the root, so that it may keep the page itself for offline use."""
        return FileResponse(STATIC / "sw.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        figures = drift.figures()
        for indicator in figures["indicators"]:
            if indicator["psi"] is not None:
                drift_psi.labels(indicator["name"], indicator["population"] or "all").set(indicator["psi"])
        drift_warning.set(1 if figures["warning"] else 0)
        drift_window.set(figures["n"])
        performance = await run_in_threadpool(readings_api.performance_figures, audit, predictor, settings.performance_window)
        for group in (g for g in performance["groups"] if g["in_force"]):
            live_read.labels(group["population"] or "all").set(group["n"])
            for name in ("sensitivity", "specificity", "ppv", "npv"):
                for bound, key in (("value", "value"), ("low", "low"), ("high", "high")):
                    if group[name][key] is not None:
                        live.labels(group["population"] or "all", name, bound).set(group[name][key])
        live_warning.set(1 if performance["warning"] else 0)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await run_in_threadpool(audit.ping)
        except Exception as exc:  # any database failure means "not ready", with the reason
            return JSONResponse(status_code=503, content={"status": "unavailable", "reason": f"database: {exc}"[:300]})
        short = disk_short_of_room(settings)
        if short:
            return JSONResponse(status_code=503, content={"status": "unavailable", "reason": short})
        return JSONResponse(content={"status": "ready", "model": model_info})

    # Middleware: each one added wraps the ones before it. From the outside in: CORS, security headers on every
    # answer, metrics (and any escaped exception turned into a JSON 500, so it is counted and carries the headers),
    # the API key, and the upload guard (size and admission before the body is read).
    app.add_middleware(UploadGuard, path=f"{API}/predictions", max_file_bytes=settings.max_upload_bytes,
                       admission=admitted, on_shed=shed.inc)  # fmt: skip

    keyed = ("/metrics", "/openapi.json") if settings.require_key_for_metrics_and_schema else ()

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):  # type: ignore[no-untyped-def]
        path = request.url.path
        if api_key and (path.startswith("/api/") or path in keyed):
            given = request.headers.get("x-api-key", "") or bearer_token(request.headers.get("authorization", ""))
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "unauthorized", "a valid X-API-Key header (or Authorization: Bearer) is required")
        return await call_next(request)

    @app.middleware("http")
    async def measure(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        with in_flight.track_inprogress():
            try:
                response = await call_next(request)
            except Exception:  # a bug of ours: logged with its traceback, answered in JSON, counted
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = error(500, "InternalError", "pneumoscan failed on this request; it was logged. Retry, and "
                                 "report it if it happens again.")  # fmt: skip
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        requests_total.labels(request.method, name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - start)
        return response

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers.update(ISOLATION_HEADERS)
        return response

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key"])  # fmt: skip
    return app


def bearer_token(authorization: str) -> str:
    """The token of ``Authorization: Bearer <token>``: what Prometheus's scrape configuration can send."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def answered_by(predictor: Predictor, row: dict) -> bool:
    """Was this audit row answered at the operating point now in force for its population (same temperature)?"""
    settings = predictor.populations.get(row.get("population") or predictor.default_population)
    return settings is not None and row.get("operating_point") in (None, settings.operating_point) and row["threshold"] == settings.threshold


def keep_upload(folder: Path, name: str, data: bytes) -> Path:
    """Written whole or not at all: a failed write leaves nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomically(folder / name, data)


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


def serve(settings: ServiceSettings) -> None:
    """Run until SIGTERM/SIGINT; uvicorn finishes in-flight requests, then the process exits 0."""
    import signal
    import sys

    import uvicorn

    check_exposure(settings)
    # uvicorn re-raises the signal it caught once it has shut down; end cleanly then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app(settings)
    print(f"pneumoscan is serving {settings.model_dir.name} at http://{settings.host}:{settings.port}/", flush=True)
    for population, point in app.state.predictor.populations.items():
        print(f"operating point in force ({population}): {point.operating_point}, threshold {point.threshold:.4f} [{point.in_force}]", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
