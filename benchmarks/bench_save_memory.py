#!/usr/bin/env python
"""Peak extra memory while saving a synthetic transformer-shaped state.

Compares, side by side and interleaved, stock ``torch.save`` / ``safetensors`` with
ckptstore's two formats, on local disk and on S3 (a moto server in this process). Every
measurement runs in a fresh child process so that its peak RSS belongs to one save only:

1. the child imports everything, builds the state (every page written), and (by default)
   does one tiny save through the same code path, so one-time costs (imports, the S3
   client, fsspec's filesystem instance) are not charged to the measured save;
2. it records the baseline RSS, resets the kernel's high-water mark (``VmHWM``, by writing
   ``5`` to ``/proc/self/clear_refs``) and starts a thread that samples ``VmRSS`` every 5 ms;
3. it runs the save; ``peak_extra = VmHWM - baseline`` (exact, kernel-tracked; the sampled
   maximum is kept as a cross-check and is the fallback where ``clear_refs`` is refused).

``--profile`` adds one extra child per operation that runs the save under ``tracemalloc``
and lists the Python allocation sites alive at the traced peak: this is how to tell which
component buffers (s3fs's part buffer, botocore, torch.save, ...). tracemalloc sees only
allocations made through Python's allocators; the gap between the traced peak and the RSS
peak is native memory (torch/C++, OpenSSL, ...).

Run ``python benchmarks/bench_save_memory.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common.child import run_script_child
from common.proc import ProcStatus, Sampler
from common.provenance import ckptstore_revision, command_line, machine_info, utc_now
from common.results_md import replace_section
from common.servers import child_env, s3_fs, s3_options, start_moto
from common.state import build_state, state_shapes

HERE = Path(__file__).resolve().parent
MiB = 2**20
SECTION = "## Save: peak extra memory"
BUCKET = "ckptstore-bench"
VERSIONS = ("s3fs", "moto", "botocore", "aiobotocore", "aiohttp")

# name -> (store, label shown in the table)
OPERATIONS: dict[str, tuple[str, str]] = {
    "torch.save": ("local", "`torch.save(state, path)` (stock)"),
    "safetensors.save_file": ("local", "`safetensors.torch.save_file(state, path)` (stock)"),
    "ckptstore-safetensors": ("local", "ckptstore `CheckpointManager(dir, format=\"safetensors\").save`"),
    "ckptstore-torch": ("local", "ckptstore `CheckpointManager(dir, format=\"torch\").save`"),
    "s3:ckptstore-safetensors": ("s3", "ckptstore `CheckpointManager(\"s3://...\", format=\"safetensors\").save`"),
    "s3:ckptstore-torch": ("s3", "ckptstore `CheckpointManager(\"s3://...\", format=\"torch\").save`"),
    "s3:torch.save-fsspec": ("s3", "`torch.save(state, fsspec.open(\"s3://...\", \"wb\"))` (stock, as Lightning does)"),
}


class TracingSampler(Sampler):
    """Also snapshots tracemalloc whenever the traced memory reaches a new high (``--profile``)."""

    def __init__(self, probe: ProcStatus, interval: float) -> None:
        super().__init__(probe, interval)
        self.snapshot: Any = None
        self.snap_traced = 0

    def sample(self) -> None:
        import tracemalloc

        super().sample()
        current = tracemalloc.get_traced_memory()[0]
        if current > self.snap_traced + 1 * MiB:  # a new traced high: keep what is alive now
            self.snapshot = tracemalloc.take_snapshot()
            self.snap_traced = current


def state_nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------------------------
# Child: one measurement
# ---------------------------------------------------------------------------------------
def child_main(spec: dict[str, Any]) -> None:
    import gc

    import fsspec
    import safetensors.torch
    import torch

    import ckptstore
    from ckptstore import CheckpointManager

    op, store = spec["op"], OPERATIONS[spec["op"]][0]
    storage_options = spec.get("storage_options") or {}
    if store == "s3":
        import s3fs  # noqa: F401  (import cost is not part of a save)
    del ckptstore

    def run(state: dict[str, Any], dest: str) -> None:
        """Save ``state`` to ``dest`` (a local folder or an s3:// prefix) the way ``op`` does."""
        if op == "torch.save":
            torch.save(state, os.path.join(dest, "model.pt"))
        elif op == "safetensors.save_file":
            safetensors.torch.save_file(state, os.path.join(dest, "model.safetensors"))
        elif op.endswith(("ckptstore-safetensors", "ckptstore-torch")):
            fmt = op.rsplit("-", 1)[1]
            CheckpointManager(dest, format=fmt, storage_options=storage_options or None).save({"model": state}, step=1)
        elif op == "s3:torch.save-fsspec":
            with fsspec.open(f"{dest}/model.pt", "wb", **storage_options) as f:
                torch.save(state, f)
        else:
            raise SystemExit(f"unknown op {op}")

    dest, warm_dest = spec["dest"], spec["dest"] + "-warmup"
    if store == "local":
        os.makedirs(dest, exist_ok=True)
        os.makedirs(warm_dest, exist_ok=True)

    state = build_state(state_shapes(spec["size_bytes"]))
    nbytes = state_nbytes(state)
    if spec["warmup"]:
        run({"w": torch.zeros(16)}, warm_dest)

    probe = ProcStatus()
    gc.collect()
    trace = bool(spec.get("profile"))
    if trace:
        import tracemalloc

        tracemalloc.start(spec.get("frames", 30))
    baseline = probe.rss()
    hwm_ok = probe.reset_hwm()
    sampler = (TracingSampler if trace else Sampler)(probe, spec["sample_ms"] / 1000)
    sampler.start()
    t0 = time.perf_counter()
    run(state, dest)
    wall = time.perf_counter() - t0
    sampler.stop()
    hwm = probe.hwm() if hwm_ok else 0
    rss_end = probe.rss()
    peak = max(hwm, sampler.max_rss)  # the HWM is exact; the sampler can only be lower
    result: dict[str, Any] = {
        "op": op, "store": store, "repeat": spec["repeat"], "state_bytes": nbytes,
        "tensors": len(state), "baseline_rss": baseline, "peak_rss": peak,
        "peak_extra_bytes": peak - baseline, "peak_extra_pct": 100 * (peak - baseline) / nbytes,
        "sampled_peak_extra_bytes": sampler.max_rss - baseline, "samples": sampler.n,
        "t_peak_s": round(sampler.t_max, 3), "wall_s": wall, "retained_bytes": rss_end - baseline,
        "peak_method": "VmHWM after clear_refs" if hwm_ok else "sampled VmRSS",
        "warmup": spec["warmup"],
    }
    if isinstance(sampler, TracingSampler):
        import tracemalloc

        _, traced_peak = tracemalloc.get_traced_memory()
        snap = sampler.snapshot
        tracemalloc.stop()
        result["traced_peak_bytes"] = traced_peak
        result["top_sites"] = top_sites(snap, spec.get("top", 6)) if snap is not None else []
        result["snapshot_traced_bytes"] = sampler.snap_traced
    # Sanity (outside the measured window): what was written.
    result["output_bytes"] = output_bytes(dest, storage_options)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def top_sites(snapshot: Any, n: int) -> list[dict[str, Any]]:
    """The ``n`` biggest allocation tracebacks of a tracemalloc snapshot, compactly."""
    import tracemalloc

    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    out = []
    for stat in snapshot.statistics("traceback")[:n]:
        frames = []
        for fr in reversed(stat.traceback):  # innermost first
            name = fr.filename
            for marker in ("site-packages/", "/work/main/", "lib/python3"):
                if marker in name:
                    name = name.split(marker, 1)[1]
                    break
            if name.startswith(("threading.py", "concurrent/futures", "asyncio/")):
                continue
            frames.append(f"{name}:{fr.lineno}")
            if len(frames) >= 7:
                break
        out.append({"bytes": stat.size, "count": stat.count, "stack": frames})
    return out


def output_bytes(dest: str, storage_options: dict[str, Any]) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(dest, **storage_options)
    fs.invalidate_cache()
    return sum(fs.du(root, total=False).values())


# ---------------------------------------------------------------------------------------
# Parent: schedule, S3 server, aggregate, report
# ---------------------------------------------------------------------------------------
def fmt_mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def aggregate(results: list[dict[str, Any]], fixed_mib: float) -> list[dict[str, Any]]:
    rows = []
    for op, size in sorted({(r["op"], r["state_bytes"]) for r in results},
                           key=lambda k: (list(OPERATIONS).index(k[0]), k[1])):
        rs = [r for r in results if r["op"] == op and r["state_bytes"] == size]
        extra = [r["peak_extra_bytes"] for r in rs]
        pct = [r["peak_extra_pct"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        budget = 0.10 * size + fixed_mib * MiB
        med = statistics.median(extra)
        rows.append({
            "op": op, "store": rs[0]["store"], "label": OPERATIONS[op][1], "state_bytes": size, "n": len(rs),
            "peak_extra_median": med, "peak_extra_min": min(extra), "peak_extra_max": max(extra),
            "peak_extra_pct_median": statistics.median(pct), "wall_median": statistics.median(wall),
            "wall_min": min(wall), "wall_max": max(wall),
            "retained_median": statistics.median(r["retained_bytes"] for r in rs),
            "budget_bytes": budget, "within_budget": max(extra) <= budget,
            "throughput_mib_s": size / MiB / statistics.median(wall),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]], fixed_mib: float) -> str:
    head = (
        "| Operation | Store | State (MiB) | Peak extra MiB, median (min–max) | % of state | "
        f"≤ 10% + {fixed_mib:g} MiB? | Wall s, median (min–max) | MiB/s | Retained after (MiB) |\n"
        "|---|---|---:|---:|---:|:---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        store = "local disk" if r["store"] == "local" else "S3 (moto)"
        lines.append(
            f"| {r['label']} | {store} | {fmt_mib(r['state_bytes'])} | "
            f"{fmt_mib(r['peak_extra_median'])} ({fmt_mib(r['peak_extra_min'])}–{fmt_mib(r['peak_extra_max'])}) | "
            f"{r['peak_extra_pct_median']:.1f}% | {'yes' if r['within_budget'] else '**no**'} "
            f"({fmt_mib(r['budget_bytes'])}) | "
            f"{r['wall_median']:.2f} ({r['wall_min']:.2f}–{r['wall_max']:.2f}) | {r['throughput_mib_s']:.0f} | "
            f"{fmt_mib(r['retained_median'])} |"
        )
    return head + "\n".join(lines) + "\n"


def scaling_markdown(rows: list[dict[str, Any]]) -> str:
    """For operations measured at two or more sizes: extra = slope x size + fixed, from the medians."""
    lines = []
    for op in OPERATIONS:
        rs = sorted((r for r in rows if r["op"] == op), key=lambda r: r["state_bytes"])
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        slope = (hi["peak_extra_median"] - lo["peak_extra_median"]) / (hi["state_bytes"] - lo["state_bytes"])
        fixed = lo["peak_extra_median"] - slope * lo["state_bytes"]
        lines.append(f"| {lo['label']} | {fmt_mib(lo['state_bytes'])} → {fmt_mib(hi['state_bytes'])} | "
                     f"{100 * slope:.1f}% | {fmt_mib(fixed)} |")
    if not lines:
        return ""
    return (
        "\nScaling (from the medians at the smallest and largest size): peak extra ≈ slope × state + fixed. "
        "A small slope can come from write granularity (bigger tensors make bigger writes, so a store's part "
        "buffer overshoots its block size further) rather than from buffering a share of the state; the "
        "allocation sites below tell which.\n\n"
        "| Operation | Sizes (MiB) | Size-dependent slope | Fixed part (MiB) |\n|---|---|---:|---:|\n"
        + "\n".join(lines) + "\n"
    )


def profile_markdown(profiles: list[dict[str, Any]]) -> str:
    out = [
        "### Where it goes: Python allocations alive at the traced peak (tracemalloc, separate runs)\n",
        (
            "One extra child per operation with `tracemalloc` on (slower; not part of the table). "
            "*Traced peak* counts Python-allocator memory only; *RSS peak extra* of the same run "
            "minus the traced peak is native memory (torch, C++ zip writer, OpenSSL, ...).\n"
        ),
    ]
    for p in profiles:
        sites = [s for s in p.get("top_sites", [])[:4] if s["bytes"] >= 1 * MiB]
        out.append(
            f"**{p['op']}** ({fmt_mib(p['state_bytes'])} MiB): RSS peak extra {fmt_mib(p['peak_extra_bytes'])} MiB, "
            f"traced peak {fmt_mib(p['traced_peak_bytes'])} MiB" + ("" if sites else "; no site holds ≥ 1 MiB.")
        )
        if sites:
            out.append("")
            out.extend(f"- {fmt_mib(s['bytes'])} MiB in {s['count']} block(s): `" + " ← ".join(s["stack"][:5]) + "`"
                       for s in sites)
        out.append("")
    return "\n".join(out) + "\n"


def results_preamble(info: dict[str, str], command: str, date: str) -> str:
    """What a new RESULTS.md says above the first section."""
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']}.  \n"
        f"Python {info['python']}, torch {info['torch']}, safetensors {info['safetensors']}, "
        f"fsspec {info['fsspec']}"
        + (f", s3fs {info['s3fs']}, moto {info['moto']}, aiobotocore {info.get('aiobotocore')}, "
           f"aiohttp {info.get('aiohttp')}" if "s3fs" in info else "")
        + ".  \n"
        f"Date: {date}.  \n"
        f"Command: `{command}`\n\n"
        "Each section below says how it was produced; rerunning a benchmark replaces only its section.\n\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size-mib", type=float, nargs="+", default=[1024],
                    help="state size(s) for local-disk saves; several sizes also give the size-dependent slope")
    ap.add_argument("--s3-size-mib", type=float, nargs="+", default=[256],
                    help="state size(s) for S3 saves (moto holds objects in memory and serves ~60 MiB/s)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per operation (interleaved)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(OPERATIONS)}")
    ap.add_argument("--skip-s3", action="store_true", help="local-disk operations only")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="charge one-time costs (S3 client creation, first-use allocations) to the measured save")
    ap.add_argument("--profile", action="store_true",
                    help="also run each operation once under tracemalloc and list the allocation sites at peak")
    ap.add_argument("--fixed-buffer-mib", type=float, default=64,
                    help="the 'fixed buffer' of the budget 10%% of state + fixed buffer")
    ap.add_argument("--s3-block-size-mib", type=float, default=None,
                    help="pass s3fs default_block_size (its part buffer) to the S3 saves; default: s3fs's 50 MiB")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--workdir", default=None, help="where local saves go (default: a temp dir under benchmarks/out)")
    ap.add_argument("--out", default=str(HERE / "out" / "save_memory.json"), help="JSON results")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="Markdown file to update")
    ap.add_argument("--no-results-md", dest="write_md", action="store_false", help="do not touch RESULTS.md")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="measure nothing: re-render the Markdown (and RESULTS.md) from a saved JSON result")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        current = machine_info(VERSIONS)  # versions the saved run did not record yet (same environment assumed)
        data["machine"] = {**{k: v for k, v in current.items() if k != "ckptstore"}, **data["machine"]}
        report(data, args)
        return 0

    ops = [o for o in OPERATIONS if not args.only or o in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(OPERATIONS)
    if unknown:
        ap.error(f"unknown operation(s) {sorted(unknown)}; choose from {list(OPERATIONS)}")
    if args.skip_s3:
        ops = [o for o in ops if OPERATIONS[o][0] != "s3"]
    need_s3 = any(OPERATIONS[o][0] == "s3" for o in ops)

    (HERE / "out").mkdir(exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="save-memory-", dir=HERE / "out"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env()

    server, endpoint, fs = None, None, None
    storage_options: dict[str, Any] = {}
    if need_s3:
        server, endpoint, _ = start_moto(count=False)
        storage_options = s3_options(endpoint)
        if args.s3_block_size_mib:
            storage_options["default_block_size"] = int(args.s3_block_size_mib * MiB)
        fs = s3_fs(endpoint)
        fs.mkdir(BUCKET)
        print(f"moto S3 server at {endpoint}, bucket {BUCKET}", flush=True)

    sizes = {"local": [int(s * MiB) for s in args.size_mib], "s3": [int(s * MiB) for s in args.s3_size_mib]}
    results: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    plan = [(op, b) for op in ops for b in sizes[OPERATIONS[op][0]]]
    started = time.perf_counter()

    def measure(op: str, size_bytes: int, repeat: int, profile: bool = False) -> dict[str, Any]:
        store = OPERATIONS[op][0]
        run_id = f"{op.replace(':', '-').replace('.', '_')}-{repeat}-{uuid.uuid4().hex[:6]}"
        dest = f"s3://{BUCKET}/{run_id}" if store == "s3" else str(workdir / run_id)
        spec = {"op": op, "dest": dest, "size_bytes": size_bytes, "repeat": repeat, "warmup": args.warmup,
                "sample_ms": args.sample_ms, "storage_options": storage_options if store == "s3" else {},
                "profile": profile}
        try:
            return run_script_child(Path(__file__).resolve(), spec, env, args.timeout)
        finally:  # free the disk / moto's memory before the next child
            if store == "s3":
                assert fs is not None
                for d in (dest, dest + "-warmup"):
                    if fs.exists(d):
                        fs.rm(d, recursive=True)
            else:
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(dest + "-warmup", ignore_errors=True)

    try:
        for repeat in range(args.repeats):
            for op, size_bytes in plan:  # interleaved: every operation (and size) once per round
                r = measure(op, size_bytes, repeat)
                results.append(r)
                print(f"[{time.perf_counter() - started:6.1f}s] round {repeat + 1}/{args.repeats} {op:28s} "
                      f"state {fmt_mib(r['state_bytes'])} MiB  peak extra {fmt_mib(r['peak_extra_bytes'])} MiB "
                      f"({r['peak_extra_pct']:.1f}%, sampled {fmt_mib(r['sampled_peak_extra_bytes'])})  "
                      f"wall {r['wall_s']:.2f}s  written {fmt_mib(r['output_bytes'])} MiB", flush=True)
        if args.profile:
            for op in ops:  # at the first size of each store
                p = measure(op, sizes[OPERATIONS[op][0]][0], -1, profile=True)
                profiles.append(p)
                print(f"[{time.perf_counter() - started:6.1f}s] profile {op}: RSS peak extra "
                      f"{fmt_mib(p['peak_extra_bytes'])} MiB, traced peak {fmt_mib(p['traced_peak_bytes'])} MiB",
                      flush=True)
                for s in p["top_sites"][:4]:
                    print(f"    {fmt_mib(s['bytes']):>7} MiB x{s['count']}: " + " <- ".join(s["stack"]), flush=True)
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    data = {"command": command_line(), "date": utc_now(),
            "machine": {**machine_info(VERSIONS), "ckptstore": ckptstore_revision()}, "args": vars(args),
            "runs": results, "profiles": profiles}
    data["summary"] = aggregate(results, args.fixed_buffer_mib)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    report(data, args)
    print(f"wrote {out}")
    return 0


def report(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the Markdown section and (unless --no-results-md) put it into RESULTS.md."""
    section = render_section(data)
    print()
    print(section)
    if args.write_md:
        replace_section(Path(args.results_md), SECTION, section,
                        results_preamble(data["machine"], data["command"], data["date"]))
        print(f"updated {args.results_md} ({SECTION})")


def render_section(data: dict[str, Any]) -> str:
    """The ``## Save: peak extra memory`` section for one benchmark invocation's JSON."""
    info, a, runs = data["machine"], data["args"], data["runs"]
    rows = aggregate(runs, a["fixed_buffer_mib"])
    stores = sorted({r["store"] for r in runs})
    sizes = {"local": a["size_mib"], "s3": a["s3_size_mib"]}
    size_text = ", ".join(f"{'local disk' if s == 'local' else 'S3'} " + " and ".join(f"{m:g}" for m in sizes[s])
                          + " MiB" for s in stores)
    need_s3 = "s3" in stores
    block = a.get("s3_block_size_mib")
    return (
        f"{SECTION}\n\n"
        f"`{data['command']}` — {data['date']}; {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; "
        f"Python {info['python']}, torch {info['torch']}, safetensors {info['safetensors']}, fsspec {info['fsspec']}"
        + (f", s3fs {info.get('s3fs')}, aiobotocore {info.get('aiobotocore')}, aiohttp {info.get('aiohttp')}, "
           f"moto {info.get('moto')}" if need_s3 else "")
        + f"; ckptstore at {info['ckptstore']}.\n\n"
        f"Requested state sizes: {size_text} (float32, GPT-like: 24 blocks + embedding; the table gives the exact "
        f"bytes). {a['repeats']} interleaved rounds; every measurement in a fresh process. *Peak extra* = peak RSS "
        "during the save (kernel `VmHWM`, reset via `/proc/self/clear_refs` after the state was built) minus the "
        "RSS just before it. "
        + ("One-time costs are excluded: each child first imports everything and does a tiny save through the same "
           "code path (S3 client, fsspec instance), as a training job's first checkpoint would. "
           if a["warmup"] else "One-time costs (S3 client creation, first use) are included (`--no-warmup`). ")
        + "*Retained after* = RSS after the save minus the baseline (freed memory the allocator kept counts). "
        "Local saves: ckptstore fsyncs the file and the folder and writes a manifest; stock `torch.save`/`save_file` "
        "do neither, so their wall times are not like for like. "
        + ("S3 is a moto server in the benchmark's parent process on 127.0.0.1 (objects held in its memory, not "
           "counted here; its throughput, not the client's, sets the wall times), "
           + (f"s3fs block size {block:g} MiB (`storage_options['default_block_size']`).\n\n"
              if block else "ckptstore uploads 16 MiB parts (its own setting); the stock peer uses s3fs's default 50 MiB.\n\n")
           if need_s3 else "\n\n")
        + markdown_table(rows, a["fixed_buffer_mib"])
        + scaling_markdown(rows)
        + ("\n" + profile_markdown(data["profiles"]) if data.get("profiles") else "")
    )

if __name__ == "__main__":
    sys.exit(main())
