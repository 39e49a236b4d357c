"""Lost replies to the commit write (issue 9, point 1), through the fault proxy in tests/netfault.py.

A create-only manifest write can succeed on the server while its reply is lost (a reset
connection). The client then retries the same request, and what the retry gets decides
whether ``write_checkpoint`` must recognise its own manifest. Measured on this venv
(aiohttp 3.14.5, s3fs 2026.9.0, gcsfs 2026.10), see ``test_the_client_retries_a_lost_reply``:

* **s3fs**: the PutObject (``PUT .../manifest.json`` with ``If-None-Match: *``) is retried by
  *aiohttp itself*, at once and once: ``ClientSession._request`` resends requests of
  "idempotent" methods (PUT among them) after ``ServerDisconnectedError``/``ClientOSError``.
  botocore and s3fs never see the first failure (further drops fall through to botocore's
  own retries). The retry meets the manifest the first attempt wrote: **412
  PreconditionFailed**, which s3fs maps to ``FileExistsError``. Without the fix in
  ``commit.write_checkpoint`` the save raises ``CheckpointExists`` and deletes its own data
  file under a committed manifest.
* **gcsfs**: ``pipe_file(mode="create")`` of a small object is one
  ``POST /upload/storage/v1/b/<bucket>/o?uploadType=multipart&ifGenerationMatch=0`` (the object
  name travels in the multipart body, so the rule matches the precondition, not the name).
  aiohttp does not retry a POST; gcsfs's ``retry_request`` does, after sleeping 1-2 s. Real
  GCS would answer the retry 412 (``FileExistsError``, like S3); **the emulator ignores
  ``ifGenerationMatch``** (docs/backend-notes.md) and simply overwrites the manifest with the
  same bytes, so the save succeeds even without the fix. On GCS these tests prove only that
  a lost reply, and the retry gcsfs makes, leave every committed checkpoint intact.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from netfault import Action, FaultProxy, Rule

from ckptstore import CheckpointManager, CkptStoreError

PROXY_TIMEOUT = 20.0  # seconds any proxied socket operation may block


def create_only_rule(kind: str, **kwargs: Any) -> Rule:
    """Drop the reply to the store's create-only write (the manifest commit)."""
    if kind == "s3":
        return Rule(Action.DROP_REPLY, method="PUT", target=r"/manifest\.json$", headers={"If-None-Match": "*"}, **kwargs)
    return Rule(Action.DROP_REPLY, method="POST", target=r"[?&]ifGenerationMatch=0(&|$)", **kwargs)


def through(store: Any, proxy: FaultProxy) -> dict[str, Any]:
    """``store``'s storage options with the endpoint replaced by the proxy's."""
    options = dict(store.storage_options)
    if store.kind == "s3":
        options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": proxy.url}
    else:
        options["endpoint_url"] = proxy.url
    return options


def upstream_of(store: Any) -> str:
    options = store.storage_options
    return options["client_kwargs"]["endpoint_url"] if store.kind == "s3" else options["endpoint_url"]


def small_state(step: int) -> dict[str, Any]:
    """About 3 KiB of tensors with every bit pattern mattering (random floats, negative ints)."""
    gen = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(512, generator=gen),
        "ids": torch.randint(-(2**40), 2**40, (64,), generator=gen, dtype=torch.int64),
        "half": torch.randn(128, generator=gen).to(torch.bfloat16),
        "step": step,
    }


def assert_bit_identical(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key
        else:
            assert got[key] == value, key


def assert_all_committed_intact(mgr: CheckpointManager) -> None:
    """Every committed checkpoint verifies, and restores what was saved under its step."""
    report = mgr.verify()
    assert report == dict.fromkeys(report), report
    for info in mgr.checkpoints():
        assert_bit_identical(mgr.restore(which=info.step), small_state(info.step))


@pytest.fixture
def proxy(remote_store: Any) -> Iterator[FaultProxy]:
    """A proxy between the client and moto (s3) or the GCS emulator (gcs), no rules yet."""
    with FaultProxy(upstream_of(remote_store), timeout=PROXY_TIMEOUT) as p:
        yield p


def test_the_client_retries_a_lost_reply(remote_store, proxy):
    """The premise: after a lost reply the client resends the create-only write by itself."""
    fs = type(remote_store.filesystem())(**through(remote_store, proxy), skip_instance_cache=True)
    rule = proxy.add(create_only_rule(remote_store.kind, times=1))
    path = remote_store.path("step_00000001", "manifest.json")
    if remote_store.kind == "s3":
        # the first attempt created the object, so the retry is refused: a success reads as a clash
        with pytest.raises(FileExistsError):
            fs.pipe_file(path, b"{}", mode="create")
    else:
        fs.pipe_file(path, b"{}", mode="create")  # the emulator ignores ifGenerationMatch=0
    assert (rule.fired, rule.matched, proxy.stats.dropped) == (1, 2, 1)  # dropped once, then retried
    assert remote_store.filesystem().cat_file(path) == b"{}"


def test_a_lost_commit_reply_still_commits(remote_store, proxy):
    """One save whose manifest reply is lost once: it succeeds and the checkpoint is whole.

    s3: the retry gets 412; only a writer that recognises its own manifest passes (issue 9).
    gcs: the retry overwrites (emulator); this proves the lost reply does no harm there.
    """
    rule = proxy.add(create_only_rule(remote_store.kind, times=1))
    mgr = CheckpointManager(remote_store.url, storage_options=through(remote_store, proxy))
    info = mgr.save(small_state(7), step=7)
    assert rule.fired == 1 and proxy.stats.dropped == 1, "the fault must really have happened"
    assert (info.name, info.step) == ("step_00000007", 7)
    assert mgr.checkpoints() == [info] and mgr.latest() == info
    assert mgr.verify() == {info.name: None}
    assert mgr.storage.exists(f"{info.name}/{info.files[0].path}")
    assert_bit_identical(mgr.restore(which=7), small_state(7))
    # and the same holds for a client that did not go through the proxy
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.verify() == {info.name: None}


@pytest.mark.slow
@pytest.mark.parametrize("remote_store", [pytest.param("s3", marks=pytest.mark.remote),  # gcs: 16 s more, make test-long
                                          pytest.param("gcs", marks=[pytest.mark.remote, pytest.mark.long])], indirect=True)
def test_saves_with_replies_lost_at_random(remote_store, proxy):
    """12 saves (6 on gcs, whose retries back off 1-2 s each), keep_last=3, each create-only
    reply lost with probability 0.5 (seeded).

    Every save must succeed; a save that cannot must raise a ckptstore error and leave every
    committed checkpoint intact. After each save every committed checkpoint verifies and
    restores bit-identical. s3: exercises the 412-on-retry path and retention around it.
    gcs: exercises gcsfs's delayed retries (the emulator lets each retry overwrite).
    """
    rule = proxy.add(create_only_rule(remote_store.kind, probability=0.5, seed=9))
    mgr = CheckpointManager(remote_store.url, keep_last=3, storage_options=through(remote_store, proxy))
    failures: list[tuple[int, CkptStoreError]] = []
    saves = 12 if remote_store.kind == "s3" else 6
    for step in range(saves):
        try:
            info = mgr.save(small_state(step), step=step)
        except CkptStoreError as err:  # anything else (a raw botocore/aiohttp error) fails the test
            failures.append((step, err))
        else:
            assert info.step == step
        assert_all_committed_intact(mgr)
    assert proxy.stats.dropped >= 3, f"the seed must drop some replies ({proxy.stats.dropped} dropped)"
    assert rule.fired == proxy.stats.dropped
    assert not failures, f"saves failed after lost replies: {failures}"
    assert [i.step for i in mgr.checkpoints()] == list(range(saves - 3, saves))


# ---------------------------------------------------------------- the proxy itself


class _Handler(http.server.BaseHTTPRequestHandler):
    """A keep-alive HTTP/1.1 upstream: ranged GET, HEAD, a chunked reply, PUT (any framing)."""

    protocol_version = "HTTP/1.1"
    objects: dict[str, bytes]

    def log_message(self, format: str, *args: Any) -> None:  # silence the access log
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        data = self.objects.get(self.path)
        if data is None:
            return self._reply(404, b"no such object")
        if rng := self.headers.get("Range"):
            first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))  # HTTP ranges are inclusive
            return self._reply(206, data[first : last + 1], {"Content-Range": f"bytes {first}-{last}/{len(data)}"})
        self._reply(200, data)

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self.objects[self.path] = body
        self._reply(200, b"stored %d" % len(body))


@pytest.fixture
def http_upstream() -> Iterator[tuple[str, dict[str, bytes]]]:
    objects = {"/blob": bytes(range(256)) * 16}
    handler = type("Handler", (_Handler,), {"objects": objects})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", objects
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_proxy_relays_a_keep_alive_sequence(http_upstream):
    url, objects = http_upstream
    blob = objects["/blob"]
    with FaultProxy(url, timeout=5) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=5)
        conn.request("GET", "/blob", headers={"Range": "bytes=100-1099"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (206, blob[100:1100])
        conn.request("HEAD", "/blob")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (200, str(len(blob)), b"")
        conn.request("GET", "/chunked")
        assert conn.getresponse().read() == b"hello chunked world"
        conn.request("PUT", "/a", body=b"x" * 3000, headers={"Expect": "100-continue"})
        assert conn.getresponse().read() == b"stored 3000"
        conn.request("PUT", "/b", body=iter([b"ab", b"cde"]), encode_chunked=True)
        assert conn.getresponse().read() == b"stored 5"
        conn.request("GET", "/missing")
        assert conn.getresponse().status == 404
        conn.close()
        assert (objects["/a"], objects["/b"]) == (b"x" * 3000, b"abcde")
        assert (proxy.stats.connections, proxy.stats.requests, proxy.stats.passed) == (1, 6, 6)
        assert proxy.stats.errors == 0


def test_proxy_drops_a_reply_once_and_refuses(http_upstream):
    url, objects = http_upstream
    drop = Rule(Action.DROP_REPLY, method="PUT", target=r"^/a$", times=1)
    refuse = Rule(Action.REFUSE, headers={"X-Refuse": None})
    with FaultProxy(url, [drop, refuse], timeout=5) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("PUT", "/a", body=b"first")
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            conn.getresponse()
        assert objects["/a"] == b"first"  # executed upstream, reply lost
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("PUT", "/a", body=b"second")  # the budget is spent: relayed
        assert conn.getresponse().read() == b"stored 6"
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):  # reset while sending, or after
            conn.request("PUT", "/c", body=b"never", headers={"X-Refuse": "1"})
            conn.getresponse()
        conn.close()
        assert objects["/a"] == b"second" and "/c" not in objects  # refused before forwarding
        assert (drop.matched, drop.fired, refuse.fired) == (2, 1, 1)
        assert (proxy.stats.dropped, proxy.stats.refused, proxy.stats.passed) == (1, 1, 1)


def test_proxy_closes_everything_on_exit(http_upstream):
    url, _ = http_upstream
    proxy = FaultProxy(url, timeout=5)
    with proxy:
        idle = socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=5)
        for _ in range(100):  # wait until the proxy has accepted it
            if proxy.stats.connections:
                break
            threading.Event().wait(0.01)
    assert idle.recv(1) == b""  # the proxy closed its end on exit, not after its timeout
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=1)
    assert not any(t.name.startswith("netfault") for t in threading.enumerate())
