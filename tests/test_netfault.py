"""The fault and link proxy (tests/netfault.py) does what it says, against moto over real sockets,
and a save and a restore through it survive injected error statuses on S3 and GCS.

Issue 14, point 1. Timings here are lower bounds only (a link can be slower, never faster),
so they hold on a loaded machine.
"""

from __future__ import annotations

import http.client
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from ckptstore import CheckpointManager
from netfault import Action, FaultProxy, Rule
from test_lost_replies import assert_bit_identical, small_state, through, upstream_of


def request(url: str, method: str, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One plain HTTP request (unsigned: objects are written public-read so they can be read back)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"x-amz-acl": "public-read"} if method == "PUT" else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"/netfault-{uuid.uuid4().hex[:8]}"
    assert request(s3_endpoint, "PUT", name)[0] == 200
    return name


def test_an_injected_status_is_answered_without_reaching_the_server(s3_endpoint, bucket):
    with FaultProxy(s3_endpoint, [Rule(Action.STATUS, method="PUT", status=503, times=1)]) as proxy:
        status, body = request(proxy.url, "PUT", f"{bucket}/k", b"first")
        assert status == 503 and b"<Code>SlowDown</Code>" in body
        assert request(proxy.url, "GET", f"{bucket}/k")[0] == 404  # the server never saw it
        assert request(proxy.url, "PUT", f"{bucket}/k", b"second")[0] == 200
        assert request(proxy.url, "GET", f"{bucket}/k") == (200, b"second")
        assert proxy.stats.answered == 1 and proxy.stats.passed == 3


@pytest.mark.parametrize("status, code", [(500, b"InternalError"), (502, b"BadGateway"), (429, b"TooManyRequests")])
def test_every_injectable_status_carries_its_s3_error_code(s3_endpoint, bucket, status, code):
    with FaultProxy(s3_endpoint, [Rule(Action.STATUS, status=status)]) as proxy:
        got, body = request(proxy.url, "GET", f"{bucket}/k")
    assert got == status and b"<Code>" + code + b"</Code>" in body


def test_a_status_injected_for_a_head_has_no_body(s3_endpoint, bucket):
    """A reply to HEAD is headers only; bytes after it are garbage to the client ("Data after
    Connection: close"), which turned retryable 5xx into parse errors in the long storm."""
    with FaultProxy(s3_endpoint, [Rule(Action.STATUS, status=503)]) as proxy:
        host, port = urlsplit(proxy.url).hostname, urlsplit(proxy.url).port
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(f"HEAD {bucket}/k HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 503 ") and reply.endswith(b"\r\n\r\n"), reply


def test_latency_is_added_each_way(s3_endpoint, bucket):
    with FaultProxy(s3_endpoint, latency=0.15) as proxy:
        started = time.monotonic()
        assert request(proxy.url, "GET", f"{bucket}/missing")[0] == 404
        assert time.monotonic() - started >= 0.3


def test_bandwidth_is_capped_per_connection_and_the_bytes_arrive_whole(s3_endpoint, bucket):
    payload = bytes(range(256)) * 2048  # 512 KiB
    assert request(s3_endpoint, "PUT", f"{bucket}/big", payload)[0] == 200
    with FaultProxy(s3_endpoint, bandwidth=1024 * 1024) as proxy:
        started = time.monotonic()
        assert request(proxy.url, "GET", f"{bucket}/big") == (200, payload)
        assert time.monotonic() - started >= 0.45  # 512 KiB at 1 MiB/s
        started = time.monotonic()
        assert request(proxy.url, "PUT", f"{bucket}/up", payload)[0] == 200  # uploads are paced too
        assert time.monotonic() - started >= 0.45
    assert request(s3_endpoint, "GET", f"{bucket}/up") == (200, payload)


def test_a_stalled_request_gets_no_reply_and_the_proxy_still_stops_at_once(s3_endpoint, bucket):
    proxy = FaultProxy(s3_endpoint, [Rule(Action.STALL, method="GET", stall_seconds=60)]).start()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        request(proxy.url, "GET", f"{bucket}/k", timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    stopping = time.monotonic()
    proxy.stop()
    assert time.monotonic() - stopping < 5 and proxy.stats.stalled == 1


def test_a_cut_reply_resets_after_its_first_bytes(s3_endpoint, bucket):
    payload = b"x" * 100_000
    assert request(s3_endpoint, "PUT", f"{bucket}/big", payload)[0] == 200
    with FaultProxy(s3_endpoint, [Rule(Action.CUT_REPLY, method="GET", reply_bytes=2000, times=1)]) as proxy:
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            request(proxy.url, "GET", f"{bucket}/big")
        assert request(proxy.url, "GET", f"{bucket}/big") == (200, payload)
        assert proxy.stats.cut == 1


def test_a_cut_request_reaches_the_server_truncated_and_stores_nothing(s3_endpoint, bucket):
    payload = b"y" * 200_000
    with FaultProxy(s3_endpoint, [Rule(Action.CUT_REQUEST, method="PUT", request_bytes=1000, times=1)]) as proxy:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            request(proxy.url, "PUT", f"{bucket}/up", payload)
        assert proxy.stats.cut_requests == 1
        assert request(proxy.url, "GET", f"{bucket}/up")[0] == 404  # nothing was stored
        assert request(proxy.url, "PUT", f"{bucket}/up", payload)[0] == 200  # the next one passes
    assert request(s3_endpoint, "GET", f"{bucket}/up") == (200, payload)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="`status`"):
        Rule(Action.STATUS, status=418)
    with pytest.raises(ValueError, match="`latency`"):
        FaultProxy("http://127.0.0.1:9", latency=-1)
    with pytest.raises(ValueError, match="`bandwidth`"):
        FaultProxy("http://127.0.0.1:9", bandwidth=0)


def error_rules(kind: str) -> list[Rule]:
    """Error statuses on the first data writes and reads: the client library must retry them."""
    write = ("PUT" if kind == "s3" else "POST")
    return [
        Rule(Action.STATUS, method=write, target=r"state-", status=503, times=2),
        Rule(Action.STATUS, method=write, target=r"state-", status=500, times=1),
        Rule(Action.STATUS, method="GET", target=r"state-", status=503, times=1),
        Rule(Action.STATUS, method="GET", target=r"state-", status=429, times=1),
    ]


@pytest.mark.parametrize("remote_store", [pytest.param("s3", marks=pytest.mark.remote),  # gcs: 10 s more, make test-long
                                          pytest.param("gcs", marks=[pytest.mark.remote, pytest.mark.long])], indirect=True)
def test_a_save_and_a_restore_ride_out_error_statuses(remote_store, caplog: Any):
    """503 SlowDown, 500 and 429 on the data file's upload and download: retried by the client
    libraries (botocore, gcsfs), so the save commits and the restore is bit-identical."""
    with FaultProxy(upstream_of(remote_store), error_rules(remote_store.kind), timeout=20.0) as proxy:
        mgr = CheckpointManager(remote_store.url, storage_options=through(remote_store, proxy))
        mgr.save(small_state(1), step=1)
        assert_bit_identical(dict(mgr.restore()), small_state(1))
        assert [rule.fired for rule in proxy.rules] == [rule.times for rule in proxy.rules]
        assert proxy.stats.answered == 5
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.verify() == {"step_00000001": None}
    assert torch.equal(direct.restore()["w"], small_state(1)["w"])
