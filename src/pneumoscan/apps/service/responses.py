"""Every refusal as ``{"error": kind, "detail": sentence}``: the exception handlers that make sure of it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """HTTP errors, invalid requests and an unreachable audit database answer in the API's error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: "unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}
        return error(exc.status_code, kinds.get(exc.status_code, "HTTPError"), str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error(422, "InvalidRequest", f"the request is not valid: {problems}"[:500])

    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("audit database error on %s: %s", request.url.path, type(exc).__name__)
        return error(503, "AuditLogUnavailable", "the audit database cannot be reached; retry shortly", {"Retry-After": "5"})
