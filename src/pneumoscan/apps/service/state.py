"""What one running service holds: the model, the audit log, the pictures, drift, limits and figures.

Built once by :func:`~pneumoscan.apps.service.app.create_app` and kept on ``app.state.service``; the
routes reach it through :mod:`~pneumoscan.apps.service.dependencies`, so no route holds state of its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pneumoscan.apps.audit import AuditLog, connect, started_row
from pneumoscan.apps.service.admission import Admission
from pneumoscan.apps.service.device import device_settings
from pneumoscan.apps.service.metrics import ServiceMetrics
from pneumoscan.apps.service.pictures import PictureCache
from pneumoscan.apps.settings import ServiceSettings
from pneumoscan.inputs.imaging import Limits
from pneumoscan.running.batching import DynamicBatcher, Preprocessed, group_commit, prediction_batcher
from pneumoscan.running.drift import DriftMonitor, Observation
from pneumoscan.running.inference import Prediction, Predictor


@dataclass
class Service:
    """Everything a request may need, opened once; ``batcher`` scores the images of requests arriving together,
    ``recorder`` commits their audit rows together."""

    settings: ServiceSettings
    predictor: Predictor
    audit: AuditLog
    api_key: str | None
    limits: Limits
    pictures: PictureCache
    drift: DriftMonitor
    slots: asyncio.Semaphore  # uploads read and decoded at once
    admitted: Admission  # uploads receiving, waiting or running
    device: dict  # what the page's on-device mode needs (the model does not change while serving)
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    batcher: DynamicBatcher[Preprocessed, Prediction] = field(init=False)
    recorder: DynamicBatcher[dict, None] = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.batcher = prediction_batcher(self.predictor, heatmap=True, max_batch=settings.batch_size,
                                          window=settings.batch_window_ms / 1000, workers=settings.model_workers,
                                          name="pneumoscan-model", on_batch=self.metrics.batch_size.observe,
                                          expected=self.uploads_on_their_way)  # fmt: skip
        self.recorder = group_commit(self.audit.record_many)  # each request answers once its own row is on disk

    def close(self) -> None:
        """After the last request: what was submitted is scored and recorded first."""
        self.batcher.close()
        self.recorder.close()

    def uploads_on_their_way(self, outstanding: int) -> int:
        """Uploads admitted and not yet handed to the model (being received, waiting for a slot or decoded)."""
        return self.admitted.inside - outstanding

    @classmethod
    def open(cls, settings: ServiceSettings, predictor: Predictor | None = None) -> Service:
        """Load the model (unless given), open the audit log, record the start, and resume drift from the log."""
        limits = Limits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        api_key = settings.resolved_api_key()
        predictor = predictor or Predictor.load(settings.model_dir, settings.precision, settings.threads, limits)
        audit = AuditLog(connect(settings.resolved_database_url))
        audit.record_model_event(started_row(predictor, "serve"))
        drift = DriftMonitor(predictor.card.get("drift_reference"), settings.drift_window, settings.drift_threshold,
                             settings.drift_min_predictions)  # fmt: skip
        for row in reversed(audit.recent(settings.drift_window)):  # a restart keeps watching: rows of this model and point
            if row["model_sha256"] == predictor.model_sha256 and answered_by(predictor, row):
                drift.add(Observation(row.get("population"), row["probability"], row.get("ood_score")))
        return cls(settings, predictor, audit, api_key, limits, PictureCache(int(settings.picture_cache_mb * 2**20)), drift,
                   asyncio.Semaphore(settings.max_concurrent), Admission(settings.max_concurrent + settings.max_queue),
                   device_settings(predictor))  # fmt: skip

    @property
    def model_info(self) -> dict[str, str]:
        card = self.predictor.card
        return {"name": card["name"], "version": card["pneumoscan_version"], "sha256": self.predictor.model_sha256}


def answered_by(predictor: Predictor, row: dict) -> bool:
    """Was this audit row answered at the operating point now in force for its population (same temperature)?"""
    settings = predictor.populations.get(row.get("population") or predictor.default_population)
    return settings is not None and row.get("operating_point") in (None, settings.operating_point) and row["threshold"] == settings.threshold
