"""Every setting of the long-running applications, the web service and the DICOM node: one place, one prefix.

Each is an environment variable ``PNEUMOSCAN_<NAME>`` or a command-line flag; what the
two applications share (the model, the data folder, the audit database, input limits)
is declared once, in :class:`ApplicationSettings`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pneumoscan.config import DEFAULT_MODEL_DIR, MAX_INPUT_BYTES, MAX_INPUT_PIXELS
from pneumoscan.errors import ConfigurationError
from pneumoscan.running.batching import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_S
from pneumoscan.running.drift import DEFAULT_WINDOW, DRIFT_THRESHOLD, MIN_PREDICTIONS


class ApplicationSettings(BaseSettings):
    """What the service and the DICOM node share: the model, where data and the audit log live, input limits."""

    model_config = SettingsConfigDict(env_prefix="PNEUMOSCAN_", protected_namespaces=())

    model_dir: Path = DEFAULT_MODEL_DIR
    precision: str = "fp32"
    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite file in data_dir
    max_upload_bytes: int = MAX_INPUT_BYTES
    max_pixels: int = MAX_INPUT_PIXELS
    # Dynamic batching: images arriving within batch_window_ms of a batch's first (at most batch_size) go through the
    # model in one call; model_workers calls run at once (one per core). batch_size 1: one image per call.
    batch_size: int = Field(DEFAULT_MAX_BATCH, ge=1, le=64)
    batch_window_ms: float = Field(DEFAULT_WINDOW_S * 1000, ge=0, le=1000)
    model_workers: int = Field(2, ge=1)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'pneumoscan.db').as_posix()}"


S = TypeVar("S", bound=ApplicationSettings)


class ServiceSettings(ApplicationSettings):
    """Every setting of the service; environment variables ``PNEUMOSCAN_*`` or CLI flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrent: int = 2  # uploads read and decoded at once (one per core); the model itself runs in batches
    max_queue: int = 32  # predictions waiting for a slot; beyond it: 503 + Retry-After instead of an unbounded queue
    cors_origins: list[str] = []  # browser origins allowed to call the API from other sites; none by default
    threads: int = 1  # ONNX Runtime threads per inference: requests run side by side instead
    api_key: str | None = None
    api_key_file: Path | None = None  # a secret mounted as a file (Docker/Kubernetes secrets); wins over api_key
    # Serving anything but the loopback address without a key lists and sends every X-ray to whoever can reach the port:
    # refused at start unless this says, by name, that it is meant.
    unsafe_allow_unauthenticated_network_access: bool = False
    # With a key: /metrics and /openapi.json need it too (X-API-Key, or Authorization: Bearer for a Prometheus scraper).
    require_key_for_metrics_and_schema: bool = False
    keep_uploads: bool = False
    picture_cache_mb: float = 32.0  # X-rays and heat maps of recent predictions, kept in memory: bounded in bytes
    min_free_disk_mb: float = 512.0  # below it, /readyz says not ready: uploads are spooled and the audit log written there
    drift_window: int = Field(DEFAULT_WINDOW, ge=1)  # recent predictions compared with the card's reference (drift)
    drift_threshold: float = Field(DRIFT_THRESHOLD, gt=0)  # PSI at which the page and /api/v1/drift warn
    drift_min_predictions: int = Field(MIN_PREDICTIONS, ge=1)  # per population, before its drift is judged
    performance_window: int = Field(500, ge=1)  # read predictions (latest first) behind live performance on /metrics and the page

    def resolved_api_key(self) -> str | None:
        """The key from ``api_key_file`` or ``api_key``; an empty one is an error, never "no authentication"."""
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ConfigurationError(f"PNEUMOSCAN_API_KEY_FILE {self.api_key_file} cannot be read ({exc.strerror})") from exc
            source = f"PNEUMOSCAN_API_KEY_FILE ({self.api_key_file})"
        elif self.api_key is not None:
            key, source = self.api_key.strip(), "PNEUMOSCAN_API_KEY"
        else:
            return None
        if not key:
            raise ConfigurationError(f"{source} is empty: set a key (e.g. 'openssl rand -hex 32') or unset it to serve "
                                     "on 127.0.0.1 without one; an empty key never means 'no authentication'")  # fmt: skip
        return key


class DicomNodeSettings(ApplicationSettings):
    """``pneumoscan dicom-node``: where it listens, whom it accepts, where results go."""

    ae_title: str = Field("PNEUMOSCAN", min_length=1, max_length=16)  # the node's own (called) AE title
    dicom_host: str = "127.0.0.1"  # the address to listen on; beyond loopback, allowed_calling_aes is required
    dicom_port: int = Field(11112, ge=0, lt=65536)  # 0: any free port (tests); not PNEUMOSCAN_PORT, the web service's
    allowed_calling_aes: Annotated[list[str], NoDecode] = []  # senders' AE titles (comma-separated); empty: any
    destination: str | None = None  # AE_TITLE@host:port (C-STORE) or a DICOMweb URL (STOW-RS); none: results wait
    workers: int = Field(4, ge=1)  # instances processed at once: their model calls and audit commits are shared
    # Processes that build and file the results (highdicom, pure Python) beside the node's own threads; 0: in its threads.
    result_processes: int = Field(2, ge=0)
    threads: int = Field(1, ge=1)  # ONNX Runtime threads per model call: model_workers run side by side instead
    # Association slots: more than the listed senders need, since one that never sends an A-ASSOCIATE-RQ holds one too
    # (for association_request_timeout seconds); and at most max_connections_per_peer connections from one address.
    max_associations: int = Field(64, ge=1)
    max_connections_per_peer: int = Field(4, ge=1)
    association_request_timeout: float = Field(5.0, gt=0)
    # Per instance, the shared max_upload_bytes; per association, this (bytes of all its instances).
    max_association_bytes: int = Field(4 * 2**30, ge=1)
    # The largest PDU the node takes (advertised at association): a 1 MB film arrives in 64 PDUs of the usual 16 KB,
    # each decoded in Python; in one of 1 MB the node spends ~7 % less CPU a study (benchmarks/bench_dicom_node.py).
    max_pdu_bytes: int = Field(2**20, ge=4096)
    retry_max_seconds: float = Field(30.0, gt=0)  # the longest pause between two tries of a destination that is away
    # Associations (or STOW-RS requests) to the destination at once, each with up to 16 studies' results: a PACS waits
    # on its disk for each instance it stores, so several connections keep it busy.
    destination_associations: int = Field(4, ge=1, le=16)
    # DICOM has no passwords: listening beyond loopback for any AE title is refused unless this says it is meant.
    unsafe_allow_any_calling_ae: bool = False

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("ae_title")
    @classmethod
    def printable_ae_title(cls, value: str) -> str:
        if not value.strip() or "\\" in value or not value.isprintable():
            raise ValueError("an AE title is 1 to 16 printable characters, without backslash")
        return value.strip()


def settings_from(kind: type[S], **flags: object) -> S:
    """Settings from ``PNEUMOSCAN_*`` and the flags given (None: not given); a bad value is a ConfigurationError."""
    try:
        return kind(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"the settings are not valid: {problems}") from None


def is_loopback(host: str) -> bool:
    """Only these addresses are reachable from this machine alone."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0's kin) may be reachable from anywhere
