"""Stores: where checkpoints go. One ``Store`` entry per backend; every implementation runs on each.

``setup(args)`` runs once in the parent (start a server, make a bucket) and returns a ``Running``
store: the URL root and fsspec ``storage_options`` the children get, a ``counter`` endpoint if
the server is wrapped by ``common.counting`` (then every cell on it reports the requests and
body bytes the server saw), and a teardown. Two flags carry the remaining differences: ``local``
(a path on this machine: mmap applies, saves end with an fsync, reads start cold, bytes moved
come from ``/proc/self/io``) and ``shared`` (a file one process writes is visible to the next;
memory:// is not, so each of its load children writes its own input).

Adding a backend is one entry and its set-up function; ``gcs`` is the example.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.servers import gcs_fs, gcs_options, s3_fs, s3_options, start_gcs_emulator, start_moto
from suite.context import Ctx

BUCKET = "ckptstore-suite"
OUT = Path(__file__).resolve().parents[1] / "out"


@dataclasses.dataclass
class Running:
    """A store after its set-up: what the children get, and how the parent tears it down."""

    root: str  # URL (or local path) under which every cell gets its own folder
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    counter: str | None = None  # endpoint answering /__bench__/reset|stats: server-side counts
    teardown: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True)
class Store:
    label: str
    setup: Callable[[argparse.Namespace], Running]
    about: str  # what RESULTS.md says about this store
    local: bool = False
    shared: bool = True
    client: str = ""  # the fsspec implementation's module: imported once by the fork server
    sizes_help: str | None = None  # None: sized by --sizes-mib; else its own --<name>-size-mib flag
    default: bool = True  # in the default --stores

    def url(self, running: Running, relative: str) -> str:
        return os.path.join(running.root, relative) if self.local else f"{running.root.rstrip('/')}/{relative}"


def _local(args: argparse.Namespace) -> Running:
    OUT.mkdir(exist_ok=True)
    root = args.workdir or tempfile.mkdtemp(prefix="suite-work-", dir=OUT)
    os.makedirs(root, exist_ok=True)
    return Running(root, teardown=(lambda: None) if args.workdir else (lambda: shutil.rmtree(root, ignore_errors=True)))


def _memory(args: argparse.Namespace) -> Running:
    return Running("memory://suite")


def _s3(args: argparse.Namespace) -> Running:
    server, endpoint, _ = start_moto()
    fs = s3_fs(endpoint)
    fs.mkdir(BUCKET)

    def teardown() -> None:
        with contextlib.suppress(Exception):
            fs.rm(BUCKET, recursive=True)
        server.stop()

    return Running(f"s3://{BUCKET}", s3_options(endpoint), counter=endpoint, teardown=teardown)


LINK_RTT_S = 0.020  # a bucket in the same region, seen from a VM
LINK_MIB_S_PER_CONNECTION = 12.5  # 100 Mbit/s per connection: well under moto's own ~60 MiB/s in all


def _s3_link(args: argparse.Namespace) -> Running:
    """moto behind the fault proxy (tests/netfault.py) set to a region-like link."""
    from common.link import FaultProxy

    server, endpoint, _ = start_moto()
    fs = s3_fs(endpoint)
    fs.mkdir(BUCKET)
    proxy = FaultProxy(endpoint, latency=LINK_RTT_S / 2, bandwidth=LINK_MIB_S_PER_CONNECTION * 2**20, timeout=120.0).start()

    def teardown() -> None:
        proxy.stop()
        with contextlib.suppress(Exception):
            fs.rm(BUCKET, recursive=True)
        server.stop()

    return Running(f"s3://{BUCKET}", s3_options(proxy.url), counter=endpoint, teardown=teardown)


def _gcs(args: argparse.Namespace) -> Running:
    server, endpoint, _ = start_gcs_emulator()
    gcs_fs(endpoint).mkdir(BUCKET)
    return Running(f"gs://{BUCKET}", gcs_options(endpoint), counter=endpoint, teardown=server.stop)


STORES: dict[str, Store] = {
    "local": Store(
        "local disk (+fsync)", _local, local=True,
        about="**local disk**: every save, stock or not, ends with an fsync of every file it wrote and the folders "
        "(inside the timing; ckptstore and DCP fsync themselves, so theirs is a no-op), and every local read starts "
        "cold (`posix_fadvise(DONTNEED)` on the input files only, so other processes' caches stay); bytes moved = "
        "`/proc/self/io` read/write bytes.",
    ),
    "memory": Store(
        "memory://", _memory, shared=False,
        about="**memory://** lives in one process, so each load child writes its own input first (untimed; the "
        "stored bytes are in the baseline).",
    ),
    "s3": Store(
        "S3 (moto)", _s3, client="s3fs",
        sizes_help="state sizes for S3 (moto serves ~60 MiB/s and reads the whole object per ranged GET)",
        about="**S3** is moto (`ThreadedMotoServer` on 127.0.0.1 in the parent process, so its memory is not "
        "counted); bytes moved and requests are counted on the server by a WSGI middleware (request bodies for "
        "saves, response bodies for loads). moto serves ~60 MiB/s and reads the whole object for every ranged GET, "
        "so S3 wall times measure moto more than the client: read the S3 rows as ratios to the raw put/cat of the "
        "same bytes and, for partial loads, by bytes moved and requests.",
    ),
    "s3-link": Store(
        "S3 (moto) behind a 20 ms, 12.5 MiB/s-per-connection link", _s3_link, client="s3fs", default=False,
        sizes_help="state sizes for S3 behind the link",
        about=f"**S3 behind a link** is the same moto reached through the fault proxy of the tests "
        f"(`tests/netfault.py`, in the parent process) set to a region-like link: {LINK_RTT_S * 1000:.0f} ms added "
        f"per request (half each way) and {LINK_MIB_S_PER_CONNECTION} MiB/s per connection in each direction. The "
        "cap is lower than a real region's because moto itself serves ~60 MiB/s in all: a 50 MiB/s cap would "
        "measure moto, not the link. Here what counts is how many transfers a client keeps going at once; the "
        "link's limit for a client with n connections is bytes ÷ (n × the cap).",
    ),
    "gcs": Store(
        "GCS (emulator)", _gcs, client="gcsfs",
        sizes_help="state sizes for GCS (the emulator's resumable uploads slow down with the square of the size)",
        about="**GCS** is `gcp-storage-emulator` (single-threaded, objects in memory, on 127.0.0.1 in the parent "
        "process) reached through gcsfs; bytes moved and requests are counted on the server by a wrapper around "
        "its request handler (`Content-Length` of request and response bodies). A resumable upload re-copies "
        "everything received so far on every chunk (gcsfs streams 5 MiB chunks), so streamed saves slow down with "
        "the square of the size, and it parses a simple (multipart) upload slowly, which gcsfs's `pipe` uses below "
        "50 MiB, so there the raw-transport save is no lower bound: read GCS wall times as the emulator's, and the "
        "GCS rows by bytes moved and requests. It has no `moveTo` either; the wrapper answers that with 400, so "
        "gcsfs's `mv` (DCP renames its `.metadata`) copies and deletes at once instead of retrying for ~30 s.",
    ),
}


def sync_tree(path: str) -> None:
    """fsync every file under ``path`` (or ``path`` itself) and the folders: what makes a local save durable."""
    if os.path.isfile(path):
        files, dirs = [path], [os.path.dirname(path)]
    else:
        files, dirs = [], [path]
        for d, sub, names in os.walk(path):
            files.extend(os.path.join(d, n) for n in names)
            dirs.extend(os.path.join(d, s) for s in sub)
    for p in files + dirs:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop_file_cache(path: str) -> None:
    """Evict only these files' pages from the page cache (other processes' caches stay)."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def output_bytes(ctx: Ctx) -> int:
    """Bytes stored under the cell's folder."""
    if ctx.local:
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ctx.url) for n in ns)
    ctx.fs.invalidate_cache()
    try:
        return sum(ctx.fs.du(ctx.url, total=False).values())
    except FileNotFoundError:
        return 0


def remove(ctx: Ctx) -> None:
    """Delete the cell's folder (frees the disk, moto's and the emulator's memory)."""
    if ctx.local:
        shutil.rmtree(ctx.url, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            ctx.fs.rm(ctx.url, recursive=True)
