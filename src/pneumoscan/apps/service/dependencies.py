"""What routes share, as FastAPI dependencies: the service's state, the model, the audit log, and the API key."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from pneumoscan.apps.audit import AuditLog
from pneumoscan.apps.service.state import Service
from pneumoscan.running.inference import Predictor

#: The header the key travels in (``Authorization: Bearer`` is taken too, for a Prometheus scraper).
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's key, when one is set")


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_predictor(request: Request) -> Predictor:
    return request.app.state.service.predictor


def get_audit(request: Request) -> AuditLog:
    return request.app.state.service.audit


def require_api_key(request: Request, given: str | None = Security(API_KEY_HEADER)) -> None:
    """Every API route needs the key when one is set (the middleware refuses an upload earlier, before its body)."""
    refusal = key_refusal(request.app.state.service.api_key, given, request.headers.get("authorization", ""))
    if refusal:
        raise HTTPException(401, refusal)


def key_refusal(api_key: str | None, given: str | None, authorization: str = "") -> str | None:
    """Why a request is refused for its key, or None: one comparison for the dependency and the middleware."""
    if not api_key:
        return None
    offered = given or bearer_token(authorization)
    if hmac.compare_digest(offered.encode(), api_key.encode()):
        return None
    return "a valid X-API-Key header (or Authorization: Bearer) is required"


def bearer_token(authorization: str) -> str:
    """The token of ``Authorization: Bearer <token>``: what Prometheus's scrape configuration can send."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
