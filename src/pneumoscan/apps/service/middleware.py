"""What wraps every request: CORS, then security headers, metrics and the API key, then the upload guard.

Each middleware added wraps the ones added before it, so :func:`install_middleware` adds them from
the inside out: the upload guard (size and admission before the body is read), then
:class:`GuardedAndMeasured` (the key, refused before the body too; metrics, where any escaped
exception becomes a counted JSON 500; the security headers on every answer), and CORS outermost.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers, MutableHeaders

from pneumoscan.apps.service.admission import ASGIApp, Message, Receive, Scope, Send, UploadGuard
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
    settings = service.settings
    app.add_middleware(UploadGuard, path=f"{API}/predictions", max_file_bytes=settings.max_upload_bytes,
                       admission=service.admitted, on_shed=service.metrics.shed.inc)  # fmt: skip
    keyed = ("/metrics", "/openapi.json") if settings.require_key_for_metrics_and_schema else ()
    app.add_middleware(GuardedAndMeasured, service=service, keyed=keyed)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key"])  # fmt: skip


class GuardedAndMeasured:
    """Pure ASGI (Starlette's ``BaseHTTPMiddleware`` costs a task group and a stream per layer per request):

    - the API key, refused before any body is read (the routers' ``require_api_key`` dependency says the same in
      OpenAPI);
    - metrics: requests in flight, count and latency by route and status; an exception that escapes is logged with
      its traceback and answered as a JSON 500, so it is counted and carries the headers;
    - the security and cross-origin isolation headers on every answer.
    """

    def __init__(self, app: ASGIApp, *, service: Service, keyed: tuple[str, ...]):
        self.app, self.service, self.keyed = app, service, keyed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics, start, status, started = self.service.metrics, time.perf_counter(), 500, False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in ANSWER_HEADERS.items():
                    headers[name] = value
            await send(message)

        with metrics.in_flight.track_inprogress():
            try:
                refusal = self.key_refusal(scope)
                app = error(401, "unauthorized", refusal) if refusal else self.app
                await app(scope, receive, send_with_headers)
            except Exception:  # a bug of ours: logged with its traceback, answered in JSON, counted
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                if started:
                    raise
                await error(500, "InternalError", "pneumoscan failed on this request; it was logged. Retry, and "
                            "report it if it happens again.")(scope, receive, send_with_headers)  # fmt: skip
        route = getattr(scope.get("route"), "path", "unmatched")
        metrics.requests.labels(scope["method"], route, str(status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)

    def key_refusal(self, scope: Scope) -> str | None:
        path = scope["path"]
        if not (path.startswith("/api/") or path in self.keyed):
            return None
        headers = Headers(scope=scope)
        return key_refusal(self.service.api_key, headers.get("x-api-key"), headers.get("authorization", ""))


#: Every answer carries these.
ANSWER_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY, **ISOLATION_HEADERS}
