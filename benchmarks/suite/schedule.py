"""The schedule: which cells exist, their inputs, and the interleaved rounds that measure them.

A cell is (operation, implementation, store, size). Rounds are interleaved (round 1: every cell
once, then round 2, ...) so slow drifts of a shared machine spread over every row. Before the
rounds, children compute the expected values per size and write the inputs on shared stores
once per (format, store, size), untimed. A cell that fails is not retried; a cell whose first
measurement takes longer than ``--slow-s`` is not repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

from common.servers import child_env, use_test_credentials
from suite.impls import IMPLEMENTATIONS
from suite.operations import input_for, reads
from suite.runner import Runner
from suite.stores import STORES, Running

MiB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Cell:
    op: str
    impl: str
    store: str
    size_mib: float

    @property
    def key(self) -> str:
        return f"{self.op}/{self.store}/{self.impl}/{self.size_mib:g}"


def sizes_of(args: argparse.Namespace, store: str) -> list[float]:
    """The state sizes a store runs at: its own ``--<store>-size-mib`` if it has one, else ``--sizes-mib``."""
    return getattr(args, f"{store.replace('-', '_')}_size_mib") if STORES[store].sizes_help else args.sizes_mib


def sizes_by_store(args: argparse.Namespace) -> dict[float, list[str]]:
    out: dict[float, list[str]] = {}
    for store in args.stores:
        for s in sizes_of(args, store):
            out.setdefault(s, []).append(store)
    return dict(sorted(out.items()))


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
                    if impl.local_only and not STORES[store].local:
                        skipped.append({"op": op, "impl": name, "store": store, "size_mib": size_s,
                                        "reason": "n/a: " + impl.local_only})
                        continue
                    cells.append(Cell(op, name, store, size_s))
    return cells, skipped


def _progress(r: dict[str, Any], c: Cell, slow: bool) -> str:
    mbps = r["moved_bytes"] / MiB / r["wall_s"] if r["wall_s"] > 0 else float("inf")
    server = r.get("server")
    return (f"{r['wall_s']:6.2f}s {mbps:7.0f} MiB/s  peak +{r['peak_extra'] / MiB:7.1f} MiB"
            + (f"  {c.store.upper()} {server['requests']} req, in {server['bytes_in'] / MiB:.1f} / out "
               f"{server['bytes_out'] / MiB:.1f} MiB" if server else "")
            + ("" if r["ok"] else f"  CHECK FAILED {r['note']}")
            + ("  (slow: 1 repeat only)" if slow else ""))


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the stores, run every cell ``args.repeats`` times interleaved, tear down; returns the raw runs."""
    cells, skipped = plan_cells(args)
    running: dict[str, Running] = {}
    started = time.perf_counter()
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    metas: dict[float, str] = {}
    slow: set[str] = set()
    meta_dir = tempfile.mkdtemp(prefix="suite-meta-")
    use_test_credentials()
    runner: Runner | None = None
    try:
        for store in args.stores:
            running[store] = STORES[store].setup(args)
            log(f"store {store}: {running[store].root}"
                + (f" (server {running[store].counter})" if running[store].counter else ""))
        # after the set-ups: they may export what the children need (the GCS emulator's host)
        runner = Runner(child_env(), args.spawn, [STORES[s].client for s in args.stores if STORES[s].client])

        def base_spec(store: str, size_mib: float) -> dict[str, Any]:
            return {"store": store, "counter": running[store].counter, "storage_options": running[store].storage_options,
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
                kind = input_for(c.op, c.impl)
                inputs.setdefault((kind, c.store, c.size_mib),
                                  STORES[c.store].url(running[c.store], f"inputs/{kind}-{c.size_mib:g}"))
        for (kind, store, size_mib), url in inputs.items():
            if not STORES[store].shared:
                continue
            t = time.perf_counter()
            res = runner.run({**base_spec(store, size_mib), "mode": "prepare", "impl": kind, "url": url}, args.timeout)
            log(f"[{time.perf_counter() - started:6.1f}s] input {kind} on {store}, {size_mib:g} MiB: "
                f"{'written' if res.get('status') != 'error' else 'FAILED ' + res['reason']} in {time.perf_counter() - t:.1f}s")
        broken: dict[str, str] = {}
        total = len(cells) * args.repeats
        done = 0
        for repeat in range(args.repeats):
            for c in cells:
                done += 1
                if c.key in broken or c.key in slow:
                    continue
                url = (inputs[(input_for(c.op, c.impl), c.store, c.size_mib)] if reads(c.op, c.impl) else
                       STORES[c.store].url(running[c.store], f"saves/{c.impl}-{uuid.uuid4().hex[:8]}"))
                spec = {**base_spec(c.store, c.size_mib), "mode": "measure", "op": c.op, "impl": c.impl, "url": url,
                        "repeat": repeat, "meta": metas[c.size_mib], "warmup": not args.no_warmup,
                        "cold": not args.warm_cache}
                t = time.perf_counter()
                r = runner.run(spec, args.timeout)
                child_s = time.perf_counter() - t
                r.update(op=c.op, impl=c.impl, store=c.store, size_mib=c.size_mib, repeat=repeat, child_s=child_s)
                runs.append(r)
                head = (f"[{time.perf_counter() - started:6.1f}s] {done}/{total} r{repeat + 1} {c.op:7s} {c.store:6s} "
                        f"{c.impl:30s} {c.size_mib:g} MiB: ")
                if r.get("status") != "ok":
                    broken[c.key] = r.get("reason", "?")
                    log(head + f"NOT RUN: {r.get('reason')}")
                    continue
                if repeat == 0 and child_s > args.slow_s and args.repeats > 1:
                    slow.add(c.key)
                log(head + _progress(r, c, c.key in slow))
    finally:
        if runner is not None:
            runner.close()
        for store in reversed(list(running)):
            with contextlib.suppress(Exception):
                running[store].teardown()
        shutil.rmtree(meta_dir, ignore_errors=True)
    return {"runs": runs, "skipped": skipped, "slow": sorted(slow), "wall_s": time.perf_counter() - started,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
