"""The audit log: one row per answered prediction, in SQLite (default) or PostgreSQL.

No pixels and no patient fields are stored: a hash of the uploaded bytes,
what the model answered, and which model answered it. The DICOM node adds one
row per received instance (``dicom_instances``): scored, refused with the reason,
or a duplicate, keyed by the sha256 of the SOP Instance UID. A radiologist's reading of a
prediction (``readings``) is appended, never changed: a later reading supersedes an earlier
one, and both are kept.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from pneumoscan.errors import DatabaseUnavailableError

metadata = MetaData()
predictions = Table(
    "predictions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("upload_sha256", String(64), nullable=False),
    Column("file_type", String(16), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("probability", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("label", String(16), nullable=False),
    Column("in_distribution", Boolean, nullable=True),
    Column("ood_score", Float, nullable=True),
    Column("population", String(16), nullable=True),  # child or adult: whose operating point decided (0002)
    Column("population_source", String(64), nullable=True),  # what decided it; never the age itself
    Column("operating_point", String(128), nullable=True),
    Column("population_note", String(256), nullable=True),  # the image and the DICOM age disagree (the age is not kept)
    Column("operating_point_source", String(64), nullable=True),  # validation, or site calibration of <date> (0003)
    Column("regions", Text, nullable=True),  # JSON list of {x, y, width, height, score}, the image's pixels (0006)
    Column("regions_note", String(256), nullable=True),  # why a pneumonia has none: its population has no region rule
)

dicom_instances = Table(
    "dicom_instances",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False, index=True),
    Column("sop_instance_sha256", String(64), nullable=False),  # sha256 of the SOP Instance UID, never the UID
    Column("pixels_sha256", String(64), nullable=True),  # sha256 of the decoded image: the same UID, another image (0005)
    Column("sop_class_uid", String(64), nullable=False),  # what kind of object (CT, DX, ...): no patient field
    Column("calling_ae", String(16), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),  # scored | refused | duplicate
    Column("reason", String(512), nullable=True),  # why it was refused, or which row it duplicates
    Column("prediction_id", String(32), nullable=True),  # its row in predictions, when scored
    Column("report_uid", String(64), nullable=True),  # the SOP Instance UIDs pneumoscan made for its results
    Column("heatmap_uid", String(64), nullable=True),
    Column("presentation_uid", String(64), nullable=True),  # the GSPS drawing its regions, when it has any (0006)
    Column("delivered_at", DateTime(timezone=True), nullable=True),  # when the destination stored both results
    Column("delivery_error", String(512), nullable=True),  # the destination refused them (kept in outbox/refused)
)


#: What a radiologist can find on a study; ``cannot_tell`` is kept but confirms nothing.
FINDINGS = ("pneumonia", "no_pneumonia", "cannot_tell")
#: Where a reading came from.
READING_SOURCES = ("page", "api", "import")

readings = Table(
    "readings",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("prediction_id", String(32), ForeignKey("predictions.id"), nullable=False, index=True),
    Column("finding", String(16), nullable=False),  # one of FINDINGS
    Column("reader", String(64), nullable=False),  # who read it: a reader id of the site, never a patient field
    Column("read_at", DateTime(timezone=True), nullable=False),  # when the radiologist read the study
    Column("recorded_at", DateTime(timezone=True), nullable=False, index=True),  # when pneumoscan stored it: the latest wins
    Column("source", String(16), nullable=False),  # one of READING_SOURCES
    Column("comment", Text, nullable=True),  # the radiologist's free text: stored here only, never logged (0007)
)


#: What a model event records: an entry point started answering with a model, or a model was promoted from a report.
MODEL_EVENTS = ("started", "promoted")

model_events = Table(
    "model_events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("event", String(16), nullable=False),  # one of MODEL_EVENTS
    Column("entry_point", String(32), nullable=False),  # serve, dicom-node, or promote
    Column("model_name", String(128), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("operating_points", Text, nullable=False),  # JSON: per population, the point's name, threshold and source (0008)
    Column("detail", Text, nullable=True),  # JSON: a promotion's report, decision, the model it replaces and who promoted it
)


#: SQLite's durability: FULL syncs the write-ahead log at every commit, so an answered prediction's row survives a power
#: loss (NORMAL syncs only at checkpoints: the last commits can vanish). Its cost is in benchmarks/bench_service.py.
SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")


def connect(url: str, synchronous: str = "FULL") -> Engine:
    """Open (and create) the database; SQLite runs in WAL mode so readers never block the writer."""
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {SQLITE_SYNCHRONOUS}")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True, pool_pre_ping=True)  # a database that comes back is used again
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.close()

    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(
            f"the audit database at {engine.url.render_as_string(hide_password=True)} cannot be opened or migrated "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check PNEUMOSCAN_DATABASE_URL and that the database is up"
        ) from exc
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision with Alembic (creates it on a new database)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class AuditLog:
    def __init__(self, engine: Engine):
        self.engine = engine

    def record(self, row: dict) -> None:
        self.record_many([row])

    def record_many(self, rows: Sequence[dict]) -> list[None]:
        """Several predictions' rows in one transaction (one sync): the service's group commit (see its ``recorder``)."""
        with self.engine.begin() as connection:
            for row in rows:
                connection.execute(insert(predictions).values(**row))
        return [None] * len(rows)

    def record_instance(self, instance: dict, prediction: dict | None = None) -> None:
        """A DICOM instance's row, with its prediction's row when it was scored: both or neither."""
        self.record_instances([(instance, prediction)])

    def record_instances(self, rows: Sequence[tuple[dict, dict | None]]) -> list[None]:
        """Several instances' rows (each with its prediction's, when scored) in one transaction: all or none.

        One commit (one sync) for a batch: what lets the DICOM node keep up (see its ``recorder``).
        """
        with self.engine.begin() as connection:
            for instance, prediction in rows:
                if prediction is not None:
                    connection.execute(insert(predictions).values(**prediction))
                connection.execute(insert(dicom_instances).values(**instance))
        return [None] * len(rows)

    def scored_instance(self, sop_instance_sha256: str, pixels_sha256: str, model_sha256: str) -> dict | None:
        """The first time this model scored this instance with these pixels; None if it never did.

        Refusals are not answers: a refused copy never keeps a later instance with the same UID from being scored.
        """
        query = (select(dicom_instances)
                 .where(and_(dicom_instances.c.sop_instance_sha256 == sop_instance_sha256,
                             dicom_instances.c.pixels_sha256 == pixels_sha256,
                             dicom_instances.c.model_sha256 == model_sha256,
                             dicom_instances.c.outcome == "scored"))
                 .order_by(dicom_instances.c.received_at).limit(1))  # fmt: skip
        with self.engine.connect() as connection:
            found = connection.execute(query).mappings().first()
        return dict(found) if found else None

    def instances(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(dicom_instances).order_by(dicom_instances.c.received_at)).mappings()]

    def mark_delivered(self, instance_id: str, when: datetime) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(dicom_instances).where(dicom_instances.c.id == instance_id).values(delivered_at=when))

    def mark_delivery_refused(self, instance_id: str, reason: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(dicom_instances).where(dicom_instances.c.id == instance_id).values(delivery_error=reason))

    def get(self, prediction_id: str) -> dict | None:
        with self.engine.connect() as connection:
            found = connection.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().first()
        return dict(found) if found else None

    def recent(self, limit: int) -> list[dict]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(predictions).order_by(predictions.c.created_at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def record_readings(self, rows: list[dict]) -> None:
        """Readings appended in one transaction: an import stores every row or none."""
        if not rows:
            return
        with self.engine.begin() as connection:
            connection.execute(insert(readings), rows)

    def readings_of(self, prediction_id: str) -> list[dict]:
        """Every reading of a prediction, oldest first: the last one is the one in force."""
        query = select(readings).where(readings.c.prediction_id == prediction_id).order_by(readings.c.recorded_at, readings.c.id)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def readings_in_force(self, limit: int, since: datetime | None = None) -> list[dict]:
        """The latest reading of each prediction with that prediction's answer, the most recently recorded first.

        ``since``: only readings recorded from then on. At most ``limit`` predictions.
        """
        ranked = select(readings, func.row_number().over(
            partition_by=readings.c.prediction_id, order_by=(readings.c.recorded_at.desc(), readings.c.id.desc())).label("rank"))
        if since is not None:
            ranked = ranked.where(readings.c.recorded_at >= since)
        latest = ranked.subquery()
        query = (select(latest.c.finding, latest.c.recorded_at, predictions.c.id, predictions.c.population,
                        predictions.c.operating_point, predictions.c.operating_point_source, predictions.c.label,
                        predictions.c.in_distribution, predictions.c.probability, predictions.c.ood_score,
                        predictions.c.model_sha256, predictions.c.upload_sha256)
                 .join(predictions, predictions.c.id == latest.c.prediction_id)
                 .where(latest.c.rank == 1).order_by(latest.c.recorded_at.desc()).limit(limit))  # fmt: skip
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def record_model_event(self, row: dict) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(model_events).values(**row))

    def model_events(self) -> list[dict]:
        """Every model event, oldest first: which model answered from when, and every promotion."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(model_events).order_by(model_events.c.at, model_events.c.id)).mappings()
            return [{**r, "operating_points": json.loads(r["operating_points"]), "detail": json.loads(r["detail"] or "null")}
                    for r in rows]  # fmt: skip

    def existing_predictions(self, ids: set[str]) -> set[str]:
        """Which of ``ids`` are predictions of this log."""
        found: set[str] = set()
        chunk = sorted(ids)
        with self.engine.connect() as connection:
            for start in range(0, len(chunk), 500):
                query = select(predictions.c.id).where(predictions.c.id.in_(chunk[start:start + 500]))
                found.update(connection.execute(query).scalars())
        return found

    def predictions_of_instances(self, sop_instance_sha256s: set[str]) -> dict[str, str]:
        """The prediction of each DICOM instance (by the sha256 of its SOP Instance UID) the node scored; the latest wins."""
        query = (select(dicom_instances.c.sop_instance_sha256, dicom_instances.c.prediction_id)
                 .where(and_(dicom_instances.c.sop_instance_sha256.in_(sorted(sop_instance_sha256s)),
                             dicom_instances.c.outcome == "scored"))
                 .order_by(dicom_instances.c.received_at))  # fmt: skip
        with self.engine.connect() as connection:
            return {row.sop_instance_sha256: row.prediction_id for row in connection.execute(query)}

    def ping(self) -> None:
        """Ready means writable: a database that answers but refuses writes would refuse every prediction."""
        with self.engine.connect() as connection:
            connection.execute(select(1))
            if self.engine.dialect.name == "postgresql" and connection.execute(text("show transaction_read_only")).scalar() == "on":
                raise DatabaseUnavailableError("the database is read-only")
            if self.engine.dialect.name == "sqlite" and connection.execute(text("pragma query_only")).scalar():
                raise DatabaseUnavailableError("the database is read-only")


def now() -> datetime:
    return datetime.now(UTC)


def uid_digest(uid: str) -> str:
    """The sha256 of a UID: how the node keys an instance (duplicates, readings) without keeping the UID itself."""
    return hashlib.sha256(str(uid).strip().encode()).hexdigest()


def reading_row(prediction_id: str, finding: str, reader: str, source: str, read_at: datetime | None = None,
                comment: str | None = None) -> dict:
    """The ``readings`` row of one radiologist's reading (values already checked by the caller)."""
    recorded = now()
    return {"id": uuid.uuid4().hex, "prediction_id": prediction_id, "finding": finding, "reader": reader,
            "read_at": read_at or recorded, "recorded_at": recorded, "source": source, "comment": comment or None}


def model_event_row(event: str, entry_point: str, name: str, sha256: str, operating_points: dict, detail: dict | None = None) -> dict:
    """The ``model_events`` row of a start or a promotion."""
    return {"id": uuid.uuid4().hex, "at": now(), "event": event, "entry_point": entry_point, "model_name": name,
            "model_sha256": sha256, "operating_points": json.dumps(operating_points, sort_keys=True),
            "detail": json.dumps(detail, sort_keys=True) if detail is not None else None}  # fmt: skip


def started_row(predictor, entry_point: str) -> dict:  # type: ignore[no-untyped-def]
    """What an entry point answers with from now on: the model and each population's operating point in force."""
    points = {p: {"name": s.operating_point, "threshold": s.threshold, "source": s.in_force} for p, s in predictor.populations.items()}
    return model_event_row("started", entry_point, predictor.card["name"], predictor.model_sha256, points)


def promotion_row(report: dict, report_sha256: str, by: str, override: str | None = None) -> dict:
    """A candidate promoted from a ``pneumoscan compare`` report: the candidate at its site points, the model it replaces,
    the report's decision and checksum, who promoted it, and why against the report when it said do not promote."""
    candidate, decision = report["candidate"], report["decision"]
    points = {p: {"name": e["candidate"]["operating_point"], "threshold": e["candidate"]["threshold"],
                  "temperature": e["candidate"]["temperature"], "source": f"site comparison of {report['date']}"}
              for p, e in report["populations"].items()}  # fmt: skip
    detail = {"report_sha256": report_sha256, "report_date": report["date"], "decision": decision["decision"],
              "reasons": decision["reasons"], "replaces": {k: report["current"][k] for k in ("name", "onnx_sha256")},
              "candidate_folder": candidate["folder"], "by": by, "override": override}  # fmt: skip
    return model_event_row("promoted", "promote", candidate["name"], candidate["onnx_sha256"], points, detail)


def prediction_row(prediction, data: bytes, file_type: str, model: dict) -> dict:  # type: ignore[no-untyped-def]
    """The ``predictions`` row of one answered image: what every entry point (upload, DICOM node) records."""
    return {
        "id": uuid.uuid4().hex,
        "created_at": now(),
        "upload_sha256": hashlib.sha256(data).hexdigest(),
        "file_type": file_type,
        "model_name": model["name"],
        "model_version": model["version"],
        "model_sha256": model["sha256"],
        "probability": prediction.probability,
        "threshold": prediction.threshold,
        "label": prediction.label,
        "in_distribution": prediction.in_distribution,
        "ood_score": prediction.ood_score,
        "population": prediction.population,
        "population_source": prediction.population_source,
        "operating_point": prediction.operating_point,
        "population_note": prediction.population_note,
        "operating_point_source": prediction.operating_point_source,
        "regions": json.dumps([region.to_dict() for region in prediction.regions], separators=(",", ":")),
        "regions_note": prediction.regions_note,
    }
