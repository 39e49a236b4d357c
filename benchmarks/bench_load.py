#!/usr/bin/env python
"""Load speed and memory: ckptstore's streaming ``load_partial`` against the stock loaders.

Two scenarios, measured side by side and interleaved in one invocation:

A. **Full load from local disk** into a pre-built model (a synthetic GPT-shaped float32
   state, 1 GiB by default): ckptstore ``load_partial(path, model)`` from a ``.safetensors``
   and from a ``.pt`` file; stock ``torch.load(mmap=True)``, ``torch.load`` and
   ``safetensors.torch.load_file``, each followed by ``model.load_state_dict``. The limits:
   a plain sequential ``readinto`` of the file into a preallocated buffer (the disk) and a
   ``copy_`` of the same number of bytes between two resident tensors (memory bandwidth).
B. **10% partial load from S3** (a moto server in this, the parent, process): a target model
   that holds about 10% of the file's bytes with matching shapes (3 of 24 blocks and the
   final norm), plus an embedding whose shape does not match and a new head. ckptstore
   ``load_partial("s3://...", target)``; stock "download everything, parse, filter by
   name and shape, ``load_state_dict(strict=False)``"; Lightning's
   ``torch.load(fsspec.open(url))``; and the transport limits ``fs.cat`` of the whole object
   and ``fs.cat_ranges`` of exactly the needed bytes.

Every measurement is a fresh child process. The child imports everything, builds the model
(every page written), does a tiny load through the same code path (one-time costs: imports,
the S3 client, fsspec's filesystem instance), drops the page cache (scenario A, unless
``--cache warm``), takes the baseline RSS, resets the kernel's ``VmHWM`` and starts a thread
that samples ``VmRSS``/``RssAnon`` every 5 ms. *Peak extra* = max(VmHWM, sampled) - baseline.
Bytes and requests on S3 are counted on the server: the moto WSGI app is wrapped by a
counting middleware, and the child brackets its measured call with ``/__bench__/reset`` and
``/__bench__/stats`` requests to it.

Run ``python benchmarks/bench_load.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from common.child import run_script_child
from common.counting import fetch
from common.proc import ProcStatus, Sampler, cpu_seconds
from common.provenance import ckptstore_revision, ckptstore_source_hash, command_line, machine_info, utc_now
from common.results_md import replace_section
from common.servers import child_env, s3_options, start_moto
from common.state import build_model, build_state, partial_blocks, partial_keys, state_shapes

HERE = Path(__file__).resolve().parent
MiB = 2**20
GiB = 2**30
SECTION = "## Load: full and partial"
BUCKET = "ckptstore-bench-load"
VERSIONS = ("numpy", "s3fs", "aiobotocore", "aiohttp", "botocore", "moto", "werkzeug")

# op -> (scenario, format, label, kind). kind: "ckptstore" | "stock" | "limit"
OPERATIONS: dict[str, tuple[str, str, str, str]] = {
    "local:ckptstore-st": ("local", "safetensors", "ckptstore `load_partial(path, model)`", "ckptstore"),
    "local:ckptstore-pt": ("local", "pt", "ckptstore `load_partial(path, model)`", "ckptstore"),
    "local:torch.load-mmap": ("local", "pt", "`torch.load(path, mmap=True, weights_only=True)` + `load_state_dict`", "stock"),
    "local:torch.load": ("local", "pt", "`torch.load(path, weights_only=True)` + `load_state_dict`", "stock"),
    "local:st.load_file": ("local", "safetensors", "`safetensors.torch.load_file(path)` + `load_state_dict`", "stock"),
    "local:limit-read": ("local", "safetensors", "limit: sequential `readinto` of the file into a resident buffer", "limit"),
    "local:limit-memcpy": ("local", "-", "limit: `dst.copy_(src)` of the same number of bytes (memory bandwidth)", "limit"),
    "s3:ckptstore-st": ("s3", "safetensors", 'ckptstore `load_partial("s3://...", target)`', "ckptstore"),
    "s3:ckptstore-pt": ("s3", "pt", 'ckptstore `load_partial("s3://...", target)`', "ckptstore"),
    "s3:download-st": (
        "s3",
        "safetensors",
        "`fs.cat_file(url)` + `safetensors.torch.load(bytes)` + filter + `load_state_dict(strict=False)`",
        "stock",
    ),
    "s3:download-pt": (
        "s3",
        "pt",
        "`fs.cat_file(url)` + `torch.load(BytesIO, weights_only=True)` + filter + `load_state_dict(strict=False)`",
        "stock",
    ),
    "s3:stream-pt": (
        "s3",
        "pt",
        "`torch.load(fsspec.open(url), weights_only=True)` + filter + `load_state_dict(strict=False)` (as Lightning loads)",
        "stock",
    ),
    "s3:limit-cat-st": ("s3", "safetensors", "limit: `fs.cat_file(url)` (whole object)", "limit"),
    "s3:limit-needed-st": ("s3", "safetensors", "limit: `fs.cat_ranges` of exactly the needed bytes", "limit"),
    "s3:limit-cat-pt": ("s3", "pt", "limit: `fs.cat_file(url)` (whole object)", "limit"),
    "s3:limit-needed-pt": ("s3", "pt", "limit: `fs.cat_ranges` of exactly the needed bytes", "limit"),
}
EXT = {"safetensors": "safetensors", "pt": "pt"}


# ---------------------------------------------------------------------------------------
# The 10% target, the file layouts
# ---------------------------------------------------------------------------------------
def target_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The 10% target: the partial blocks and ln_f as in the file, a resized embedding, a new head."""
    d = shapes["ln_f.weight"][0]
    out = {k: shapes[k] for k in partial_keys(shapes)}
    out["embed.weight"] = (shapes["embed.weight"][0] + 1024, d)  # new vocabulary: shape mismatch, skipped
    out["head.weight"] = (16, d)  # not in the file: missing
    return out


def fingerprint(t: Any) -> list[float]:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    idx = sorted({0, n // 7, n // 3, n // 2, (2 * n) // 3, n - 2 if n > 1 else 0, n - 1})
    return [float(flat[i]) for i in idx]


def safetensors_layout(path: Path) -> dict[str, Any]:
    """{key: [start, end)} absolute, and the header bytes (8 + JSON), read independently of ckptstore."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    spans = {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
    return {"spans": spans, "header_bytes": base, "file_bytes": path.stat().st_size, "member_headers": {}}


def torch_layout(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """{key: [start, end)} of each tensor's storage in a torch.save zip, checked against the tensor bytes.

    Storage i of a state_dict saved by torch.save is the i-th tensor in insertion order; the
    mapping is verified by comparing the first bytes at the computed offset with the tensor's.
    Directory bytes: everything from the central directory on (incl. EOCD records) plus
    data.pkl's member; ``member_headers[key]`` = the local header bytes before a tensor's data.
    """
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        start_dir = z.start_dir  # type: ignore[attr-defined]
    pkl = next(n for n in infos if n.endswith("/data.pkl"))
    prefix = pkl[: -len("data.pkl")]
    spans, headers = {}, {}
    with open(path, "rb") as f:

        def data_start(info: zipfile.ZipInfo) -> int:
            f.seek(info.header_offset)
            sig, nlen, elen = struct.unpack("<4s22xHH", f.read(30))
            assert sig == b"PK\x03\x04"
            return info.header_offset + 30 + nlen + elen

        for i, (key, t) in enumerate(state.items()):
            info = infos[f"{prefix}data/{i}"]
            start = data_start(info)
            f.seek(start)
            raw = t.reshape(-1)[:4].numpy().tobytes()
            if f.read(len(raw)) != raw or info.file_size != t.numel() * t.element_size():
                raise RuntimeError(f"{path}: storage data/{i} is not {key}; cannot map the layout")
            spans[key] = (start, start + info.file_size)
            headers[key] = start - info.header_offset
        pkl_info = infos[pkl]
        pkl_bytes = data_start(pkl_info) - pkl_info.header_offset + pkl_info.file_size
    size = path.stat().st_size
    return {"spans": spans, "header_bytes": (size - start_dir) + pkl_bytes, "file_bytes": size, "member_headers": headers}


def needed_ranges(spans: dict[str, tuple[int, int]], selected: set[str]) -> list[tuple[int, int]]:
    """Selected spans merged where no unselected tensor lies between them (only zip headers may)."""
    ranges: list[list[int]] = []
    prev_selected = False
    for key, (start, end) in sorted(spans.items(), key=lambda kv: kv[1][0]):
        if key in selected:
            if prev_selected and ranges:
                ranges[-1][1] = end
            else:
                ranges.append([start, end])
        prev_selected = key in selected
    return [(a, b) for a, b in ranges]


# ---------------------------------------------------------------------------------------
# The server's request log, summarized
# ---------------------------------------------------------------------------------------
def anatomy(log: list[dict[str, Any]]) -> dict[str, int]:
    """Requests of one call by kind, e.g. {"HEAD": 2, "GET <= 64 B": 291, "GET > 1 MiB": 4}."""
    out: dict[str, int] = {}
    for e in log:
        if e["method"] != "GET":
            kind = e["method"] + (f" {e['status']}" if not e["status"].startswith("2") else "")
        elif "list-type" in e["query"]:
            kind = "LIST"
        elif not e["status"].startswith("2"):
            kind = f"GET {e['status']}"
        elif not e["range"]:
            kind = "GET whole object"
        elif e["body"] <= 64:
            kind = "GET <= 64 B"
        elif e["body"] <= MiB:
            kind = "GET 65 B-1 MiB"
        else:
            kind = "GET > 1 MiB"
        out[kind] = out.get(kind, 0) + 1
    return out


def summarize_log(log: list[dict[str, Any]]) -> dict[str, Any]:
    methods: dict[str, int] = {}
    for e in log:
        methods[e["method"]] = methods.get(e["method"], 0) + 1
    ranged = [e["seconds"] for e in log if e["method"] == "GET" and e["range"] and e["status"].startswith("2")]
    return {
        "requests": len(log),
        "body_bytes": sum(e["body"] for e in log),
        "by_method": methods,
        "statuses": sorted({e["status"] for e in log}),
        "ranged_gets": len(ranged),
        "ranged_get_server_s_median": statistics.median(ranged) if ranged else None,
        "server_s_total": sum(e["seconds"] for e in log),
        "anatomy": anatomy(log),
    }


# ---------------------------------------------------------------------------------------
# Child: one measurement
# ---------------------------------------------------------------------------------------
def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def child_main(spec: dict[str, Any]) -> None:
    import gc
    import io

    import fsspec
    import numpy  # noqa: F401
    import safetensors.torch
    import torch

    from ckptstore import load_partial

    src_hash = ckptstore_source_hash()  # the code this child imported
    op = spec["op"]
    scenario, fmt, _, kind = OPERATIONS[op]
    so = spec.get("storage_options") or {}
    meta = json.loads(Path(spec["meta"]).read_text())
    files = meta["files"][scenario]
    shapes = {k: tuple(v) for k, v in meta["shapes"][scenario].items()}
    fmt_key = fmt if fmt != "-" else "safetensors"
    path = files[fmt_key]["url"]
    if scenario == "s3":
        import s3fs  # noqa: F401

    # -- build what the op loads into (every page written) -------------------------------
    model = src = dst = buf = None
    if op == "local:limit-read":
        buf = torch.zeros(files[fmt_key]["file_bytes"], dtype=torch.uint8)
    elif op == "local:limit-memcpy":
        n = files["safetensors"]["file_bytes"]
        src, dst = torch.ones(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    elif kind != "limit":
        model = build_model(shapes if scenario == "local" else {k: tuple(v) for k, v in meta["target"].items()},
                            requires_grad=True)

    # -- warm-up: the same code path on a tiny file --------------------------------------
    tiny = meta["tiny"][scenario][fmt_key]
    tiny_model = build_model({"w": (4, 4)}, requires_grad=True)
    fs = None
    if scenario == "s3":
        fs = fsspec.core.url_to_fs(path, **so)[0]  # the stock paths reuse it; ckptstore opens its own (no listing cache)
    report_obj = None

    def run(url: str, m: Any, full: bool) -> Any:
        if op in ("local:ckptstore-st", "local:ckptstore-pt"):
            return load_partial(url, m)
        if op in ("s3:ckptstore-st", "s3:ckptstore-pt"):
            return load_partial(url, m, storage_options=so)
        if op == "local:torch.load-mmap":
            sd = torch.load(url, mmap=True, weights_only=True)
            m.load_state_dict(sd)
            del sd
        elif op == "local:torch.load":
            sd = torch.load(url, weights_only=True)
            m.load_state_dict(sd)
            del sd
        elif op == "local:st.load_file":
            sd = safetensors.torch.load_file(url)
            m.load_state_dict(sd)
            del sd
        elif op.startswith("s3:download-") or op == "s3:stream-pt":
            if op == "s3:stream-pt":
                with fsspec.open(url, "rb", **so) as f:
                    sd = torch.load(f, weights_only=True)
            else:
                data = fs.cat_file(url)
                sd = safetensors.torch.load(data) if fmt == "safetensors" else torch.load(io.BytesIO(data), weights_only=True)
                del data
            want = m.state_dict()
            keep = {k: v for k, v in sd.items() if k in want and v.shape == want[k].shape}
            del sd
            m.load_state_dict(keep, strict=False)
            del keep
        elif op.startswith("s3:limit-cat-"):
            return len(fs.cat_file(url))
        elif op.startswith("s3:limit-needed-"):
            ranges = files[fmt_key]["needed_ranges"] if full else [(0, 8)]
            chunks = fs.cat_ranges([url] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges], on_error="raise")
            return sum(len(c) for c in chunks)
        else:
            raise SystemExit(f"unknown op {op}")
        return None

    if kind != "limit" or scenario == "s3":
        run(tiny, tiny_model, full=False)
    elif op == "local:limit-read":
        with open(tiny, "rb", buffering=0) as f:
            f.readinto(bytearray(64))
    else:
        torch.zeros(16, dtype=torch.uint8).copy_(torch.ones(16, dtype=torch.uint8))
    if scenario == "s3":
        fs.cat_file(path, start=0, end=1)  # moto reads the whole object per GET: warm its temp file's pages

    cache = "n/a (S3)"
    if scenario == "local":
        if spec["cache"] == "cold":
            cache = "cold (dropped)" if drop_page_cache() else "warm (drop_caches refused)"
        else:
            with open(path, "rb", buffering=0) as f:
                while f.read(64 * MiB):
                    pass
            cache = "warm (pre-read)"
    if scenario == "s3":
        fetch(spec["endpoint"], "reset")

    # -- the measured call -----------------------------------------------------------------
    probe = ProcStatus()
    gc.collect()
    baseline, baseline_anon = probe.fields(b"VmRSS", b"RssAnon")
    hwm_ok = probe.reset_hwm()
    sampler = Sampler(probe, spec["sample_ms"] / 1000)
    sampler.start()

    attempts: list[tuple[float, float]] = []  # (wall, cpu); limits keep the best of several tries
    tries = spec["limit_tries"] if scenario == "local" and kind == "limit" else 1
    for attempt in range(tries):
        if attempt and spec["cache"] == "cold":
            drop_page_cache()
        c0, t0 = cpu_seconds(), time.perf_counter()
        if op == "local:limit-read":
            view = buf.numpy().data
            with open(path, "rb", buffering=0) as f:
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise RuntimeError("short file")
                    done += n
            moved = done
        elif op == "local:limit-memcpy":
            dst.copy_(src)
            moved = dst.numel()
        else:
            out = run(path, model, full=True)
            report_obj = out if kind == "ckptstore" else None
            moved = out if isinstance(out, int) else None
        attempts.append((time.perf_counter() - t0, cpu_seconds() - c0))
    wall, cpu = min(attempts)
    sampler.stop()
    hwm, rss_end = probe.fields(b"VmHWM", b"VmRSS")
    server = fetch(spec["endpoint"], "stats") if scenario == "s3" else None
    peak = max(hwm if hwm_ok else 0, sampler.max_rss)

    # -- check the result (outside the measured window) -----------------------------------
    verified, problems = None, []
    if model is not None:
        sd = model.state_dict()
        expect = meta["fingerprints"][scenario]
        loaded = set(meta["selected"]) if scenario == "s3" else set(shapes)
        for k in loaded:
            if fingerprint(sd[k]) != expect[k]:
                problems.append(f"{k}: wrong values")
        for k in set(sd) - loaded:  # resized embedding and new head must be untouched
            if bool(sd[k].any()):
                problems.append(f"{k}: written though it should not be")
        if report_obj is not None and set(report_obj.loaded) != loaded:
            problems.append(f"report.loaded has {len(report_obj.loaded)} keys, expected {len(loaded)}")
        verified = not problems
    elif moved is not None:
        expected_moved = {"local:limit-read": files[fmt_key]["file_bytes"], "local:limit-memcpy": files["safetensors"]["file_bytes"]}.get(
            op
        )
        if op.startswith("s3:limit-cat-"):
            expected_moved = files[fmt_key]["file_bytes"]
        if op.startswith("s3:limit-needed-"):
            expected_moved = sum(b - a for a, b in files[fmt_key]["needed_ranges"])
        verified = moved == expected_moved
        if not verified:
            problems.append(f"moved {moved} bytes, expected {expected_moved}")

    result: dict[str, Any] = {
        "op": op,
        "scenario": scenario,
        "format": fmt,
        "kind": kind,
        "repeat": spec["repeat"],
        "wall_s": wall,
        "cpu_s": cpu,
        "attempts": attempts,
        "ckptstore_src": src_hash,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_extra_bytes": peak - baseline,
        "sampled_peak_extra_bytes": sampler.max_rss - baseline,
        "anon_peak_extra_bytes": sampler.max_anon - baseline_anon,
        "samples": sampler.n,
        "retained_bytes": rss_end - baseline,
        "peak_method": "VmHWM after clear_refs" if hwm_ok else "sampled VmRSS",
        "cache": cache,
        "verified": verified,
        "problems": problems[:5],
    }
    if report_obj is not None:
        result["report"] = {
            "bytes_read": report_obj.bytes_read,
            "requests": report_obj.requests,
            "loaded": len(report_obj.loaded),
            "skipped_shape": sorted(report_obj.skipped_shape),
            "missing": report_obj.missing,
            "unexpected": len(report_obj.unexpected),
            "cast": len(report_obj.cast),
        }
    if server is not None:
        result["server"] = summarize_log(server)
        result["server_log"] = server
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------
# Parent: files, S3 server, schedule, aggregate, report
# ---------------------------------------------------------------------------------------
def prepare_files(workdir: Path, size_bytes: int, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the state as .safetensors and .pt under ``workdir``; return (files info, fingerprints)."""
    import safetensors.torch
    import torch

    shapes = state_shapes(size_bytes)
    state = build_state(shapes)
    fps = {k: fingerprint(t) for k, t in state.items()}
    st_path, pt_path = workdir / f"model-{tag}.safetensors", workdir / f"model-{tag}.pt"
    safetensors.torch.save_file(state, str(st_path))
    torch.save(state, pt_path)
    files = {
        "safetensors": {"path": str(st_path), **safetensors_layout(st_path)},
        "pt": {"path": str(pt_path), **torch_layout(pt_path, state)},
    }
    files["state_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    files["tensors"] = len(state)
    del state
    return files, {"shapes": {k: list(v) for k, v in shapes.items()}, "fingerprints": fps}


def med_range(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for op in OPERATIONS:
        rs = [r for r in runs if r["op"] == op]
        if not rs:
            continue
        row = {
            "op": op,
            "scenario": rs[0]["scenario"],
            "format": rs[0]["format"],
            "kind": rs[0]["kind"],
            "label": OPERATIONS[op][2],
            "n": len(rs),
            "wall": [r["wall_s"] for r in rs],
            "cpu": [r["cpu_s"] for r in rs],
            "peak": [r["peak_extra_bytes"] for r in rs],
            "anon": [r["anon_peak_extra_bytes"] for r in rs],
            "retained": [r["retained_bytes"] for r in rs],
            "verified": all(r["verified"] is not False for r in rs),
            "problems": sorted({p for r in rs for p in r.get("problems", [])}),
            "cache": sorted({r["cache"] for r in rs}),
        }
        row["wall_median"] = statistics.median(row["wall"])
        row["peak_median"] = statistics.median(row["peak"])
        if "server" in rs[0]:
            row["server_bytes"] = [r["server"]["body_bytes"] for r in rs]
            row["server_requests"] = [r["server"]["requests"] for r in rs]
            row["server_by_method"] = rs[0]["server"]["by_method"]
            row["server_statuses"] = sorted({s for r in rs for s in r["server"]["statuses"]})
            ranged = [r["server"]["ranged_get_server_s_median"] for r in rs if r["server"]["ranged_get_server_s_median"] is not None]
            row["ranged_get_server_s"] = statistics.median(ranged) if ranged else None
            row["server_s_total"] = [r["server"]["server_s_total"] for r in rs]
            row["anatomy"] = anatomy(rs[0]["server_log"]) if "server_log" in rs[0] else rs[0]["server"]["anatomy"]
        if "report" in rs[0]:
            row["report_bytes"] = [r["report"]["bytes_read"] for r in rs]
            row["report_requests"] = [r["report"]["requests"] for r in rs]
            row["report"] = rs[0]["report"]
        rows.append(row)
    return rows


def mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def spread(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{statistics.median(values):g} ({lo}–{hi})"


def spread_mib(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo / MiB:.2f}" if lo == hi else f"{statistics.median(values) / MiB:.2f} ({lo / MiB:.2f}–{hi / MiB:.2f})"


def local_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = [r for r in rows if r["scenario"] == "local"]
    if not rows:
        return ""
    files = meta["files"]["local"]
    best = {
        f: min((r["wall_median"] for r in rows if r["kind"] == "stock" and r["format"] == f), default=None) for f in ("safetensors", "pt")
    }
    best_any = min((r["wall_median"] for r in rows if r["kind"] == "stock"), default=None)
    limit = next((r["wall_median"] for r in rows if r["op"] == "local:limit-read"), None)
    out = [
        "| Operation | File | Wall s, median (min–max) | GiB/s | × best stock, same format | × best stock, any "
        "| × read limit | CPU s | Peak extra RSS MiB, median (min–max) | of which anon MiB | Retained MiB | OK |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        nbytes = files[r["format"] if r["format"] != "-" else "safetensors"]["file_bytes"]
        w = r["wall_median"]
        same = best.get(r["format"])
        out.append(
            f"| {r['label']} | {'.' + r['format'] if r['format'] != '-' else '–'} | {med_range(r['wall'])} "
            f"| {nbytes / GiB / w:.2f} "
            f"| {f'{w / same:.2f}' if same and r['kind'] != 'limit' else '–'} "
            f"| {f'{w / best_any:.2f}' if best_any and r['kind'] != 'limit' else '–'} "
            f"| {f'{w / limit:.2f}' if limit else '–'} | {statistics.median(r['cpu']):.2f} "
            f"| {med_range([p / MiB for p in r['peak']], '{:.1f}')} | {statistics.median(r['anon']) / MiB:.1f} "
            f"| {statistics.median(r['retained']) / MiB:.1f} | {'yes' if r['verified'] else '**NO**'} |"
        )
    return "\n".join(out) + "\n"


def s3_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = [r for r in rows if r["scenario"] == "s3"]
    if not rows:
        return ""
    files = meta["files"]["s3"]
    out = [
        "| Operation | File | Wall s, median (min–max) | × best stock | × needed-bytes limit | CPU s "
        "| Peak extra RSS MiB, median (min–max) | Server: bytes sent MiB | Server: requests (by method) "
        "| LoadReport bytes_read MiB / requests | Bytes ≤ 1.05 × selected + header? | OK |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for f in ("safetensors", "pt"):
        fr = [r for r in rows if r["format"] == f]
        if not fr:
            continue
        best = min((r["wall_median"] for r in fr if r["kind"] == "stock"), default=None)
        limit = next((r["wall_median"] for r in fr if r["op"].startswith("s3:limit-needed-")), None)
        info = files[f]
        budget = 1.05 * meta["selected_bytes"]["s3"][f] + info["plan_header_bytes"]
        for r in fr:
            w = r["wall_median"]
            check = "–"
            if r["kind"] == "ckptstore":
                worst = max(r["server_bytes"])
                check = f"{'yes' if worst <= budget else '**no**'} ({mib(worst)} ≤ {mib(budget)})"
            methods = ", ".join(f"{k} {v}" for k, v in sorted(r["server_by_method"].items()))
            rep = f"{spread_mib(r['report_bytes'])} / {spread(r['report_requests'])}" if "report_bytes" in r else "–"
            out.append(
                f"| {r['label']} | .{f} | {med_range(r['wall'])} "
                f"| {f'{w / best:.2f}' if best and r['kind'] != 'limit' else '–'} "
                f"| {f'{w / limit:.2f}' if limit else '–'} | {statistics.median(r['cpu']):.2f} "
                f"| {med_range([p / MiB for p in r['peak']], '{:.1f}')} | {spread_mib(r['server_bytes'])} "
                f"| {spread(r['server_requests'])} ({methods}) | {rep} | {check} "
                f"| {'yes' if r['verified'] else '**NO**'} |"
            )
    return "\n".join(out) + "\n"


def render_section(data: dict[str, Any]) -> str:
    info, a, meta = data["machine"], data["args"], data["meta"]
    rows = aggregate(data["runs"])
    scen = {r["scenario"] for r in rows}
    parts = [
        f"{SECTION}\n\n"
        f"Command: `{data['command']}` — {data['date']} (wall {data['elapsed_s'] / 60:.1f} min).  \n"
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']}; "
        f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), numpy {info['numpy']}, "
        f"safetensors {info['safetensors']}, fsspec {info['fsspec']}, s3fs {info.get('s3fs')}, "
        f"aiobotocore {info.get('aiobotocore')}, aiohttp {info.get('aiohttp')}, moto {info.get('moto')}, "
        f"werkzeug {info.get('werkzeug')}; ckptstore at {info['ckptstore']}.  \n"
        f"Load average (1 min) at start / end: {data['loadavg'][0]:.2f} / {data['loadavg'][1]:.2f}. "
        f"**The machine was shared**: {a.get('shared_note') or 'other jobs ran at the same time'}; "
        "wall times carry that noise (the CPU-seconds column is less sensitive to it), memory and byte "
        "counts do not.\n\n"
        f"{a['repeats']} interleaved rounds (round 1: every operation once, then round 2, ...); every measurement "
        "in a fresh child process that first builds the model (every page written) and runs the same code path "
        "once on a tiny file (imports, S3 client, fsspec instance are not charged). *Peak extra RSS* = "
        "max(kernel `VmHWM` reset via `/proc/self/clear_refs`, `VmRSS` sampled every "
        f"{a['sample_ms']:g} ms) minus the RSS just before the call; *anon* = the sampled `RssAnon` peak minus its "
        "baseline (file-backed mmap pages are in RSS but not in anon). *Retained* = RSS after the call minus the "
        "baseline. *OK* = every loaded tensor's values checked against the source (7 sampled elements each), "
        "tensors that must not be loaded still zero, LoadReport.loaded exact; limits: byte count checked.\n",
    ]
    if "local" in scen:
        lf = meta["files"]["local"]
        caches = sorted({c for r in rows if r["scenario"] == "local" for c in r["cache"]})
        parts.append(
            f"\n### A. Full load from local disk into a pre-built model\n\n"
            f"State: {lf['tensors']} float32 tensors, {mib(lf['state_bytes'])} MiB (embedding + 24 blocks + final "
            f"norm); files: .safetensors {mib(lf['safetensors']['file_bytes'])} MiB, .pt (torch.save) "
            f"{mib(lf['pt']['file_bytes'])} MiB, on the root disk (virtio block device). Page cache: "
            f"{', '.join(caches)} — "
            + (
                "every child runs `sync; echo 3 > /proc/sys/vm/drop_caches` right before its baseline, so every "
                "measured read comes from the disk (this also evicts other processes' cached pages)."
                if a["cache"] == "cold"
                else "every child reads the whole file once before its baseline, so every measured read comes from the page cache."
            )
            + " *× best stock* divides by the fastest stock loader (same file format / any format); *× read limit* "
            "divides by the sequential `readinto` of the .safetensors file. GiB/s = file bytes / wall time. "
            + (
                f"The two limit rows are each child's best of {a['limit_tries']} tries (page cache dropped before each): "
                "a limit is the best the hardware did, and cold reads on this VM's disk vary 2-4x between identical "
                "tries (0.45-1.9 s for 1 GiB in a separate check).\n\n"
                if a.get("limit_tries", 1) > 1
                else "\n\n"
            )
            + local_table(rows, meta)
        )
    if "s3" in scen:
        sf = meta["files"]["s3"]
        sel = meta["selected_bytes"]["s3"]
        ranged = [  # small ranged GETs of the planners, sent one at a time: moto's cost per request, no lock waits
            e["seconds"]
            for r in data["runs"]
            if r["scenario"] == "s3" and r["kind"] == "ckptstore"
            for e in r.get("server_log", [])
            if e["method"] == "GET" and e["range"] and e["body"] <= 64 * 1024 and e["status"].startswith("2")
        ]
        parts.append(
            f"\n### B. 10% partial load from S3 (moto)\n\n"
            f"File: {sf['tensors']} float32 tensors, {mib(sf['state_bytes'])} MiB; .safetensors "
            f"{mib(sf['safetensors']['file_bytes'])} MiB, .pt {mib(sf['pt']['file_bytes'])} MiB, uploaded once per "
            f"format before the measurements (upload times: " + ", ".join(f".{k} {v:.1f} s" for k, v in meta["upload_s"].items()) + "). "
            f"Target model: blocks {', '.join(map(str, partial_blocks()))} of 24 and `ln_f` with the file's shapes "
            f"({len(meta['selected'])} tensors, {mib(sel['safetensors'])} MiB = "
            f"{100 * sel['safetensors'] / sf['state_bytes']:.1f}% of the state), an `embed.weight` with 1024 more "
            "rows (shape mismatch: must be skipped, not fetched) and a new `head.weight` (missing from the file). "
            "Selected bytes + header/directory bytes (the requirement's allowance): .safetensors "
            f"{mib(sel['safetensors'])} + {sf['safetensors']['plan_header_bytes']} B (8-byte length + JSON header); "
            f".pt {mib(sel['pt'])} + {sf['pt']['plan_header_bytes']} B (central directory + EOCD records, the "
            "data.pkl member, and the local header of each selected member). The needed-bytes limit fetches the "
            "selected tensors as maximal runs without an unselected tensor inside "
            f"({len(sf['safetensors']['needed_ranges'])} ranges for .safetensors, {len(sf['pt']['needed_ranges'])} "
            "for .pt; the .pt runs include the few-dozen-byte zip headers between members), concurrently via "
            "`cat_ranges`.\n\n"
            "Bytes and requests are counted **on the server**: a WSGI middleware around moto's app (in the parent "
            "process) logs every request and the response body bytes it returns; the child resets and reads that "
            "log through a side channel right around the measured call. They include everything the call sends: "
            "HEAD/info requests, ckptstore's `manifest.json` probe (a 404 with a small XML body). "
            "moto (`ThreadedMotoServer` on 127.0.0.1, objects in spooled temp files) reads the **whole object** to "
            "serve any ranged GET"
            + (
                f" (median {statistics.median(ranged):.2f} s of server time for a ranged GET of at most 64 KiB here, "
                f"{len(ranged)} such requests sent one at a time by ckptstore's planning step)"
                if ranged
                else ""
            )
            + ", under a per-object lock, and it shares the 2 cores with the client: on moto, wall time is "
            "dominated by the request count, not by the bytes. A real S3 endpoint serves a ranged GET in tens of "
            "milliseconds with many in flight, so the byte and request columns transfer to real S3, the wall "
            "times do not.\n\n"
            + s3_table(rows, meta)
            + "\nRequests by kind (server log of the first round; `GET <= 64 B` are 8-byte length prefixes, zip "
            "EOCD/local-header reads and the like):\n\n"
            + "".join(
                f"- {r['label']}, .{r['format']}: "
                + ", ".join(f"{k} × {v}" for k, v in sorted(r["anatomy"].items(), key=lambda kv: -kv[1]))
                + "\n"
                for r in rows
                if r["scenario"] == "s3" and r["kind"] != "limit"
            )
        )
    src = data.get("ckptstore_src")
    if src:
        measured = sorted({r["ckptstore_src"] for r in data["runs"] if r["kind"] == "ckptstore"})
        if len(measured) > 1:
            parts.insert(
                1,
                f"\n**Warning: ckptstore/ changed during this run**: the ckptstore rows ran different code (source hashes "
                f"{', '.join(measured)}); they mix versions.\n\n",
            )
        elif src["start"] != src["end"]:
            which = "the code at the start, the revision named above" if measured == [src["start"]] else "not the start's code"
            parts.insert(
                1,
                f"\nNote: ckptstore/ changed during the run (source hash {src['start']} at the start, {src['end']} at the "
                f"end); every ckptstore row ran the same code, {', '.join(measured)} ({which}). Stock loaders and limits "
                "do not run ckptstore code.\n\n",
            )
    problems = [(r["op"], p) for r in rows for p in r["problems"]]
    if problems:
        parts.append("\nVerification problems: " + "; ".join(f"{o}: {p}" for o, p in problems) + "\n")
    return "".join(parts)


def run_machine_info() -> dict[str, str]:
    """``machine_info`` with the ckptstore revision and torch's thread count."""
    import torch

    return {**machine_info(VERSIONS), "ckptstore": ckptstore_revision(), "torch_threads": str(torch.get_num_threads())}


def results_preamble(info: dict[str, str]) -> str:
    """What a new RESULTS.md says above the first section."""
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']}.\n\n"
            "Each section below says how it was produced; rerunning a benchmark replaces only its section.\n\n")


def report(data: dict[str, Any], args: argparse.Namespace) -> None:
    section = render_section(data)
    print()
    print(section)
    if args.write_md:
        replace_section(Path(args.results_md), SECTION, section, results_preamble(data["machine"]))
        print(f"updated {args.results_md} ({SECTION})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size-mib", type=float, default=1024, help="state size for the local full loads (A)")
    ap.add_argument(
        "--s3-size-mib", type=float, default=1024, help="state size of the S3 file for the partial loads (B); moto ingests ~60 MiB/s"
    )
    ap.add_argument("--repeats", type=int, default=3, help="measurements per operation (interleaved rounds)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(OPERATIONS)}")
    ap.add_argument("--skip-s3", action="store_true", help="scenario A only")
    ap.add_argument("--skip-local", action="store_true", help="scenario B only")
    ap.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="local reads: drop the page cache before each measurement (needs root) or pre-read the file",
    )
    ap.add_argument("--limit-tries", type=int, default=3, help="local limit rows: best of this many tries in one child")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--shared-note", default="", help="how the machine was shared, for the results text")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir under benchmarks/out)")
    ap.add_argument("--out", default=str(HERE / "out" / "load.json"), help="JSON results")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="Markdown file to update")
    ap.add_argument("--no-results-md", dest="write_md", action="store_false", help="do not touch RESULTS.md")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per child")
    ap.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="measure nothing: re-render the Markdown (and RESULTS.md) from a saved JSON result",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), args)
        return 0

    unknown = set(filter(None, args.only.split(","))) - set(OPERATIONS)
    if unknown:
        ap.error(f"unknown operation(s) {sorted(unknown)}; choose from {list(OPERATIONS)}")
    ops = [o for o in OPERATIONS if not args.only or o in args.only.split(",")]
    ops = [o for o in ops if not (args.skip_s3 and OPERATIONS[o][0] == "s3") and not (args.skip_local and OPERATIONS[o][0] == "local")]
    scenarios = {OPERATIONS[o][0] for o in ops}
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    machine = run_machine_info()  # the ckptstore revision measured is the one at the start
    src_start = ckptstore_source_hash()

    (HERE / "out").mkdir(exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="load-", dir=HERE / "out"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env()

    server = None
    try:
        import safetensors.torch
        import torch

        # -- files ----------------------------------------------------------------------------
        meta: dict[str, Any] = {"files": {}, "shapes": {}, "fingerprints": {}, "tiny": {}, "selected_bytes": {}, "upload_s": {}}
        sizes = {"local": int(args.size_mib * MiB), "s3": int(args.s3_size_mib * MiB)}
        made: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        for scen in sorted(scenarios):
            size = sizes[scen]
            if size not in made:
                t = time.perf_counter()
                made[size] = prepare_files(workdir, size, f"{size // MiB}mib")
                print(
                    f"[{time.perf_counter() - started:6.1f}s] wrote {size / MiB:g} MiB state as .safetensors and "
                    f".pt in {time.perf_counter() - t:.1f}s",
                    flush=True,
                )
            files, extra = made[size]
            meta["files"][scen] = json.loads(json.dumps(files))
            meta["shapes"][scen] = extra["shapes"]
            meta["fingerprints"][scen] = extra["fingerprints"]
            tiny_state = {"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}
            safetensors.torch.save_file(tiny_state, str(workdir / "tiny.safetensors"))
            torch.save(tiny_state, workdir / "tiny.pt")
            meta["tiny"][scen] = {"safetensors": str(workdir / "tiny.safetensors"), "pt": str(workdir / "tiny.pt")}
            for f in ("safetensors", "pt"):
                meta["files"][scen][f]["url"] = meta["files"][scen][f]["path"]

        storage_options: dict[str, Any] = {}
        endpoint = ""
        if "s3" in scenarios:
            import s3fs

            server, endpoint, counting = start_moto()
            storage_options = s3_options(endpoint)
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
            fs.mkdir(BUCKET)
            print(f"moto S3 server at {endpoint}, bucket {BUCKET}", flush=True)
            shapes = {k: tuple(v) for k, v in meta["shapes"]["s3"].items()}
            tshapes = target_shapes(shapes)
            meta["target"] = {k: list(v) for k, v in tshapes.items()}
            selected = sorted(k for k, v in tshapes.items() if shapes.get(k) == v)
            meta["selected"] = selected
            sel_set = set(selected)
            meta["selected_bytes"]["s3"] = {}
            for f in ("safetensors", "pt"):
                info = meta["files"]["s3"][f]
                spans = {k: tuple(v) for k, v in info["spans"].items()}
                meta["selected_bytes"]["s3"][f] = sum(spans[k][1] - spans[k][0] for k in selected)
                info["needed_ranges"] = needed_ranges(spans, sel_set)
                info["plan_header_bytes"] = info["header_bytes"] + sum(info["member_headers"].get(k, 0) for k in selected)
                key = f"{BUCKET}/model.{EXT[f]}"
                t = time.perf_counter()
                fs.put_file(info["path"], key)
                meta["upload_s"][f] = time.perf_counter() - t
                info["url"] = f"s3://{key}"
                fs.put_file(meta["tiny"]["s3"][f], f"{BUCKET}/tiny.{EXT[f]}")
                meta["tiny"]["s3"][f] = f"s3://{BUCKET}/tiny.{EXT[f]}"
                print(
                    f"[{time.perf_counter() - started:6.1f}s] uploaded .{f} ({mib(info['file_bytes'])} MiB) in "
                    f"{meta['upload_s'][f]:.1f}s; needed ranges {len(info['needed_ranges'])}",
                    flush=True,
                )
            assert counting is not None
            counting.control("reset")
        meta_path = workdir / "meta.json"
        meta_path.write_text(json.dumps(meta))

        # -- measurements, interleaved ------------------------------------------------------
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for op in ops:
                spec = {
                    "op": op,
                    "repeat": repeat,
                    "meta": str(meta_path),
                    "sample_ms": args.sample_ms,
                    "cache": args.cache,
                    "limit_tries": args.limit_tries,
                    "endpoint": endpoint,
                    "storage_options": storage_options if OPERATIONS[op][0] == "s3" else {},
                }
                r = run_script_child(Path(__file__).resolve(), spec, env, args.timeout)
                runs.append(r)
                extra = ""
                if "server" in r:
                    extra = f"  server {mib(r['server']['body_bytes'])} MiB / {r['server']['requests']} req {r['server']['by_method']}"
                if "report" in r:
                    extra += f"  report {mib(r['report']['bytes_read'])} MiB / {r['report']['requests']} req"
                print(
                    f"[{time.perf_counter() - started:6.1f}s] round {repeat + 1}/{args.repeats} {op:24s} "
                    f"wall {r['wall_s']:6.2f}s cpu {r['cpu_s']:5.2f}s  peak extra {mib(r['peak_extra_bytes'])} "
                    f"MiB (anon {mib(r['anon_peak_extra_bytes'])})  {r['cache']}  ok={r['verified']}{extra}",
                    flush=True,
                )
                if r["problems"]:
                    print("    problems:", r["problems"], flush=True)
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    for info in (f for scen in meta["files"].values() for f in (scen["safetensors"], scen["pt"])):
        info.pop("spans", None)  # bulky; the ranges and totals stay
        info.pop("member_headers", None)
    meta.pop("fingerprints", None)
    data = {
        "command": command_line(),
        "date": utc_now(),
        "elapsed_s": time.perf_counter() - started,
        "loadavg": [load0, os.getloadavg()[0]],
        "machine": machine,
        "ckptstore_src": {"start": src_start, "end": ckptstore_source_hash(), "children": sorted({r["ckptstore_src"] for r in runs})},
        "args": vars(args),
        "meta": meta,
        "runs": runs,
    }
    data["summary"] = [{k: v for k, v in row.items()} for row in aggregate(runs)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    report(data, args)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
