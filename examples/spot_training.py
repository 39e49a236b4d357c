"""Training on spot instances: save in the background, save once more on the notice, resume anywhere.

Run it; kill it however the cloud does (``kill -TERM``, a spot notice, or ``kill -9``); run the
same command again, on any machine that reaches the root: it continues from its newest
checkpoint and ends exactly where an uninterrupted run ends.

    python examples/spot_training.py s3://bucket/runs/spot-demo --steps 300
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from ckptstore import CheckpointManager, RNGState


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of ``step`` is a function of the step, so a resumed run sees what an uninterrupted one saw."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="where checkpoints go: a path, s3://..., gs://...")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=20, help="steps between background saves")
    parser.add_argument("--storage-options", type=json.loads, default={}, help="JSON, passed to fsspec")
    parser.add_argument("--clouds", default="aws,gcp,azure", help="metadata servers to poll for a notice ('' for none)")
    parser.add_argument("--metadata-endpoints", type=json.loads, default=None, help='JSON, e.g. {"aws": "http://..."}')
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (to watch it in a demo)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState()}

    mgr = CheckpointManager(args.root, keep_last=3, save_interval_steps=args.save_every,
                            storage_options=args.storage_options)
    mgr.watch_preemption(clouds=[c for c in args.clouds.split(",") if c], endpoints=args.metadata_endpoints,
                         poll_seconds=0.5)
    restored = mgr.restore(state)  # None on a fresh start; a warning says so if the root was not empty
    start = 0 if restored is None else restored["step"] + 1
    print("fresh start" if restored is None else f"resuming at step {start}", flush=True)

    for step in range(start, args.steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        print(f"step {step} loss {loss.item():.6f}", flush=True)
        if mgr.reached_preemption(step):  # the machine is going: save now, and wait for it
            mgr.save({**state, "step": step}, step=step)
            print(f"preempted ({mgr.preemption_notice}): saved step {step}", flush=True)
            return
        if mgr.should_save(step):  # training goes on while the bytes travel
            mgr.save({**state, "step": step}, step=step, blocking=False)
        time.sleep(args.step_seconds)

    mgr.wait()  # the last background save, and its failure if it failed
    latest, last = mgr.latest(), args.steps - 1
    if latest is None or latest.step < last:  # the end of the run, if the interval did not save it
        mgr.save({**state, "step": last}, step=last)
    print("done", flush=True)


if __name__ == "__main__":
    main()
