"""Sharded save and restore on 2 ranks: ckptstore against DCP's own fsspec writer (issue 15, point 6).

Each measurement is a fresh 2-rank job (this script re-run with ``--rank-worker``; gloo, CPU,
``OMP_NUM_THREADS=1`` as torchrun sets it). Each rank builds the same seeded stack of float32
``nn.Linear(w, w)`` (``--mib`` in all), ``fully_shard``s it on a 2-rank CPU mesh, does a tiny save and
restore through the same code path (one-time costs are not charged), then times ``mgr.save`` against
``dcp.save(get_model_state_dict(m), storage_writer=FsspecWriter(url))``, and ``mgr.restore`` (a new
manager: list, verify CRC32C, load) against ``dcp.load`` + ``set_model_state_dict``, into a fresh
sharded model checked bit for bit. Per call: barrier, ``VmHWM`` reset, RSS, the call, ``VmHWM``,
barrier. Each save goes to a fresh sub-URL; local reads start cold; on S3 (moto in this process)
requests and bytes are counted on the server. Rounds interleave ckptstore and DCP per store.

    .venv/bin/python benchmarks/bench_distributed.py --mib 256 --rounds 3 --stores local,s3
    .venv/bin/python benchmarks/bench_distributed.py --mib 16 --rounds 1 --stores local   # smoke run
    .venv/bin/python benchmarks/bench_distributed.py --from-json benchmarks/out/distributed.json --notes "..."
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.proc import MiB, ProcStatus, cpu_seconds, proc_io
from common.provenance import ckptstore_source_hash, command_line, machine_info, utc_now

OUT = Path(__file__).resolve().parent / "out"
BUCKET = "bench-distributed"
WORLD = 2
IMPLS = ("ckptstore", "dcp")
OPS = ("save", "restore")
COLUMNS = [("save", "own_s"), ("save", "job_s"), ("restore", "own_s"), ("restore", "job_s"), ("save", "peak_extra_mib"),
           ("restore", "peak_extra_mib")]
HEADING = "## Sharded save and restore on 2 ranks: ckptstore vs DCP (bench_distributed.py)"


# -- one rank ------------------------------------------------------------------------------
def layer_shape(mib: float) -> tuple[int, int]:
    """(layers, width): 2048-wide layers (16 MiB each) when the state allows, else two smaller ones."""
    elems = int(mib * MiB) // 4
    if elems >= 2 * 2048 * 2048:
        return max(1, round(elems / 2048**2)), 2048
    return 2, max(2, int(math.sqrt(elems / 2)) // 2 * 2)


def build(mib: float, seed: int, mesh: Any) -> Any:
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    layers, width = layer_shape(mib)
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def ckptstore_ops(url: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """(save(model), restore(model)) for ckptstore on ``url``; the managers are made here, untimed."""
    from ckptstore import CheckpointManager

    saver = CheckpointManager(url, storage_options=options, rank_timeout=300)

    def save(model: Any) -> None:
        saver.save({"model": model}, step=1)

    def restore(model: Any) -> Any:
        mgr = CheckpointManager(url, storage_options=options, rank_timeout=300)  # a restarted job's new manager
        return lambda: mgr.restore({"model": model})

    return save, restore


def dcp_ops(url: str, options: dict[str, Any]) -> tuple[Any, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    try:
        from torch.distributed.checkpoint import FsspecReader as reader, FsspecWriter as writer  # type: ignore[attr-defined]
    except ImportError:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader as reader, FsspecWriter as writer

    def save(model: Any) -> None:
        dcp.save(get_model_state_dict(model), storage_writer=writer(url, **options))

    def load(model: Any) -> None:
        sd = get_model_state_dict(model)
        dcp.load(sd, storage_reader=reader(url, **options))
        set_model_state_dict(model, sd)

    def restore(model: Any) -> Any:
        return lambda: load(model)

    return save, restore


OPS_OF = {"ckptstore": ckptstore_ops, "dcp": dcp_ops}


def measure(fn: Any, probe: ProcStatus, rank: int, counter: str | None) -> dict[str, Any]:
    import torch.distributed as dist
    from common.counting import fetch

    if counter and rank == 0:
        fetch(counter, "reset")
    dist.barrier()
    io0, cpu0 = proc_io(), cpu_seconds()
    ctypes.CDLL(None).malloc_trim(0)  # free heap pages go back to the kernel: the peak counts what the call makes resident
    if not probe.reset_hwm():
        raise RuntimeError("the kernel refused to reset VmHWM (/proc/self/clear_refs): no exact peak")
    rss0, t0 = probe.rss(), time.perf_counter()
    fn()
    own, peak = time.perf_counter() - t0, probe.hwm()
    cpu, io1 = cpu_seconds() - cpu0, proc_io()
    dist.barrier()
    job = time.perf_counter() - t0
    out: dict[str, Any] = {"own_s": own, "job_s": job, "cpu_s": cpu, "rss_before_mib": rss0 / MiB, "peak_extra_mib": (peak - rss0) / MiB,
           "disk_read_mib": (io1["read_bytes"] - io0["read_bytes"]) / MiB,
           "disk_write_mib": (io1["write_bytes"] - io0["write_bytes"]) / MiB}
    if counter and rank == 0:
        entries = fetch(counter, "stats")
        methods: dict[str, int] = {}
        for e in entries:
            methods[e["method"]] = methods.get(e["method"], 0) + 1
        out["server"] = {"requests": len(entries), "by_method": methods,
                         "uploaded_mib": sum(e["request_body"] for e in entries) / MiB,
                         "downloaded_mib": sum(e["body"] for e in entries) / MiB,
                         "gets": [[e["path"].rsplit("/", 1)[-1], e["range"], e["body"]] for e in entries if e["method"] == "GET"]}
    return out


def evict(url: str) -> None:
    """Drop the page cache of the files under a local ``url`` (written and fsynced, so clean)."""
    for folder, _, names in os.walk(url):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def rank_worker(spec: dict[str, Any]) -> None:
    import fsspec
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    options, url, local = spec["storage_options"], spec["url"], spec["store"] == "local"
    make = OPS_OF[spec["impl"]]
    probe = ProcStatus()
    out: dict[str, Any] = {"rank": rank}
    try:
        warm_save, warm_restore = make(spec["warm_url"], options)  # one tiny round trip: nothing one-time is charged
        warm_save(build(0.25, 0, mesh))
        warm_restore(build(0.25, 1, mesh))()
        model, fresh = build(spec["mib"], 0, mesh), build(spec["mib"], 1, mesh)
        params = list(model.parameters())
        out["local_shard_mib"] = sum(p.to_local().numel() * p.element_size() for p in params) / MiB
        save, restore = make(url, options)
        out["save"] = measure(lambda: save(model), probe, rank, spec.get("counter"))
        if local and rank == 0:
            evict(url)
        out["restore"] = measure(restore(fresh), probe, rank, spec.get("counter"))
        out["bit_equal"] = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(params, fresh.parameters()))
        if rank == 0:
            fs, root = fsspec.core.url_to_fs(url, **options)
            found = fs.find(root, detail=True)
            out["stored"] = {"files": len(found), "mib": sum(i["size"] for i in found.values()) / MiB,
                             "names": sorted(os.path.basename(p) for p in found)}
        out["ckptstore_source_hash"] = ckptstore_source_hash()
    finally:
        with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


# -- the parent ----------------------------------------------------------------------------
def run_job(spec: dict[str, Any], env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    """One 2-rank job; what each rank wrote (an ``error`` entry where it failed)."""
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as out:
        cfg = json.dumps({**spec, "out": out})
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port, procs, logs = sock.getsockname()[1], [], []
        for rank in range(WORLD):
            renv = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                    "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            procs.append(subprocess.Popen([sys.executable, __file__, "--rank-worker", cfg], env=renv,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            logs.append(f"timed out after {timeout} s")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        ranks = []
        for rank, p in enumerate(procs):
            path = Path(out) / f"rank{rank}.json"
            r = json.loads(path.read_text()) if path.exists() else {"rank": rank}
            if p.returncode != 0 or "restore" not in r:
                r["error"] = f"rc {p.returncode}: " + "\n".join(logs)[-3000:]
            ranks.append(r)
        return ranks


def setup_store(name: str) -> tuple[str, dict[str, Any], str | None, Any, Any]:
    """(base URL, storage_options, counter endpoint, remove(url), stop())."""
    if name == "local":
        base = OUT / "distributed_tmp"
        base.mkdir(parents=True, exist_ok=True)
        return str(base), {}, None, lambda url: shutil.rmtree(url, ignore_errors=True), lambda: shutil.rmtree(base, True)
    if name == "s3":
        from common.servers import s3_fs, s3_options, start_moto, use_test_credentials

        use_test_credentials()
        server, endpoint, _ = start_moto(count=True)
        fs = s3_fs(endpoint)
        fs.mkdir(BUCKET)

        def remove(url: str) -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(url, recursive=True)
        return f"s3://{BUCKET}", s3_options(endpoint), endpoint, remove, server.stop
    raise SystemExit(f"unknown store {name!r} (local, s3)")


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from common.servers import child_env

    env = child_env()
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for store in args.stores:
        base, options, counter, remove, stop = setup_store(store)
        try:
            for rnd in range(1, args.rounds + 1):
                for impl in IMPLS:
                    url, warm = f"{base}/{impl}-r{rnd}", f"{base}/warm-{impl}-r{rnd}"
                    spec = {"store": store, "impl": impl, "url": url, "warm_url": warm, "storage_options": options,
                            "mib": args.mib, "counter": counter}
                    t0 = time.monotonic()
                    ranks = run_job(spec, env, args.timeout)
                    remove(url)
                    remove(warm)
                    runs.append({"store": store, "impl": impl, "round": rnd, "ranks": ranks, "job_wall_s": time.monotonic() - t0})
                    status = "; ".join(r["error"].splitlines()[-1] for r in ranks if "error" in r) or " ".join(
                        f"r{r['rank']}: save {r['save']['own_s']:.2f}s restore {r['restore']['own_s']:.2f}s" for r in ranks)
                    print(f"[{time.monotonic() - started:6.0f}s] {store} {impl} round {rnd}: {status}", flush=True)
                    sys.stderr.write("".join(r["error"] + "\n" for r in ranks if "error" in r))
        finally:
            stop()
    layers, width = layer_shape(args.mib)
    return {"command": command_line(), "date": utc_now(), "machine": machine_info(["s3fs", "moto", "crc32c"]),
            "args": {"mib": args.mib, "rounds": args.rounds, "stores": args.stores},
            "model": {"layers": layers, "width": width, "mib": layers * (width * width + width) * 4 / MiB},
            "runs": runs, "total_s": time.monotonic() - started, "notes": args.notes, "ckptstore_source_hash": ckptstore_source_hash()}


# -- aggregation and report ----------------------------------------------------------------
def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "not run"
    med = statistics.median(values)
    return fmt.format(med) if len(values) == 1 else f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def series(runs: list[dict], store: str, impl: str, rank: int, op: str, key: str) -> list[float]:
    return [r["ranks"][rank][op][key] for r in runs if r["store"] == store and r["impl"] == impl
            and "error" not in r["ranks"][rank] and op in r["ranks"][rank]]


def aggregate(result: dict[str, Any]) -> dict[str, Any]:
    agg = {}
    for cell in itertools.product(result["args"]["stores"], IMPLS, range(WORLD), OPS, ("own_s", "job_s", "peak_extra_mib", "cpu_s")):
        vals = series(result["runs"], *cell)
        agg["{}/{}/rank{}/{}/{}".format(*cell)] = {"median": statistics.median(vals) if vals else None,
                                                    "min": min(vals, default=None), "max": max(vals, default=None), "n": len(vals)}
    return agg


def ratio(agg: dict, store: str, rank: int, op: str, key: str) -> str:
    a, b = (agg[f"{store}/{impl}/rank{rank}/{op}/{key}"]["median"] for impl in IMPLS)
    if key == "peak_extra_mib" and a is not None and b is not None and max(a, b) < 4:
        return "both < 4 MiB"  # a ratio of page-level noise
    return f"{a / b:.2f}x" if a is not None and b and b > 0 else "n/a"


def report(result: dict[str, Any]) -> str:
    agg, runs, m = aggregate(result), result["runs"], result["machine"]
    model = result["model"]
    lines = [HEADING, "",
             f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
             f"Machine: {m['cores']}-core VM ({m['cpu']}, {m['ram_gib']} GiB RAM, kernel {m['kernel']}); "
             f"torch {m['torch']}, Python {m['python']}, fsspec {m['fsspec']}, s3fs {m.get('s3fs', '-')}, moto {m.get('moto', '-')}; "
             f"ckptstore source sha256 {result.get('ckptstore_source_hash', '?')}  ",
             f"State: {model['layers']} × `nn.Linear({model['width']}, {model['width']})` float32, {model['mib']:.1f} MiB, "
             f"`fully_shard` per layer and root on a 2-rank CPU mesh (gloo), "
             f"{next((r['ranks'][0].get('local_shard_mib', 0) for r in runs), 0):.1f} MiB per rank. "
             f"{result['args']['rounds']} rounds per store, ckptstore and DCP interleaved; each cell a fresh 2-rank job; "
             f"median (min–max) over rounds. Total run time {result['total_s']:.0f} s.", "",
             "*own* = the rank's own call (barrier before; timed until the call returns), *job* = until the barrier after it. Peak "
             "extra = `VmHWM` (reset just before the call, after `malloc_trim(0)`) − RSS before, per rank. ckptstore: "
             "`mgr.save({'model': m}, step=1)`, `CheckpointManager(url).restore({'model': fresh})` (lists, verifies CRC32C of every "
             "file, loads). DCP: `dcp.save(get_model_state_dict(m), storage_writer=FsspecWriter(url))`, `dcp.load(sd, "
             "storage_reader=FsspecReader(url))` + `set_model_state_dict` (defaults: `sync_files=True`). Local reads start cold; S3 "
             "is moto in the parent process.", "",
             "| store | impl | rank | save own s | save job s | restore own s | restore job s | save peak extra MiB | "
             "restore peak extra MiB | bit-equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for store in result["args"]["stores"]:
        for impl in IMPLS:
            for rank in range(WORLD):
                cells = [spread(series(runs, store, impl, rank, op, key), "{:.1f}" if key == "peak_extra_mib" else "{:.2f}")
                         for op, key in COLUMNS]
                eq = [r["ranks"][rank].get("bit_equal") for r in runs if r["store"] == store and r["impl"] == impl]
                lines.append(f"| {store} | {impl} | {rank} | " + " | ".join(cells) + f" | {'yes' if eq and all(eq) else eq} |")
    lines += ["", "Ratio ckptstore / DCP (medians):", "",
              "| store | rank | save time | restore time | save peak extra | restore peak extra |", "|---|---|---|---|---|---|"]
    for store in result["args"]["stores"]:
        for rank in range(WORLD):
            lines.append(f"| {store} | {rank} | " + " | ".join(
                ratio(agg, store, rank, op, key) for key in ("own_s", "peak_extra_mib") for op in OPS) + " |")
    lines += ["", "What was stored and moved (last round; S3 requests and bytes counted on the server, both ranks together; "
              "local disk bytes from `/proc/self/io`, rank 0 + rank 1):", "",
              "| store | impl | files | stored MiB | save: requests / uploaded MiB / disk written MiB | "
              "restore: requests / downloaded MiB / disk read MiB | CPU s save / restore (rank 0) |", "|---|---|---|---|---|---|---|"]
    for store in result["args"]["stores"]:
        for impl in IMPLS:
            last = [r for r in runs if r["store"] == store and r["impl"] == impl and all("error" not in x for x in r["ranks"])]
            if not last:
                lines.append(f"| {store} | {impl} | not run | | | | |")
                continue
            r0, r1 = last[-1]["ranks"]
            sv, rs = r0["save"].get("server", {}), r0["restore"].get("server", {})
            disk = {op: sum(x[op][k] for x in (r0, r1)) for op, k in (("save", "disk_write_mib"), ("restore", "disk_read_mib"))}
            lines.append(f"| {store} | {impl} | {r0['stored']['files']} | {r0['stored']['mib']:.1f} | "
                         f"{sv.get('requests', '-')} / {sv.get('uploaded_mib', 0):.1f} / {disk['save']:.1f} | "
                         f"{rs.get('requests', '-')} / {rs.get('downloaded_mib', 0):.1f} / {disk['restore']:.1f} | "
                         f"{r0['save']['cpu_s']:.2f} / {r0['restore']['cpu_s']:.2f} |")
    failed = [f"{r['store']} {r['impl']} round {r['round']} rank {x['rank']}: {x['error'].splitlines()[-1]}"
              for r in runs for x in r["ranks"] if "error" in x]
    if failed:
        lines += ["", "Failed cells:", *[f"* {f}" for f in failed]]
    hashes = sorted({x["ckptstore_source_hash"] for r in runs for x in r["ranks"] if "ckptstore_source_hash" in x})
    if len(hashes) > 1:
        lines += ["", f"**ckptstore/*.py changed during the run** (source hashes seen by the ranks: {', '.join(hashes)})."]
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=256, help="state size in MiB, all ranks together (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per store, each ckptstore then DCP (default 3)")
    p.add_argument("--stores", default="local,s3", help="comma-separated: local, s3 (default local,s3)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one 2-rank job may take (default 300)")
    p.add_argument("--notes", default="", help="a paragraph appended to the markdown section")
    p.add_argument("--out", type=Path, default=OUT / "distributed.json")
    p.add_argument("--from-json", type=Path, help="re-render the markdown from a JSON written before")
    p.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_worker:
        rank_worker(json.loads(args.rank_worker))
        return
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if args.notes:
            result["notes"] = args.notes
    else:
        result = run_all(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "aggregate": aggregate(result)}, indent=1))
    md = report(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
