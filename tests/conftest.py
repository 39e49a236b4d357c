"""One suite, every store: fixtures for local paths, file://, memory://, S3 (moto) and GCS (emulator).

Fixtures
--------
``s3_endpoint`` (session)   moto's ThreadedMotoServer on 127.0.0.1:<free port>; yields "http://127.0.0.1:PORT".
                            AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing, AWS_DEFAULT_REGION=us-east-1
                            while it runs (restored afterwards).
``gcs_endpoint`` (session)  gcp-storage-emulator, in process, in-memory storage, 127.0.0.1:<free port>;
                            STORAGE_EMULATOR_HOST and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false while it runs.
``store``                   ids local, file, memory, s3, gcs: a ``Store`` with a fresh, empty root.
``process_store``           local, file, s3, gcs: stores that a child process can reach too.
``remote_store``            s3, gcs only.

Servers start once per session, and only when a test asks for them. Bytes cross a real HTTP
socket. Before each S3 test moto is reset (POST /moto-api/reset), before each GCS test the
emulator is wiped (GET /wipe); each test also gets a fresh bucket name, and the listing caches
of every cached s3fs/gcsfs instance are invalidated so a reset server never shows stale entries.
The local roots (``tmp_path/"root"``) do not exist yet: code under test must create them.

Markers: ``long`` (minutes; skipped unless ``--long``: ``make test-long``), ``slow`` (deselect
with ``-m "not slow"``) and ``remote`` (every s3/gcs param carries it, so ``-m "not remote"``
runs without servers). See docs/backend-notes.md for the backend quirks.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest

LOCAL_KINDS = ["local", "file", "memory"]
REMOTE_KINDS = ["s3", "gcs"]
ALL_KINDS = LOCAL_KINDS + REMOTE_KINDS

S3_KEY = S3_SECRET = "testing"
S3_REGION = "us-east-1"
_GCSFS_FLAG = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"  # read by gcsfs at *import* time
_AWS_VARS_TO_HIDE = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                     "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class Store:
    """A fresh, empty root on one backend, and the options fsspec needs to reach it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    kind: str = "local"

    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The (cached) fsspec filesystem for this store."""
        return fsspec.core.url_to_fs(self.url, **self.storage_options)[0]

    def path(self, *parts: str) -> str:
        """fs-native path (no protocol) of the root, or of ``parts`` below it."""
        root = fsspec.core.url_to_fs(self.url, **self.storage_options)[1].rstrip("/")
        return "/".join([root, *parts])

    def join(self, *parts: str) -> str:
        """URL of ``parts`` below the root."""
        return "/".join([self.url.rstrip("/"), *parts])


# ---------------------------------------------------------------- helpers


def _http(method: str, url: str, data: bytes | None = None) -> bytes:
    # text/plain: moto's /moto-api/reset-auth reads the raw body, a form content type would eat it
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def _bypass_proxies(mp: pytest.MonkeyPatch) -> None:
    for var in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(var, "")
        mp.setenv(var, ",".join(x for x in (current, "127.0.0.1", "localhost") if x))


def _fs_classes(protocol: str) -> list[type]:
    """The imported fsspec classes for ``protocol``, with their subclasses (each has its own instance cache)."""
    module = {"s3": "s3fs", "gs": "gcsfs"}[protocol]
    if module not in sys.modules:
        return []
    base = sys.modules["s3fs"].S3FileSystem if protocol == "s3" else sys.modules["gcsfs"].core.GCSFileSystem
    seen, todo = [], [base]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def invalidate_listing_caches(protocol: str) -> None:
    """Drop the directory-listing cache of every cached instance (s3fs/gcsfs cache listings forever)."""
    for cls in _fs_classes(protocol):
        for inst in list(getattr(cls, "_cache", {}).values()):
            inst.invalidate_cache()


def _use_core_gcsfs(mp: pytest.MonkeyPatch) -> None:
    """Make "gs://" resolve to the plain GCSFileSystem.

    With GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT unset/true at import, ``gcsfs.GCSFileSystem`` is the
    ExtendedGcsFileSystem, which asks the Storage Control gRPC API for each bucket's type and, against
    the emulator, waits 60 s per bucket before falling back. pytest_configure sets the flag early; this
    covers the case where something imported gcsfs before that.
    """
    gcsfs = pytest.importorskip("gcsfs")
    core = gcsfs.core.GCSFileSystem
    if gcsfs.GCSFileSystem is core:
        return
    warnings.warn("gcsfs was imported with its experimental zonal-bucket support on; using gcsfs.core.GCSFileSystem "
                  "for the emulator", stacklevel=2)
    mp.setattr(gcsfs, "GCSFileSystem", core)
    for proto in ("gs", "gcs"):
        mp.setitem(fsspec.registry._registry, proto, core)  # type: ignore[attr-defined]


def _quiet_disconnects(httpd: Any) -> None:
    """The emulator prints a traceback whenever gcsfs drops a connection early; keep other errors."""
    original = httpd.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        original(request, client_address)

    httpd.handle_error = handle_error


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    werkzeug = logging.getLogger("werkzeug")
    old_level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one access-log line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", S3_REGION)
        for var in _AWS_VARS_TO_HIDE:
            mp.delenv(var, raising=False)
        _bypass_proxies(mp)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            invalidate_listing_caches("s3")
            werkzeug.setLevel(old_level)


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_GCSFS_FLAG, "false")
        _bypass_proxies(mp)
        _use_core_gcsfs(mp)
        # create_server(host, port, in_memory=...) -> Server; start() runs an http.server in a thread.
        # port=0 picks a free port; the bound port is only reachable through the private _api._httpd.
        server = emulator.create_server("127.0.0.1", 0, in_memory=True)
        server.start()
        try:
            httpd = server._api._httpd
            _quiet_disconnects(httpd)
            endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
            mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
            yield endpoint
        finally:
            server.stop()
            invalidate_listing_caches("gs")


# ---------------------------------------------------------------- stores


def _memory_forget(prefix: str) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    def inside(p: str) -> bool:
        return p == prefix or p.startswith(prefix + "/")

    for key in [k for k in MemoryFileSystem.store if inside(k)]:
        MemoryFileSystem.store.pop(key, None)
    MemoryFileSystem.pseudo_dirs[:] = [d for d in MemoryFileSystem.pseudo_dirs if not inside(d)]


def _make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    if kind == "local":
        yield Store(str(tmp_path / "root"), {}, kind)
    elif kind == "file":
        yield Store(f"file://{tmp_path / 'root'}", {}, kind)
    elif kind == "memory":
        try:
            yield Store(f"memory://{bucket}/root", {}, kind)
        finally:
            _memory_forget(f"/{bucket}")
    elif kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        _http("POST", f"{endpoint}/moto-api/reset")
        invalidate_listing_caches("s3")
        # no client_kwargs.region_name: s3fs would send it as LocationConstraint on mkdir, and
        # CreateBucket rejects "us-east-1" there (InvalidLocationConstraint -> OSError EINVAL)
        options = {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": endpoint}}
        fsspec.filesystem("s3", **options).mkdir(bucket)
        try:
            yield Store(f"s3://{bucket}/root", options, kind)
        finally:
            _http("POST", f"{endpoint}/moto-api/reset")  # frees moto's memory now
            invalidate_listing_caches("s3")
    elif kind == "gcs":
        endpoint = request.getfixturevalue("gcs_endpoint")
        _http("GET", f"{endpoint}/wipe")
        invalidate_listing_caches("gs")
        options = {"endpoint_url": endpoint, "token": "anon"}
        fsspec.filesystem("gs", **options).mkdir(bucket)
        try:
            yield Store(f"gs://{bucket}/root", options, kind)
        finally:
            _http("GET", f"{endpoint}/wipe")
            invalidate_listing_caches("gs")
    else:
        raise ValueError(f"unknown store kind {kind!r}")


def _params(kinds: list[str]) -> list[Any]:
    return [pytest.param(k, id=k, marks=[pytest.mark.remote] if k in REMOTE_KINDS else []) for k in kinds]


@pytest.fixture(params=_params(ALL_KINDS))
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """Every backend, in process."""
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture(params=_params(["local", "file", *REMOTE_KINDS]))
def process_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """Every backend that another process can reach (memory:// lives in one process)."""
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture(params=_params(REMOTE_KINDS))
def remote_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """The object stores only."""
    yield from _make_store(request.param, request, tmp_path)


# ---------------------------------------------------------------- configuration

_saved_flag: list[str | None] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="also run the minutes-long trials (marker: long)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="a long trial: run with --long (make test-long)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "long: minutes-long trials, run only with --long (make test-long)")
    config.addinivalue_line("markers", "remote: runs against the moto or GCS emulator server; deselect with -m 'not remote'")
    # gcsfs reads the flag when it is first imported, which can happen long before gcs_endpoint
    # runs (at collection, or in a child process), so it is set for the whole session.
    _saved_flag.append(os.environ.get(_GCSFS_FLAG))
    os.environ[_GCSFS_FLAG] = "false"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _saved_flag:
        old = _saved_flag.pop()
        if old is None:
            os.environ.pop(_GCSFS_FLAG, None)
        else:
            os.environ[_GCSFS_FLAG] = old


@pytest.fixture
def storage_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every ``FsspecStorage.read`` the test makes, in order (a spy: the reads happen)."""
    from ckptstore.storage import FsspecStorage

    sizes: list[int] = []
    real_read = FsspecStorage.read

    def counted(self: FsspecStorage, path: str, start: int | None = None, end: int | None = None) -> bytes:
        data = real_read(self, path, start, end)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(FsspecStorage, "read", counted)
    return sizes
