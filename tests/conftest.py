"""One suite, every store: fixtures for local paths, file://, memory://, S3 (moto) and GCS (emulator).

Servers bind to 127.0.0.1 on free ports, start once per session only when a test needs
them, and stop at the end. Bytes cross a real HTTP socket: moto's ThreadedMotoServer for S3
(s3fs talks to it as to AWS), gcp-storage-emulator for GCS (gcsfs via STORAGE_EMULATOR_HOST).
Each test gets a fresh bucket; moto is reset after each S3 test to free its memory.
"""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest

LOCAL_KINDS = ["local", "file", "memory"]
REMOTE_KINDS = ["s3", "gcs"]


@dataclass(frozen=True)
class Store:
    """A fresh, empty root on one backend, and the options fsspec needs to reach it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "local"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    server = emulator.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # else gcsfs probes gRPC for 60 s per bucket
        yield endpoint
    server.stop()


def _make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    if kind == "local":
        yield Store(str(tmp_path / "root"), {}, kind)
    elif kind == "file":
        yield Store(f"file://{tmp_path / 'root'}", {}, kind)
    elif kind == "memory":
        url = f"memory://{bucket}/root"
        yield Store(url, {}, kind)
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{bucket}"):
            fs.rm(f"/{bucket}", recursive=True)
    elif kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        fsspec.filesystem("s3", **options).mkdir(bucket)
        yield Store(f"s3://{bucket}/root", options, kind)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    elif kind == "gcs":
        endpoint = request.getfixturevalue("gcs_endpoint")
        options = {"endpoint_url": endpoint, "token": "anon"}
        fsspec.filesystem("gs", **options).mkdir(bucket)
        yield Store(f"gs://{bucket}/root", options, kind)
    else:
        raise ValueError(kind)


@pytest.fixture(params=LOCAL_KINDS + REMOTE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """Every backend, in process."""
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture(params=["local", "file", *REMOTE_KINDS])
def process_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """Every backend that another process can reach (memory:// lives in one process)."""
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture(params=REMOTE_KINDS)
def remote_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """The object stores only."""
    yield from _make_store(request.param, request, tmp_path)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
