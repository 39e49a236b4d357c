"""A metadata server on 127.0.0.1 that answers as AWS, GCP and Azure answer about preemption.

First "no notice"; after :meth:`FakeMetadata.post_notice`, the notice. It also checks the
headers each cloud demands (an IMDSv2 token for AWS, ``Metadata-Flavor: Google``,
``Metadata: true``), refusing a request without them as the clouds do, and counts requests.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "fake-imdsv2-token"


class FakeMetadata:
    """``with FakeMetadata() as meta: meta.url`` ... ``meta.post_notice()``."""

    def __init__(self) -> None:
        self.noticed = threading.Event()
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                outer.requests.append(f"PUT {self.path}")
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._reply(200, TOKEN.encode())
                self._reply(400, b"")

            def do_GET(self) -> None:
                outer.requests.append(f"GET {self.path}")
                notice = outer.noticed.is_set()
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                        return self._reply(401, b"")
                    body = json.dumps({"action": "terminate", "time": "2026-12-01T15:00:00Z"}).encode()
                    return self._reply(200, body) if notice else self._reply(404, b"Not Found")
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._reply(403, b"")
                    return self._reply(200, b"TRUE" if notice else b"FALSE")
                if self.path.startswith("/metadata/scheduledevents"):
                    if self.headers.get("Metadata") != "true":
                        return self._reply(400, b"")
                    events = [{"EventId": "1", "EventType": "Preempt", "NotBefore": "Tue, 01 Dec 2026 15:00:30 GMT"}]
                    return self._reply(200, json.dumps({"DocumentIncarnation": 1, "Events": events if notice else []}).encode())
                self._reply(404, b"")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def post_notice(self) -> None:
        self.noticed.set()

    def __enter__(self) -> FakeMetadata:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
