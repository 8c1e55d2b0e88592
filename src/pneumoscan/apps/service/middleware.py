"""What wraps every request: CORS, security headers, metrics and the last-resort 500, the API key, the upload guard.

Each middleware added wraps the ones added before it, so :func:`install_middleware` adds them from
the inside out: the upload guard (size and admission before the body is read), the key (refused
before the body too), metrics (any escaped exception becomes a counted JSON 500 with the headers),
the security headers on every answer, and CORS outermost.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from pneumoscan.apps.service.admission import UploadGuard
from pneumoscan.apps.service.dependencies import key_refusal
from pneumoscan.apps.service.responses import error
from pneumoscan.apps.service.schemas import API
from pneumoscan.apps.service.state import Service

log = logging.getLogger(__name__)

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


def install_middleware(app: FastAPI, service: Service) -> None:
    settings, metrics = service.settings, service.metrics
    app.add_middleware(UploadGuard, path=f"{API}/predictions", max_file_bytes=settings.max_upload_bytes,
                       admission=service.admitted, on_shed=metrics.shed.inc)  # fmt: skip
    keyed = ("/metrics", "/openapi.json") if settings.require_key_for_metrics_and_schema else ()

    @app.middleware("http")
    async def refuse_without_key(request: Request, call_next):  # type: ignore[no-untyped-def]
        """Before any body is read; the routers' ``require_api_key`` dependency says the same in OpenAPI."""
        path = request.url.path
        if path.startswith("/api/") or path in keyed:
            refusal = key_refusal(service.api_key, request.headers.get("x-api-key"), request.headers.get("authorization", ""))
            if refusal:
                return error(401, "unauthorized", refusal)
        return await call_next(request)

    @app.middleware("http")
    async def measure(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        with metrics.in_flight.track_inprogress():
            try:
                response = await call_next(request)
            except Exception:  # a bug of ours: logged with its traceback, answered in JSON, counted
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = error(500, "InternalError", "pneumoscan failed on this request; it was logged. Retry, and "
                                 "report it if it happens again.")  # fmt: skip
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - start)
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
