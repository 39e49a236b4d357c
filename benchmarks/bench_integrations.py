#!/usr/bin/env python
"""What ckptstore's Lightning and HF Trainer integrations give over the frameworks' own remote checkpointing.

    nice .venv/bin/python benchmarks/bench_integrations.py    # 256 MiB, S3 (moto) + local disk, 3 rounds (~5 min)

Saves a Lightning-shaped checkpoint (GPT-shaped ``state_dict``, Adam ``optimizer_states``, plain ``loops``/
``hyper_parameters``; ``--mib`` of float32) to S3 (moto on 127.0.0.1, started here) and local disk through
Lightning's ``_atomic_save`` (S3 endpoint and keys from ``AWS_*`` variables: Lightning passes no options),
``CkptStoreIO.save_checkpoint``, ``CheckpointManager.save`` (``CkptStoreCheckpoint``'s save) and the limit,
one ``fs.pipe_file`` of the same bytes (local: write + fsync): seconds and peak RSS above the RSS before the
call, each save in a fresh warmed child, rounds interleaved. Integrity: a byte of tensor data flipped in each
path's file, loaded by Lightning's ``_load``, ``CkptStoreIO.load_checkpoint`` and the manager's restore.
HF (S3): ``save_folder`` (``CkptStoreCallback``) of a ``checkpoint-N`` folder against ``fs.put``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from common.child import run_script_child
from common.provenance import ckptstore_source_hash, command_line, machine_info, utc_now
from common.results_md import replace_section
from common.servers import child_env, s3_fs, s3_options, start_moto
from common.state import build_state, state_shapes
from suite import limits
from suite.context import Ctx
from suite.measure import make_ctx, run_measured
from suite.stores import STORES

MiB = 2**20
SECTION = "## Integrations: Lightning and the HF Trainer (issue 16)"
SAVES = {"lightning": "Lightning `_atomic_save(ckpt, url)`", "ckptstore-io": "`CkptStoreIO(so).save_checkpoint(ckpt, url)`",
         "manager": "`CheckpointManager(root, storage_options=so).save(ckpt, step)` (`CkptStoreCheckpoint`)",
         "raw": "limit: one `fs.pipe_file` of the same bytes (local: 64 MiB writes, then fsync)"}
HF = {"hf-manager": "HF: `CheckpointManager.save_folder(folder, step)` (`CkptStoreCallback`)",
      "hf-put": "HF limit: `fs.put(folder, url, recursive=True)`"}


def lightning_checkpoint(total_bytes: int) -> dict[str, Any]:
    """What ``Trainer.save_checkpoint`` builds for a model trained with Adam: 1/3 weights, 2/3 optimizer state."""
    import torch

    model = build_state(state_shapes(total_bytes // 3))
    state = {i: {"step": torch.tensor(1000.0), "exp_avg": t * 0.1, "exp_avg_sq": t * t} for i, t in enumerate(model.values())}
    group = {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "foreach": None,
             "maximize": False, "capturable": False, "differentiable": False, "fused": None, "params": list(range(len(model)))}
    done = {"total": {"ready": 1000, "completed": 1000}, "current": {"ready": 40, "completed": 40}}
    loops = {"fit_loop": {"state_dict": {}, "epoch_progress": done, "epoch_loop.batch_progress": done}}
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.6.6", "state_dict": model, "loops": loops,
            "callbacks": {}, "optimizer_states": [{"state": state, "param_groups": [group]}], "lr_schedulers": [],
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 3e-4, "layers": 24, "name": "gpt", "dropout": 0.1}}


def tensor_bytes(tree: Any) -> int:
    if isinstance(tree, (dict, list, tuple)):
        return sum(tensor_bytes(v) for v in (tree.values() if isinstance(tree, dict) else tree))
    return tree.numel() * tree.element_size() if hasattr(tree, "numel") else 0


def hf_folder(path: str, total: int) -> None:
    """A Trainer-like ``checkpoint-N`` folder of ~``total`` bytes: safetensors weights, a pickled optimizer, small files."""
    import safetensors.torch
    import torch

    os.makedirs(path)
    safetensors.torch.save_file(build_state(state_shapes(total * 2 // 3)), f"{path}/model.safetensors")
    moments = build_state(state_shapes(total // 6))
    torch.save({"exp_avg": moments, "exp_avg_sq": {k: v * v for k, v in moments.items()}}, f"{path}/optimizer.pt")
    for name, obj in (("scheduler.pt", {"step": 500}), ("rng_state.pth", {"cpu": torch.get_rng_state()}),
                      ("trainer_state.json", '{"global_step": 500}'), ("config.json", '{"n_layer": 24}')):
        Path(path, name).write_text(obj) if isinstance(obj, str) else torch.save(obj, f"{path}/{name}")


def saver(op: str, ctx: Ctx) -> Any:
    """``(obj, dest) -> None`` for ``op``; ``dest`` is a folder on ``ctx``'s store."""
    from ckptstore import CheckpointManager

    so = ctx.storage_options
    if op == "lightning":
        from lightning.fabric.utilities.cloud_io import _atomic_save
        return lambda obj, dest: _atomic_save(obj, f"{dest}/model.ckpt")
    if op == "ckptstore-io":
        from ckptstore.lightning import CkptStoreIO
        plugin = CkptStoreIO(so)
        return lambda obj, dest: plugin.save_checkpoint(obj, f"{dest}/model.ckpt")
    if op in ("manager", "hf-manager"):
        def save(obj: Any, dest: str) -> None:
            mgr = CheckpointManager(dest, storage_options=so or None, distributed=False)
            mgr.save(obj, step=1000) if op == "manager" else mgr.save_folder(obj, step=500, name="checkpoint-500")
        return save
    if op == "hf-put":
        return lambda folder, dest: ctx.fs.put(folder, f"{dest}/checkpoint-500", recursive=True)
    # the suite's transport limit: fs.pipe_file (S3), 64 MiB write() calls (local: run_measured adds the fsync)
    return lambda data, dest: limits.raw_save(Ctx(ctx.store, dest, so, ctx.local, ctx.fs, data=data))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One save in this fresh process: the suite's ``run_measured`` (VmHWM, server counts, local fsync), call timed inside."""
    import torch

    op, dest = spec["op"], spec["dest"]
    ctx = make_ctx(spec, dest)
    fn = saver(op, ctx)
    obj, warm, nbytes, weights = spec["folder"], spec["warm_folder"], 0, 0
    if not op.startswith("hf-"):
        obj, warm = lightning_checkpoint(spec["bytes"]), {"w": torch.zeros(16)}
        nbytes, weights = tensor_bytes(obj), tensor_bytes(obj["state_dict"])
        if op == "raw":  # the bytes of Lightning's file, laid out before the call
            torch.save(obj, buf := io.BytesIO())
            obj, warm = buf.getvalue(), b"0" * 64  # getvalue() shares the BytesIO's buffer: one copy resident
    for folder in (dest, dest + "-warm"):
        ctx.fs.makedirs(folder, exist_ok=True)
    fn(warm, dest + "-warm")

    def timed(c: Ctx) -> None:
        t0 = time.perf_counter()
        fn(obj, dest)
        c.extra["call_s"] = time.perf_counter() - t0

    out = run_measured({"counter": spec["endpoint"], "sample_ms": 5}, ctx, timed, STORES[spec["store"]], writes=True)
    out.update(call_s=ctx.extra["call_s"], state_bytes=nbytes, weights_bytes=weights, source_hash=ckptstore_source_hash(),
               stored=sum(ctx.fs.du(dest, total=False).values()))
    ctx.fs.rm(dest, recursive=True)
    return out


def flip(fs: Any, path: str, zipped: bool) -> str:
    """Flip the exponent byte of a float32 in the middle of the biggest tensor record (zip) / the data (safetensors)."""
    raw = bytearray(fs.cat_file(path))
    if zipped:
        info = max((i for i in zipfile.ZipFile(io.BytesIO(bytes(raw))).infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
        n, e = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        start, size, where = info.header_offset + 30 + n + e, info.file_size, f"zip record `{info.filename}`"
    else:
        start = 8 + struct.unpack("<Q", raw[:8])[0]
        size, where = len(raw) - start, "safetensors data"
    at = start + (size // 2 & ~3) + 3
    raw[at] ^= 0x40
    fs.pipe_file(path, bytes(raw))
    return f"byte {at} ({where})"


def wrong_values(want: Any, got: Any, path: str = "") -> list[str]:
    if isinstance(want, (dict, list, tuple)):
        keys = want.keys() if isinstance(want, dict) else range(len(want))
        return [w for k in keys for w in wrong_values(want[k], got[k], f"{path}[{k!r}]")]
    if not hasattr(want, "numel") or bool((want == got).all()):
        return []
    i = int((want != got).flatten().nonzero()[0])
    return [f"{path}[{i}]: {want.flatten()[i].item():.4g} → {got.flatten()[i].item():.4g}"]


def integrity(spec: dict[str, Any]) -> dict[str, Any]:
    from lightning.fabric.utilities.cloud_io import _load

    from ckptstore import CheckpointManager
    from ckptstore.lightning import CkptStoreIO

    so, root = spec["storage_options"], spec["dest"]
    ctx = make_ctx(spec, root)
    ckpt = lightning_checkpoint(spec["bytes"])

    def outcome(read: Any) -> str:
        try:
            wrong = wrong_values(ckpt, read())
        except Exception as err:  # what the reader raised is the result
            return f"raised `{type(err).__name__}`: {str(err).replace(root, '…')[:300]}"
        return f"loaded, no error; {len(wrong)} wrong value(s): " + "; ".join(wrong[:2]) if wrong else "loaded, equal"

    def damaged(writer: str) -> tuple[str, dict[str, Any]]:
        url = f"{root}/{writer}/model.ckpt"
        if writer == "manager":
            mgr = CheckpointManager(f"{root}/manager", storage_options=so or None, distributed=False)
            info = mgr.save(ckpt, step=1000)
            return flip(ctx.fs, f"{info.url}/{info.files[0].path}", zipped=False), {
                "`CheckpointManager(root).restore()` (latest, as `fit(ckpt_path=\"last\")`)": lambda: mgr.restore(None),
                "`CkptStoreIO(manager=mgr).load_checkpoint(checkpoint url)`":
                lambda: CkptStoreIO(so, manager=mgr).load_checkpoint(info.url)}
        ctx.fs.makedirs(os.path.dirname(url), exist_ok=True)
        saver(writer, ctx)(ckpt, os.path.dirname(url))
        return flip(ctx.fs, url, zipped=True), {"Lightning `_load(url)`": lambda: _load(url),
                                            "`CkptStoreIO(so).load_checkpoint(url)`": lambda: CkptStoreIO(so).load_checkpoint(url)}

    rows = [{"store": spec["store"], "writer": writer, "damage": damage, "reader": name, "outcome": outcome(read)}
            for writer in ("lightning", "ckptstore-io", "manager") for damage, readers in [damaged(writer)]
            for name, read in readers.items()]
    ctx.fs.rm(root, recursive=True)
    return {"rows": rows, "state_bytes": tensor_bytes(ckpt)}


def med(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def ratio(a: float, b: float, floor: float = 0.0) -> str:
    return f"{a / b:.2f}×" if b > floor else f"limit < {floor:.0f} MiB"


def report(args: argparse.Namespace, rows: list[dict[str, Any]], checks: list[dict[str, Any]], took: float) -> str:
    m = machine_info(("lightning", "transformers", "s3fs", "botocore", "moto"))
    state, weights = next((r["state_bytes"], r["weights_bytes"]) for r in rows if r["op"] in ("lightning", "manager"))
    versions = ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("cpu", "cores", "ram_gib", "kernel"))
    out = [SECTION, "", f"Command: `{command_line()}`  ", f"Date: {utc_now()}  ",
           f"Machine: 2-core shared VM ({m['cpu']}, {m['ram_gib']} GiB RAM, kernel {m['kernel']}); S3 = moto on 127.0.0.1 "
           f"(loopback, ~60 MiB/s), started by the benchmark; {versions}; ckptstore source sha256 {rows[0]['source_hash']}  ",
           f"Checkpoint: a Lightning `dump_checkpoint()`-shaped dict, {state / MiB:.1f} MiB of float32 ({weights / MiB:.1f} MiB "
           "weights, Adam `exp_avg`/`exp_avg_sq` and a step tensor per parameter, `loops`/`hyper_parameters` plain values). "
           f"Rounds: {args.repeats}, interleaved, each save in a fresh child; median (min–max). Total run time {took:.0f} s.",
           "", "*Peak extra* = `VmHWM` (reset just before the call) − RSS just before it (the checkpoint, or for the limit "
           "its bytes, already resident). Local: *call* is what the training loop waits for, *+ fsync* adds an fsync of every "
           "file written (ckptstore fsyncs inside the call; Lightning's local write and the limit's writes do not). × limit: "
           "medians over the limit's on the same store (time: *+ fsync* locally). The HF rows (S3): a Trainer-like "
           f"`checkpoint-500` folder of {args.hf_mib} MiB (model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth, two "
           "JSON files), uploaded in the same rounds; their limit is `fs.put`.", "",
           "| store | save | call s | call + fsync s | × limit | peak extra MiB | × limit | stored MiB | S3 requests |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups = [(store, SAVES, "raw") for store in args.stores] + [("s3", HF, "hf-put")] * any(r["op"] in HF for r in rows)
    for store, ops, limit in groups:
        lt, lm = (statistics.median(r[k] for r in rows if r["store"] == store and r["op"] == limit) for k in ("wall_s", "peak_extra"))
        for op, label in ops.items():
            rs = [r for r in rows if r["store"] == store and r["op"] == op]
            t, p = [r["wall_s"] for r in rs], [r["peak_extra"] / MiB for r in rs]
            reqs = "—" if store == "local" else ", ".join(f"{v} {k}" for k, v in sorted(rs[-1]["server"]["by_method"].items()))
            out.append(f"| {store} | {label} | {med([r['call_s'] for r in rs])} | {med(t) if store == 'local' else '='} | "
                       f"{ratio(statistics.median(t), lt)} | {med(p, '{:.1f}')} | {ratio(statistics.median(p), lm / MiB, 4)} "
                       f"| {rs[-1]['stored'] / MiB:.1f} | {reqs} |")
    out += ["", f"Integrity: each path saved a {checks[0]['state_bytes'] / MiB:.1f} MiB checkpoint of the same shape; one "
            "byte of the stored file was flipped (the exponent byte of a float32 in the middle of the biggest tensor), then "
            "it was loaded back:", "", "| store | written by | flipped | loaded by | what happened |", "|---|---|---|---|---|"]
    out += [f"| {c['store']} | {SAVES[c['writer']].split(' (`')[0]} | {c['damage']} | {c['reader']} | "
            f"{c['outcome'].replace('|', '/')} |" for ch in checks for c in ch["rows"]]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="float32 MiB of the checkpoint saved (default 256)")
    ap.add_argument("--integrity-mib", type=int, default=24, help="MiB of the integrity rows' checkpoint (default 24)")
    ap.add_argument("--hf-mib", type=int, default=64, help="MiB of the HF checkpoint folder (default 64; 0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stores", default="s3,local", type=lambda s: s.split(","))
    ap.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "bench_integrations.json"))
    ap.add_argument("--no-results-md", action="store_true", help="do not write the section of benchmarks/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(integrity(spec) if spec["op"] == "integrity" else measure(spec)))
        return
    t0 = time.perf_counter()
    server, endpoint, _ = start_moto(count=True)
    s3_fs(endpoint).mkdir("ckptstore-bench-integrations")
    env = {**child_env(), "AWS_ENDPOINT_URL": endpoint}  # Lightning passes no storage options: a user sets these
    work = tempfile.mkdtemp(prefix="bench-integrations-")
    roots = {"s3": ("s3://ckptstore-bench-integrations", s3_options(endpoint)), "local": (f"{work}/local", {})}
    rows: list[dict[str, Any]] = []

    def run(op: str, store: str, dest: str, mib: int) -> dict[str, Any]:
        spec = {"op": op, "store": store, "dest": f"{roots[store][0]}/{dest}", "storage_options": roots[store][1], "bytes": mib * MiB,
                "endpoint": endpoint if store == "s3" else None, "folder": f"{work}/hf", "warm_folder": f"{work}/hf-warm"}
        got = run_script_child(__file__, spec, env, timeout=300)
        print(op, store, dest, "done" if "rows" in got else f"{got['wall_s']:.2f} s {got['peak_extra'] / MiB:.1f} MiB", flush=True)
        return {"op": op, "store": store, **got}

    try:
        if args.hf_mib:
            hf_folder(f"{work}/hf", args.hf_mib * MiB)
            hf_folder(f"{work}/hf-warm", MiB)
        for r in range(args.repeats):
            for store in args.stores:
                rows += [run(op, store, f"{op}-r{r}", args.mib) for op in SAVES]
            if args.hf_mib and "s3" in args.stores:
                rows += [run(op, "s3", f"{op}-r{r}", 0) for op in HF]
        checks = [run("integrity", store, "integrity", args.integrity_mib) for store in args.stores]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    took = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks, "seconds": took}, indent=1))
    print(section := report(args, rows, checks, took))
    if not args.no_results_md:
        replace_section(Path(__file__).resolve().parent / "RESULTS.md", SECTION, section)


if __name__ == "__main__":
    main()
