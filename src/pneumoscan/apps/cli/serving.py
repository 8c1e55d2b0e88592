"""The long-running applications and their records: ``serve``, ``dicom-node`` and ``readings import``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan.apps.cli.common import HelpFormatter, add_audit_database_arguments, open_audit_log
from pneumoscan.config import (
    DEFAULT_MODEL_DIR,
)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the REST API (FastAPI) with the exported model",
        description="Serve the model over HTTP. Every setting can also come from PNEUMOSCAN_* environment variables "
        "(PNEUMOSCAN_DATABASE_URL, PNEUMOSCAN_API_KEY or PNEUMOSCAN_API_KEY_FILE, ...); flags win. On any address but "
        "the loopback one, an API key is required.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--int8", action="store_true", help="serve the int8 model")
    add_audit_database_arguments(p)
    p.add_argument("--unsafe-allow-unauthenticated-network-access", action="store_true",
                   help="serve on a non-loopback --host without an API key (only on a closed network: anyone who "
                   "reaches the port can list and download every X-ray)")  # fmt: skip
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pneumoscan.apps.service.app import serve
    from pneumoscan.apps.settings import ServiceSettings, settings_from

    serve(settings_from(ServiceSettings, host=args.host, port=args.port, model_dir=args.model, data_dir=args.data_dir,
                        database_url=args.database_url, precision="int8" if args.int8 else None,
                        unsafe_allow_unauthenticated_network_access=args.unsafe_allow_unauthenticated_network_access or None))
    return 0


def add_readings_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "readings",
        help="record radiologists' readings of pneumoscan's predictions (e.g. exported from a RIS)",
        description="Radiologists' readings, stored against the predictions in the audit log: what feeds the live "
        "sensitivity and specificity of a site.",
        formatter_class=HelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imported = actions.add_parser(
        "import",
        help="import a CSV of readings: every row or none",
        description="Import readings from a CSV with the columns finding (pneumonia, no_pneumonia, cannot_tell), reader "
        "(the site's reader id) and prediction_id or sop_instance_uid (a study the DICOM node scored, matched through the "
        "hash it stored), optionally read_at (ISO 8601) and comment. Every bad row is named with its line and nothing is "
        "imported until the file is right. PNEUMOSCAN_DATA_DIR / PNEUMOSCAN_DATABASE_URL apply; flags win.",
        formatter_class=HelpFormatter,
    )
    imported.add_argument("file", type=Path, metavar="FILE.csv")
    add_audit_database_arguments(imported)
    imported.set_defaults(handler=run_readings_import)


def run_readings_import(args: argparse.Namespace) -> int:
    from pneumoscan.apps.readings import import_readings

    summary = import_readings(args.file, open_audit_log(args))
    findings = ", ".join(f"{n} {finding.replace('_', ' ')}" for finding, n in summary.by_finding.items())
    keys = ", ".join(f"{n} by {key.replace('_', ' ')}" for key, n in summary.by_key.items() if n)
    print(f"imported {summary.rows} reading(s) from {args.file.name}: {findings} ({keys})")
    return 0


def add_dicom_node_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dicom-node",
        help="run a DICOM node (Storage SCP) that scores received X-rays and sends results to a PACS",
        description="Receive X-rays over DICOM (C-ECHO, C-STORE), score each with the exported model, and send a "
        "structured report (TID 1500) and a heat-map Secondary Capture to --destination. Refused instances (CT, lateral, "
        "not a chest, undecodable) get an audit row with the reason and no result. Every setting can also come from "
        "PNEUMOSCAN_* environment variables (PNEUMOSCAN_AE_TITLE, PNEUMOSCAN_DICOM_PORT, PNEUMOSCAN_ALLOWED_CALLING_AES, "
        "PNEUMOSCAN_DESTINATION, ...); flags win. Stop with Ctrl-C: what was received is scored first.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ae-title", default=None, help="the node's AE title (default PNEUMOSCAN)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="DICOM port (default 11112)")
    p.add_argument("--allow-ae", action="append", default=None, metavar="AE_TITLE",
                   help="a calling AE title allowed to send (repeat; required beyond loopback)")  # fmt: skip
    p.add_argument("--destination", default=None, metavar="DEST",
                   help="where results go: AE_TITLE@host:port (C-STORE) or a DICOMweb URL (STOW-RS)")
    p.add_argument("--model", type=Path, default=None, help=f"exported model folder (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--int8", action="store_true", help="score with the int8 model")
    p.add_argument("--data-dir", type=Path, default=None, help="spool, outbox and SQLite audit database (default ./data)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")
    p.add_argument("--workers", type=int, default=None, help="instances processed at once (default 4)")
    p.set_defaults(handler=run_dicom_node)


def run_dicom_node(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pneumoscan.apps.dicom.node import run_node
    from pneumoscan.apps.settings import DicomNodeSettings, settings_from

    settings = settings_from(DicomNodeSettings, ae_title=args.ae_title, dicom_host=args.host, dicom_port=args.port,
                             allowed_calling_aes=args.allow_ae, destination=args.destination, model_dir=args.model,
                             data_dir=args.data_dir, database_url=args.database_url,
                             precision="int8" if args.int8 else None, workers=args.workers)  # fmt: skip
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    run_node(settings, stop)
    return 0

