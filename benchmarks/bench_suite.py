#!/usr/bin/env python
"""Benchmark suite: formats x stores x sizes x operations, ckptstore beside the stock peers and the limits.

One invocation measures, interleaved and each in a fresh child process:

* implementations (``IMPLEMENTATIONS``): stock ``torch.save``/``torch.load`` (and ``mmap=True``),
  stock ``safetensors``, Lightning's ``_atomic_save``, ``torch.distributed.checkpoint``
  (single process), ckptstore (both formats; ``restore`` and in-place ``load_partial``),
  and the limits: the raw transport of the same bytes and a memory copy of them;
* stores (``STORES``): local disk (every save ends with an fsync of what it wrote),
  ``memory://``, S3 on a moto server in this process;
* operations (``OPERATIONS``): save, full load into a pre-built model, 10% partial load.

Adding a store (GCS) or an operation (async-save stall) is one entry in a registry: see
``STORES`` / ``OPERATIONS`` and ``benchmarks/README.md``.

Each child imports everything, runs the same code path once on a tiny state (one-time costs:
imports, the S3 client, fsspec instances), builds what the operation needs (the state, or a
zero-filled model), resets the kernel's ``VmHWM`` and times the call. ``peak extra`` = VmHWM
(max with a 5 ms ``VmRSS`` sampler) minus the RSS just before the call. On S3 a WSGI
middleware around moto counts requests and body bytes on the server; on local disk
``/proc/self/io`` counts the bytes the process read from / wrote to the block layer.

Run ``python benchmarks/bench_suite.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import io
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 2**20
SECTION = "## Suite: formats x stores"
BUCKET = "ckptstore-suite"
CONTROL = "/__suite__/"
LAYERS = 24


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =======================================================================================
# The synthetic state (same shapes as bench_save_memory.py: GPT-like float32)
# =======================================================================================
def state_shapes(size_bytes: int, layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Shapes of a GPT-like float32 state of about ``size_bytes``: ``layers`` blocks + an embedding."""
    params = size_bytes // 4
    d = max(64, round((0.85 * params / (12 * layers)) ** 0.5 / 64) * 64)
    while d > 64 and params - layers * (12 * d * d + 13 * d) - 2 * d < d:
        d -= 64
    vocab = max(1, (params - layers * (12 * d * d + 13 * d) - 2 * d) // d)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "ln1.weight": (d,), p + "ln1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
            p + "ln2.weight": (d,), p + "ln2.bias": (d,),
            p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
            p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def selected_keys(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The 10% partial load: every 8th block (0, 8, 16 of 24) and the final norm (~10.6% of the bytes)."""
    out = []
    for k in shapes:
        m = re.match(r"layers\.(\d+)\.", k)
        if (m and int(m.group(1)) % 8 == 0) or k.startswith("ln_f."):
            out.append(k)
    return out


def build_state(size_bytes: int, layers: int = LAYERS) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in state_shapes(size_bytes, layers).items():
        t = torch.empty(shape, dtype=torch.float32)
        t.uniform_(-0.02, 0.02, generator=gen)
        state[name] = t
    return state


def build_model(shapes: dict[str, tuple[int, ...]]) -> Any:
    """A module whose state_dict has exactly these keys and shapes, zero-filled (pages touched)."""
    import torch

    root = torch.nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        t = torch.empty(shape, dtype=torch.float32)
        t.zero_()
        mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def nbytes(shapes: dict[str, tuple[int, ...]], keys: list[str] | None = None) -> int:
    total = 0
    for k in keys if keys is not None else shapes:
        n = 4
        for s in shapes[k]:
            n *= s
        total += n
    return total


def tensor_sums(tensors: dict[str, Any]) -> dict[str, float]:
    import torch

    return {k: float(t.detach().sum(dtype=torch.float64)) for k, t in tensors.items()}


# =======================================================================================
# Context handed to every implementation function
# =======================================================================================
@dataclasses.dataclass
class Ctx:
    """What one measured call sees. ``url`` is this cell's folder (its input for reads, its output for saves)."""

    store: str
    url: str
    storage_options: dict[str, Any]
    local: bool
    fs: Any
    state: dict[str, Any] | None = None
    model: Any = None  # load: the pre-built model; partial: the 10% target
    keys: list[str] = dataclasses.field(default_factory=list)  # the target's keys
    data: Any = None  # limits: prepared bytes / tensors
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.url, name) if self.local else f"{self.url.rstrip('/')}/{name}"

    @property
    def so(self) -> dict[str, Any] | None:
        return self.storage_options or None


# =======================================================================================
# Stores
# =======================================================================================
@dataclasses.dataclass(frozen=True)
class Store:
    """A place checkpoints go. ``setup`` runs once in the parent and returns (info, teardown);
    ``url_for(info, relative)`` and ``storage_options(info)`` are what children get."""

    label: str
    setup: Callable[[argparse.Namespace], tuple[dict[str, Any], Callable[[], None]]]
    url_for: Callable[[dict[str, Any], str], str]
    storage_options: Callable[[dict[str, Any]], dict[str, Any]]
    local: bool = False  # URLs are local paths: mmap applies; saves end with an fsync; reads start cold
    shared: bool = True  # a file written by one process is visible to another (memory:// is not)


def _local_setup(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], None]]:
    (HERE / "out").mkdir(exist_ok=True)
    root = args.workdir or tempfile.mkdtemp(prefix="suite-work-", dir=HERE / "out")
    os.makedirs(root, exist_ok=True)
    return {"root": root}, (lambda: None) if args.workdir else (lambda: shutil.rmtree(root, ignore_errors=True))


def _memory_setup(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], None]]:
    return {}, lambda: None


def _s3_setup(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[], None]]:
    server, endpoint = start_moto()
    info = {"endpoint": endpoint, "counter": endpoint + CONTROL}
    fs = s3_fs(endpoint)
    fs.mkdir(BUCKET)
    log(f"moto S3 server at {endpoint}, bucket {BUCKET}")

    def teardown() -> None:
        with contextlib.suppress(Exception):
            fs.rm(BUCKET, recursive=True)
        server.stop()

    return info, teardown


STORES: dict[str, Store] = {
    "local": Store(
        "local disk (+fsync)", _local_setup,
        url_for=lambda info, rel: os.path.join(info["root"], rel),
        storage_options=lambda info: {}, local=True,
    ),
    "memory": Store(
        "memory://", _memory_setup,
        url_for=lambda info, rel: f"memory://suite/{rel}",
        storage_options=lambda info: {}, shared=False,
    ),
    "s3": Store(
        "S3 (moto)", _s3_setup,
        url_for=lambda info, rel: f"s3://{BUCKET}/{rel}",
        storage_options=lambda info: {"client_kwargs": {"endpoint_url": info["endpoint"]},
                                      "key": "testing", "secret": "testing"},
    ),
    # A new store is one entry, e.g. GCS on the emulator the tests use:
    # "gcs": Store("GCS (emulator)", _gcs_setup, url_for=lambda info, rel: f"gs://bench/{rel}",
    #              storage_options=lambda info: {"endpoint_url": info["endpoint"], "token": "anon"}),
}


def sync_tree(path: str) -> None:
    """fsync every file under ``path`` (or ``path`` itself) and the folders: what makes a save durable."""
    if os.path.isfile(path):
        files, dirs = [path], [os.path.dirname(path)]
    else:
        files, dirs = [], [path]
        for d, sub, names in os.walk(path):
            files.extend(os.path.join(d, n) for n in names)
            dirs.extend(os.path.join(d, s) for s in sub)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
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


# =======================================================================================
# Implementations: {operation: function(ctx)}; stock peers, ckptstore, limits
# =======================================================================================
@dataclasses.dataclass(frozen=True)
class Impl:
    label: str
    kind: str  # "peer" | "ckptstore" | "limit"
    ops: dict[str, Callable[[Ctx], Any]]
    input: str | None = None  # whose save writes the file this one reads (None: its own)
    pre: dict[str, Callable[[Ctx], None]] = dataclasses.field(default_factory=dict)  # untimed, before the call
    not_for: dict[str, str] = dataclasses.field(default_factory=dict)  # store -> why it does not apply
    stores: tuple[str, ...] | None = None  # run on these stores only (None: all)
    reads_input: bool = True  # False: its load/partial need no file (the memory copy)
    any_store: bool = False  # one measurement shown under every store (memory copy)


# -- stock torch ------------------------------------------------------------------------
def torch_save(ctx: Ctx) -> None:
    import torch

    if ctx.local:
        torch.save(ctx.state, ctx.path("model.pt"))
    else:
        with ctx.fs.open(ctx.path("model.pt"), "wb") as f:
            torch.save(ctx.state, f)


def _torch_read(ctx: Ctx, mmap: bool = False) -> dict[str, Any]:
    import torch

    if ctx.local:
        return torch.load(ctx.path("model.pt"), weights_only=True, mmap=mmap)
    with ctx.fs.open(ctx.path("model.pt"), "rb") as f:
        return torch.load(f, weights_only=True)


def torch_load(ctx: Ctx, mmap: bool = False) -> None:
    ctx.model.load_state_dict(_torch_read(ctx, mmap))


def torch_partial(ctx: Ctx, mmap: bool = False) -> None:
    sd = _torch_read(ctx, mmap)
    ctx.model.load_state_dict({k: sd[k] for k in ctx.keys})


# -- stock safetensors ------------------------------------------------------------------
def st_save(ctx: Ctx) -> None:
    import safetensors.torch

    if ctx.local:
        safetensors.torch.save_file(ctx.state, ctx.path("model.safetensors"))
    else:
        ctx.fs.pipe_file(ctx.path("model.safetensors"), safetensors.torch.save(ctx.state))


def _st_read(ctx: Ctx) -> dict[str, Any]:
    import safetensors.torch

    if ctx.local:
        return safetensors.torch.load_file(ctx.path("model.safetensors"))
    return safetensors.torch.load(ctx.fs.cat_file(ctx.path("model.safetensors")))


def st_load(ctx: Ctx) -> None:
    ctx.model.load_state_dict(_st_read(ctx))


def st_partial(ctx: Ctx) -> None:
    if ctx.local:  # the stock partial API: safe_open (mmap) + get_tensor of the wanted keys
        from safetensors import safe_open

        with safe_open(ctx.path("model.safetensors"), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in ctx.keys}
    else:  # remote: safe_open needs a local path, so the whole object comes over
        full = _st_read(ctx)
        sd = {k: full[k] for k in ctx.keys}
        del full
    ctx.model.load_state_dict(sd)


# -- Lightning ----------------------------------------------------------------------------
def lightning_save(ctx: Ctx) -> None:
    """lightning.fabric.utilities.cloud_io._atomic_save (Lightning 2.x): serialize to BytesIO, then write."""
    import fsspec
    import torch

    buf = io.BytesIO()
    torch.save(ctx.state, buf)
    with fsspec.open(ctx.path("model.pt"), "wb", **ctx.storage_options) as f:
        f.write(buf.getvalue())


# -- torch.distributed.checkpoint ---------------------------------------------------------
def _dcp_io(ctx: Ctx, write: bool) -> Any:
    from torch.distributed import checkpoint as dcp

    where = ctx.path("dcp")
    if ctx.local:
        return dcp.FileSystemWriter(where) if write else dcp.FileSystemReader(where)
    try:
        from torch.distributed.checkpoint import FsspecReader, FsspecWriter  # type: ignore[attr-defined]
    except ImportError:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    return FsspecWriter(where, **ctx.storage_options) if write else FsspecReader(where, **ctx.storage_options)


def dcp_save(ctx: Ctx) -> None:
    from torch.distributed import checkpoint as dcp

    dcp.save(ctx.state, storage_writer=_dcp_io(ctx, write=True))


def dcp_load(ctx: Ctx) -> None:  # the same call for full and partial: DCP loads what the state_dict asks for
    from torch.distributed import checkpoint as dcp

    dcp.load(ctx.model.state_dict(), storage_reader=_dcp_io(ctx, write=False))


# -- ckptstore ---------------------------------------------------------------------------
def ck_save(fmt: str) -> Callable[[Ctx], None]:
    def save(ctx: Ctx) -> None:
        from ckptstore import CheckpointManager

        CheckpointManager(ctx.path("ck"), format=fmt, storage_options=ctx.so).save({"model": ctx.state}, step=0)

    return save


def ck_restore(fmt: str) -> Callable[[Ctx], None]:
    def restore(ctx: Ctx) -> None:
        from ckptstore import CheckpointManager

        CheckpointManager(ctx.path("ck"), format=fmt, storage_options=ctx.so).restore({"model": ctx.model})

    return restore


def ck_find(ctx: Ctx) -> None:
    """Untimed: the committed checkpoint folder's URL (what a caller of load_partial already knows)."""
    from ckptstore import CheckpointManager

    latest = CheckpointManager(ctx.path("ck"), storage_options=ctx.so).latest()
    assert latest is not None, f"no checkpoint under {ctx.path('ck')}"
    ctx.extra["ck_url"] = latest.url


def ck_load_partial(ctx: Ctx) -> None:
    from ckptstore import load_partial

    ctx.extra["report"] = load_partial(ctx.extra["ck_url"], ctx.model, storage_options=ctx.so)


# -- limits -----------------------------------------------------------------------------
def raw_prepare_save(ctx: Ctx) -> None:
    """The bytes of the safetensors file of this state: the same bytes, laid out once."""
    import safetensors.torch

    ctx.data = safetensors.torch.save(ctx.state)
    ctx.state = None


CHUNK = 64 * MiB  # local limits move the bytes in 64 MiB calls: one 1 GiB write() costs several times more CPU


def raw_save(ctx: Ctx) -> None:
    if ctx.local:  # + the store's fsync: a disk write with fsync
        view = memoryview(ctx.data)
        with open(ctx.path("model.safetensors"), "wb", buffering=0) as f:
            for i in range(0, len(view), CHUNK):
                f.write(view[i : i + CHUNK])
    else:
        ctx.fs.pipe_file(ctx.path("model.safetensors"), ctx.data)


def _resident(n: int) -> memoryview:
    import torch

    buf = torch.empty(n, dtype=torch.uint8)
    buf.zero_()  # every page faulted in before the call, like a pre-built model
    return memoryview(buf.numpy())


def raw_load(ctx: Ctx) -> None:
    if ctx.local:  # a sequential read into a resident buffer
        view, got = ctx.data, 0
        with open(ctx.path("model.safetensors"), "rb", buffering=0) as f:
            while got < len(view):
                n = f.readinto(view[got : got + CHUNK])
                if not n:
                    break
                got += n
        ctx.extra["got"] = got
    else:
        ctx.extra["got"] = len(ctx.fs.cat_file(ctx.path("model.safetensors")))


def raw_prepare_load(ctx: Ctx) -> None:
    ctx.model = None  # the transport fills no model
    if ctx.local:
        ctx.data = _resident(os.path.getsize(ctx.path("model.safetensors")))


def raw_prepare_partial(ctx: Ctx) -> None:
    """Byte ranges of the selected tensors in the safetensors file (adjacent ones merged), from its header."""
    p = ctx.path("model.safetensors")
    n = int.from_bytes(ctx.fs.cat_file(p, start=0, end=8), "little")
    header = json.loads(ctx.fs.cat_file(p, start=8, end=8 + n))
    base = 8 + n
    want = set(ctx.keys)
    spans = sorted((base + v["data_offsets"][0], base + v["data_offsets"][1], k in want)
                   for k, v in header.items() if k != "__metadata__")
    runs: list[list[int]] = []
    prev_selected = False
    for start, end, sel in spans:
        if sel:
            if prev_selected and runs and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end])
        prev_selected = sel
    ctx.extra["ranges"] = runs
    ctx.model = None
    if ctx.local:
        ctx.data = _resident(sum(b - a for a, b in runs))


def raw_partial(ctx: Ctx) -> None:
    runs = ctx.extra["ranges"]
    p = ctx.path("model.safetensors")
    if ctx.local:  # one pread per run of adjacent selected tensors, into a resident buffer
        view, at, got = ctx.data, 0, 0
        fd = os.open(p, os.O_RDONLY)
        try:
            for a, b in runs:
                for off in range(a, b, CHUNK):
                    n = min(CHUNK, b - off)
                    got += os.preadv(fd, [view[at : at + n]], off)
                    at += n
        finally:
            os.close(fd)
        ctx.extra["got"] = got
        return
    got_parts = ctx.fs.cat_ranges([p] * len(runs), [a for a, _ in runs], [b for _, b in runs])
    ctx.extra["got"] = sum(len(g) for g in got_parts)


def memcpy_prepare(ctx: Ctx) -> None:
    import torch

    n = ctx.extra["moved_bytes"]
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    src.fill_(1)
    dst.zero_()
    ctx.data, ctx.state, ctx.model = (src, dst), None, None


def memcpy(ctx: Ctx) -> None:
    src, dst = ctx.data
    dst.copy_(src)


NOT_LOCAL = "mmap needs a local file"
IMPLEMENTATIONS: dict[str, Impl] = {
    "torch": Impl("`torch.save` / `torch.load` (memory, S3: through `fs.open`)", "peer",
                  {"save": torch_save, "load": torch_load, "partial": torch_partial}),
    "torch-mmap": Impl("`torch.load(mmap=True)`", "peer",
                       {"load": lambda c: torch_load(c, mmap=True), "partial": lambda c: torch_partial(c, mmap=True)},
                       input="torch", not_for={"memory": NOT_LOCAL, "s3": NOT_LOCAL}),
    "safetensors": Impl("`safetensors.torch` `save_file`/`load_file`, local `safe_open` (memory, S3: bytes + "
                        "`fs.pipe`/`fs.cat`)", "peer", {"save": st_save, "load": st_load, "partial": st_partial}),
    "lightning": Impl("Lightning `_atomic_save`: `torch.save` to BytesIO, then `fsspec.open(url, 'wb').write`", "peer",
                      {"save": lightning_save}),
    "dcp": Impl("`torch.distributed.checkpoint` (FileSystemWriter / FsspecWriter), one process", "peer",
                {"save": dcp_save, "load": dcp_load, "partial": dcp_load}),
    "ckptstore-torch": Impl("ckptstore `CheckpointManager(format='torch')` `.save` / `.restore`; partial: `load_partial`",
                            "ckptstore", {"save": ck_save("torch"), "load": ck_restore("torch"), "partial": ck_load_partial},
                            pre={"partial": ck_find}),
    "ckptstore-safetensors": Impl("ckptstore `CheckpointManager(format='safetensors')` `.save` / `.restore`; partial: "
                                  "`load_partial`", "ckptstore",
                                  {"save": ck_save("safetensors"), "load": ck_restore("safetensors"),
                                   "partial": ck_load_partial}, pre={"partial": ck_find}),
    "ckptstore-torch-inplace": Impl("ckptstore `load_partial(checkpoint, model)` (torch format, in place)", "ckptstore",
                                    {"load": ck_load_partial}, input="ckptstore-torch", pre={"load": ck_find}),
    "ckptstore-safetensors-inplace": Impl("ckptstore `load_partial(checkpoint, model)` (safetensors format, in place)",
                                          "ckptstore", {"load": ck_load_partial}, input="ckptstore-safetensors",
                                          pre={"load": ck_find}),
    "limit-transport": Impl("limit: raw transport of the same bytes (local: 64 MiB writes + fsync / `readinto` a "
                            "resident buffer / `preadv` of the needed runs; memory, S3: `fs.pipe` / `fs.cat` / "
                            "`fs.cat_ranges` of the needed bytes)", "limit",
                            {"save": raw_save, "load": raw_load, "partial": raw_partial}, input="safetensors",
                            pre={"save": raw_prepare_save, "load": raw_prepare_load, "partial": raw_prepare_partial}),
    "limit-memcpy": Impl("limit: memory copy of the same bytes (`dst.copy_(src)`)", "limit",
                         {"save": memcpy, "load": memcpy, "partial": memcpy},
                         pre={"save": memcpy_prepare, "load": memcpy_prepare, "partial": memcpy_prepare},
                         stores=("local",), any_store=True, reads_input=False),
}


def input_of(impl: str) -> str:
    return IMPLEMENTATIONS[impl].input or impl


def reads(op: str, impl: str) -> bool:
    return OPERATIONS[op].reads and IMPLEMENTATIONS[impl].reads_input


# =======================================================================================
# Operations: how to build what the call needs, and how to check it
# =======================================================================================
@dataclasses.dataclass(frozen=True)
class Operation:
    label: str
    reads: bool  # needs an input file written beforehand (untimed)
    build: Callable[[Ctx, dict[str, tuple[int, ...]]], None]  # builds ctx.state / ctx.model before the baseline
    moved: Callable[[dict[str, tuple[int, ...]]], int]  # bytes that throughput is counted on
    check: Callable[[Ctx, dict[str, Any]], tuple[bool, str]]


def _build_save(ctx: Ctx, shapes: dict[str, tuple[int, ...]]) -> None:
    ctx.state = build_state(ctx.extra["size_bytes"], ctx.extra.get("layers", LAYERS))


def _build_load(ctx: Ctx, shapes: dict[str, tuple[int, ...]]) -> None:
    ctx.model, ctx.keys = build_model(shapes), list(shapes)


def _build_partial(ctx: Ctx, shapes: dict[str, tuple[int, ...]]) -> None:
    keys = selected_keys(shapes)
    ctx.model, ctx.keys = build_model({k: shapes[k] for k in keys}), keys


def _check_saved(ctx: Ctx, meta: dict[str, Any]) -> tuple[bool, str]:
    if ctx.data is not None and not isinstance(ctx.data, bytes):  # memory copy
        return True, ""
    written = output_bytes(ctx)
    ctx.extra["output_bytes"] = written
    return written >= 0.99 * meta["state_bytes"], f"wrote {written / MiB:.1f} MiB"


def _check_loaded(ctx: Ctx, meta: dict[str, Any]) -> tuple[bool, str]:
    if ctx.model is None:  # limits: the transport's byte count (the memory copy has nothing to check)
        got = ctx.extra.get("got")
        if got is None:
            return True, ""
        want = meta["file_bytes"] if ctx.extra["op"] == "load" else sum(b - a for a, b in ctx.extra["ranges"])
        return got == want, f"{got} of {want} bytes"
    sums = tensor_sums(dict(ctx.model.state_dict()))
    bad = [k for k in ctx.keys if abs(sums[k] - meta["sums"][k]) > 1e-6 * max(1.0, abs(meta["sums"][k]))]
    return not bad, (f"{len(bad)} tensors differ, e.g. {bad[0]}" if bad else "")


OPERATIONS: dict[str, Operation] = {
    "save": Operation("Save", False, _build_save, moved=nbytes, check=_check_saved),
    "load": Operation("Full load into a pre-built model", True, _build_load, moved=nbytes, check=_check_loaded),
    "partial": Operation("10% partial load (blocks 0, 8, 16 of 24 + final norm)", True, _build_partial,
                         moved=lambda shapes: nbytes(shapes, selected_keys(shapes)), check=_check_loaded),
    # A new operation is one entry plus the functions of the implementations that support it, e.g.
    # "async_save": Operation("Async save: training stall", False, _build_save, moved=nbytes, check=_check_saved)
    # with IMPLEMENTATIONS[...].ops["async_save"] returning once training may continue.
}


def output_bytes(ctx: Ctx) -> int:
    if ctx.local:
        return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(ctx.url) for n in ns)
    ctx.fs.invalidate_cache()
    try:
        return sum(ctx.fs.du(ctx.url, total=False).values())
    except FileNotFoundError:
        return 0


# =======================================================================================
# Memory probes (Linux /proc)
# =======================================================================================
class ProcStatus:
    def __init__(self) -> None:
        self.fd = os.open("/proc/self/status", os.O_RDONLY)

    def read(self, field: bytes) -> int:
        data = os.pread(self.fd, 8192, 0)
        i = data.index(field + b":")
        return int(data[i + len(field) + 1 : data.index(b"kB", i)]) * 1024

    def rss(self) -> int:
        return self.read(b"VmRSS")

    def anon(self) -> int:
        return self.read(b"RssAnon")

    def hwm(self) -> int:
        return self.read(b"VmHWM")

    def reset_hwm(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return self.hwm() <= self.rss() + 4 * MiB


class Sampler(threading.Thread):
    def __init__(self, probe: ProcStatus, interval: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.stop_event = threading.Event()
        self.max_rss = self.max_anon = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.max_rss = max(self.max_rss, self.probe.rss())
            self.max_anon = max(self.max_anon, self.probe.anon())
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# =======================================================================================
# Child processes
# =======================================================================================
def make_ctx(spec: dict[str, Any], url: str) -> Ctx:
    import fsspec

    store = STORES[spec["store"]]
    so = spec["storage_options"]
    fs = fsspec.filesystem("file") if store.local else fsspec.core.url_to_fs(url, **so)[0]
    return Ctx(spec["store"], url, so, store.local, fs)


def write_input(spec: dict[str, Any], url: str, size_bytes: int, layers: int = LAYERS) -> None:
    """Write the input file(s) an implementation reads, with the implementation that produces them."""
    kind = input_of(spec["impl"])
    ctx = make_ctx(spec, url)
    if ctx.local:
        os.makedirs(url, exist_ok=True)
    ctx.state = build_state(size_bytes, layers)
    IMPLEMENTATIONS[kind].ops["save"](ctx)
    if ctx.local:
        sync_tree(url)
    ctx.state = None
    gc.collect()


def remove(ctx: Ctx) -> None:
    if ctx.local:
        shutil.rmtree(ctx.url, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            ctx.fs.rm(ctx.url, recursive=True)


def counter(spec: dict[str, Any], what: str) -> Any:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(spec["store_info"]["counter"] + what, timeout=120) as r:
        return json.loads(r.read())


def summarize_requests(entries: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for e in entries:
        kind = e["method"] + ("" if e["status"].startswith("2") else f" {e['status']}")
        by[kind] = by.get(kind, 0) + 1
    return {"requests": len(entries), "by_method": by,
            "bytes_in": sum(e["request_body"] for e in entries), "bytes_out": sum(e["body"] for e in entries)}


def run_measured(spec: dict[str, Any], ctx: Ctx, fn: Callable[[Ctx], Any], store: Store, op: str) -> dict[str, Any]:
    probe = ProcStatus()
    count = "counter" in spec["store_info"]
    gc.collect()
    if count:
        counter(spec, "reset")
    io0, cpu0 = proc_io(), cpu_seconds()
    baseline, anon0 = probe.rss(), probe.anon()
    hwm_ok = probe.reset_hwm()
    sampler = Sampler(probe, spec["sample_ms"] / 1000)
    sampler.start()
    t0 = time.perf_counter()
    fn(ctx)
    if op == "save" and store.local:
        sync_tree(ctx.url)
    wall = time.perf_counter() - t0
    sampler.stop()
    cpu, io1 = cpu_seconds() - cpu0, proc_io()
    peak = max(probe.hwm() if hwm_ok else 0, sampler.max_rss)
    out = {
        "wall_s": wall, "cpu_s": cpu, "baseline_rss": baseline, "peak_extra": peak - baseline,
        "anon_extra": max(0, sampler.max_anon - anon0), "retained": probe.rss() - baseline,
        "peak_method": "VmHWM" if hwm_ok else "sampled", "disk_read": io1["read_bytes"] - io0["read_bytes"],
        "disk_write": io1["write_bytes"] - io0["write_bytes"],
    }
    if count:
        out["server"] = summarize_requests(counter(spec, "stats"))
    return out


def child_main(spec: dict[str, Any]) -> None:
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import fsspec  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch

    import ckptstore  # noqa: F401

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    mode, store = spec["mode"], STORES[spec["store"]]
    if spec["store"] == "s3":
        import s3fs  # noqa: F401

    if mode == "meta":
        state = build_state(spec["size_bytes"])
        import safetensors.torch as st

        meta = {"state_bytes": sum(t.numel() * 4 for t in state.values()), "sums": tensor_sums(state),
                "file_bytes": len(st.save(state)), "tensors": len(state)}
        Path(spec["meta_out"]).write_text(json.dumps(meta))
        Path(spec["result"]).write_text("{}")
        return
    if mode == "prepare":
        write_input(spec, spec["url"], spec["size_bytes"])
        Path(spec["result"]).write_text("{}")
        return

    op, impl_name = spec["op"], spec["impl"]
    impl, operation = IMPLEMENTATIONS[impl_name], OPERATIONS[op]
    meta = json.loads(Path(spec["meta"]).read_text())
    fn = impl.ops[op]
    reading = reads(op, impl_name)
    result: dict[str, Any] = {"op": op, "impl": impl_name, "store": spec["store"], "repeat": spec["repeat"],
                              "size_mib": spec["size_mib"], "state_bytes": meta["state_bytes"]}

    def prepared(url: str, size_bytes: int, layers: int, write: bool) -> Ctx:
        ctx = make_ctx(spec, url)
        ctx.extra.update(op=op, impl=impl_name, size_bytes=size_bytes, layers=layers)
        if reading and write:
            write_input(spec, url, size_bytes, layers)
        elif not reading and ctx.local:
            os.makedirs(url, exist_ok=True)
        shapes = state_shapes(size_bytes, layers)
        ctx.extra["moved_bytes"] = operation.moved(shapes)
        operation.build(ctx, shapes)
        if op in impl.pre:
            impl.pre[op](ctx)
        return ctx

    try:
        if spec["warmup"]:  # the same code path once, on a tiny state: one-time costs are not charged
            w = prepared(spec["url"] + "-warmup", 2 * MiB, 3, write=True)
            fn(w)
            if op == "save" and store.local:
                sync_tree(w.url)
            if reading or op == "save":
                remove(w)
            del w
        ctx = prepared(spec["url"], spec["size_bytes"], LAYERS, write=reading and not store.shared)
        if reading and store.local and spec["cold"]:
            drop_file_cache(spec["url"])
        result.update(run_measured(spec, ctx, fn, store, op))
        result["moved_bytes"] = ctx.extra["moved_bytes"]
        ok, note = operation.check(ctx, meta)
        result.update(ok=ok, note=note, status="ok")
        rep = ctx.extra.get("report")
        if rep is not None:
            result["report"] = {"bytes_read": rep.bytes_read, "requests": rep.requests, "loaded": len(rep.loaded)}
        if "output_bytes" in ctx.extra:
            result["output_bytes"] = ctx.extra["output_bytes"]
        if op == "save":
            remove(ctx)
    except Exception as err:  # recorded as "not run: <reason>" rather than crashing the suite
        import traceback

        traceback.print_exc()
        result.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
    Path(spec["result"]).write_text(json.dumps(result))


# =======================================================================================
# Parent: moto with counting, scheduling
# =======================================================================================
class CountingApp:
    """WSGI middleware around moto: logs each request's method, status and body bytes (both ways).

    ``GET /__suite__/reset`` clears the log, ``GET /__suite__/stats`` returns it (neither is counted)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.in_flight = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL):
            deadline = time.monotonic() + 10
            while self.in_flight and time.monotonic() < deadline:  # let the last response finish
                time.sleep(0.005)
            with self.lock:
                body = json.dumps(self.log).encode() if path.endswith("stats") else b"[]"
                if path.endswith("reset"):
                    self.log = []
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        entry = {"method": environ.get("REQUEST_METHOD", ""), "request_body": int(environ.get("CONTENT_LENGTH") or 0),
                 "body": 0, "status": ""}
        with self.lock:
            self.in_flight += 1

        def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            entry["status"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, sr)
        except BaseException:
            with self.lock:
                self.in_flight -= 1
            raise
        return self._count(result, entry)

    def _count(self, result: Any, entry: dict[str, Any]) -> Any:
        try:
            for chunk in result:
                if entry["method"] != "HEAD":
                    entry["body"] += len(chunk)
                yield chunk
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            with self.lock:
                self.log.append(entry)
                self.in_flight -= 1


def start_moto() -> tuple[Any, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    wsgi = server._server  # werkzeug's server; its handler looks up .app per request
    wsgi.app = CountingApp(wsgi.app)
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True)


PRELOAD = ("fsspec", "safetensors.torch", "torch", "numpy", "ckptstore", "s3fs", "torch.distributed.checkpoint")


def zygote_main() -> None:
    """Fork server: imports everything once, then forks one fresh process per measurement.

    Protocol on stdin/stdout, one JSON line each: spec in -> {"pid": ...} -> {"rc": ...}. The
    zygote never runs a torch op (no thread pool exists to be broken by fork); each forked
    child resets VmHWM itself, so its peak is its own.
    """
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import importlib

    for mod in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the measured process
            fd = os.open(spec["stderr_path"], os.O_WRONLY | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            rc = 0
            try:
                child_main(spec)
            except BaseException:
                import traceback

                traceback.print_exc()
                rc = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(rc)
        out.write(json.dumps({"pid": pid}).encode() + b"\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        out.flush()


class Runner:
    """Runs one child per spec: forked from a pre-imported zygote (default) or a fresh interpreter (--spawn)."""

    def __init__(self, env: dict[str, str], spawn: bool) -> None:
        self.env, self.spawn = env, spawn
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def _start(self) -> None:
        self.close()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--zygote"], env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf = b""
        self._line(300)

    def _line(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        fd, result_path = tempfile.mkstemp(prefix="suite-result-", suffix=".json")
        os.close(fd)
        fd, err_path = tempfile.mkstemp(prefix="suite-stderr-", suffix=".txt")
        os.close(fd)
        spec = {**spec, "result": result_path, "stderr_path": err_path}
        try:
            rc = self._run_spawn(spec, timeout) if self.spawn else self._run_fork(spec, timeout)
            stderr = Path(err_path).read_text(errors="replace")
            text = Path(result_path).read_text()
            if rc is None:
                return {"status": "error", "reason": f"timed out after {timeout:g} s"}
            if rc != 0 or not text:
                tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
                return {"status": "error", "reason": f"child exited {rc}: " + (tail[-1] if tail else "")[:300]}
            res = json.loads(text)
            if res.get("status") == "error":
                res["stderr_tail"] = stderr[-3000:]
            return res
        finally:
            os.unlink(result_path)
            os.unlink(err_path)

    def _run_spawn(self, spec: dict[str, Any], timeout: float) -> int | None:
        with open(spec["stderr_path"], "w") as err:
            try:
                return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                      env=self.env, stdout=err, stderr=err, timeout=timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                return None

    def _run_fork(self, spec: dict[str, Any], timeout: float) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self._line(60)["pid"]
        try:
            return int(self._line(timeout)["rc"])
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            self._line(60)
            return None


@dataclasses.dataclass(frozen=True)
class Cell:
    op: str
    impl: str
    store: str
    size_mib: float

    @property
    def key(self) -> str:
        return f"{self.op}/{self.store}/{self.impl}/{self.size_mib:g}"


def plan_cells(args: argparse.Namespace) -> tuple[list[Cell], list[dict[str, Any]]]:
    """The cells to measure, and the ones that do not apply (with why)."""
    cells, skipped = [], []
    for size_s, stores in sizes_by_store(args).items():
        for op in args.ops:
            for store in stores:
                for name in args.impls:
                    impl = IMPLEMENTATIONS[name]
                    if op not in impl.ops or (impl.stores and store not in impl.stores):
                        continue
                    if store in impl.not_for:
                        skipped.append({"op": op, "impl": name, "store": store, "size_mib": size_s,
                                        "reason": "n/a: " + impl.not_for[store]})
                        continue
                    cells.append(Cell(op, name, store, size_s))
    return cells, skipped


def sizes_by_store(args: argparse.Namespace) -> dict[float, list[str]]:
    out: dict[float, list[str]] = {}
    for store in args.stores:
        for s in (args.s3_size_mib if store == "s3" else args.sizes_mib):
            out.setdefault(s, []).append(store)
    return dict(sorted(out.items()))


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"}
    env.pop("AWS_PROFILE", None)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    cells, skipped = plan_cells(args)
    infos: dict[str, dict[str, Any]] = {}
    teardowns: list[Callable[[], None]] = []
    started = time.perf_counter()
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    metas: dict[float, str] = {}
    meta_dir = tempfile.mkdtemp(prefix="suite-meta-")
    runner = Runner(env, args.spawn)
    try:
        for store in args.stores:
            info, teardown = STORES[store].setup(args)
            infos[store], teardowns = info, [*teardowns, teardown]

        def base_spec(store: str, size_mib: float) -> dict[str, Any]:
            return {"store": store, "store_info": infos[store], "storage_options": STORES[store].storage_options(infos[store]),
                    "size_mib": size_mib, "size_bytes": int(size_mib * MiB), "sample_ms": args.sample_ms,
                    "threads": args.threads}

        for size_mib in sorted({c.size_mib for c in cells}):  # expected values for the checks
            path = os.path.join(meta_dir, f"meta-{size_mib:g}.json")
            res = runner.run({**base_spec(cells[0].store, size_mib), "mode": "meta", "meta_out": path}, args.timeout)
            if res.get("status") == "error":
                raise RuntimeError(f"could not build the {size_mib:g} MiB state: {res['reason']}")
            metas[size_mib] = path
        # Inputs on shared stores: written once per (format, store, size) before the rounds, untimed.
        inputs: dict[tuple[str, str, float], str] = {}
        for c in cells:
            if reads(c.op, c.impl):
                inputs.setdefault((input_of(c.impl), c.store, c.size_mib),
                                  STORES[c.store].url_for(infos[c.store], f"inputs/{input_of(c.impl)}-{c.size_mib:g}"))
        for (kind, store, size_mib), url in inputs.items():
            if not STORES[store].shared:
                continue
            t = time.perf_counter()
            res = runner.run({**base_spec(store, size_mib), "mode": "prepare", "impl": kind, "url": url}, args.timeout)
            log(f"[{time.perf_counter() - started:6.1f}s] input {kind} on {store}, {size_mib:g} MiB: "
                f"{'written' if res.get('status') != 'error' else 'FAILED ' + res['reason']} in {time.perf_counter() - t:.1f}s")
        broken: dict[str, str] = {}
        slow: set[str] = set()
        total = len(cells) * args.repeats
        done = 0
        for repeat in range(args.repeats):
            for c in cells:
                done += 1
                if c.key in broken or c.key in slow:
                    continue
                url = (inputs[(input_of(c.impl), c.store, c.size_mib)] if reads(c.op, c.impl) else
                       STORES[c.store].url_for(infos[c.store], f"saves/{c.impl}-{uuid.uuid4().hex[:8]}"))
                spec = {**base_spec(c.store, c.size_mib), "mode": "measure", "op": c.op, "impl": c.impl, "url": url,
                        "repeat": repeat, "meta": metas[c.size_mib], "warmup": not args.no_warmup,
                        "cold": not args.warm_cache}
                t = time.perf_counter()
                r = runner.run(spec, args.timeout)
                child_s = time.perf_counter() - t
                r.update(op=c.op, impl=c.impl, store=c.store, size_mib=c.size_mib, repeat=repeat, child_s=child_s)
                runs.append(r)
                elapsed = time.perf_counter() - started
                if r.get("status") != "ok":
                    broken[c.key] = r.get("reason", "?")
                    log(f"[{elapsed:6.1f}s] {done}/{total} r{repeat + 1} {c.op:7s} {c.store:6s} {c.impl:30s} "
                        f"{c.size_mib:g} MiB: NOT RUN: {r.get('reason')}")
                    continue
                if repeat == 0 and child_s > args.slow_s and args.repeats > 1:
                    slow.add(c.key)
                mbps = r["moved_bytes"] / MiB / r["wall_s"] if r["wall_s"] > 0 else float("inf")
                server = r.get("server")
                log(f"[{elapsed:6.1f}s] {done}/{total} r{repeat + 1} {c.op:7s} {c.store:6s} {c.impl:30s} {c.size_mib:g} MiB: "
                    f"{r['wall_s']:6.2f}s {mbps:7.0f} MiB/s  peak +{r['peak_extra'] / MiB:7.1f} MiB"
                    + (f"  S3 {server['requests']} req, in {server['bytes_in'] / MiB:.1f} / out {server['bytes_out'] / MiB:.1f} MiB"
                       if server else "")
                    + ("" if r["ok"] else f"  CHECK FAILED {r['note']}")
                    + ("  (slow: 1 repeat only)" if c.key in slow else ""))
    finally:
        runner.close()
        for teardown in reversed(teardowns):
            with contextlib.suppress(Exception):
                teardown()
        shutil.rmtree(meta_dir, ignore_errors=True)
    return {"runs": runs, "skipped": skipped, "slow": sorted(slow), "wall_s": time.perf_counter() - started,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


# =======================================================================================
# Aggregation and report
# =======================================================================================
def aggregate(runs: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["op"], r["store"], r["impl"], r["size_mib"]), []).append(r)
    rows = []
    for (op, store, impl, size), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row: dict[str, Any] = {"op": op, "store": store, "impl": impl, "size_mib": size, "n": len(ok)}
        if not ok:
            row["not_run"] = "not run: " + rs[0].get("reason", "?")
            rows.append(row)
            continue

        def med(key: str, rs: list[dict[str, Any]] = ok) -> float:
            return statistics.median(r[key] for r in rs)

        wall = [r["wall_s"] for r in ok]
        peak = [r["peak_extra"] for r in ok]
        row.update(
            state_bytes=ok[0]["state_bytes"], moved_bytes=ok[0]["moved_bytes"], wall=med("wall_s"), wall_min=min(wall),
            wall_max=max(wall), cpu=med("cpu_s"), peak=med("peak_extra"), peak_min=min(peak), peak_max=max(peak),
            anon=med("anon_extra"), retained=med("retained"), ok=all(r["ok"] for r in ok),
            notes=sorted({r["note"] for r in ok if not r["ok"]}), disk_read=med("disk_read"), disk_write=med("disk_write"),
        )
        row["mib_s"] = row["moved_bytes"] / MiB / row["wall"] if row["wall"] > 0 else None
        if "server" in ok[0]:
            row["requests"] = statistics.median(r["server"]["requests"] for r in ok)
            row["bytes_in"] = statistics.median(r["server"]["bytes_in"] for r in ok)
            row["bytes_out"] = statistics.median(r["server"]["bytes_out"] for r in ok)
            row["by_method"] = ok[0]["server"]["by_method"]
        if "report" in ok[0]:
            row["report"] = ok[0]["report"]
        rows.append(row)
    rows += [{**s, "n": 0, "not_run": s["reason"]} for s in skipped]
    order = list(IMPLEMENTATIONS)
    rows.sort(key=lambda r: (r["size_mib"], list(OPERATIONS).index(r["op"]) if r["op"] in OPERATIONS else 99,
                             list(STORES).index(r["store"]) if r["store"] in STORES else 99,
                             order.index(r["impl"]) if r["impl"] in order else 99))
    # ratios within (op, size, store); the memory copy (measured once) joins every store
    for r in rows:
        if "wall" not in r:
            continue
        peers = [p for p in rows if p["op"] == r["op"] and p["size_mib"] == r["size_mib"] and p["store"] == r["store"]
                 and "wall" in p and IMPLEMENTATIONS.get(p["impl"], Impl("", "", {})).kind == "peer"]
        limit = next((p for p in rows if p["op"] == r["op"] and p["size_mib"] == r["size_mib"] and p["store"] == r["store"]
                      and p["impl"] == "limit-transport" and "wall" in p), None)
        copy = next((p for p in rows if p["op"] == r["op"] and p["size_mib"] == r["size_mib"]
                     and p["impl"] == "limit-memcpy" and "wall" in p), None)
        best = min(peers, key=lambda p: p["wall"]) if peers else None
        r["x_best_peer"] = r["wall"] / best["wall"] if best else None
        r["best_peer"] = best["impl"] if best else None
        bound = max([p["wall"] for p in (limit, copy) if p is not None], default=None)  # each is a lower bound
        r["limit_s"] = bound
        r["x_limit"] = r["wall"] / bound if bound else None
        moved = r.get("bytes_out") if r["op"] != "save" else r.get("bytes_in")
        lim_moved = (limit.get("bytes_out") if r["op"] != "save" else limit.get("bytes_in")) if limit else None
        r["x_limit_bytes"] = moved / lim_moved if moved is not None and lim_moved else None
    return rows


def fmt_mib(b: float | None, digits: int = 1) -> str:
    return "–" if b is None else f"{b / MiB:.{digits}f}"


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def store_rows(rows: list[dict[str, Any]], op: str, size: float, store: str) -> list[dict[str, Any]]:
    out = [r for r in rows if r["op"] == op and r["size_mib"] == size and r["store"] == store]
    copy = [r for r in rows if r["op"] == op and r["size_mib"] == size and r["impl"] in IMPLEMENTATIONS
            and IMPLEMENTATIONS[r["impl"]].any_store and r["store"] != store]
    return out + copy


def table(rows: list[dict[str, Any]], op: str, size: float, stores: list[str]) -> str:
    partial = op == "partial"
    head = ("| Store | Implementation | Wall s, median (min–max) | MiB/s" + (" (of the 10%)" if partial else "")
            + " | × best peer | × limit | Peak extra RSS MiB, median (min–max) | % of state | anon MiB | CPU s "
            "| Bytes moved MiB (× limit) | Requests | OK |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n")
    lines = []
    for store in stores:
        for r in store_rows(rows, op, size, store):
            impl = IMPLEMENTATIONS.get(r["impl"])
            label = f"**`{r['impl']}`**" if impl and impl.kind == "ckptstore" else f"`{r['impl']}`"
            if "not_run" in r:
                lines.append(f"| {STORES[store].label} | {label} | {r['not_run']} | | | | | | | | | | |")
                continue
            if r["impl"] == "limit-memcpy":
                moved = None
            elif store == "s3":
                moved = r.get("bytes_in") if op == "save" else r.get("bytes_out")
            elif store == "local":
                moved = r["disk_write"] if op == "save" else r["disk_read"]
            else:
                moved = None
            moved_s = "–" if moved is None else fmt_mib(moved) + (f" ({r['x_limit_bytes']:.2f})" if store == "s3"
                                                                    and r.get("x_limit_bytes") else "")
            reqs = "–" if "requests" not in r or store != "s3" else f"{r['requests']:g}"
            n_note = "" if r["n"] >= 3 or r["n"] == 0 else f" (n={r['n']})"
            lines.append(
                f"| {STORES[store].label} | {label}{n_note} | {r['wall']:.2f} ({r['wall_min']:.2f}–{r['wall_max']:.2f}) | "
                f"{r['mib_s']:.0f} | {fmt_x(r['x_best_peer'] if r['store'] == store else None)} | "
                f"{fmt_x(r['x_limit'] if r['store'] == store else None)} | "
                f"{fmt_mib(r['peak'])} ({fmt_mib(r['peak_min'])}–{fmt_mib(r['peak_max'])}) | "
                f"{100 * r['peak'] / r['state_bytes']:.0f}% | {fmt_mib(r['anon'])} | {r['cpu']:.2f} | {moved_s} | {reqs} | "
                f"{'yes' if r['ok'] else '**no** ' + '; '.join(r['notes'])} |"
            )
    return head + "\n".join(lines) + "\n"


def summary_table(rows: list[dict[str, Any]], sizes: list[float], stores_by_size: dict[float, list[str]]) -> str:
    lines = ["| Operation | Store | Size MiB | Best ckptstore | Wall × best peer | Peak MiB: ckptstore / best peer by time | "
             "× limit (time) | × limit (bytes) |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for size in sizes:
        for op in OPERATIONS:
            for store in stores_by_size.get(size, []):
                rs = [r for r in rows if r["op"] == op and r["size_mib"] == size and r["store"] == store and "wall" in r]
                ck = [r for r in rs if IMPLEMENTATIONS[r["impl"]].kind == "ckptstore"]
                if not ck:
                    continue
                best = min(ck, key=lambda r: r["wall"])
                peer = next((r for r in rs if r["impl"] == best.get("best_peer")), None)
                lines.append(
                    f"| {op} | {STORES[store].label} | {size:g} | {best['impl']} | {fmt_x(best['x_best_peer'])}"
                    + (f" (vs {peer['impl']})" if peer else "") + " | "
                    f"{fmt_mib(best['peak'])} / {fmt_mib(peer['peak']) if peer else '–'} | {fmt_x(best['x_limit'])} | "
                    f"{fmt_x(best.get('x_limit_bytes'))} |")
    return "\n".join(lines) + "\n"


def render_section(data: dict[str, Any]) -> str:
    rows = data["summary"]
    sizes = sorted({r["size_mib"] for r in rows})
    stores_by_size = {s: [st for st in STORES if any(r["store"] == st and r["size_mib"] == s for r in rows)] for s in sizes}
    inv = data["invocations"]
    m = inv[-1]["machine"]
    out = [SECTION, ""]
    for i in inv:
        mine = [r for r in data["runs"] if r.get("inv") == i.get("id")]
        cover = "; ".join(f"{STORES[st].label} " + ", ".join(f"{z:g}" for z in sorted({r["size_mib"] for r in mine
                                                                                       if r["store"] == st})) + " MiB"
                          for st in STORES if any(r["store"] == st for r in mine))
        changed = i.get("ckptstore_changed_during_run")
        out.append(f"Command: `{i['command']}` — {i['date']}, wall {i['wall_s'] / 60:.1f} min; load average (1 min) "
                   f"at start / end {i['loadavg_start'][0]:.2f} / {i['loadavg_end'][0]:.2f}; ckptstore at "
                   f"{i.get('ckptstore') or i['machine'].get('ckptstore')}"
                   + (f" (changed to {changed} during the run; measured: the start state, which the fork server imported)"
                      if changed else "") + (f"; rows: {cover}" if cover else "") + ".  ")
    out += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; Python {m['python']}, "
        f"torch {m['torch']} ({inv[-1]['threads']} threads), safetensors {m['safetensors']}, fsspec {m['fsspec']}, "
        f"s3fs {m.get('s3fs')}, aiobotocore {m.get('aiobotocore')}, moto {m.get('moto')}, matplotlib {m.get('matplotlib')}.",
        "",
    ]
    notes = list(dict.fromkeys(i["note"] for i in inv if i.get("note")))
    if notes:
        out += ["**The machine was shared.** " + " ".join(notes) + " Wall times carry that noise (CPU seconds less so); "
                "memory and byte counts do not."
                + (" (The `--note` texts on the command lines were written before the runs; these sentences replace them "
                   "with what process checks during the runs saw.)"
                   if any(i.get("note") != (i.get("args") or {}).get("note") for i in inv) else ""), ""]
    out += [
        "What each row is: every measurement runs in a fresh child process, interleaved (round 1: every cell once, then "
        "round 2, ...); the child first runs the same code path on a tiny state (imports, S3 client, fsspec instances are "
        "not charged), then builds what the operation needs (the state for a save; a zero-filled model, every page "
        "touched, for a load) and times the call. *Peak extra RSS* = kernel `VmHWM` (reset via `/proc/self/clear_refs`) "
        "minus the RSS just before the call; *anon* = the sampled `RssAnon` rise (file-backed mmap pages count in RSS, not "
        "in anon). State: GPT-like float32 (embedding + 24 blocks + final norm, 291 tensors). *MiB/s* = state bytes "
        "(partial: the selected 10.6%) / wall. *× best peer* = wall / the fastest stock peer's median wall (same store, "
        "size, operation); *× limit* = wall / the larger of two lower bounds measured in the same run: the raw "
        "transport of the same bytes (local: 64 MiB writes + fsync, or a cold `readinto` a resident buffer, partial: "
        "`preadv` of the runs of selected tensors; memory and S3: `fs.pipe` / `fs.cat`, partial: `fs.cat_ranges` of "
        "exactly the selected byte ranges) and a memory copy of them (on memory://, `fs.pipe` keeps "
        "a reference to the bytes, so the copy is the bound there). *Bytes moved (× limit)*: S3 bytes over the raw "
        "transport's. The memory-copy row is one measurement shown under every store.",
        "",
        "Stores: **local disk**: every save, stock or not, ends with an fsync of every file it wrote and the folders "
        "(inside the timing; ckptstore and DCP fsync themselves, so theirs is a no-op), and every local read starts "
        "cold (`posix_fadvise(DONTNEED)` on the input files only, so other processes' caches stay); bytes moved = "
        "`/proc/self/io` read/write bytes. **memory://** lives in one process, so each load child writes its own input "
        "first (untimed; the stored bytes are in the baseline). **S3** is moto (`ThreadedMotoServer` on 127.0.0.1 in "
        "the parent process, so its memory is not counted); bytes moved and requests are counted on the server by a "
        "WSGI middleware (request bodies for saves, response bodies for loads). moto serves ~60 MiB/s and reads the "
        "whole object for every ranged GET, so S3 wall times measure moto more than the client: read the S3 rows as "
        "ratios to the raw put/cat of the same bytes and, for partial loads, by bytes moved and requests.",
        "",
        "Peers' remote paths: stock torch writes `torch.save(sd, fs.open(url, 'wb'))` and reads "
        "`torch.load(fs.open(url, 'rb'))` (this is also how Lightning loads); stock safetensors goes through bytes "
        "(`save` + `fs.pipe`, `fs.cat` + `load`); the stock partial is a full load + filter except locally, where "
        "`safe_open`/`get_tensor` and `torch.load(mmap=True)` read only what they touch. DCP loads only the keys the "
        "target's state_dict has. ckptstore's *load* rows: `restore` is the manager API (reads the checkpoint, then "
        "`load_state_dict`), *in place* is `load_partial(checkpoint, model)` with every key.",
        "",
        "Implementations (rows; ckptstore in bold):",
        "",
        *[f"- `{name}`: {impl.label}" for name, impl in IMPLEMENTATIONS.items() if any(r["impl"] == name for r in rows)],
        "",
        "![throughput](charts/suite_throughput.png)",
        "",
        "![peak memory](charts/suite_memory.png)",
        "",
    ]
    for size in sizes:
        for op, operation in OPERATIONS.items():
            if any(r["op"] == op and r["size_mib"] == size for r in rows):
                sb = next((r["state_bytes"] for r in rows if r["size_mib"] == size and "state_bytes" in r), 0)
                out += [f"### {operation.label}, {size:g} MiB state ({fmt_mib(sb)} MiB)", "",
                        table(rows, op, size, stores_by_size[size])]
    out += ["### ckptstore against the best stock peer", "",
            "Per cell, the fastest ckptstore implementation; × < 1 is faster than the best peer.", "",
            summary_table(rows, sizes, stores_by_size)]
    slow = sorted({s for i in inv for s in i.get("slow", [])})
    if slow:
        out += ["Measured once (the first measurement took longer than `--slow-s`): " + ", ".join(f"`{s}`" for s in slow)
                + ".", ""]
    reqs = [r for r in rows if r["store"] == "s3" and r.get("by_method") and r["op"] != "save"]
    if reqs:
        out += ["S3 requests by method (first measurement): "
                + "; ".join(f"{r['op']} {r['impl']} {r['size_mib']:g} MiB: "
                            + ", ".join(f"{k} × {v}" for k, v in sorted(r["by_method"].items())) for r in reqs) + ".", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def charts(data: dict[str, Any], out_dir: Path, copy_to: Path | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["summary"] if "wall" in r]
    sizes = sorted({r["size_mib"] for r in rows})
    ops = [o for o in OPERATIONS if any(r["op"] == o for r in rows)]
    impls = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in rows)]
    cmap = plt.get_cmap("tab20")
    colors = {i: cmap(n % 20) for n, i in enumerate(impls)}
    written = []
    for what, ylabel, fname in (("mib_s", "MiB/s (log)", "suite_throughput.png"),
                                ("peak", "peak extra RSS, MiB", "suite_memory.png")):
        fig, axes = plt.subplots(len(sizes), len(ops), figsize=(6.5 * len(ops), 4.2 * len(sizes)), squeeze=False)
        for si, size in enumerate(sizes):
            for oi, op in enumerate(ops):
                ax = axes[si][oi]
                stores = [s for s in STORES if any(r["store"] == s and r["size_mib"] == size and r["op"] == op for r in rows)]
                present = [i for i in impls if any(r["impl"] == i and r["size_mib"] == size and r["op"] == op for r in rows)]
                width = 0.85 / max(1, len(present))
                for ii, impl in enumerate(present):
                    xs, ys, lo, hi = [], [], [], []
                    for xi, store in enumerate(stores):
                        r = next((r for r in rows if r["impl"] == impl and r["op"] == op and r["size_mib"] == size
                                  and (r["store"] == store or IMPLEMENTATIONS[impl].any_store)), None)
                        if r is None:
                            continue
                        if what == "mib_s":
                            y = r["mib_s"]
                            lo.append(y - r["moved_bytes"] / MiB / r["wall_max"])
                            hi.append(r["moved_bytes"] / MiB / r["wall_min"] - y)
                        else:
                            y = r["peak"] / MiB
                            lo.append(y - r["peak_min"] / MiB)
                            hi.append(r["peak_max"] / MiB - y)
                        xs.append(xi - 0.425 + width * (ii + 0.5))
                        ys.append(y)
                    ax.bar(xs, ys, width, yerr=[lo, hi], color=colors[impl], label=impl, capsize=1.5,
                           edgecolor="black" if IMPLEMENTATIONS[impl].kind == "ckptstore" else "none", linewidth=0.8)
                ax.set_xticks(range(len(stores)))
                ax.set_xticklabels([STORES[s].label for s in stores])
                if what == "mib_s":
                    ax.set_yscale("log")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op}, {size:g} MiB" + (" (MiB/s of the 10%)" if op == "partial" and what == "mib_s" else ""))
                ax.grid(axis="y", alpha=0.3)
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8,
                   frameon=False)
        fig.suptitle(("Throughput" if what == "mib_s" else "Peak extra memory")
                     + " per format and store (median, whiskers min–max; ckptstore outlined)")
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) // 6), 1, 0.96))
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if copy_to is not None:
            copy_to.mkdir(exist_ok=True)
            shutil.copyfile(path, copy_to / fname)
    return written


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu
    ram = 0
    with contextlib.suppress(OSError, AttributeError), open("/proc/meminfo") as f:
        ram = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) * 1024  # type: ignore[union-attr]
    import fsspec
    import safetensors
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "safetensors": safetensors.__version__, "fsspec": fsspec.__version__}
    for mod in ("s3fs", "moto", "botocore", "aiobotocore", "aiohttp", "matplotlib"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram_gib": f"{ram / 2**30:.1f}", "kernel": platform.release(),
            **versions}


def ckptstore_revision() -> str:
    """HEAD, plus a hash of the uncommitted diff of ckptstore/ if there is one: the code a run measures."""
    import hashlib

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "ckptstore"], cwd=REPO, capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" + uncommitted changes in ckptstore/ (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})" if diff else "")


def write_results_md(path: Path, section: str) -> None:
    """Replace (or append) only this benchmark's section; the file is re-read right before writing."""
    text = path.read_text() if path.exists() else "# ckptstore benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def report(data: dict[str, Any], args: argparse.Namespace) -> None:
    out_dir = Path(args.out).parent
    if not args.no_charts:
        for p in charts(data, out_dir, None if args.no_results_md else HERE / "charts"):
            log(f"wrote {p}")
    section = render_section(data)
    print(section)
    if not args.no_results_md:
        write_results_md(Path(args.results_md), section)
        log(f"updated {args.results_md} ({SECTION}); charts copied to {HERE / 'charts'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[100], help="state sizes for local disk and memory://")
    ap.add_argument("--s3-size-mib", type=float, nargs="+", default=[100],
                    help="state sizes for S3 (moto serves ~60 MiB/s and reads the whole object per ranged GET)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median and min–max over them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round")
    ap.add_argument("--stores", nargs="+", default=list(STORES), choices=list(STORES))
    ap.add_argument("--ops", nargs="+", default=list(OPERATIONS), choices=list(OPERATIONS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    ap.add_argument("--slow-s", type=float, default=60.0,
                    help="a cell whose first child takes longer than this is measured once only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    ap.add_argument("--warm-cache", action="store_true", help="local reads from the page cache (default: cold)")
    ap.add_argument("--no-warmup", action="store_true", help="charge one-time costs to the measured call")
    ap.add_argument("--sample-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument("--workdir", default=None, help="local-disk folder (default: a temp dir under benchmarks/out)")
    ap.add_argument("--out", default=str(HERE / "out" / "suite.json"))
    ap.add_argument("--append", action="store_true",
                    help="add this invocation to --out (cells measured again replace the old ones) and report both")
    ap.add_argument("--note", default="", help="a sentence for RESULTS.md, e.g. what else ran on the machine")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--no-results-md", action="store_true", help="leave RESULTS.md and benchmarks/charts/ alone")
    ap.add_argument("--no-charts", action="store_true")
    ap.add_argument("--from-json", default=None, metavar="PATH", help="measure nothing: re-render from a saved JSON")
    ap.add_argument("--spawn", action="store_true",
                    help="a fresh interpreter per measurement instead of a fork of a pre-imported server (slower)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if args.zygote:
        zygote_main()
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        data["summary"] = aggregate(data["runs"], data["skipped"])
        report(data, args)
        return 0
    if args.quick:
        args.repeats = 1
    order = list(IMPLEMENTATIONS)
    args.impls = sorted(set(args.impls), key=order.index)
    args.ops = [o for o in OPERATIONS if o in args.ops]
    args.stores = [s for s in STORES if s in args.stores]
    rev_start = ckptstore_revision()  # the fork server imports ckptstore once, at the start
    diff_start = subprocess.run(["git", "diff", "HEAD", "--", "ckptstore"], cwd=REPO, capture_output=True, text=True,
                                check=False).stdout
    res = measure_all(args)
    rev_end = ckptstore_revision()
    import torch

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]])
    inv = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k not in ("child", "zygote")},
           "wall_s": res["wall_s"], "loadavg_start": res["loadavg_start"], "loadavg_end": res["loadavg_end"],
           "slow": res["slow"], "note": args.note, "threads": args.threads or torch.get_num_threads(),
           "ckptstore": rev_start, "ckptstore_changed_during_run": rev_end if rev_end != rev_start else None,
           "ckptstore_uncommitted_diff": diff_start}
    inv["id"] = uuid.uuid4().hex[:8]
    for r in res["runs"] + res["skipped"]:
        r["inv"] = inv["id"]
    data: dict[str, Any] = {"invocations": [inv], "runs": res["runs"], "skipped": res["skipped"]}
    out = Path(args.out)
    if args.append and out.exists():
        old = json.loads(out.read_text())
        new_keys = {(r["op"], r["store"], r["impl"], r["size_mib"]) for r in res["runs"] + res["skipped"]}
        keep = [r for r in old["runs"] if (r["op"], r["store"], r["impl"], r["size_mib"]) not in new_keys]
        keep_sk = [r for r in old["skipped"] if (r["op"], r["store"], r["impl"], r["size_mib"]) not in new_keys]
        alive = {r.get("inv") for r in keep + keep_sk}
        old_invs = [i for i in old["invocations"] if "id" not in i or i["id"] in alive]  # drop fully replaced runs
        data = {"invocations": [*old_invs, inv], "runs": keep + res["runs"], "skipped": keep_sk + res["skipped"]}
    data["summary"] = aggregate(data["runs"], data["skipped"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    log(f"wrote {out}")
    report(data, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
