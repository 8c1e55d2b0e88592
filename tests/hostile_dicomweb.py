"""A DICOMweb server of the tests' own that misbehaves on purpose, on 127.0.0.1: what pull mode must survive.

Modes (issue 27):
- ``endless``: every QIDO page is full, with new UIDs at every offset; WADO answers 404;
- ``huge``: one instance whose WADO part is 500 MB (sent a chunk at a time, never held);
- ``endless-chunked``: one instance whose WADO answer is chunked and never ends;
- ``trickle``: every answer sends its headers, then one byte every ``trickle_seconds``;
- ``trickle-wado``: the searches answer at once, the three retrievals trickle;
- ``no-content``: not hostile: every search finds nothing and says so with 204 No Content;
- ``malformed``: one good chest DX among a search result without StudyInstanceUID, UIDs ``..`` and
  ``1.2<newline>3``, and instances answered as ``text/html`` or as bytes that are not DICOM.
Every request loop is bounded by the client; ``stop()`` ends the server.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

GOOD_STUDY, GOOD_SERIES, GOOD_SOP = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.1.1"
HTML_SOP, NOT_DICOM_SOP = "1.2.826.0.1.3680043.10.1.1.2", "1.2.826.0.1.3680043.10.1.1.3"
BOUNDARY = "pneumoscan-test-boundary"


def uid_entry(**uids: str) -> dict:
    tags = {"study": "0020000D", "series": "0020000E", "sop": "00080018"}
    return {tags[name]: {"vr": "UI", "Value": [value]} for name, value in uids.items()}


class HostileDicomweb:
    def __init__(self, mode: str, good_instance: bytes = b"", trickle_seconds: float = 20.0):
        self.mode, self.good_instance, self.trickle_seconds = mode, good_instance, trickle_seconds
        self.requests = 0
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests += 1
                try:
                    server.answer(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: what it is meant to do
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"

    def start(self) -> HostileDicomweb:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ answers

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        parts = url.path.removeprefix("/dicom-web").strip("/").split("/")
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if self.mode == "trickle":
            return self.trickle(handler)
        if parts[-1] in ("series", "instances"):
            if self.mode == "no-content":  # how dcm4chee and others answer a search that finds nothing
                handler.send_response(204)
                handler.send_header("Content-Length", "0")
                return handler.end_headers()
            return self.send_json(handler, self.search(parts, query))
        sop = parts[-1]
        if self.mode == "endless":
            return self.send(handler, 404, "text/plain", b"no such instance")
        if self.mode == "huge":
            return self.send_huge_part(handler, 500 * 2**20)
        if self.mode == "endless-chunked":
            return self.send_endless_chunks(handler)
        if self.mode == "trickle-wado":
            return self.trickle(handler)
        if sop == HTML_SOP:
            return self.send(handler, 200, "text/html", b"<!doctype html><html><body>Login required</body></html>")
        if sop == NOT_DICOM_SOP:
            return self.send_multipart(handler, b"this is not a DICOM file at all" * 10)
        return self.send_multipart(handler, self.good_instance)

    def search(self, parts: list[str], query: dict[str, str]) -> list[dict]:
        limit, offset = int(query.get("limit", 100)), int(query.get("offset", 0))
        if self.mode == "endless":  # a full page of new UIDs at every offset, for ever
            root = "1.2.826.0.1.3680043.10.9" if parts[-1] == "series" else f"{parts[-2]}.9"
            return [uid_entry(study=f"{root}.{offset + i + 1}", series=f"{root}.{offset + i + 1}.1", sop=f"{root}.{offset + i + 1}.1.1")
                    for i in range(limit)]  # fmt: skip
        if offset or (parts[-1] == "series" and query.get("Modality") == "CR"):  # its studies are DX
            return []
        if parts[-1] == "series":
            series = [uid_entry(study=GOOD_STUDY, series=GOOD_SERIES)]
            if self.mode == "malformed":
                series += [{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}},  # no StudyInstanceUID
                           uid_entry(study="..", series="1.2.3"), uid_entry(study="1.2\n3", series="1.2.4")]  # fmt: skip
            return series
        if self.mode == "malformed":
            return [uid_entry(sop=GOOD_SOP), uid_entry(sop=HTML_SOP), uid_entry(sop=NOT_DICOM_SOP), uid_entry(sop="../../etc")]
        if self.mode == "trickle-wado":
            return [uid_entry(sop=f"{GOOD_SOP}{i}") for i in range(3)]
        return [uid_entry(sop=GOOD_SOP)]

    def send(self, handler: BaseHTTPRequestHandler, status: int, content_type: str, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def send_json(self, handler: BaseHTTPRequestHandler, results: list[dict]) -> None:
        self.send(handler, 200, "application/dicom+json", json.dumps(results).encode())

    def send_multipart(self, handler: BaseHTTPRequestHandler, part: bytes) -> None:
        body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + f"\r\n--{BOUNDARY}--\r\n".encode())
        self.send(handler, 200, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', body)

    def send_huge_part(self, handler: BaseHTTPRequestHandler, size: int) -> None:
        head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + bytes(128) + b"DICM"
        handler.send_response(200)
        handler.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        handler.send_header("Content-Length", str(len(head) + size))
        handler.end_headers()
        handler.wfile.write(head)
        block = bytes(2**20)
        for _ in range(size // len(block)):
            if self.stopping.is_set():
                return
            handler.wfile.write(block)

    def send_endless_chunks(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        block = bytes(2**16)
        for _ in range(100_000):  # 6.5 GB at most: bounded, though no client should read that far
            if self.stopping.is_set():
                return
            handler.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")

    def trickle(self, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Content-Length", "1000000")
        handler.end_headers()
        for _ in range(1000):  # bounded: ends by itself
            if self.stopping.wait(self.trickle_seconds):
                return
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0)
