"""One cell, measured in its own child process: time, CPU, peak extra RSS, bytes moved, correctness.

The child runs the same code path once on a tiny state first (imports, the fsspec instance, an
S3/GCS client: one-time costs are not charged), builds what the operation needs, resets the
kernel's ``VmHWM`` and times the call. ``peak_extra`` = VmHWM (max with a sampled ``VmRSS``)
minus the RSS just before the call; ``anon_extra`` = the sampled ``RssAnon`` rise. On a store
with a ``counter`` the server's log of requests and body bytes is reset and read right around
the call; on local disk ``/proc/self/io`` gives the bytes that reached the block layer.

Besides measuring (``mode: measure``), a child builds the state's expected values (``meta``) or
writes one input file (``prepare``) so the parent never runs a torch op (see ``runner.py``).
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.counting import fetch
from common.proc import ProcStatus, Sampler, cpu_seconds, proc_io
from common.state import LAYERS, build_state, state_shapes
from suite.context import Ctx
from suite.impls import IMPLEMENTATIONS
from suite.operations import OPERATIONS, input_for, reads, tensor_sums
from suite.stores import STORES, Store, drop_file_cache, remove, sync_tree

MiB = 2**20


def make_ctx(spec: dict[str, Any], url: str) -> Ctx:
    import fsspec

    store = STORES[spec["store"]]
    so = spec["storage_options"]
    fs = fsspec.filesystem("file") if store.local else fsspec.core.url_to_fs(url, **so)[0]
    return Ctx(spec["store"], url, so, store.local, fs)


def write_input(spec: dict[str, Any], url: str, size_bytes: int, layers: int = LAYERS) -> None:
    """Write the input file(s) a cell reads, with the implementation that produces them (``spec``'s op's, or its impl's)."""
    ctx = make_ctx(spec, url)
    if ctx.local:
        os.makedirs(url, exist_ok=True)
    ctx.state = build_state(state_shapes(size_bytes, layers))
    IMPLEMENTATIONS[input_for(spec.get("op"), spec["impl"])].ops["save"](ctx)
    if ctx.local:
        sync_tree(url)
    ctx.state = None
    gc.collect()


def summarize_requests(entries: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for e in entries:
        kind = e["method"] + ("" if e["status"].startswith("2") else f" {e['status']}")
        by[kind] = by.get(kind, 0) + 1
    return {"requests": len(entries), "by_method": by,
            "bytes_in": sum(e["request_body"] for e in entries), "bytes_out": sum(e["body"] for e in entries)}


def run_measured(spec: dict[str, Any], ctx: Ctx, fn: Callable[[Ctx], Any], store: Store, writes: bool) -> dict[str, Any]:
    """Time ``fn(ctx)``; a local write includes the fsync of what it wrote."""
    probe = ProcStatus()
    counter = spec.get("counter")
    gc.collect()
    if counter:
        fetch(counter, "reset")
    io0, cpu0 = proc_io(), cpu_seconds()
    baseline, anon0 = probe.rss(), probe.anon()
    hwm_ok = probe.reset_hwm()
    sampler = Sampler(probe, spec["sample_ms"] / 1000)
    sampler.start()
    t0 = time.perf_counter()
    fn(ctx)
    if writes and store.local:
        sync_tree(ctx.url)
    wall = time.perf_counter() - t0
    sampler.stop()
    cpu, io1 = cpu_seconds() - cpu0, proc_io()
    peak = max(probe.hwm() if hwm_ok else 0, sampler.max_rss)
    out: dict[str, Any] = {
        "wall_s": wall, "cpu_s": cpu, "baseline_rss": baseline, "peak_extra": peak - baseline,
        "anon_extra": max(0, sampler.max_anon - anon0), "retained": probe.rss() - baseline,
        "peak_method": "VmHWM" if hwm_ok else "sampled", "disk_read": io1["read_bytes"] - io0["read_bytes"],
        "disk_write": io1["write_bytes"] - io0["write_bytes"],
    }
    if counter:
        out["server"] = summarize_requests(fetch(counter, "stats"))
    return out


def write_meta(spec: dict[str, Any]) -> None:
    """The expected values the checks compare against: state bytes, tensor sums, safetensors file size."""
    import safetensors.torch

    state = build_state(state_shapes(spec["size_bytes"]))
    meta = {"state_bytes": sum(t.numel() * 4 for t in state.values()), "sums": tensor_sums(state),
            "file_bytes": len(safetensors.torch.save(state)), "tensors": len(state)}
    Path(spec["meta_out"]).write_text(json.dumps(meta))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure the cell ``spec`` names; a failure is recorded as ``status: error`` with its reason."""
    op, impl_name = spec["op"], spec["impl"]
    impl, operation, store = IMPLEMENTATIONS[impl_name], OPERATIONS[op], STORES[spec["store"]]
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
            warm_url = spec["url"] + "-warmup"
            try:
                w = prepared(warm_url, 2 * MiB, 3, write=True)
                fn(w)
                if not operation.reads and store.local:
                    sync_tree(w.url)
                del w
            finally:  # also after a failure: a leftover would make the next cell on this input fail
                if reading or not operation.reads:
                    remove(make_ctx(spec, warm_url))
        ctx = prepared(spec["url"], spec["size_bytes"], LAYERS, write=reading and not store.shared)
        if reading and store.local and spec["cold"]:
            drop_file_cache(spec["url"])
        result.update(run_measured(spec, ctx, fn, store, writes=operation.writes))
        result["moved_bytes"] = ctx.extra["moved_bytes"]
        ok, note = operation.check(ctx, meta)
        result.update(ok=ok, note=note, status="ok")
        rep = ctx.extra.get("report")
        if rep is not None:
            result["report"] = {"bytes_read": rep.bytes_read, "requests": rep.requests, "loaded": len(rep.loaded)}
        if "output_bytes" in ctx.extra:
            result["output_bytes"] = ctx.extra["output_bytes"]
        if not operation.reads:
            remove(ctx)
        elif operation.output:  # a conversion's output lies next to its input, which stays
            ctx.fs.rm(ctx.path(operation.output))
    except Exception as err:  # recorded as "not run: <reason>" rather than crashing the suite
        traceback.print_exc()
        first_line = str(err).splitlines()[0] if str(err) else ""
        result.update(status="error", reason=f"{type(err).__name__}: {first_line}"[:300])
    return result


def child_main(spec: dict[str, Any]) -> None:
    """Entry point of a child: ``spec["mode"]`` is ``meta``, ``prepare`` or ``measure``; writes ``spec["result"]``."""
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import fsspec  # noqa: F401  (imported before any timing, also in a --spawn child)
    import safetensors.torch  # noqa: F401
    import torch

    import ckptstore  # noqa: F401

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result: dict[str, Any] = {}
    if spec["mode"] == "meta":
        write_meta(spec)
    elif spec["mode"] == "prepare":
        write_input(spec, spec["url"], spec["size_bytes"])
    else:
        result = measure(spec)
    Path(spec["result"]).write_text(json.dumps(result))
