"""A small training job for the exact-resume test, run as a fresh process (or in-process for memory://).

usage: python resume_worker.py '{"root": ..., "storage_options": ..., "fmt": ..., "stop": 6, "total": 12, "out": path}'
Trains from the latest checkpoint under ``root`` (or from scratch) up to step ``stop``, saving
after every step, then writes the final model and optimizer state to ``out`` with torch.save.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import torch
from torch import nn

from ckptstore import CheckpointManager, RNGState


def run(root: str, storage_options: dict, fmt: str, stop: int, out: str | None = None) -> dict:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    mgr = CheckpointManager(root, keep_last=2, format=fmt, storage_options=storage_options)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState()}
    values = mgr.restore(state)
    start = 0 if values is None else values["step"] + 1
    losses = [] if values is None else values["losses"]
    for step in range(start, stop):
        idx = torch.randperm(64)[:16]  # global torch RNG: shuffling and dropout
        noise = np.random.randn() * 1e-3 + random.random() * 1e-3  # numpy and python RNGs matter too
        loss = (model(data[idx]) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        mgr.save({**state, "step": step, "losses": losses}, step=step)
    result = {"model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses}
    if out:
        torch.save(result, out)
    return result


if __name__ == "__main__":
    run(**json.loads(sys.argv[1]))
