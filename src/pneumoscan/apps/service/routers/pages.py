"""The page, the API docs and the service worker, all from this origin (no CDN), and none in OpenAPI."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[2] / "static"
VENDOR = STATIC / "vendor" / "onnxruntime-web"
#: Swagger UI's files that the docs page loads, from the installed package (never a CDN): served under /docs/static/.
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/static/vendor/onnxruntime-web/{name}")
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


@router.get("/docs")
async def docs() -> FileResponse:
    return FileResponse(STATIC / "docs.html", media_type="text/html")


@router.get("/docs/static/{name}")
async def docs_file(name: str) -> FileResponse:
    from swagger_ui_bundle import swagger_ui_path

    if name not in SWAGGER_FILES:
        raise HTTPException(404, "no such file")
    return FileResponse(Path(str(swagger_ui_path)) / name, media_type=SWAGGER_FILES[name])


@router.get("/sw.js")
async def service_worker() -> FileResponse:
    """At the root, so that it may keep the page itself for offline use."""
    return FileResponse(STATIC / "sw.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})
