#!/usr/bin/env python
"""Async save: how long the training loop stalls for ``save(blocking=False)`` against a blocking save.

Issue 13 (async save): ``mgr.save(state, step, metrics, blocking=False)`` returns a handle as soon
as the state has been copied to host memory (``ckptstore/snapshot.py``); the write, the commit and
retention run in a background thread (``ckptstore/background.py``). The goal: the stall is at most
1.5x a plain in-memory copy of the state. This benchmark measures, for a GPT-shaped float32 state
(``common/state.py``, 1 GiB by default) on local disk and on S3 (moto in this, the parent, process):

* **blocking**: ``mgr.save({"model": state}, step)``; the stall is the whole save;
* **async**: ``mgr.save(..., blocking=False)``; the stall is the time until it returns the handle,
  and *until committed* the time until ``handle.result()`` returns;
* **plain copies**, the yardsticks: ``{k: v.clone() for k, v in state.items()}`` (fresh memory, as
  the snapshot must take: the goal's "plain in-memory copy") and ``dst[k].copy_(v)`` into buffers
  allocated and touched beforehand (the memcpy floor, what a snapshot that kept its buffers between
  saves could reach);
* **loop** (unless ``--no-loop``): a "training loop" of float32 matmuls in the main thread keeps
  running while an async save writes in the background; its step time before, during and after
  the save gives the slowdown the background write costs the loop (two cores, the GIL) and the
  training time lost, against the blocking save's stall.

Every measurement is a fresh child process, rounds are interleaved (round 1: every cell once, then
round 2, ...). A child builds the state (every page written), opens the manager and saves a tiny
state through the same path at step 0 (imports, S3 client, fsspec instance, the first thread are not
charged; the measured save is then a training loop's second save), resets ``VmHWM``
(``/proc/self/clear_refs``) and measures. Async saves and the clone are measured twice in a row: the
first in the child (its memory freshly mapped) and again right after the first one's memory was
freed (the allocator and the kernel hand back pages that were just in use; see RESULTS.md for why
the two differ on a VM).

Run ``python benchmarks/bench_async.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from statistics import mean, median
from typing import Any

from common.child import run_script_child
from common.proc import (
    ProcStatus,
    Sampler,
    children_cpu_seconds,
    cpu_seconds,
    machine_busy_seconds,
    minor_faults,
)
from common.provenance import ckptstore_revision, ckptstore_source_hash, command_line, machine_info, utc_now
from common.results_md import replace_section
from common.servers import child_env, s3_fs, s3_options, start_moto
from common.state import build_state, state_shapes

HERE = Path(__file__).resolve().parent
MiB = 2**20
SECTION = "## Async save: training-loop stall (bench_async.py)"
BUCKET = "ckptstore-bench-async"
VERSIONS = ("s3fs", "aiobotocore", "botocore", "moto", "crc32c")
GOAL = 1.5  # async stall <= GOAL x a plain in-memory copy of the state
STORES = {"local": "local disk", "s3": "S3 (moto)"}

# op -> (store, kind, label); the order is the order within a round and in the tables
OPERATIONS: dict[str, tuple[str, str, str]] = {
    "copy:clone": ("copy", "clone", "plain copy: `{k: v.clone() for k, v in state.items()}`"),
    "copy:prealloc": ("copy", "prealloc", "plain copy into resident buffers: `dst[k].copy_(v)`"),
    "local:blocking": ("local", "blocking", "`mgr.save(state, step)` (blocking)"),
    "local:async": ("local", "async", "`mgr.save(state, step, blocking=False)`"),
    "s3:blocking": ("s3", "blocking", "`mgr.save(state, step)` (blocking)"),
    "s3:async": ("s3", "async", "`mgr.save(state, step, blocking=False)`"),
    "local:loop": ("local", "loop", "matmul loop during `save(blocking=False)`"),
    "s3:loop": ("s3", "loop", "matmul loop during `save(blocking=False)`"),
}
TWICE = ("clone", "prealloc", "async")  # kinds measured twice in a row in one child


# ---------------------------------------------------------------------------------------
# Child: one measurement
# ---------------------------------------------------------------------------------------
def state_nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def join_save_threads() -> None:
    """Wait until the background save thread has ended: ``result()`` returns just before it drops the snapshot."""
    for t in threading.enumerate():
        if t.name.startswith("ckptstore-save-"):
            t.join()


class TimedSnapshot:
    """Wraps ``ckptstore.manager.snapshot`` to time it: how much of the async stall the host copy is."""

    def __init__(self) -> None:
        import ckptstore.manager

        self.module, self.real, self.seconds = ckptstore.manager, ckptstore.manager.snapshot, 0.0
        ckptstore.manager.snapshot = self

    def __call__(self, tree: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.real(tree)
        finally:
            self.seconds += time.perf_counter() - started


class Window:
    """One measured call: baseline RSS, VmHWM reset, the 5 ms sampler, CPU time and minor faults."""

    def __init__(self, probe: ProcStatus, sample_ms: float) -> None:
        import gc

        gc.collect()
        self.probe = probe
        self.baseline = probe.rss()
        self.hwm_ok = probe.reset_hwm()
        self.sampler = Sampler(probe, sample_ms / 1000)
        self.sampler.start()
        self.cpu0, self.flt0 = cpu_seconds(), minor_faults()
        self.t0 = time.perf_counter()

    def mark(self) -> dict[str, Any]:
        """The figures at the end of the stall (the copy done, ``save`` returned)."""
        stall = time.perf_counter() - self.t0
        cpu, flt = cpu_seconds() - self.cpu0, minor_faults() - self.flt0
        hwm = self.probe.hwm() if self.hwm_ok else 0
        return {"stall_s": stall, "cpu_stall_s": cpu, "minflt_stall": flt,
                "peak_extra_stall": max(hwm, self.sampler.max_rss) - self.baseline}

    def close(self) -> dict[str, Any]:
        self.sampler.stop()
        hwm = self.probe.hwm() if self.hwm_ok else 0
        return {"baseline_rss": self.baseline, "peak_extra": max(hwm, self.sampler.max_rss) - self.baseline,
                "sampled_peak_extra": self.sampler.max_rss - self.baseline, "samples": self.sampler.n,
                "peak_method": "VmHWM after clear_refs" if self.hwm_ok else "sampled VmRSS"}


def copy_pass(kind: str, state: dict[str, Any], dst: dict[str, Any], probe: ProcStatus, sample_ms: float) -> dict[str, Any]:
    """One plain copy of ``state``: ``clone`` (fresh memory) or ``copy_`` into the resident ``dst``."""
    import gc

    w = Window(probe, sample_ms)
    if kind == "clone":
        out = {k: v.clone() for k, v in state.items()}
    else:
        for k, v in state.items():
            dst[k].copy_(v)
        out = dst
    m = w.mark()
    m["total_s"] = m["stall_s"]
    checksum = float(sum(float(t.view(-1)[:: 1 + t.numel() // 7].sum()) for t in out.values()))
    del out
    gc.collect()
    m["retained_result"] = m["retained_joined"] = probe.rss() - w.baseline
    return {**m, **w.close(), "checksum": checksum}


def save_pass(mgr: Any, state: dict[str, Any], step: int, blocking: bool, probe: ProcStatus, sample_ms: float,
              timed: TimedSnapshot) -> dict[str, Any]:
    """One measured save: the stall, the time until committed, the peak; the background thread ended after."""
    import gc

    timed.seconds = 0.0
    w = Window(probe, sample_ms)
    out = mgr.save({"model": state}, step=step, blocking=blocking)
    m = w.mark()
    info = out if blocking else out.result()
    m["total_s"] = time.perf_counter() - w.t0
    m["retained_result"] = probe.rss() - w.baseline
    join_save_threads()
    gc.collect()
    m["retained_joined"] = probe.rss() - w.baseline
    m["snapshot_s"] = timed.seconds
    m["written_bytes"] = info.size
    return {**m, **w.close()}


def loop_run(mgr: Any, state: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Matmul steps before, during and after one async save; the save is issued between two steps."""
    import torch

    n = spec["matmul"]
    gen = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen), torch.empty(n, n)

    def step() -> float:
        started = time.perf_counter()
        torch.mm(a, b, out=c)
        return time.perf_counter() - started

    def steps_for(seconds: float) -> list[float]:
        out, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            out.append(step())
        return out

    for _ in range(3):
        step()
    before = steps_for(spec["loop_baseline_s"])
    t0 = time.perf_counter()
    handle = mgr.save({"model": state}, step=1, blocking=False)
    stall = time.perf_counter() - t0
    during = []
    while True:  # the loop goes on; it notices the save is done between two steps
        during.append(step())
        if handle.done():
            break
    window = time.perf_counter() - t0
    handle.result()
    join_save_threads()
    after = steps_for(spec["loop_baseline_s"])
    return {"matmul": n, "stall_s": stall, "window_s": window, "before": before, "during": during, "after": after}


def child_main(spec: dict[str, Any]) -> None:
    import torch

    from ckptstore import CheckpointManager

    op = spec["op"]
    store, kind, _ = OPERATIONS[op]
    if store == "s3":
        import s3fs  # noqa: F401  (import cost is not part of a save)
    timed = TimedSnapshot()
    state = build_state(state_shapes(spec["size_bytes"]))
    probe = ProcStatus()
    result: dict[str, Any] = {"op": op, "store": store, "kind": kind, "round": spec["round"], "size_bytes": spec["size_bytes"],
                              "state_bytes": state_nbytes(state), "tensors": len(state), "torch_threads": torch.get_num_threads()}
    if store == "copy":
        dst: dict[str, Any] = {}
        if kind == "prealloc":
            dst = {k: torch.empty_like(v).zero_() for k, v in state.items()}  # resident before the baseline
        small = torch.zeros(16)
        small.clone().copy_(small)  # warm-up: the same two calls on a tiny tensor
        result["passes"] = [copy_pass(kind, state, dst, probe, spec["sample_ms"]) for _ in range(2 if kind in TWICE else 1)]
    else:
        if store == "local":
            os.makedirs(spec["root"], exist_ok=True)
        mgr = CheckpointManager(spec["root"], storage_options=spec["storage_options"] or None)
        tiny = {"model": {"w": torch.zeros(16)}}  # the same path, a tiny state
        if kind == "blocking":
            mgr.save(tiny, step=0)
        else:
            mgr.save(tiny, step=0, blocking=False).result()
            join_save_threads()
        if kind == "loop":
            result["loop"] = loop_run(mgr, state, spec)
        else:
            result["passes"] = [save_pass(mgr, state, step, kind == "blocking", probe, spec["sample_ms"], timed)
                                for step in range(1, 3 if kind in TWICE else 2)]
        mgr.wait()
    result["ckptstore_src"] = ckptstore_source_hash()
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------
# Parent: aggregate and report
# ---------------------------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def rng(values: list[float], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """``median (min–max)``, or one number for one value."""
    v = [x * scale for x in values]
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"


def cells(runs: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(op, requested size) -> its runs, in round order."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r["round"]):
        out.setdefault((r["op"], r["size_bytes"]), []).append(r)
    return out


def pass_values(rs: list[dict[str, Any]], key: str, which: int = 0) -> list[float]:
    return [r["passes"][which][key] for r in rs if len(r.get("passes", [])) > which]


def med(rs: list[dict[str, Any]], key: str, which: int = 0) -> float:
    v = pass_values(rs, key, which)
    return median(v) if v else float("nan")


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str, which: int = 0) -> list[float]:
    """Per round: a's value over b's (the two children of one round ran minutes apart at most)."""
    by_round = {r["round"]: r for r in b}
    return [r["passes"][which][key] / by_round[r["round"]]["passes"][which][key] for r in a
            if r["round"] in by_round and len(r["passes"]) > which and len(by_round[r["round"]]["passes"]) > which]


def loop_figures(run: dict[str, Any]) -> dict[str, float]:
    lp = run["loop"]
    base = mean(lp["before"])
    return {"base_ms": base * 1000, "after_ms": mean(lp["after"]) * 1000, "during_ms": mean(lp["during"]) * 1000,
            "slowdown": mean(lp["during"]) / base, "steps": len(lp["during"]), "window_s": lp["window_s"],
            "stall_s": lp["stall_s"], "lost_s": lp["window_s"] - len(lp["during"]) * base}


def main_table(c: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    out = [
        "| Operation | Store | State (MiB) | Stall s: 1st in the process | Stall s: again, right after | "
        "Until committed s | Peak extra MiB (until committed) | % of state | Peak extra MiB when `save` returns | "
        "RSS above baseline after `result()` / thread ended (MiB) | Minor faults in the stall (k) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (op, _size), rs in sorted(c.items(), key=lambda kv: (list(OPERATIONS).index(kv[0][0]), kv[0][1])):
        store, kind, label = OPERATIONS[op]
        if kind == "loop":
            continue
        nbytes = rs[0]["state_bytes"]
        again = pass_values(rs, "stall_s", 1)
        until = "–" if store == "copy" else rng(pass_values(rs, "total_s"))
        peak = pass_values(rs, "peak_extra")
        out.append(
            f"| {label} | {STORES.get(store, 'memory')} | {mib(nbytes)} | {rng(pass_values(rs, 'stall_s'), '{:.3f}')} | "
            f"{rng(again, '{:.3f}') if again else '–'} | {until} | {rng(peak, '{:.1f}', 1 / MiB)} | "
            f"{100 * median(peak) / nbytes:.1f}% | {rng(pass_values(rs, 'peak_extra_stall'), '{:.1f}', 1 / MiB)} | "
            f"{mib(med(rs, 'retained_result'))} / {mib(med(rs, 'retained_joined'))} | "
            f"{med(rs, 'minflt_stall') / 1000:.0f} |"
        )
    return "\n".join(out) + "\n"


def store_ratios(c: dict[tuple[str, int], list[dict[str, Any]]], store: str, size: int) -> dict[str, Any] | None:
    """The ratios of one store at one size (None if a cell is missing)."""
    need = {k: c.get((f"{store}:{k}", size)) for k in ("async", "blocking")}
    copies = {k: c.get((f"copy:{k}", size)) for k in ("clone", "prealloc")}
    if need["async"] is None or copies["clone"] is None:
        return None
    a, clone = need["async"], copies["clone"]
    out: dict[str, Any] = {
        "clone_1st": med(a, "stall_s") / med(clone, "stall_s"),
        "clone_again": med(a, "stall_s", 1) / med(clone, "stall_s", 1),
        "clone_paired_1st": paired(a, clone, "stall_s"),
        "clone_paired_again": paired(a, clone, "stall_s", 1),
        "snapshot_share": med(a, "snapshot_s") / med(a, "stall_s"),
        "other_ms": median([p["stall_s"] - p["snapshot_s"] for r in a for p in r["passes"]]) * 1000,
        "state_bytes": a[0]["state_bytes"],
    }
    if copies["prealloc"] is not None:
        out["prealloc"] = med(a, "stall_s") / med(copies["prealloc"], "stall_s")
        out["prealloc_again"] = med(a, "stall_s", 1) / med(copies["prealloc"], "stall_s", 1)
    if need["blocking"] is not None:
        b = need["blocking"]
        out.update({
            "blocking": med(a, "stall_s") / med(b, "stall_s"),
            "total_vs_blocking": med(a, "total_s") / med(b, "total_s"),
            "extra_peak": med(a, "peak_extra") - med(b, "peak_extra"),
            "blocking_stall": med(b, "stall_s"),
        })
    out["met"] = out["clone_1st"] <= GOAL and out["clone_again"] <= GOAL
    return out


def ratio_table(c: dict[tuple[str, int], list[dict[str, Any]]], sizes: dict[str, list[int]]) -> str:
    out = [
        f"| Store | State (MiB) | Async stall / clone: 1st (per round) | again (per round) | ≤ {GOAL}x? | "
        "Async stall / `copy_` into resident buffers: 1st, again | Async stall / blocking stall | "
        "Async until committed / blocking | Async peak − blocking peak (MiB) | … as % of state | "
        "Snapshot's share of the async stall | Rest of the stall (ms) |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for store in STORES:
        for size in sizes.get(store, []):
            r = store_ratios(c, store, size)
            if r is None:
                continue
            per = {k: ", ".join(f"{x:.2f}" for x in r[f"clone_paired_{k}"]) for k in ("1st", "again")}
            pre = f"{r['prealloc']:.1f}x, {r['prealloc_again']:.1f}x" if "prealloc" in r else "–"
            blk = (f"{r['blocking']:.3f}x | {r['total_vs_blocking']:.2f}x | {mib(r['extra_peak'])} | "
                   f"{100 * r['extra_peak'] / r['state_bytes']:.1f}%") if "blocking" in r else "– | – | – | –"
            out.append(
                f"| {STORES[store]} | {mib(r['state_bytes'])} | **{r['clone_1st']:.2f}x** ({per['1st']}) | "
                f"**{r['clone_again']:.2f}x** ({per['again']}) | {'yes' if r['met'] else '**no**'} | {pre} | {blk} | "
                f"{100 * r['snapshot_share']:.1f}% | {r['other_ms']:.1f} |"
            )
    return "\n".join(out) + "\n"


def loop_table(c: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    rows = []
    for (op, size), rs in c.items():
        store, kind, _ = OPERATIONS[op]
        if kind != "loop":
            continue
        f = [loop_figures(r) for r in rs]
        blocking = c.get((f"{store}:blocking", size))
        blocking_s = med(blocking, "stall_s") if blocking else float("nan")
        lost = [x["lost_s"] for x in f]
        rows.append(
            f"| {STORES[store]} | {mib(rs[0]['state_bytes'])} | {rs[0]['loop']['matmul']} | "
            f"{rng([x['base_ms'] for x in f], '{:.1f}')} / {rng([x['after_ms'] for x in f], '{:.1f}')} | "
            f"{rng([x['during_ms'] for x in f], '{:.1f}')} | {rng([x['slowdown'] for x in f])}x | "
            f"{rng([x['steps'] for x in f], '{:.0f}')} | {rng([x['window_s'] for x in f])} | "
            f"{rng([x['stall_s'] for x in f], '{:.3f}')} | {rng(lost)} | {blocking_s:.2f} | "
            f"{median(lost) / blocking_s:.2f} | {rng([r['parent_cpu_s'] for r in rs]) if store == 's3' else '–'} |"
        )
    if not rows:
        return ""
    return (
        "| Store | State (MiB) | Matmul n | Step ms before / after the save | Step ms during the background save | "
        "Slowdown during | Steps during | Save issued → loop saw it done (s) | Async stall s | Training time lost s | "
        "Blocking save stall s (the time it loses) | Lost, async / blocking | moto CPU s (parent) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )


def verdict(c: dict[tuple[str, int], list[dict[str, Any]]], sizes: dict[str, list[int]]) -> str:
    lines = []
    for store in STORES:
        for size in sizes.get(store, []):
            r = store_ratios(c, store, size)
            if r is None:
                continue
            lines.append(
                f"{STORES[store]}, {mib(r['state_bytes'])} MiB: the async stall is {r['clone_1st']:.2f}x the clone as the "
                f"first copy in the process and {r['clone_again']:.2f}x right after a previous one (goal ≤ {GOAL}x: "
                f"{'met' if r['met'] else 'not met'})"
                + (f"; {r['prealloc']:.1f}x / {r['prealloc_again']:.1f}x a `copy_` into resident buffers" if "prealloc" in r else "")
                + (f"; {r['blocking']:.3f}x the blocking save's stall ({r['blocking_stall']:.2f} s); it costs "
                   f"{mib(r['extra_peak'])} MiB more peak memory than the blocking save "
                   f"({100 * r['extra_peak'] / r['state_bytes']:.0f}% of the state)" if "blocking" in r else "")
                + "."
            )
    met = all(store_ratios(c, s, z)["met"] for s in STORES for z in sizes.get(s, []) if store_ratios(c, s, z))  # type: ignore[index]
    head = f"**Goal (async stall ≤ {GOAL}x a plain in-memory copy, the clone): {'met' if met else 'not met'}.**"
    return head + "\n\n" + "\n".join(f"- {x}" for x in lines) + "\n"


def render_section(data: dict[str, Any]) -> str:
    info, a = data["machine"], data["args"]
    c = cells(data["runs"])
    sizes = {"local": [int(s * MiB) for s in a["size_mib"]], "s3": [int(s * MiB) for s in a["s3_size_mib"]]}
    sizes = {s: z for s, z in sizes.items() if s in a["stores"]}
    load = data["load"]
    other = load["other_cpu_s"] / load["elapsed_s"]
    threads = sorted({r["torch_threads"] for r in data["runs"]})
    parts = [
        f"{SECTION}\n\n",
        f"Command: `{data['command']}` — {data['date']} (wall {data['elapsed_s'] / 60:.1f} min).  \n"
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']}; "
        f"Python {info['python']}, torch {info['torch']} ({', '.join(map(str, threads))} threads), fsspec {info['fsspec']}"
        + (f", s3fs {info.get('s3fs')}, aiobotocore {info.get('aiobotocore')}, botocore {info.get('botocore')}, "
           f"moto {info.get('moto')}" if "s3" in a["stores"] else "")
        + f", crc32c {info.get('crc32c')}; ckptstore at {info['ckptstore']}.  \n"
        f"Load average (1 min) at start / end: {data['loadavg'][0]:.2f} / {data['loadavg'][1]:.2f}; other processes "
        f"used {load['other_cpu_s']:.0f} CPU-seconds during the run (`/proc/stat` busy time minus this benchmark's "
        f"processes), on average **{other:.2f} of the {info['cores']} cores**"
        + (f". **The machine was shared**: {a['shared_note']}" if a.get("shared_note") else "")
        + ".\n\n",
        f"State: {', '.join(f'{STORES[s]} ' + ' and '.join(mib(z) for z in zs) + ' MiB' for s, zs in sizes.items())} "
        "requested (float32, GPT-like: embedding + 24 blocks + final norm, `common/state.py`), saved as "
        "`{\"model\": state}` with the default format (safetensors). "
        f"{a['repeats']} interleaved rounds; every cell a fresh child process, which builds the state, opens the "
        "manager and first saves a tiny state at step 0 through the same path (blocking or not: imports, the S3 "
        "client, fsspec's instance and the first thread are not charged, and the measured save is a manager's "
        "second, as in a training loop), then resets `VmHWM`. *Stall* = the time until `save` returns (blocking: "
        "the whole save, local saves fsync; async: until the handle is returned, the host copy done), or the "
        "copy's time. *Until committed* = until `handle.result()` returns. *Peak extra* = `VmHWM` (max with a "
        "5 ms `VmRSS` sampler) minus the RSS just before the call, up to the commit; *when `save` returns* = the "
        "same at the end of the stall. Async saves and the clone run twice in a row in one child: *1st in the "
        "process* (the copy lands in memory this process never touched) and *again, right after* the first "
        "one's memory was freed. The yardsticks: the **clone** takes fresh memory as the snapshot must (it is the "
        "goal's \"plain in-memory copy\": what `{k: v.clone()}` or `copy.deepcopy` costs the loop); "
        "`copy_` into buffers allocated and touched beforehand is the memcpy floor (what a snapshot that keeps "
        "its buffers from one save to the next could reach, at the price of holding one state copy for good). "
        "*Minor faults*: first touches of fresh pages (262k per GiB at 4 KiB). The snapshot's share is timed by "
        "wrapping `ckptstore.manager.snapshot`. "
        + ("S3 is a moto server (`ThreadedMotoServer`, 127.0.0.1) in the parent process: it holds the objects in "
           "its memory (not counted) and its throughput (~60 MiB/s) sets the upload times; its CPU is the parent's "
           "CPU time during the child. " if "s3" in a["stores"] else "")
        + "\n\n",
        main_table(c),
        "\nRatios (medians; per round in parentheses: the two children of one round ran back to back):\n\n",
        ratio_table(c, sizes),
    ]
    lt = loop_table(c)
    if lt:
        parts += [
            f"\nTraining loop during an async save: the main thread runs `torch.mm` of two {a['matmul']}x{a['matmul']} "
            f"float32 matrices back to back ({a['loop_baseline_s']:g} s before the save to set the step time, and "
            f"{a['loop_baseline_s']:g} s after it as a check), issues `save(blocking=False)` between two steps and "
            "keeps stepping until `handle.done()`. *Training time lost* = (save issued → the step in which the loop "
            "saw it done) − steps done meanwhile × the step time before; a blocking save loses its whole stall. The "
            "background write competes with the loop for the two cores (and for the GIL between torch calls)"
            + ("; on S3 so does moto, which a real S3 would not" if "s3" in a["stores"] else "") + ".\n\n",
            lt,
        ]
    parts += ["\n", verdict(c, sizes)]
    src = data["ckptstore_src"]
    if len(src["children"]) > 1:
        parts.insert(1, f"**Warning: ckptstore/ changed during this run**: the children ran different code (source hashes "
                        f"{', '.join(src['children'])}); they mix versions.\n\n")
    elif src["start"] != src["end"]:
        parts.insert(1, f"Note: ckptstore/ changed during the run (source hash {src['start']} at the start, {src['end']} "
                        f"at the end); every child ran {src['children'][0]}.\n\n")
    if a.get("notes"):
        parts.append("\n" + a["notes"].strip() + "\n")
    return "".join(parts)


def report(data: dict[str, Any], args: argparse.Namespace) -> None:
    section = render_section(data)
    print()
    print(section)
    if args.results_md:
        replace_section(Path(args.results_md), SECTION, section)
        print(f"updated {args.results_md} ({SECTION})")


# ---------------------------------------------------------------------------------------
# Parent: server, schedule, rounds
# ---------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The cells of one round, in order: the copies at every size a store uses, then the stores' saves."""
    sizes = {"local": [int(s * MiB) for s in args.size_mib], "s3": [int(s * MiB) for s in args.s3_size_mib]}
    used = sorted({z for s in args.stores for z in sizes[s]})
    cells_: list[tuple[str, int]] = []
    for op, (store, kind, _) in OPERATIONS.items():
        if kind == "loop" and not args.loop:
            continue
        if store == "copy":
            cells_ += [(op, z) for z in used]
        elif store in args.stores:
            cells_ += [(op, z) for z in sizes[store]]
    return cells_


def measure(args: argparse.Namespace, started: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Start moto (if S3 is measured), run the interleaved rounds; return the runs and the CPU accounting."""
    (HERE / "out").mkdir(exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="async-", dir=HERE / "out"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env()
    server, fs, options = None, None, {}
    if "s3" in args.stores:
        server, endpoint, _ = start_moto(count=False)
        options = s3_options(endpoint)
        fs = s3_fs(endpoint)
        fs.mkdir(BUCKET)
        print(f"moto S3 server at {endpoint}, bucket {BUCKET}", flush=True)
    busy0, own0 = machine_busy_seconds(), cpu_seconds() + children_cpu_seconds()
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.repeats):
            for op, size in plan(args):
                store = OPERATIONS[op][0]
                run_id = f"{op.replace(':', '-')}-{r}-{uuid.uuid4().hex[:6]}"
                root = f"s3://{BUCKET}/{run_id}" if store == "s3" else str(workdir / run_id)
                spec = {"op": op, "size_bytes": size, "round": r, "root": root, "sample_ms": args.sample_ms,
                        "storage_options": options if store == "s3" else {}, "matmul": args.matmul,
                        "loop_baseline_s": args.loop_baseline_s}
                parent0, children0, busy_c0, t0 = cpu_seconds(), children_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
                try:
                    run = run_script_child(Path(__file__).resolve(), spec, env, args.timeout)
                finally:  # free the disk / moto's memory before the next child
                    if store == "s3":
                        assert fs is not None
                        if fs.exists(root):
                            fs.rm(root, recursive=True)
                    else:
                        shutil.rmtree(root, ignore_errors=True)
                parent, child = cpu_seconds() - parent0, children_cpu_seconds() - children0
                run.update(parent_cpu_s=parent, child_cpu_s=child, child_wall_s=time.perf_counter() - t0,
                           other_cpu_s=machine_busy_seconds() - busy_c0 - parent - child)
                runs.append(run)
                print(f"[{time.perf_counter() - started:6.1f}s] round {r + 1}/{args.repeats} {op:15s} {mib(size):>7} MiB  "
                      + progress_line(run), flush=True)
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    own = cpu_seconds() + children_cpu_seconds() - own0
    return runs, {"other_cpu_s": machine_busy_seconds() - busy0 - own, "own_cpu_s": own}


def progress_line(run: dict[str, Any]) -> str:
    if "loop" in run:
        f = loop_figures(run)
        return (f"stall {f['stall_s']:.3f}s  step {f['base_ms']:.1f} → {f['during_ms']:.1f} ms ({f['slowdown']:.2f}x) "
                f"for {f['window_s']:.2f}s, lost {f['lost_s']:.2f}s  other load {run['other_cpu_s'] / run['child_wall_s']:.2f}")
    return "  ".join(f"stall {p['stall_s']:.3f}s total {p['total_s']:.2f}s peak +{mib(p['peak_extra'])} MiB" for p in run["passes"]) + \
        f"  other load {run['other_cpu_s'] / run['child_wall_s']:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size-mib", type=float, nargs="+", default=None, help="state size(s) on local disk (default 1024; --quick: 16)")
    ap.add_argument("--s3-size-mib", type=float, nargs="+", default=None,
                    help="state size(s) on S3 (default 1024; --quick: 16); moto serves ~60 MiB/s, ~17 s per 1 GiB upload")
    ap.add_argument("--stores", nargs="+", choices=list(STORES), default=list(STORES), help="stores to measure")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--no-loop", dest="loop", action="store_false", help="leave out the training-loop variant")
    ap.add_argument("--matmul", type=int, default=1024, help="the loop's step: torch.mm of two n x n float32 matrices")
    ap.add_argument("--loop-baseline-s", type=float, default=None,
                    help="seconds of loop steps before (and after) the save (default 3; --quick: 0.3)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 16 MiB, 1 round, short loop baselines; RESULTS.md untouched unless --results-md")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--workdir", default=None, help="where local saves go (default: a temp dir under benchmarks/out)")
    ap.add_argument("--out", default=str(HERE / "out" / "async.json"), help="JSON results")
    ap.add_argument("--results-md", default=None, help="Markdown file to update (default benchmarks/RESULTS.md; --quick: none)")
    ap.add_argument("--no-results-md", action="store_true", help="do not touch any RESULTS.md")
    ap.add_argument("--shared-note", default="", help="what else ran on the machine, for the results text")
    ap.add_argument("--notes", default="", help="a paragraph appended to the section (observations)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="measure nothing: re-render the Markdown (and RESULTS.md) from a saved JSON result")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    quick = args.quick
    args.size_mib = args.size_mib or [16 if quick else 1024]
    args.s3_size_mib = args.s3_size_mib or [16 if quick else 1024]
    args.repeats = args.repeats or (1 if quick else 3)
    args.loop_baseline_s = args.loop_baseline_s if args.loop_baseline_s is not None else (0.3 if quick else 3.0)
    if args.no_results_md or (quick and args.results_md is None):
        args.results_md = None
    elif args.results_md is None:
        args.results_md = str(HERE / "RESULTS.md")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        if args.notes:
            data["args"]["notes"] = args.notes
        if args.shared_note:
            data["args"]["shared_note"] = args.shared_note
        report(data, args)
        return 0

    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    machine = {**machine_info(VERSIONS), "ckptstore": ckptstore_revision()}
    src_start = ckptstore_source_hash()
    runs, cpu = measure(args, started)
    elapsed = time.perf_counter() - started
    data = {
        "command": command_line(),
        "date": utc_now(),
        "elapsed_s": elapsed,
        "loadavg": [load0, os.getloadavg()[0]],
        "load": {**cpu, "elapsed_s": elapsed},
        "machine": machine,
        "ckptstore_src": {"start": src_start, "end": ckptstore_source_hash(), "children": sorted({r["ckptstore_src"] for r in runs})},
        "args": vars(args),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    report(data, args)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
