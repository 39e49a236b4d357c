#!/usr/bin/env python
"""Save cost against history: time and S3 requests of a save as the root fills with checkpoints.

Issue 10, point 7: every save, ``latest()`` and ``ls`` used to list the root and read every
manifest on it. A manager now reads each committed manifest once (``ckptstore/scan.py``,
``KnownManifests``); each call still lists the root once (a paginated LIST, 1,000 keys a page).
The goal: a save flat within 1.2x from 1 to 1,000 checkpoints, in requests and in time.

For each history size n (``--sizes``, default 1, 100 and 1,000 checkpoints), on S3 (a moto
server in this, the parent, process, its own bucket per size: moto's LIST scans every key of a
bucket), ``--saves`` interleaved rounds; each round is a fresh child process that measures,
in this order and each with its wall time and the requests the server saw:

1. **cold save**: a new manager (a restarted job; what every save cost before the cache)
   saves step n + 2r + 1 to the root holding n checkpoints; it reads all n manifests.
2. **warm save**: a manager that listed the root when the child started (a training loop's
   manager after its restore) saves step n + 2r + 2. It has not read the cold save's manifest,
   as a training loop's manager has not read its own previous save's: the steady state.
3. ``latest()`` on that warm manager (it reads the manifest of its own save).
4. **raw listing**: ``fs.find(root, detail=True)`` on s3fs after ``invalidate_cache``: the floor
   that the store's LIST sets for any call that lists the root.

Then (untimed) the two new checkpoints are deleted, so every round starts from n. The state is
tiny (a 4 KiB tensor and an int) so the save's own bytes do not hide the cost of history. Each
save uses the default ``keep_last=None``. The child first saves once to a throwaway root, so
one-time costs (imports, the S3 client, fsspec's instance) are not charged; the managers share
fsspec's cached s3fs instance, so a cold save's connection is warm too.

Roots are populated fast: one real ``CheckpointManager.save`` of step 1, then raw fsspec puts of
its data file and its manifest (``name`` and ``step`` rewritten) into ``step_00000002/`` ... ;
``CheckpointManager(root).checkpoints()`` must then list exactly steps 1..n.

Requests are counted on the server (``common/counting.py``): the child brackets each call with
``/__bench__/reset`` and ``/__bench__/stats``, and each request is classified by method and
query string (``list-type=2``: LIST; a GET of ``*/manifest.json``: a manifest read).

Run ``python benchmarks/bench_history.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from common.child import run_script_child
from common.counting import fetch
from common.proc import cpu_seconds
from common.provenance import ckptstore_revision, ckptstore_source_hash, command_line, machine_info, utc_now
from common.results_md import replace_section
from common.servers import child_env, s3_fs, s3_options, start_moto

HERE = Path(__file__).resolve().parent
SECTION = "## Save cost against history (bench_history.py)"
BUCKET = "ckptstore-bench-history"
VERSIONS = ("s3fs", "aiobotocore", "botocore", "moto", "werkzeug")
TENSOR_ELEMENTS = 1024  # float32: 4 KiB
LIST_PAGE_KEYS = 1000  # keys per LIST page, on S3 and on moto
KEYS_PER_CHECKPOINT = 2  # state-<8hex>.safetensors and manifest.json

# op -> (label, checkpoints its listing sees beyond n); the order is the order of measurement
OPERATIONS: dict[str, tuple[str, int]] = {
    "cold-save": ("cold save: a new manager's `save`", 0),
    "warm-save": ("warm save: `save` by a manager that listed the root", 1),
    "latest": ("`latest()` on the warm manager", 2),
    "raw-list": ("raw listing: `fs.find(root, detail=True)`, cache invalidated", 2),
}
KINDS = ("LIST", "GET manifest", "GET other", "PUT", "POST", "HEAD", "DELETE")


# ---------------------------------------------------------------------------------------
# The state, the roots
# ---------------------------------------------------------------------------------------
def tiny_state(step: int) -> dict[str, Any]:
    """What each save writes: a 4 KiB float32 tensor and an int."""
    import torch

    return {"w": torch.full((TENSOR_ELEMENTS,), float(step)), "step": step}


def folder(step: int) -> str:
    """The folder ckptstore names a step's checkpoint."""
    return f"step_{step:08d}"


def copied_manifest(template: bytes, step: int) -> bytes:
    """``template`` (a manifest) with its ``name`` and ``step`` rewritten for ``step``, as ckptstore writes JSON."""
    doc = json.loads(template)
    doc.update(name=folder(step), step=step)
    return json.dumps(doc, indent=1, allow_nan=False).encode()


def populate(fs: Any, root: str, options: dict[str, Any], n: int) -> float:
    """Put n checkpoints (steps 1..n) under ``root``; return the seconds it took.

    Step 1 is a real save; steps 2..n are raw puts of its data file and of its manifest with
    ``name`` and ``step`` rewritten. Raises RuntimeError unless a new manager lists exactly 1..n.
    """
    from ckptstore import CheckpointManager

    started = time.perf_counter()
    info = CheckpointManager(root, storage_options=options).save(tiny_state(1), step=1)
    path = fs._strip_protocol(root)
    data_name = info.files[0].path
    data = fs.cat_file(f"{path}/{folder(1)}/{data_name}")
    manifest = fs.cat_file(f"{path}/{folder(1)}/manifest.json")
    files: dict[str, bytes] = {}
    for step in range(2, n + 1):
        files[f"{path}/{folder(step)}/{data_name}"] = data
        files[f"{path}/{folder(step)}/manifest.json"] = copied_manifest(manifest, step)
    if files:
        fs.pipe(files)
    steps = [c.step for c in CheckpointManager(root, storage_options=options).checkpoints()]
    if steps != list(range(1, n + 1)):
        raise RuntimeError(f"{root}: a new manager lists {len(steps)} checkpoints after populating, expected steps 1..{n}")
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------
# The server's request log, summarized
# ---------------------------------------------------------------------------------------
def request_kind(entry: dict[str, Any]) -> str:
    """One of ``KINDS`` (or the bare method) for a logged request, from its method, query and path."""
    method = entry["method"]
    query = urllib.parse.parse_qs(entry["query"], keep_blank_values=True)
    if method == "GET" and "list-type" in query:
        return "LIST"
    if method == "GET":
        return "GET manifest" if entry["path"].endswith("/manifest.json") else "GET other"
    if method == "POST" and "delete" in query:  # DeleteObjects: a batch delete
        return "DELETE"
    return method


def tally(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests of one call: total, by kind, non-2xx answers, and the server seconds spent on LISTs."""
    kinds: dict[str, int] = {}
    for entry in log:
        kind = request_kind(entry)
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "requests": len(log),
        "kinds": kinds,
        "non_2xx": sum(not e["status"].startswith("2") for e in log),
        "list_server_s": sum(e["seconds"] for e in log if request_kind(e) == "LIST"),
    }


# ---------------------------------------------------------------------------------------
# Child: one round at one history size
# ---------------------------------------------------------------------------------------
def measured(endpoint: str, call: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """``call()``'s result, and its wall time, CPU time and server-side request tally.

    The CPU time is this process's, every thread's: s3fs parses the replies on its event-loop thread.
    """
    fetch(endpoint, "reset")
    cpu, started = cpu_seconds(), time.perf_counter()
    result = call()
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return result, {"wall_s": wall, "cpu_s": cpu, **tally(fetch(endpoint, "stats"))}


def child_main(spec: dict[str, Any]) -> None:
    import s3fs  # noqa: F401  (import cost is not part of a save)

    from ckptstore import CheckpointManager

    n, endpoint, root = spec["n"], spec["endpoint"], spec["root"]
    options = s3_options(endpoint)
    CheckpointManager(spec["warmup_root"], storage_options=options).save(tiny_state(0), step=0)
    warm = CheckpointManager(root, storage_options=options)
    found = len(warm.checkpoints())  # the warm manager has now read every manifest
    if found != n:
        raise RuntimeError(f"{root} holds {found} checkpoints at the start of a round, expected {n}")
    cold_step, warm_step = n + 2 * spec["round"] + 1, n + 2 * spec["round"] + 2
    cold = CheckpointManager(root, storage_options=options)  # construction (HEAD bucket, HEAD root) is not timed
    fs, path = warm.storage.fs, warm.storage.root

    def raw_listing() -> dict[str, Any]:
        fs.invalidate_cache(path)
        return fs.find(path, detail=True)

    ops: dict[str, dict[str, Any]] = {}
    cold_info, ops["cold-save"] = measured(endpoint, lambda: cold.save(tiny_state(cold_step), step=cold_step))
    warm_info, ops["warm-save"] = measured(endpoint, lambda: warm.save(tiny_state(warm_step), step=warm_step))
    latest, ops["latest"] = measured(endpoint, warm.latest)
    listed, ops["raw-list"] = measured(endpoint, raw_listing)
    expected_keys = KEYS_PER_CHECKPOINT * (n + OPERATIONS["raw-list"][1])
    if latest is None or latest.step != warm_step or len(listed) != expected_keys:
        raise RuntimeError(f"{root}: latest() is {latest and latest.step} (expected {warm_step}), the listing has "
                           f"{len(listed)} keys (expected {expected_keys})")
    for info in (cold_info, warm_info):  # back to n checkpoints, the manifest first as ckptstore deletes
        for name in ("manifest.json", *(f.path for f in info.files)):
            warm.storage.delete(f"{info.name}/{name}")
    for op, (_, extra) in OPERATIONS.items():
        ops[op]["listed"] = n + extra
    result = {"n": n, "round": spec["round"], "ckptstore_src": ckptstore_source_hash(), "ops": ops}
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------
# Parent: aggregate and report
# ---------------------------------------------------------------------------------------
def ms_range(values: list[float]) -> str:
    """Seconds as ``median (min–max)`` milliseconds."""
    ms = [v * 1000 for v in values]
    return f"{median(ms):.1f}" if len(ms) == 1 else f"{median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f})"


def spread(values: list[int]) -> str:
    """Counts as ``median (min–max)``, or one number when they are all equal."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{median(values):g} ({lo}–{hi})"


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """(op, n) -> its measurements over the rounds, and per round its wall and CPU time minus the raw listing's."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        floor = run["ops"]["raw-list"]
        for op, m in run["ops"].items():
            cell = cells.setdefault((op, run["n"]), {"listed": m["listed"], "kinds": {}})
            for key, value in (("wall", m["wall_s"]), ("cpu", m["cpu_s"]), ("requests", m["requests"]),
                               ("list_s", m["list_server_s"]), ("over_list", m["wall_s"] - floor["wall_s"]),
                               ("over_list_cpu", m["cpu_s"] - floor["cpu_s"])):
                cell.setdefault(key, []).append(value)
            for kind in {*KINDS, *m["kinds"]}:
                cell["kinds"].setdefault(kind, []).append(m["kinds"].get(kind, 0))
    return cells


def kinds_shown(cells: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Every kind in ``KINDS``, then any other method the server saw."""
    extra = sorted({k for c in cells.values() for k in c["kinds"]} - set(KINDS))
    return [*KINDS, *extra]


def table(cells: dict[tuple[str, int], dict[str, Any]], sizes: list[int]) -> str:
    kinds = kinds_shown(cells)
    out = [
        f"| Operation | History n | Checkpoints listed | Wall ms, median (min–max) | × at n = {sizes[0]:,} | Requests | "
        + " | ".join(kinds) + " | LIST server ms | Client CPU ms | Wall − raw listing ms |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---:|",
    ]
    for op, (label, _) in OPERATIONS.items():
        base = median(cells[(op, sizes[0])]["wall"])
        for n in sizes:
            c = cells[(op, n)]
            over = "–" if op == "raw-list" else ms_range(c["over_list"])
            out.append(
                f"| {label} | {n:,} | {c['listed']:,} | {ms_range(c['wall'])} | {median(c['wall']) / base:.2f} "
                f"| {spread(c['requests'])} | " + " | ".join(spread(c["kinds"][k]) for k in kinds)
                + f" | {median(c['list_s']) * 1000:.1f} | {median(c['cpu']) * 1000:.1f} | {over} |"
            )
    return "\n".join(out) + "\n"


def ratios(cells: dict[tuple[str, int], dict[str, Any]], sizes: list[int]) -> dict[str, dict[str, float]]:
    """op -> wall and request ratios of the largest history to the smallest (medians)."""
    lo, hi = sizes[0], sizes[-1]
    return {
        op: {
            "wall": median(cells[(op, hi)]["wall"]) / median(cells[(op, lo)]["wall"]),
            "requests": median(cells[(op, hi)]["requests"]) / median(cells[(op, lo)]["requests"]),
        }
        for op in OPERATIONS
    }


def ratio_lines(cells: dict[tuple[str, int], dict[str, Any]], sizes: list[int]) -> str:
    lo, hi = sizes[0], sizes[-1]
    r = ratios(cells, sizes)
    lines = [f"- {OPERATIONS[op][0]}, n = {hi:,} / n = {lo:,}: time **{r[op]['wall']:.2f}x**, requests "
             f"**{r[op]['requests']:.2f}x** ({median(cells[(op, hi)]['requests']):g} / {median(cells[(op, lo)]['requests']):g})"
             for op in OPERATIONS]
    lines.append("- warm save minus the raw listing of the same round (median): "
                 + ", ".join(f"{median(cells[('warm-save', n)]['over_list']) * 1000:.1f} ms at n = {n:,}" for n in sizes))
    return "\n".join(lines) + "\n"


def list_pages(n: int, extra: int) -> int:
    """LIST requests for one listing of n + ``extra`` checkpoints."""
    return -(-KEYS_PER_CHECKPOINT * (n + extra) // LIST_PAGE_KEYS)


def verdict(cells: dict[tuple[str, int], dict[str, Any]], sizes: list[int]) -> str:
    """The paragraph that says whether the 1.2x goal is met, in requests and in time, and why."""
    lo, hi = sizes[0], sizes[-1]
    r = ratios(cells, sizes)["warm-save"]
    warm, raw = {n: cells[("warm-save", n)] for n in (lo, hi)}, {n: cells[("raw-list", n)] for n in (lo, hi)}
    lists = {n: median(warm[n]["kinds"]["LIST"]) for n in (lo, hi)}
    others = {n: median(warm[n]["requests"]) - lists[n] for n in (lo, hi)}
    manifests = {n: median(warm[n]["kinds"]["GET manifest"]) for n in (lo, hi)}
    cold = {n: median(cells[("cold-save", n)]["kinds"]["GET manifest"]) for n in (lo, hi)}
    pages = {n: list_pages(n, OPERATIONS["warm-save"][1]) for n in (lo, hi)}
    ms = {key: {n: median(raw[n][key]) * 1000 for n in (lo, hi)} for key in ("wall", "list_s", "cpu")}
    keys = {n: KEYS_PER_CHECKPOINT * (n + OPERATIONS["raw-list"][1]) for n in (lo, hi)}
    per_key_us = (ms["cpu"][hi] - ms["cpu"][lo]) / (keys[hi] - keys[lo]) * 1000 if hi > lo else 0.0
    over = {key: {n: median(warm[n][key]) * 1000 for n in (lo, hi)} for key in ("over_list", "over_list_cpu")}
    spread_ms = {n: (max(raw[n]["wall"]) - min(raw[n]["wall"])) * 1000 for n in (lo, hi)}
    met = {k: "met" if r[k] <= 1.2 else "not met" for k in ("requests", "wall")}
    return (
        f"**Goal (a save flat within 1.2x from {lo:,} to {hi:,} checkpoints): in requests {met['requests']} "
        f"({r['requests']:.2f}x), in time {met['wall']} ({r['wall']:.2f}x), on moto.** "
        f"*Manifests:* a warm save reads {manifests[lo]:g} at n = {lo:,} and {manifests[hi]:g} at n = {hi:,} (the "
        "cold save's, which it has not seen, as a training loop's manager reads its own previous save's); a cold "
        f"save, which is what every save cost before the cache, reads {cold[lo]:g} and {cold[hi]:g}. "
        f"*Requests:* besides LIST, the warm save sends {others[lo]:g} at n = {lo:,} and {others[hi]:g} at "
        f"n = {hi:,}; its LIST requests are {lists[lo]:g} and {lists[hi]:g}, one per page of at most "
        f"{LIST_PAGE_KEYS:,} keys ({KEYS_PER_CHECKPOINT} keys a checkpoint: {pages[lo]} and {pages[hi]} pages "
        "expected), and a real S3 pages the same way, so what remains of the growth is one LIST request per "
        f"{LIST_PAGE_KEYS // KEYS_PER_CHECKPOINT:,} checkpoints. "
        f"*Time:* the raw listing alone takes {ms['wall'][lo]:.1f} ms at n = {lo:,} and {ms['wall'][hi]:.1f} ms "
        f"at n = {hi:,}. Of that, moto spends {ms['list_s'][lo]:.1f} and {ms['list_s'][hi]:.1f} ms answering "
        "(it scans and sorts every key of the bucket for every page, so a page costs O(keys): moto's cost, not "
        f"S3's), and the client {ms['cpu'][lo]:.1f} and {ms['cpu'][hi]:.1f} ms of CPU "
        "parsing it (botocore parses each key's XML and its `LastModified` date, s3fs builds the entries: about "
        f"{per_key_us:.0f} µs per key on this machine, a cost a real S3 "
        "leaves in place). The warm save adds to the raw listing of the same round "
        f"{over['over_list'][lo]:.1f} ms at n = {lo:,} and {over['over_list'][hi]:.1f} ms at n = {hi:,} in wall "
        f"time (noisy: the raw listing alone spans {spread_ms[hi]:.0f} ms between rounds at n = {hi:,}), "
        f"{over['over_list_cpu'][lo]:.1f} and {over['over_list_cpu'][hi]:.1f} ms in client CPU. So the slope is "
        "the listing's, not the manifests': on a real S3 a save at "
        f"{hi:,} checkpoints would cost {pages[hi] - pages[lo]} more LIST round trip(s) and the client's parse of "
        f"{keys[hi] - keys[lo]:,} more keys than at {lo:,}, not one GET per manifest.\n"
    )


def render_section(data: dict[str, Any]) -> str:
    info, a = data["machine"], data["args"]
    sizes = sorted(a["sizes"])
    cells = aggregate(data["runs"])
    populated = ", ".join(f"n = {int(n):,} in {s:.1f} s" for n, s in data["populate_s"].items())
    parts = [
        f"{SECTION}\n\n"
        f"Command: `{data['command']}` — {data['date']} (wall {data['elapsed_s'] / 60:.1f} min).  \n"
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']}; "
        f"Python {info['python']}, torch {info['torch']}, fsspec {info['fsspec']}, s3fs {info.get('s3fs')}, "
        f"aiobotocore {info.get('aiobotocore')}, botocore {info.get('botocore')}, moto {info.get('moto')}, "
        f"werkzeug {info.get('werkzeug')}; ckptstore at {info['ckptstore']}.  \n"
        f"Load average (1 min) at start / end: {data['loadavg'][0]:.2f} / {data['loadavg'][1]:.2f}.\n\n"
        f"S3 is moto (`ThreadedMotoServer`, 127.0.0.1, in the parent process; one bucket per history size). "
        f"Each root holds n checkpoints of a tiny state (a {TENSOR_ELEMENTS * 4 // 1024} KiB float32 tensor and an "
        f"int; {KEYS_PER_CHECKPOINT} keys each), populated by one real save and raw puts of copies with the "
        f"manifest's `name` and `step` rewritten ({populated}; a new manager then listed exactly n). "
        f"{a['saves']} interleaved rounds (round 1: every size once, then round 2, ...), each a fresh child process "
        "that first saves once to a throwaway root (imports, S3 client, fsspec instance not charged), lists the "
        "root with the manager it keeps (the warm one), then measures in this order: a **cold save** by a new "
        "manager (constructed untimed) to the root holding n checkpoints; a **warm save** by the kept manager "
        "(n + 1 on the root: the cold save's manifest is the one it has not read, as a training loop's manager "
        "has not read its own previous save's); `latest()` on it; and the **raw listing**, "
        "`fs.invalidate_cache(root); fs.find(root, detail=True)` on s3fs, the floor any call that lists the "
        "root pays. The two new checkpoints are then deleted (untimed). `keep_last=None` (nothing pruned). "
        "Requests are counted on the server by a WSGI middleware around moto, classified by method and query "
        "(`list-type=2`: LIST; a GET of `*/manifest.json`: GET manifest; POST: the data file's multipart "
        "initiate and complete); *LIST server ms* is the time moto spent answering them; *Client CPU ms* is the "
        "child's CPU time during the call (every thread: s3fs parses the replies on its event-loop thread). "
        "*Wall − raw listing* subtracts the raw listing's wall time of the same round.\n\n",
        table(cells, sizes),
        f"\nRatios, n = {sizes[-1]:,} against n = {sizes[0]:,} (medians):\n\n",
        ratio_lines(cells, sizes),
        "\n" + verdict(cells, sizes),
    ]
    src = data["ckptstore_src"]
    if len(src["children"]) > 1:
        parts.insert(1, f"**Warning: ckptstore/ changed during this run**: the rounds ran different code (source hashes "
                        f"{', '.join(src['children'])}); they mix versions.\n\n")
    elif src["start"] != src["end"]:
        parts.insert(1, f"Note: ckptstore/ changed during the run (source hash {src['start']} at the start, {src['end']} "
                        f"at the end); every round ran {src['children'][0]}.\n\n")
    return "".join(parts)


def report(data: dict[str, Any], args: argparse.Namespace) -> None:
    section = render_section(data)
    print()
    print(section)
    if args.write_md:
        replace_section(Path(args.results_md), SECTION, section)
        print(f"updated {args.results_md} ({SECTION})")


# ---------------------------------------------------------------------------------------
# Parent: server, roots, rounds
# ---------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, started: float) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Start moto, populate one root per size, run the interleaved rounds; return (populate seconds, runs)."""
    server, endpoint, _ = start_moto(count=True)
    env = child_env()
    try:
        fs = s3_fs(endpoint)
        options = s3_options(endpoint)
        populate_s: dict[str, float] = {}
        for n in args.sizes:
            fs.mkdir(f"{BUCKET}-{n}")
            populate_s[str(n)] = populate(fs, f"s3://{BUCKET}-{n}/run", options, n)
            print(f"[{time.perf_counter() - started:6.1f}s] populated n = {n} in {populate_s[str(n)]:.1f}s", flush=True)
        fs.mkdir(f"{BUCKET}-warmup")
        runs = []
        for r in range(args.saves):
            for n in args.sizes:
                # "op" names the child in run_script_child's errors
                spec = {"op": f"history n={n}", "n": n, "round": r, "endpoint": endpoint, "root": f"s3://{BUCKET}-{n}/run",
                        "warmup_root": f"s3://{BUCKET}-warmup/{uuid.uuid4().hex}"}
                run = run_script_child(Path(__file__).resolve(), spec, env, args.timeout)
                runs.append(run)
                print(f"[{time.perf_counter() - started:6.1f}s] round {r + 1}/{args.saves} n = {n:5d}  "
                      + "  ".join(f"{op} {m['wall_s'] * 1000:7.1f} ms {m['requests']:4d} req" for op, m in run["ops"].items()),
                      flush=True)
    finally:
        server.stop()
    return populate_s, runs


def sizes_arg(text: str) -> list[int]:
    """``"1,100,1000"`` -> [1, 100, 1000]: sorted, distinct, each at least 1."""
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=sizes_arg, default="1,100,1000", help="checkpoints already on the root, comma-separated")
    ap.add_argument("--saves", type=int, default=5, help="rounds: timed saves (and latest(), listings) per size")
    ap.add_argument("--out", default=str(HERE / "out" / "history.json"), help="JSON results")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="Markdown file to update")
    ap.add_argument("--no-results-md", dest="write_md", action="store_false", help="do not touch RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="measure nothing: re-render the Markdown (and RESULTS.md) from a saved JSON result")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), args)
        return 0

    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    machine = {**machine_info(VERSIONS), "ckptstore": ckptstore_revision()}  # the revision measured is the one at the start
    src_start = ckptstore_source_hash()
    populate_s, runs = measure(args, started)
    data = {
        "command": command_line(),
        "date": utc_now(),
        "elapsed_s": time.perf_counter() - started,
        "loadavg": [load0, os.getloadavg()[0]],
        "machine": machine,
        "ckptstore_src": {"start": src_start, "end": ckptstore_source_hash(), "children": sorted({r["ckptstore_src"] for r in runs})},
        "args": vars(args),
        "populate_s": populate_s,
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
