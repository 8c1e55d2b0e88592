"""Admission and size limits for uploads, decided before the body is read.

FastAPI parses a multipart upload (spooling it to disk) before the route runs,
so a limit checked in the route comes after a 1 GB body was written, and a
queue checked there comes after 40 concurrent uploads were held. This ASGI
middleware stands in front of the upload route instead: a declared
``Content-Length`` over the limit is refused at once, a request beyond capacity
is refused before its first body byte is read, and a body that streams past the
limit (chunked, or lying about its length) is cut off there.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Room for the multipart envelope (boundaries, part headers, a file name) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


class Admission:
    """Counts uploads in the service (being received, waiting or running); refuses one beyond ``limit``.

    Only the event loop touches it, so no lock is needed.
    """

    def __init__(self, limit: int):
        self.limit, self.inside = limit, 0

    def enter(self) -> bool:
        if self.inside >= self.limit:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1


class BodyTooLarge(Exception):
    """Raised into the application when the body streams past the limit; the middleware answers 413."""


class UploadGuard:
    """Pure ASGI middleware for ``POST path``: size and admission before the body, and a byte count while it streams."""

    def __init__(self, app: ASGIApp, *, path: str, max_file_bytes: int, admission: Admission,
                 on_shed: Callable[[], None] = lambda: None):  # fmt: skip
        self.app, self.path, self.admission, self.on_shed = app, path, admission, on_shed
        self.max_file_bytes = max_file_bytes
        self.max_body = max_file_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body:
            await self.too_large(send)
            return
        if not self.admission.enter():
            self.on_shed()
            await send_json(send, 503, "Overloaded", "the service is at capacity; retry shortly",
                            {"retry-after": "1", "connection": "close"})  # closed: its body is never read  # fmt: skip
            return
        try:
            await self.run_counting(scope, receive, send)
        finally:
            self.admission.leave()

    async def run_counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        received, cut, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, cut
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    cut = True
                    raise BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if cut:  # whatever the application answers to the cut-off body, the client is told 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            pass
        if cut and not started:
            await self.too_large(send)

    async def too_large(self, send: Send) -> None:
        await send_json(send, 413, "ImageTooLarge", f"the upload is larger than {self.max_file_bytes // 2**20} MB",
                        {"connection": "close"})  # fmt: skip


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_json(send: Send, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": kind, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
