"""Upload limits and admission come before the body: driven at the ASGI level, counting every byte the app pulls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pneumoscan.apps.service.admission import MULTIPART_OVERHEAD
from pneumoscan.apps.service.app import create_app
from pneumoscan.apps.settings import ServiceSettings

LIMIT = 1 * 2**20
BOUNDARY = b"pneumoscanboundary"


@pytest.fixture(scope="module")
def app(shipped_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    settings = ServiceSettings(model_dir=shipped_model, data_dir=tmp_path_factory.mktemp("guard"), max_upload_bytes=LIMIT,
                               max_concurrent=1, max_queue=0)  # fmt: skip
    return create_app(settings)


class Upload:
    """One POST /api/v1/predictions as a client would stream it; counts the body bytes the app pulled."""

    def __init__(self, content_length: int | None, chunks, hold: asyncio.Event | None = None):  # type: ignore[no-untyped-def]
        self.content_length, self.chunks, self.hold = content_length, iter(chunks), hold
        self.pulled, self.status, self.body = 0, None, b""

    def scope(self) -> dict:
        headers = [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)]
        if self.content_length is not None:
            headers.append((b"content-length", str(self.content_length).encode()))
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                "path": "/api/v1/predictions", "raw_path": b"/api/v1/predictions", "query_string": b"", "root_path": "",
                "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip

    async def receive(self) -> dict:
        if self.hold is not None:
            await self.hold.wait()
        chunk = next(self.chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        self.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def run(self, app) -> Upload:  # type: ignore[no-untyped-def]
        await app(self.scope(), self.receive, self.send)
        return self


def endless_multipart(chunk: int = 64 * 1024):  # type: ignore[no-untyped-def]
    """A multipart upload whose file part never ends (a 1 GB upload, or an endless one)."""
    yield b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n' \
          b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n"  # fmt: skip
    while True:
        yield bytes(chunk)


def test_a_declared_length_over_the_limit_is_refused_before_one_byte_is_read(app) -> None:  # type: ignore[no-untyped-def]
    upload = asyncio.run(Upload(2**30, endless_multipart()).run(app))
    assert upload.status == 413 and b"ImageTooLarge" in upload.body
    assert upload.pulled == 0


def test_a_body_that_streams_past_the_limit_is_cut_there(app) -> None:  # type: ignore[no-untyped-def]
    """No Content-Length (chunked), or one that lies: the app stops pulling at the limit; nothing beyond is spooled."""
    for declared in (None, 1000):
        upload = asyncio.run(Upload(declared, endless_multipart()).run(app))
        assert upload.status == 413 and b"ImageTooLarge" in upload.body, upload.body
        assert upload.pulled <= LIMIT + MULTIPART_OVERHEAD + 64 * 1024, upload.pulled


def test_beyond_capacity_an_upload_is_refused_before_its_body_is_read(app) -> None:  # type: ignore[no-untyped-def]
    """max_concurrent=1, max_queue=0: while one upload is being received, the next one gets 503 having sent nothing."""

    async def scenario() -> tuple[Upload, Upload]:
        release = asyncio.Event()
        first = Upload(None, [b"--" + BOUNDARY + b"--\r\n"], hold=release)
        running = asyncio.create_task(first.run(app))
        await asyncio.sleep(0.05)  # the first is admitted and waits for its body
        second = await Upload(LIMIT // 2, endless_multipart()).run(app)  # within the limit: refused for capacity only
        release.set()
        await running
        return first, second

    first, second = asyncio.run(scenario())
    assert second.status == 503 and second.pulled == 0 and b"Overloaded" in second.body
    assert first.status == 422  # admitted, then refused for what it held (no file field)
