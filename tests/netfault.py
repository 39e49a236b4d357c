"""A fault-injecting HTTP/1.1 proxy for tests and benchmarks (no pytest needed).

``FaultProxy`` listens on 127.0.0.1 (a free port) in front of one upstream HTTP endpoint (moto,
the GCS emulator) and relays requests unchanged, byte for byte, unless a :class:`Rule` says
otherwise. Clients are pointed at :attr:`FaultProxy.url` instead of the upstream (s3fs:
``client_kwargs={"endpoint_url": url}``; gcsfs: ``endpoint_url=url``).

What it can do:

* Keep-alive: each client connection gets its own upstream connection and may carry any number
  of requests. Request bodies are framed by ``Content-Length`` or chunked transfer encoding;
  ``Expect: 100-continue`` is answered by the proxy itself (the header is not forwarded, and an
  interim 1xx from the upstream is skipped). Responses are framed by ``Content-Length``, chunked
  encoding or connection close; HEAD, 1xx, 204 and 304 responses have no body.
* Per request, the first matching rule picks an :class:`Action` from the method, the target
  (path and query, as sent) and the headers:

  - ``PASS``: relay it (what happens when no rule matches);
  - ``DROP_REPLY``: forward it, read the upstream's whole reply (so the server has executed the
    request), then reset the client connection (``SO_LINGER`` 0, a real RST) without sending a
    byte of the reply: the "lost reply" that makes a client retry a request that succeeded;
  - ``REFUSE``: reset the client connection before anything is forwarded;
  - ``STATUS``: answer ``Rule.status`` (500, 502, 503 SlowDown, 429...) with an S3-style error
    body, without forwarding: the server never sees the request;
  - ``STALL``: read the request, forward nothing and send nothing for ``Rule.stall_seconds``
    (or until the proxy stops), then reset: a connection that hangs without closing;
  - ``CUT_REPLY``: forward it, relay the first ``Rule.reply_bytes`` bytes of the reply (head
    included), then reset: a connection dropped mid-download;
  - ``CUT_REQUEST``: forward the head and the first ``Rule.request_bytes`` bytes of the body,
    then reset both sides: a connection dropped mid-upload (the server gets a truncated request);
  - ``STALL_REQUEST``: read the head and ``Rule.request_bytes`` bytes of the body, then stop
    reading for ``Rule.stall_seconds`` (or until the proxy stops), then reset: a server that
    stops reading mid-upload, so the client's send blocks once the socket buffers are full.

  A rule can be limited to firing ``times`` times (the first matches), and/or fire with a
  seeded ``probability``; ``Rule.matched`` and ``Rule.fired`` count what it saw and did.
* A region-like link for everything it relays: ``latency`` seconds added each way (before a
  request goes upstream and before its reply goes back), and ``bandwidth`` bytes per second per
  connection in each direction: a request is read from the client at that rate (64 KiB at a
  time, so TCP holds the client back, as a real link does: its upload takes the time the link
  takes, and its read timeout starts only after it), then sent upstream at once; a reply is
  sent to the client at that rate, in 64 KiB slices.
* It counts what it did (:class:`Stats`, and a log of ``(method, target, action)``), so a test
  can assert that a fault really happened, and the most requests it handled at once
  per method (``Stats.max_in_flight["PUT"]``), so a test can see how many transfers a client
  keeps going.
* It is a context manager: on exit it stops its threads and closes every socket. Every socket
  has a timeout (``timeout`` seconds), so a stuck peer never hangs a test.

Limits: plain HTTP only (no TLS, no CONNECT tunnels, no HTTP/2, no upgrades); one upstream per
proxy; requests are relayed one at a time per connection (no pipelining); bodies are held in
memory, so keep test payloads small; ``Stats.log`` grows by one entry per request. Rules see
request heads only, not bodies (gcsfs puts an uploaded object's name in the body, so match
its query instead). moto (Werkzeug) and the GCS emulator (``http.server``, HTTP/1.0) close
the connection after every reply, so against them each request is a connection of its own.

To add a kind of fault, add an :class:`Action` and handle it in ``_Connection._exchange``;
matching, budgets and counting stay as they are.
"""

from __future__ import annotations

import contextlib
import enum
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["Action", "FaultProxy", "RequestHead", "Rule", "Stats"]

_MAX_HEAD = 64 * 1024  # bytes of request/status line plus headers
_SLICE = 64 * 1024  # bytes per paced send on a capped link


class Action(enum.Enum):
    """What the proxy does with one request."""

    PASS = "pass"
    DROP_REPLY = "drop_reply"
    REFUSE = "refuse"
    STATUS = "status"
    STALL_REQUEST = "stall_request"
    STALL = "stall"
    CUT_REPLY = "cut_reply"
    CUT_REQUEST = "cut_request"


# S3's error codes for the statuses a test injects (GCS clients read the status alone)
_ERROR_CODES = {500: ("Internal Server Error", "InternalError"), 502: ("Bad Gateway", "BadGateway"),
                503: ("Slow Down", "SlowDown"), 429: ("Too Many Requests", "TooManyRequests"),
                403: ("Forbidden", "AccessDenied"), 404: ("Not Found", "NoSuchKey")}


@dataclass(frozen=True)
class RequestHead:
    """The part of a request that rules see: ``headers`` keys are lower-case."""

    method: str
    target: str  # path and query, as the client sent them
    headers: Mapping[str, str]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Rule:
    """Apply ``action`` to requests that match every given criterion.

    Args:
        action: what to do with a matching request.
        method: the HTTP method, exactly (``"PUT"``); None matches any.
        target: a regular expression searched in the path and query (``r"/manifest\\.json$"``).
        headers: header name -> required value (compared case-insensitively, stripped);
            a value of None only requires the header to be present.
        when: any further predicate on the :class:`RequestHead`.
        times: fire at most this many times (on the first matches); None means no limit.
        probability: fire on a matching request with this probability (drawn from ``seed``).
        seed: seeds this rule's own random generator, so runs repeat exactly.
        status: the status ``STATUS`` answers (with an S3-style ``<Error><Code>`` body).
        stall_seconds: how long ``STALL`` holds the connection before it resets it.
        reply_bytes: how many bytes of the reply ``CUT_REPLY`` relays before it resets.
        request_bytes: how many bytes of the request body ``CUT_REQUEST`` forwards before it resets.
    """

    action: Action
    method: str | None = None
    target: str | None = None
    headers: Mapping[str, str | None] = field(default_factory=dict)
    when: Callable[[RequestHead], bool] | None = None
    times: int | None = None
    probability: float = 1.0
    seed: int = 0
    status: int = 503
    stall_seconds: float = 30.0
    reply_bytes: int = 0
    request_bytes: int = 0
    matched: int = field(default=0, init=False)  # matching requests seen
    fired: int = field(default=0, init=False)  # of which the action was applied
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"`probability` must be in [0, 1], got {self.probability!r}")
        if self.times is not None and self.times < 0:
            raise ValueError(f"`times` must be >= 0 or None, got {self.times!r}")
        if self.action is Action.STATUS and self.status not in _ERROR_CODES:
            raise ValueError(f"`status` must be one of {sorted(_ERROR_CODES)}, got {self.status!r}")
        self._pattern = re.compile(self.target) if self.target is not None else None
        self._rng = random.Random(self.seed)

    def matches(self, head: RequestHead) -> bool:
        """True if ``head`` meets every criterion (budget and probability aside)."""
        if self.method is not None and head.method != self.method:
            return False
        if self._pattern is not None and not self._pattern.search(head.target):
            return False
        for name, want in self.headers.items():
            got = head.headers.get(name.lower())
            if got is None or (want is not None and got.strip().lower() != want.strip().lower()):
                return False
        return self.when is None or self.when(head)

    def decide(self, head: RequestHead) -> Action | None:
        """The action for ``head``, or None if this rule does not fire (the caller holds the lock)."""
        if not self.matches(head):
            return None
        self.matched += 1
        if self.times is not None and self.fired >= self.times:
            return None
        if self.probability < 1.0 and self._rng.random() >= self.probability:
            return None
        self.fired += 1
        return self.action


@dataclass
class Stats:
    """What the proxy did; ``log`` holds ``(method, target, action)`` per request."""

    connections: int = 0
    requests: int = 0  # request heads read (each gets a log entry)
    passed: int = 0  # replies relayed to the client
    dropped: int = 0  # requests executed upstream whose reply was replaced by a reset
    refused: int = 0  # requests reset before forwarding
    answered: int = 0  # requests answered with an injected status, never forwarded
    stalled: int = 0  # requests held without a reply, then reset
    cut: int = 0  # replies reset after their first bytes
    cut_requests: int = 0  # requests forwarded in part, then reset
    errors: int = 0  # connections ended by a malformed message, a timeout or a reset
    in_flight: dict[str, int] = field(default_factory=dict)  # group (method) -> requests being handled now
    max_in_flight: dict[str, int] = field(default_factory=dict)  # group (method) -> the most at once
    log: list[tuple[str, str, Action]] = field(default_factory=list)


class _Closed(Exception):
    """The peer closed the connection cleanly between messages."""


class _Reader:
    """Buffered reads of lines and exact byte counts from a socket, keeping the raw bytes."""

    def __init__(self, sock: socket.socket, rate: float | None = None, stopping: threading.Event | None = None) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.rate, self.stopping = rate, stopping or threading.Event()
        self._free_at = 0.0  # monotonic time when the link is free again (no credit builds up while idle)

    def _fill(self) -> bool:
        chunk = self.sock.recv(_SLICE)
        self.buf += chunk
        if self.rate and chunk:  # hold the sender back to the link's rate, as TCP would
            self._free_at = max(self._free_at, time.monotonic()) + len(chunk) / self.rate
            ahead = self._free_at - time.monotonic()
            if ahead > 0 and self.stopping.wait(ahead):
                raise ConnectionError("the proxy is stopping")
        return bool(chunk)

    def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise ValueError("header line too long")
            if not self._fill():
                raise _Closed() if not self.buf else ConnectionError("connection closed mid-line")
        out = bytes(self.buf[: end + 1])
        del self.buf[: end + 1]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"connection closed with {n - len(self.buf)} bytes still expected")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def until_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _read_head(reader: _Reader) -> tuple[str, list[bytes], dict[str, str]]:
    """Read a start line and headers: (start line, raw header lines, lower-cased header dict)."""
    start = reader.line()
    while start in (b"\r\n", b"\n"):  # tolerate stray blank lines between messages (RFC 9112 2.2)
        start = reader.line()
    raw: list[bytes] = []
    headers: dict[str, str] = {}
    size = len(start)
    while (line := reader.line()) not in (b"\r\n", b"\n"):
        size += len(line)
        if size > _MAX_HEAD:
            raise ValueError("headers too long")
        raw.append(line)
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return start.decode("latin-1").rstrip("\r\n"), raw, headers


def _read_body(reader: _Reader, headers: Mapping[str, str], *, until_close: bool) -> bytes:
    """The raw message body (chunk framing and trailers included, to relay as sent)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = reader.line()
            parts.append(size_line)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (trailer := reader.line()) not in (b"\r\n", b"\n"):
                    parts.append(trailer)
                parts.append(trailer)
                return b"".join(parts)
            parts.append(reader.exactly(size + 2))  # the chunk and its CRLF
    if "content-length" in headers:
        return reader.exactly(int(headers["content-length"]))
    return reader.until_eof() if until_close else b""


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One client connection and the upstream connection that serves it."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.up_reader: _Reader | None = None
        self._unfinished: str | None = None  # the group of the request being handled

    def serve(self) -> None:
        reader = _Reader(self.client, self.proxy.bandwidth, self.proxy._stopping)  # uploads are paced as they arrive
        try:
            while not self.proxy._stopping.is_set() and self._exchange(reader):
                pass
        except _Closed:
            pass
        except (OSError, ValueError):  # ConnectionError and TimeoutError are OSErrors
            self.proxy._count("errors")
        finally:
            for sock in (self.client, self.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def interrupt(self) -> None:
        """Wake a thread blocked on either socket (stop() calls this; serve() then closes them)."""
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            with contextlib.suppress(OSError):
                self.upstream.close()
        self.upstream = self.up_reader = None

    def _send(self, sock: socket.socket, data: bytes) -> None:
        """Send ``data`` at the link's bandwidth (all at once without a cap)."""
        rate = self.proxy.bandwidth
        if not rate:
            sock.sendall(data)
            return
        start = time.monotonic()
        for offset in range(0, len(data), _SLICE):
            sock.sendall(data[offset : offset + _SLICE])
            ahead = start + (offset + min(_SLICE, len(data) - offset)) / rate - time.monotonic()
            if ahead > 0 and self.proxy._stopping.wait(ahead):
                raise ConnectionError("the proxy is stopping")

    def _delay(self) -> None:
        """One way of the link's latency (cut short when the proxy stops)."""
        if self.proxy.latency and self.proxy._stopping.wait(self.proxy.latency):
            raise ConnectionError("the proxy is stopping")

    def _forward(self, request: bytes) -> tuple[str, list[bytes], dict[str, str], _Reader]:
        """Send ``request`` upstream and read the final reply's head (interim 1xx skipped)."""
        self._delay()
        for attempt in (0, 1):
            reused = self.upstream is not None
            if self.upstream is None or self.up_reader is None:
                self.upstream = socket.create_connection(self.proxy.upstream_address, timeout=self.proxy.timeout)
                self.up_reader = _Reader(self.upstream)
            try:
                self.upstream.sendall(request)  # paced already, as it arrived from the client
                while True:
                    status_line, raw, headers = _read_head(self.up_reader)
                    if not 100 <= int(status_line.split(" ", 2)[1]) < 200:
                        return status_line, raw, headers, self.up_reader
            except (_Closed, ConnectionError):
                # an idle kept-alive upstream connection may have been closed by the server
                # before it read anything: reconnect once, as any HTTP client would
                self._drop_upstream()
                if not reused or attempt:
                    raise ConnectionError("the upstream closed the connection without replying") from None
        raise AssertionError("unreachable")

    def _exchange(self, reader: _Reader) -> bool:
        """Relay one request and its reply; return False when the connection must end."""
        start, raw_headers, headers = _read_head(reader)
        method, target, _ = ([*start.split(" ", 2), "", ""])[:3]
        head = RequestHead(method, target, headers)
        rule = self.proxy._decide(head)
        self._unfinished = self.proxy.group(head)
        try:
            return self._handle(reader, rule, start, raw_headers, headers)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Count the request as handled (once): called before its reply's last bytes go out, so
        that a client's next request, sent the moment it has the reply, never overlaps it."""
        if self._unfinished is not None:
            self.proxy._done(self._unfinished)
            self._unfinished = None

    def _handle(self, reader: _Reader, rule: Rule | None, start: str, raw_headers: list[bytes],
                headers: dict[str, str]) -> bool:
        method, target, version = ([*start.split(" ", 2), "", ""])[:3]
        action = Action.PASS if rule is None else rule.action
        if action is Action.REFUSE:
            self.proxy._count("refused")  # counted first: the client may look at once
            _reset(self.client)
            return False
        if action is Action.CUT_REQUEST:  # the head and part of the body reach the server, then both sides reset
            assert rule is not None
            partial = reader.exactly(min(rule.request_bytes, int(headers.get("content-length", "0"))))
            self.proxy._count("cut_requests")
            upstream = socket.create_connection(self.proxy.upstream_address, timeout=self.proxy.timeout)
            with contextlib.suppress(OSError):
                upstream.sendall(b"".join([start.encode("latin-1"), b"\r\n", *raw_headers, b"\r\n", partial]))
            _reset(upstream)
            _reset(self.client)
            return False
        if action is Action.STALL_REQUEST:  # take part of the body, then stop reading: the sender's buffers fill
            assert rule is not None
            reader.exactly(min(rule.request_bytes, int(headers.get("content-length", "0"))))
            self.proxy._count("stalled")
            self.proxy._stopping.wait(rule.stall_seconds)
            _reset(self.client)
            return False
        if headers.get("expect", "").lower() == "100-continue":
            # answered here so that the body follows at once; the upstream never sees the Expect
            self.client.sendall(f"{version or 'HTTP/1.1'} 100 Continue\r\n\r\n".encode("latin-1"))
            raw_headers = [h for h in raw_headers if not h.lower().startswith(b"expect:")]
        body = _read_body(reader, headers, until_close=False)
        if action is Action.STALL:  # hold the connection, reply nothing, then reset
            self.proxy._count("stalled")
            assert rule is not None
            self.proxy._stopping.wait(rule.stall_seconds)
            _reset(self.client)
            return False
        if action is Action.STATUS:
            assert rule is not None
            reason, code = _ERROR_CODES[rule.status]
            error = (f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code><Message>injected by netfault"
                     f"</Message><Resource>{target}</Resource></Error>").encode()
            self._delay()
            self.proxy._count("answered")
            self._finish()
            body = b"" if method == "HEAD" else error  # a reply to HEAD has headers only: a body would be garbage after it
            self._send(self.client, f"HTTP/1.1 {rule.status} {reason}\r\nContent-Type: application/xml\r\n"
                                    f"Content-Length: {len(error)}\r\nConnection: close\r\n\r\n".encode() + body)
            return False
        status_line, resp_raw, resp_headers, up_reader = self._forward(
            b"".join([start.encode("latin-1"), b"\r\n", *raw_headers, b"\r\n", body])
        )
        status = int(status_line.split(" ", 2)[1])
        no_body = method == "HEAD" or status in (204, 304)
        framed = no_body or "content-length" in resp_headers or "chunked" in resp_headers.get("transfer-encoding", "").lower()
        resp_body = _read_body(up_reader, resp_headers, until_close=True) if not no_body else b""
        if action is Action.DROP_REPLY:  # the server has executed the request: lose its reply
            self.proxy._count("dropped")
            _reset(self.client)
            return False
        reply = b"".join([status_line.encode("latin-1"), b"\r\n", *resp_raw, b"\r\n", resp_body])
        self._delay()
        if action is Action.CUT_REPLY:
            assert rule is not None
            self.proxy._count("cut")
            self._send(self.client, reply[: rule.reply_bytes])
            _reset(self.client)
            return False
        self.proxy._count("passed")
        self._finish()
        self._send(self.client, reply)
        server_closes = "close" in resp_headers.get("connection", "").lower() or (
            status_line.startswith("HTTP/1.0") and "keep-alive" not in resp_headers.get("connection", "").lower()
        )
        if server_closes or not framed:
            self._drop_upstream()
        # the client learns from the same headers that the server closes; mirror it
        client_closes = "close" in headers.get("connection", "").lower() or version == "HTTP/1.0"
        return framed and not server_closes and not client_closes


class FaultProxy:
    """A threaded fault-injecting proxy on 127.0.0.1 in front of ``upstream``.

    Args:
        upstream: the endpoint to relay to, ``"http://127.0.0.1:PORT"``.
        rules: checked in order for every request; the first that fires decides.
        timeout: seconds any socket operation may block (client, upstream, accept).
        latency: seconds added each way to every relayed request (a 20 ms RTT is ``0.01``).
        bandwidth: bytes per second per connection, each direction (None: no cap).
        group: names the class of a request for ``Stats.in_flight`` / ``max_in_flight``
            (default: its method), so a test can count, say, data-file reads apart from listings.

    Example:
        >>> with FaultProxy("http://127.0.0.1:9", [Rule(Action.DROP_REPLY, method="PUT", times=1)]) as proxy:
        ...     proxy.url.startswith("http://127.0.0.1:")
        True
    """

    def __init__(
        self, upstream: str, rules: list[Rule] | None = None, *, timeout: float = 30.0,
        latency: float = 0.0, bandwidth: float | None = None, group: Callable[[RequestHead], str] | None = None,
    ) -> None:
        if latency < 0 or (bandwidth is not None and bandwidth <= 0):
            raise ValueError(f"`latency` must be >= 0 and `bandwidth` > 0 or None, got {latency!r}, {bandwidth!r}")
        self.latency, self.bandwidth = latency, bandwidth
        self.group: Callable[[RequestHead], str] = group or (lambda head: head.method)
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must look like http://HOST:PORT, got {upstream!r}")
        self.upstream_address = (parts.hostname, parts.port)
        self.rules: list[Rule] = list(rules or [])
        self.timeout = timeout
        self.stats = Stats()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # how often the accept loop checks for stop()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="netfault-accept", daemon=True)

    def start(self) -> FaultProxy:
        """Start accepting connections (``with FaultProxy(...)`` does this)."""
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=self.timeout)  # within one accept timeout (0.2 s)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.interrupt()
        for thread in list(self._threads):
            thread.join(timeout=self.timeout)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def add(self, rule: Rule) -> Rule:
        """Append a rule while the proxy runs; return it (its ``fired`` count is live)."""
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: relay everything from now on."""
        with self._lock:
            self.rules.clear()

    def _decide(self, head: RequestHead) -> Rule | None:
        """The rule that fires for ``head`` (None: relay it), logged and counted."""
        with self._lock:
            fired = next((rule for rule in self.rules if rule.decide(head) is not None), None)
            self.stats.requests += 1
            key = self.group(head)
            now = self.stats.in_flight[key] = self.stats.in_flight.get(key, 0) + 1
            self.stats.max_in_flight[key] = max(self.stats.max_in_flight.get(key, 0), now)
            self.stats.log.append((head.method, head.target, Action.PASS if fired is None else fired.action))
            return fired

    def _done(self, key: str) -> None:
        with self._lock:
            self.stats.in_flight[key] -= 1

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed by stop()
            client.settimeout(self.timeout)
            conn = _Connection(self, client)
            thread = threading.Thread(target=self._serve, args=(conn,), name="netfault-conn", daemon=True)
            with self._lock:
                self.stats.connections += 1
                self._connections.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: _Connection) -> None:
        try:
            conn.serve()
        finally:
            with self._lock:
                self._connections.discard(conn)
