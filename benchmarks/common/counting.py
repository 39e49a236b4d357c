"""Server-side request counting for the local object-store servers (moto, the GCS emulator).

Bytes and requests are counted where a real service would bill them: on the server. Each
server's request handling is wrapped so that every request appends one entry to a
``RequestLog``: method, path, query, Range header, request body bytes (``Content-Length``),
response body bytes, status and server seconds. A measured child brackets its call with
``GET <endpoint>/__bench__/reset`` and ``GET <endpoint>/__bench__/stats`` (``fetch``); the
wrapper answers those itself, so they never reach the store and are not counted (``__bench__``
is not a valid bucket name on S3 or GCS).

Two wrappers, one per server kind: ``CountingWSGI`` for moto's WSGI app, ``counting_handler``
for the GCS emulator's ``http.server`` handler class.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

CONTROL = "/__bench__/"


class RequestLog:
    """The requests a server handled since the last reset; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self.in_flight = 0

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end(self, entry: dict[str, Any] | None) -> None:
        with self.lock:
            if entry is not None:
                self.entries.append(entry)
            self.in_flight -= 1

    def control(self, path: str) -> bytes:
        """Answer ``CONTROL + "reset"`` (clear) or ``CONTROL + "stats"`` (the entries as JSON)."""
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:  # let the last response's close() land
            time.sleep(0.005)
        with self.lock:
            body = json.dumps(self.entries).encode() if path.endswith("stats") else b"[]"
            if path.endswith("reset"):
                self.entries = []
        return body


def new_entry(method: str, path: str, query: str, byte_range: str | None, request_body: int) -> dict[str, Any]:
    return {"method": method, "path": path, "query": query, "range": byte_range, "request_body": request_body,
            "body": 0, "status": "", "seconds": 0.0}


class CountingWSGI:
    """WSGI middleware (around moto's app): one ``RequestLog`` entry per request, body bytes both ways."""

    def __init__(self, app: Any, log: RequestLog) -> None:
        self.app, self.log = app, log

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL):
            body = self.log.control(path)
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        entry = new_entry(environ.get("REQUEST_METHOD", ""), path, environ.get("QUERY_STRING", ""),
                          environ.get("HTTP_RANGE"), int(environ.get("CONTENT_LENGTH") or 0))
        t0 = time.perf_counter()
        self.log.begin()

        def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            entry["status"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, sr)
        except BaseException:
            self.log.end(None)
            raise
        return self._count(result, entry, t0)

    def _count(self, result: Any, entry: dict[str, Any], t0: float) -> Iterator[bytes]:
        try:
            for chunk in result:
                if entry["method"] != "HEAD":
                    entry["body"] += len(chunk)
                yield chunk
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            entry["seconds"] = time.perf_counter() - t0
            self.log.end(entry)


def counting_handler(base: Any, log: RequestLog) -> Any:
    """A subclass of the ``http.server`` handler ``base`` that logs each request in ``log``.

    The response body size is taken from the ``Content-Length`` header the handler sends (the GCS
    emulator always sends one); the request body size likewise (gcsfs always sends one).
    """

    class Counting(base):
        entry: dict[str, Any] | None = None

        def _counted(self, handle: Any) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path.startswith(CONTROL):
                body = log.control(url.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.entry = new_entry(self.command, url.path, url.query, self.headers.get("Range"),
                                   int(self.headers.get("Content-Length") or 0))
            t0 = time.perf_counter()
            log.begin()
            try:
                handle(self)
            finally:
                self.entry["seconds"] = time.perf_counter() - t0
                log.end(self.entry)
                self.entry = None

        def send_response(self, code: int, message: str | None = None) -> None:
            if self.entry is not None:
                self.entry["status"] = str(code)
            super().send_response(code, message)

        def send_header(self, keyword: str, value: str) -> None:
            if self.entry is not None and keyword.lower() == "content-length" and self.command != "HEAD":
                self.entry["body"] = int(value)
            super().send_header(keyword, value)

    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        handle = getattr(base, f"do_{method}", None)
        if handle is not None:
            setattr(Counting, f"do_{method}", lambda self, h=handle: self._counted(h))
    return Counting


def fetch(endpoint: str, what: str, timeout: float = 120) -> Any:
    """``reset`` or ``stats`` of the counting wrapper of the server at ``endpoint`` (no proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(endpoint + CONTROL + what, timeout=timeout) as r:
        return json.loads(r.read())
