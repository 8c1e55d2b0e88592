"""The web service: ``pneumoscan serve`` (FastAPI + uvicorn), the REST API and the page over the shared ONNX model.

:func:`create_app` is the app factory: it opens the service's state (model, audit log, pictures,
drift; :mod:`.state`), installs the error handlers (:mod:`.responses`), one router per resource
(:mod:`.routers`) and the middleware (:mod:`.middleware`). What routes share comes to them as
dependencies (:mod:`.dependencies`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import pneumoscan
from pneumoscan.apps.service.middleware import install_middleware
from pneumoscan.apps.service.responses import install_error_handlers
from pneumoscan.apps.service.routers import drift, model, on_device, operations, pages, predictions, readings
from pneumoscan.apps.service.state import Service
from pneumoscan.apps.settings import ServiceSettings, is_loopback
from pneumoscan.errors import ConfigurationError
from pneumoscan.running.inference import Predictor

#: In the order they are matched: the readings' paths before the pictures' ``/{id}/{picture}.png``, and the page's
#: vendored runtime files before the ``/static`` mount.
ROUTERS = (readings.router, predictions.router, model.router, drift.router, on_device.router, operations.router, pages.router)


def create_app(settings: ServiceSettings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """The service's ASGI app; ``predictor`` replaces the one ``settings.model_dir`` names (tests)."""
    service = Service.open(settings or ServiceSettings(), predictor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="pneumoscan", version=pneumoscan.__version__, description="Pneumonia detection on chest X-rays",
                  docs_url=None, redoc_url=None, lifespan=lifespan)  # the docs page is ours: Swagger UI from this origin
    app.state.service = service
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    install_middleware(app, service)
    return app


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
    for population, point in app.state.service.predictor.populations.items():
        print(f"operating point in force ({population}): {point.operating_point}, threshold {point.threshold:.4f} [{point.in_force}]", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
