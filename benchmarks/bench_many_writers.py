#!/usr/bin/env python
"""Many writers, one checkpoint folder: the request pattern of a sharded save, simulated (issue 15, point 8).

No torch.distributed: N simulated ranks (threads, or ``--processes K`` worker processes holding
the ranks as threads) each write one shard the way ``ckptstore.sharded`` does
(``FsspecStorage.open_write(path)`` with no size hint, bytes through ``ChecksumWriter``, the DCP
name ``state-<token>.rank<r>-0.distcp``) into one folder on S3 (moto on 127.0.0.1) behind the
link proxy of the tests (``tests/netfault.py``, ``--latency`` s each way). Rank 0 then does
what ``CheckpointManager._write_sharded`` does, with the manager's own code:

1. **prepare**: ``mgr._prepare`` (``scan``: one LIST of the root, a GET per unread manifest;
   ``check_free``; cleanup; on a manager's first save, one LIST of multipart uploads);
2. **write**: all ranks at once (released by a barrier), each its shard;
3. **finish**: rank 0 writes ``.dcp-metadata`` then ``.tree.json`` (after DCP's gather);
4. **commit**: ``commit.commit_manifest`` (create-only PUT, then ``storage.exists`` per file);
5. **retention**: ``mgr._delete(mgr._doomed(...))`` with ``keep_last=1`` (what ``_after_commit`` does);
6. **probe** (not ckptstore): one ``fs.find`` of the folder, what a LIST-based commit check would cost.

Two saves per configuration (step 1 on an empty root, step 2 prunes step 1). Requests are
counted at the proxy (a rule that never fires records time, method, target, body size) and on
the server (``common/counting.py``), each with the "prefix" S3 would partition on: the key's
folder, or a LIST's ``prefix=``. Ranks share ``--clients`` s3fs instances per process (one costs
~0.14 s and ~14 MB) with enough pooled connections: on the wire, N independent ranks.
Results: benchmarks/out/many_writers.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import sys
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptstore import CheckpointManager, Transfers, commit
from ckptstore.manifest import CheckpointInfo, FileEntry
from ckptstore.serializers import ChecksumWriter
from ckptstore.storage import open_storage
from common.counting import fetch
from common.link import FaultProxy
from common.provenance import ckptstore_source_hash, command_line, machine_info, utc_now
from common.servers import S3_KEYS, s3_fs, start_moto, use_test_credentials

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netfault import Action, Rule

MiB, GiB = 2**20, 2**30
OUT = Path(__file__).resolve().parent / "out"
WRITE_KINDS = {"PUT", "PUT if-none-match", "UploadPart", "CreateMultipart", "CompleteMultipart", "DELETE", "AbortMultipart"}


# -- the ranks ----------------------------------------------------------------------------------
def make_clients(url: str, endpoint: str, count: int, ranks: int, part: int, in_flight: int) -> list[Any]:
    pool = math.ceil(ranks / count) * (in_flight + 1) + 4
    opts = {"client_kwargs": {"endpoint_url": endpoint}, **S3_KEYS, "skip_instance_cache": True,
            "config_kwargs": {"max_pool_connections": pool}}
    clients = [open_storage(url, opts, Transfers(part_bytes=part, in_flight=in_flight)) for _ in range(count)]
    for c in clients:
        c.fs.connect()  # the client, no request
    return clients


def write_shard(storage: Any, folder: str, token: str, rank: int, size: int, buf: bytes) -> dict[str, Any]:
    path = f"{folder}/state-{token}.rank{rank}-0.distcp"
    t0 = time.monotonic()
    with storage.open_write(path) as raw:  # as sharded._StoreFiles.create_stream: no size hint
        out = ChecksumWriter(raw)
        out.write(rank.to_bytes(8, "little"))
        left = size - 8
        while left > 0:
            n = min(left, len(buf))
            out.write(memoryview(buf)[:n])
            left -= n
    return {"path": path, "size": out.size, "crc": out.crc, "t0": t0, "t1": time.monotonic()}


def write_ranks(clients: list[Any], ranks: list[int], folder: str, token: str, size: int, buf: bytes) -> list[dict[str, Any]]:
    """Every rank in ``ranks`` writes its shard at once (a barrier releases them); their results."""
    barrier = threading.Barrier(len(ranks))
    results: list[Any] = [None] * len(ranks)

    def work(i: int, rank: int) -> None:
        barrier.wait()
        try:
            results[i] = write_shard(clients[i % len(clients)], folder, token, rank, size, buf)
        except BaseException as err:  # reported by the caller
            results[i] = err

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed := [r for r in results if isinstance(r, BaseException)]:
        raise failed[0]
    return results


def _worker(conn: Any, url: str, endpoint: str, ranks: list[int], clients: int, part: int, in_flight: int, size: int) -> None:
    """A worker process: its ranks' clients, then one ``write_ranks`` per (folder, token) it is sent."""
    use_test_credentials()
    pool = make_clients(url, endpoint, min(clients, len(ranks)), len(ranks), part, in_flight)
    buf = os.urandom(min(size, MiB))
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        try:
            conn.send(write_ranks(pool, ranks, msg[0], msg[1], size, buf))
        except Exception as err:
            conn.send(f"{type(err).__name__}: {err}")


# -- counting -----------------------------------------------------------------------------------
class Tap:
    """Records every request the proxy sees, with the phase the driver is in."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.records: list[tuple[float, str, str, str, int, bool]] = []

    def __call__(self, head: Any) -> bool:
        size = int(head.headers.get("content-length") or 0)
        self.records.append((time.monotonic(), self.phase, head.method, head.target, size, "if-none-match" in head.headers))
        return False  # never fires: the request is relayed as it is


def kind_of(method: str, q: dict[str, list[str]], has_key: bool, create_only: bool) -> str:
    if method == "PUT":
        return "UploadPart" if "partNumber" in q else "PUT if-none-match" if create_only else "PUT"
    if method == "POST":
        return "CreateMultipart" if "uploads" in q else "CompleteMultipart" if "uploadId" in q else \
            "DeleteObjects" if "delete" in q else "POST"
    if method == "GET":
        return "LIST uploads" if "uploads" in q else "ListParts" if "uploadId" in q else "GET" if has_key else "LIST"
    if method == "DELETE":
        return "AbortMultipart" if "uploadId" in q else "DELETE"
    return f"{method}{'' if has_key else ' bucket'}"


def classify(target: str, method: str, create_only: bool) -> tuple[str, str]:
    """(kind, prefix): a key's folder, a LIST's prefix= (or "bucket")."""
    path, _, q = target.partition("?")
    query = urllib.parse.parse_qs(q, keep_blank_values=True)
    parts = urllib.parse.unquote(path).lstrip("/").split("/", 1)
    has_key = len(parts) == 2 and parts[1] != ""
    prefix = (parts[1].rsplit("/", 1)[0] + "/" if "/" in parts[1] else "(bucket top level)") if has_key else \
        query.get("prefix", ["(bucket)"])[0] or "(bucket)"
    return kind_of(method, query, has_key, create_only), prefix


def summarize(records: list[tuple[float, str, str, str, int, bool]], t0: float, t1: float) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    per_prefix: dict[str, Counter[str]] = defaultdict(Counter)
    windows: dict[str, Counter[int]] = defaultdict(Counter)
    wwindows: dict[str, Counter[int]] = defaultdict(Counter)
    for t, _, method, target, _size, create_only in records:
        kind, prefix = classify(target, method, create_only)
        kinds[kind] += 1
        per_prefix[prefix][kind] += 1
        windows[prefix][int(t - t0)] += 1
        if kind in WRITE_KINDS:
            wwindows[prefix][int(t - t0)] += 1
    return {"seconds": round(t1 - t0, 4), "requests": len(records), "kinds": dict(sorted(kinds.items())),
            "prefixes": {p: {"requests": sum(c.values()), "kinds": dict(sorted(c.items())),
                             "peak_per_s": max(windows[p].values()), "peak_writes_per_s": max(wwindows[p].values(), default=0)}
                         for p, c in sorted(per_prefix.items())}}


# -- one configuration --------------------------------------------------------------------------
PHASES = ("prepare", "write", "finish", "commit", "retention", "probe")


def run_config(label: str, endpoint: str, proxy: FaultProxy, tap: Tap, n: int, size: int, part: int, in_flight: int,
               processes: int, clients: int) -> dict[str, Any]:
    bucket = f"mw-{label}".lower().replace("_", "-")
    s3_fs(endpoint).mkdir(bucket)
    url = f"s3://{bucket}/root"
    tap.phase = "setup"
    opts = {"client_kwargs": {"endpoint_url": proxy.url}, **S3_KEYS, "skip_instance_cache": True}
    mgr = CheckpointManager(url, keep_last=1, storage_options=opts, transfers=Transfers(part_bytes=part, in_flight=in_flight))
    all_ranks, workers = list(range(n)), []
    if processes:
        ctx = mp.get_context("spawn")
        for k in range(processes):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(there, url, proxy.url, all_ranks[k::processes], clients, part, in_flight, size))
            proc.start()
            workers.append((proc, here))
        for _, conn in workers:
            assert conn.recv() == "ready"
    else:
        pool = make_clients(url, proxy.url, min(clients, n), n, part, in_flight)
        buf = os.urandom(min(size, MiB))
    saves = []
    marks: dict[str, tuple[float, float]] = {}
    served: dict[str, list[dict[str, Any]]] = {}

    @contextlib.contextmanager
    def measured(p: str) -> Iterator[None]:
        fetch(endpoint, "reset")
        tap.phase, t0 = p, time.monotonic()
        yield
        marks[p], tap.phase = (t0, time.monotonic()), "idle"
        served[p] = fetch(endpoint, "stats")

    for step in (1, 2):
        name = f"step_{step:08d}"

        with measured("prepare"):
            found = mgr._prepare(step, name, False)
        token = commit.new_token()
        with measured("write"):
            if processes:
                for _, conn in workers:
                    conn.send((name, token))
                got = [conn.recv() for _, conn in workers]
                if errors := [g for g in got if isinstance(g, str)]:
                    raise RuntimeError(errors[0])
                shards = [s for g in got for s in g]
            else:
                shards = write_ranks(pool, all_ranks, name, token, size, buf)
        small = []
        with measured("finish"):
            for suffix, nbytes in ((".dcp-metadata", 256 * n + 1024), (".tree.json", 1024)):  # a rough DCP plan size
                with mgr.storage.open_write(f"{name}/state-{token}{suffix}") as raw:
                    (w := ChecksumWriter(raw)).write(os.urandom(nbytes))
                small.append(FileEntry(f"state-{token}{suffix}", w.size, w.crc))
        files = tuple(sorted([FileEntry(s["path"].split("/", 1)[1], s["size"], s["crc"]) for s in shards] + small,
                             key=lambda e: e.path))
        info = CheckpointInfo(name=name, step=step, format="dcp", metrics={}, files=files, url=mgr.storage.url(name),
                              monitor=mgr.policy.ranks_by)
        with measured("commit"):
            info = commit.commit_manifest(mgr.storage, info)
        with measured("retention"):
            doomed = mgr._doomed([*found.committed, info], protect=info.name)
            mgr._delete(doomed)
        with measured("probe"):
            listed = mgr.storage.fs.find(f"{mgr.storage.root}/{name}", detail=True)
        assert len(listed) == len(files) + 1, (len(listed), len(files))
        save: dict[str, Any] = {"step": step, "files": len(files), "pruned": [d.name for d in doomed], "phases": {}}
        for p in PHASES:
            s = save["phases"][p] = summarize([r for r in tap.records if r[1] == p], *marks[p])
            server = served[p]
            s["server"] = {"requests": len(server), "bytes_in": sum(e["request_body"] for e in server),
                           "bytes_out": sum(e["body"] for e in server), "statuses": dict(Counter(e["status"] for e in server))}
        durations = sorted(s["t1"] - s["t0"] for s in shards)
        save["rank_seconds"] = {k: round(durations[i], 4) for k, i in (("min", 0), ("median", n // 2), ("max", -1))}
        saves.append(save)
        tap.records = []  # every request of this save is summarized
    for proc, conn in workers:
        conn.send(None)
        proc.join(30)
    return {"label": label, "writers": n, "shard_bytes": size, "part_bytes": part, "in_flight": in_flight,
            "processes": processes, "saves": saves}


# -- report -------------------------------------------------------------------------------------
def fmt_kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in kinds.items()) or "-"


def config_tables(cfg: dict[str, Any]) -> list[str]:
    mode = f"{cfg['processes']} processes" if cfg["processes"] else "threads"
    out = [f"### {cfg['label']}: {cfg['writers']} writers × {cfg['shard_bytes'] / MiB:g} MiB, part {cfg['part_bytes'] / MiB:g} MiB, "
           f"in_flight {cfg['in_flight']}, {mode}", ""]
    for save in cfg["saves"]:
        rs = save["rank_seconds"]
        out += [f"Save of step {save['step']} ({save['files']} data files + manifest; pruned: {', '.join(save['pruned']) or 'nothing'}; "
                f"per-rank write s min/median/max {rs['min']}/{rs['median']}/{rs['max']})", "",
                "| phase | wall s | requests (proxy / server) | by kind | bytes up | bytes down | peak req/s per prefix (1 s windows) |",
                "|---|---:|---:|---|---:|---:|---|"]
        for p in PHASES:
            s = save["phases"][p]
            peaks = "; ".join(f"`{pre}` {v['peak_per_s']} (writes {v['peak_writes_per_s']})" for pre, v in s["prefixes"].items())
            out.append(f"| {p} | {s['seconds']:.3f} | {s['requests']} / {s['server']['requests']} | {fmt_kinds(s['kinds'])} | "
                       f"{s['server']['bytes_in']:,} | {s['server']['bytes_out']:,} | {peaks or '-'} |")
        out.append("")
    return out


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def scaling_table(cfgs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    rows = ["| writers | files | prepare (save 2): requests, s | write: requests, s | commit: requests, s | "
            "retention (save 2): requests, s | probe (1 LIST): requests, s |", "|---:|---:|---|---|---|---|---|"]
    xs, commit_s, ret_s = [], [], []
    for c in cfgs:
        s2 = c["saves"][-1]
        ph = s2["phases"]

        cells = [f"{ph[p]['requests']} ({fmt_kinds(ph[p]['kinds'])}), {ph[p]['seconds']:.3f}" for p in
                 ("prepare", "write", "commit", "retention", "probe")]
        rows.append(f"| {c['writers']} | {s2['files']} | {' | '.join(cells)} |")
        xs.append(s2["files"])
        commit_s.append(ph["commit"]["seconds"])
        ret_s.append(ph["retention"]["seconds"])
    fits = {"commit": fit(xs, commit_s), "retention": fit(xs, ret_s)} if len(xs) > 1 else {}
    rows += ["", "Least-squares fit, save of step 2 (files = writers + 2): " + "; ".join(
        f"{k} = {b:.3f} s + {a * 1e3:.1f} ms × files" for k, (a, b) in fits.items()) + "."] if fits else []
    return rows, fits


def extrapolation(fits: dict[str, Any], latency: float) -> tuple[list[str], dict[str, Any]]:
    ranks, shard = 1000, GiB
    files = ranks + 2
    rows = ["| part size | requests per rank file | write-phase requests (1,000 ranks) | req/s if written within T = 1 / 10 / 60 / 300 s "
            "| T needed to stay ≤ 3,500/s on one S3 prefix | memory per rank ((in_flight+1) × part) |",
            "|---|---:|---:|---|---:|---:|"]
    data: dict[str, Any] = {"ranks": ranks, "shard_bytes": shard, "files": files, "parts": {}}
    for part in (8 * MiB, 64 * MiB, 256 * MiB):
        per = math.ceil(shard / part) + 2  # create + parts + complete
        total = ranks * per + 2  # + rank 0's .dcp-metadata and .tree.json (single PUTs)
        rates = [total / t for t in (1, 10, 60, 300)]
        data["parts"][part] = {"per_rank": per, "total": total, "rates": rates}
        rows.append(f"| {part // MiB} MiB{' (default)' if part == 8 * MiB else ''} | {per} | {total:,} | "
                    f"{' / '.join(f'{r:,.0f}' for r in rates)} | {total / 3500:.1f} s | {5 * part // MiB} MiB |")
    pages = math.ceil(files / 1000)
    rows += ["", "Rank 0's serial requests at the end of a 1,000-rank save (one round trip each, one after another):", "",
             "| call (today) | requests | at 20 ms RTT | at 50 ms RTT | fitted here | could be |", "|---|---:|---:|---:|---:|---|"]
    serial = {"commit: PUT if-none-match + storage.exists per file (HEAD)": (1 + files, "commit", f"1 PUT + {pages} LIST pages"),
              "retention: GET + DELETE manifest + DELETE per file": (2 + files, "retention", f"GET + DELETE + {pages} DeleteObjects"),
              "next save's scan (keep_last=1): LIST pages + GET manifest": (math.ceil((files + 1) / 1000) + 1, "", "same")}
    for what, (req, key, better) in serial.items():
        fitted = f"{fits[key][1] + fits[key][0] * files:.1f} s" if key in fits else "-"
        rows.append(f"| {what} | {req:,} | {req * 0.02:.1f} s | {req * 0.05:.1f} s | {fitted} | {better} |")
    data["serial"] = {k: v[0] for k, v in serial.items()}
    rows += ["", f"(The proxy adds {2 * latency * 1e3:.0f} ms RTT here; moto adds its own time.) S3: ≥ 3,500 PUT/COPY/POST/DELETE "
             "and 5,500 GET/HEAD req/s per partitioned prefix (UploadPart is a PUT), scaled up gradually under sustained load, "
             "503 SlowDown meanwhile. GCS: ~1,000 object writes/s and ~5,000 reads/s per bucket at first, doubling every 20 min "
             "of sustained load; sequential key names concentrate load. GCS counts 1,002 object writes per save here (each a "
             "resumable upload whose chunks go one after another)."]
    return rows, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=32)
    ap.add_argument("--shard-bytes", type=int, default=MiB)
    ap.add_argument("--big-shard-bytes", type=int, default=16 * MiB, help="0: skip the multipart run")
    ap.add_argument("--part-bytes", type=int, default=5 * MiB, help="the multipart run's part size")
    ap.add_argument("--in-flight", type=int, default=2)
    ap.add_argument("--scale", default="8,32,128", help="writer counts of the commit-scaling runs ('' to skip)")
    ap.add_argument("--scale-bytes", type=int, default=64 * 1024)
    ap.add_argument("--latency", type=float, default=0.01, help="seconds added each way by the proxy")
    ap.add_argument("--processes", type=int, default=0, help="0: ranks are threads; K: spread over K processes")
    ap.add_argument("--clients", type=int, default=8, help="s3fs instances per process")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    use_test_credentials()
    server, endpoint, _ = start_moto(count=True)
    tap, cfgs, started = Tap(), [], time.monotonic()
    with FaultProxy(endpoint, [Rule(Action.PASS, when=tap)], latency=args.latency, timeout=120) as proxy:
        plan = [("small", args.writers, args.shard_bytes, 8 * MiB)]
        if args.big_shard_bytes:
            plan.append(("multipart", args.writers, args.big_shard_bytes, args.part_bytes))
        plan += [(f"scale{n}", n, args.scale_bytes, 8 * MiB) for n in map(int, filter(None, args.scale.split(",")))]
        for label, n, size, part in plan:
            print(f"[{time.monotonic() - started:6.1f}s] {label}: {n} writers × {size} bytes", flush=True)
            cfgs.append(run_config(label, endpoint, proxy, tap, n, size, part, args.in_flight, args.processes, args.clients))
    server.stop()
    scaled = [c for c in cfgs if c["label"].startswith("scale")]
    scale_rows, fits = scaling_table(scaled) if scaled else ([], {})
    ext_rows, ext = extrapolation(fits, args.latency)
    meta = {"command": command_line(), "date": utc_now(), "total_seconds": round(time.monotonic() - started, 1),
            "latency_each_way_s": args.latency, "ckptstore_source": ckptstore_source_hash(),
            "machine": machine_info(("s3fs", "moto", "botocore"))}
    lines = ["# Many writers into one checkpoint folder (issue 15, point 8)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; run took {meta['total_seconds']} s; "
             f"ckptstore source {meta['ckptstore_source']}; proxy latency {args.latency * 1e3:.0f} ms each way; "
             f"moto {meta['machine'].get('moto')}, s3fs {meta['machine'].get('s3fs')}, {meta['machine']['cores']} cores.", "",
             "Prefix = the key's folder, or a LIST's `prefix=`. Requests counted at the proxy and (second number) on "
             "the server; bytes on the server. Peak req/s: the most requests to that prefix in one 1 s window of the phase.", ""]
    for c in cfgs:
        lines += config_tables(c)
    if scale_rows:
        lines += ["## Commit cost against the number of writers (save of step 2, which also prunes step 1)", "", *scale_rows, ""]
    lines += ["## Extrapolation: 1,000 ranks × 1 GiB (1 TiB) into one folder", "", *ext_rows, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_writers.md").write_text("\n".join(lines) + "\n")
    (args.out / "many_writers.json").write_text(json.dumps({"meta": meta, "configs": cfgs, "fits": fits,
                                                            "extrapolation": ext}, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
