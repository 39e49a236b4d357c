"""One rank of a small torch.distributed job (gloo, CPU) for test_distributed.py.

usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dist_worker.py '{"scenario": ..., "root": ...,
       "storage_options": ..., "out": folder}'

Each scenario runs the same code on every rank, as a training script does, and writes what
this rank saw to ``<out>/rank<r>.json`` (and tensors to ``<out>/rank<r>.pt``) for the test to check.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from torch import nn

import ckptstore.dcp_files
from ckptstore import CheckpointManager, CkptStoreError


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(m: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int) -> None:
    for i in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * i + rank))
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def info_of(info: Any) -> dict:
    return {"name": info.name, "step": info.step, "format": info.format, "files": sorted(f.path for f in info.files)}


def error_of(err: BaseException) -> dict:
    return {"type": type(err).__name__, "message": str(err)}


def replicated(cfg: dict, rank: int, out: dict) -> None:
    """DDP-style: every rank holds the whole model; rank 0 writes, everyone learns the result."""
    m = nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    mgr = CheckpointManager(cfg["root"], keep_last=2, keep_best=1, monitor="loss", storage_options=cfg["storage_options"],
                            rank_timeout=60)
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3}  # step 2 is the best: kept beside the last two
    out["saves"] = []
    for step, loss in losses.items():
        train(m, opt, 1, rank)
        blocking = step != 3  # one save in the background, the same on every rank
        result = mgr.save({"model": m.module, "optim": opt, "epoch": step}, step=step, metrics={"loss": loss}, blocking=blocking)
        out["saves"].append(info_of(result if blocking else result.result()))
    out["kept"] = [i.step for i in mgr.checkpoints()]
    try:
        mgr.save({"model": m.module}, step=4)
    except CkptStoreError as err:
        out["again"] = error_of(err)
    fresh = model()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restored = mgr.restore({"model": fresh, "optim": fresh_opt})
    out["restored"] = {"name": restored.checkpoint.name, "epoch": restored["epoch"]}
    out["same_model"] = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.module.state_dict().values()))
    watcher = mgr.watch_preemption(signals=(signal.SIGUSR1,), clouds=())
    if rank == 1:  # the notice reaches one node only
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
    out["preempted"] = [mgr.reached_preemption(5), mgr.should_save(5)]
    watcher.stop()
    timed = CheckpointManager(cfg["root"].rstrip("/") + "_timed", storage_options=cfg["storage_options"], save_interval_seconds=1.0)
    if rank == 1:  # rank 1's clock says "due", rank 0's does not yet: they must agree
        time.sleep(1.1)
    out["timed"] = timed.should_save(1)
    if rank == 0:  # a manager of one rank only, as code written before ckptstore knew about ranks does it
        alone = CheckpointManager(cfg["root"].rstrip("/") + "_alone", storage_options=cfg["storage_options"], distributed=False)
        out["alone"] = alone.save({"model": m.module}, step=1).step
    dist.barrier()
    out["pruned"] = [i.step for i in mgr.prune()]  # collective: rank 0 prunes, every rank learns what
    out["deleted"] = mgr.delete(2).step


def sharded(cfg: dict, rank: int, out: dict) -> None:
    """FSDP2: each rank holds a shard; every rank writes its own through DCP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    m = model()
    fully_shard(m, mesh=mesh)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    mgr = CheckpointManager(cfg["root"], keep_last=2, storage_options=cfg["storage_options"], rank_timeout=60)
    out["saves"] = []
    for step in (1, 2, 3):
        train(m, opt, 1, rank)
        result = mgr.save({"model": m, "optim": opt, "epoch": step, "lr": [0.1]}, step=step, blocking=step != 2)
        out["saves"].append(info_of(result if step != 2 else result.result()))
    out["kept"] = [i.step for i in mgr.checkpoints()]
    fresh = model()
    fully_shard(fresh, mesh=mesh)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restored = mgr.restore({"model": fresh, "optim": fresh_opt})
    out["restored"] = {"name": restored.checkpoint.name, "epoch": restored["epoch"], "lr": restored["lr"]}
    out["same_model"] = all([torch.equal(full(a), full(b)) for a, b in zip(fresh.state_dict().values(), m.state_dict().values())])
    saved_opt, fresh_state = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    out["same_optim"] = all([torch.equal(full(saved_opt[i][k]), full(fresh_state[i][k])) for i in saved_opt for k in saved_opt[i]])
    train(m, opt, 1, rank)  # one more step from the saved state, and from the restored one: the same
    train(fresh, fresh_opt, 1, rank)
    out["same_after_a_step"] = all([torch.equal(full(a), full(b)) for a, b in zip(fresh.state_dict().values(), m.state_dict().values())])
    model_state = {k: full(v) for k, v in m.state_dict().items()}  # full_tensor is collective: every rank
    optim_state = {f"{i}/{k}": full(v) for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    mgr.save({"model": m, "optim": opt, "epoch": 4, "lr": [0.1]}, step=4)
    if rank == 0:
        torch.save({"model": model_state, "optim": optim_state}, os.path.join(cfg["out"], "step4.pt"))
    real_write = ckptstore.dcp_files._CountingStream.write
    if rank == 1:  # a store that refuses rank 1's shard: no rank commits, every rank says so
        def refuse(self: Any, data: Any) -> int:
            raise ckptstore.StorageError("injected: the store refused rank 1's shard")
        ckptstore.dcp_files._CountingStream.write = refuse  # type: ignore[method-assign]
    try:
        mgr.save({"model": m, "optim": opt, "epoch": 5}, step=5)
    except CkptStoreError as err:
        out["refused"] = error_of(err)
    ckptstore.dcp_files._CountingStream.write = real_write  # type: ignore[method-assign]
    out["kept_after_refusal"] = [i.step for i in mgr.checkpoints()]
    mgr.save({"model": m, "optim": opt, "epoch": 5}, step=5)
    if rank == 0:  # damage rank 1's shard of step 5: only the rank that checks that file can see it
        newest = mgr.latest()
        shard = next(f.path for f in newest.files if ".rank1-" in f.path)
        fs, root = fsspec.core.url_to_fs(cfg["root"], **cfg["storage_options"])
        path = f"{root.rstrip('/')}/{newest.name}/{shard}"
        data = bytearray(fs.cat_file(path))
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(path, bytes(data))
    dist.barrier()
    fallback = mgr.restore({"model": fresh, "optim": fresh_opt})  # every rank falls back, together
    out["fell_back_to"] = fallback.checkpoint.name
    mgr.delete(5)


def killed(cfg: dict, rank: int, out: dict) -> None:
    """Rank 1 is SIGKILLed while it writes its shard of step 2; rank 0 must not hang or commit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    m = model()
    fully_shard(m, mesh=mesh)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    mgr = CheckpointManager(cfg["root"], storage_options=cfg["storage_options"], rank_timeout=cfg.get("rank_timeout", 60))
    train(m, opt, 1, rank)
    mgr.save({"model": m, "optim": opt}, step=1)
    train(m, opt, 1, rank)
    if rank == 1:
        real_write = ckptstore.dcp_files._CountingStream.write

        def die_midway(self: Any, data: Any) -> int:
            if self.checksum.size > 0 and "hang" not in cfg:  # some bytes of the shard are out: die mid-file
                os.kill(os.getpid(), signal.SIGKILL)
            if self.checksum.size > 0 and cfg.get("hang"):  # or stall there, once, then go on
                time.sleep(cfg["hang"])
                cfg["hang"] = 0
            return real_write(self, data)
        ckptstore.dcp_files._CountingStream.write = die_midway  # type: ignore[method-assign]
    started = time.monotonic()
    out["step1"] = True
    try:
        mgr.save({"model": m, "optim": opt}, step=2)
        out["saved"] = True
    except CkptStoreError as err:
        out["error"] = error_of(err)
    out["seconds"] = time.monotonic() - started


SCENARIOS = {"replicated": replicated, "sharded": sharded, "killed": killed}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {}
    path = os.path.join(cfg["out"], f"rank{rank}.json")
    try:
        SCENARIOS[cfg["scenario"]](cfg, rank, out)
    finally:
        with open(path, "w") as f:
            json.dump(out, f)
    if cfg["scenario"] == "killed":
        os._exit(0)  # its peer is gone: nothing to tear down with it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
