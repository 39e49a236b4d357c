"""The demo job: train, checkpoint every epoch, get preempted for real, resume exactly.

``ckptstore demo`` (and ``make demo``) starts a training process that saves to ``--root``
every epoch, kills it with SIGKILL mid-run as a spot-instance reclaim would, starts a fresh
process that resumes from the latest checkpoint, and finally checks that the resumed run's
weights are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from .manager import CheckpointManager
from .rng import RNGState

EXPORT = "model_best.safetensors"


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The demo's model, optimizer and scheduler, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def synthetic_data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression problem (its own generator, so it never touches the global RNG)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def train(root: str, epochs: int, storage_options: dict[str, Any] | None = None, epoch_seconds: float = 0.0,
          fmt: str = "safetensors", verbose: bool = True) -> nn.Module:
    """Train ``epochs`` epochs, resuming from ``root`` if it holds a checkpoint."""
    model, opt, sched = build()
    mgr = CheckpointManager(root, keep_last=2, keep_best=1, monitor="val_loss", format=fmt,
                            storage_options=storage_options, export_best=EXPORT)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState()}
    values = mgr.restore(state)
    start, losses = (0, []) if values is None else (values["epoch"] + 1, values["loss_train"])
    say = print if verbose else (lambda *a, **k: None)
    say(f"[pid {os.getpid()}] " + ("starting fresh" if values is None else f"resumed after epoch {start - 1}"), flush=True)
    x, y = synthetic_data()
    xv, yv = x[:256], y[:256]
    for epoch in range(start, epochs):
        model.train()
        for idx in torch.randperm(len(x) - 256).add_(256).split(128):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            val = nn.functional.mse_loss(model(xv), yv).item()
        losses.append(loss.item())
        info = mgr.save({**state, "epoch": epoch, "loss_train": losses}, step=epoch, metrics={"val_loss": val})
        say(f"[pid {os.getpid()}] epoch {epoch}: val_loss {val:.4f}, saved {info.name} ({info.size} bytes)", flush=True)
        time.sleep(epoch_seconds)
    return model


def run(root: str = "./runs/demo", epochs: int = 8, preempt_after: int = 3,
        storage_options: dict[str, Any] | None = None, fresh: bool = False) -> bool:
    """Run the demo; return True if the resumed run matches an uninterrupted one exactly."""
    if fresh:
        mgr = CheckpointManager(root, storage_options=storage_options)
        for info in mgr.checkpoints():
            mgr.delete(info.name)
        for name in (EXPORT, f"{EXPORT}.json"):  # its record keeps the best metric ever seen here
            mgr.storage.delete(name)
    CheckpointManager(root, storage_options=storage_options).storage.makedirs()  # fail here, not in the child
    print(f"== training to {root}, preempted after epoch {preempt_after}")
    worker = _spawn(root, epochs, storage_options, epoch_seconds=1.0)
    mgr = CheckpointManager(root, monitor="val_loss", storage_options=storage_options)
    while (latest := mgr.latest()) is None or latest.step < preempt_after:
        if worker.poll() is not None:
            raise RuntimeError(f"the training process exited early with code {worker.returncode}")
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)  # a reclaimed spot instance gets no chance to clean up
    worker.wait()
    print(f"== preempted: killed pid {worker.pid} with SIGKILL (exit code {worker.returncode})")
    print("== committed:", ", ".join(f"{c.name} val_loss={c.metrics['val_loss']:.4f}" for c in mgr.checkpoints()))
    print("== restarting: a fresh process resumes from the latest checkpoint")
    if _spawn(root, epochs, storage_options).wait() != 0:
        raise RuntimeError("the resumed training process failed")
    print("== after the run:", ", ".join(c.name for c in mgr.checkpoints()), "| best:", getattr(mgr.best(), "name", None))
    reference = train(f"memory://ckptstore-demo-reference/{os.getpid()}", epochs, verbose=False)
    resumed, _, _ = build()
    CheckpointManager(root, storage_options=storage_options).restore({"model": resumed})
    same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))
    print(f"== resumed run equals an uninterrupted run bit for bit: {same}")
    return same


def _spawn(root: str, epochs: int, storage_options: dict[str, Any] | None, epoch_seconds: float = 0.0) -> subprocess.Popen[bytes]:
    args = json.dumps({"root": root, "epochs": epochs, "storage_options": storage_options, "epoch_seconds": epoch_seconds})
    return subprocess.Popen([sys.executable, "-m", "ckptstore.demo", args])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[pid %(process)d] %(message)s", stream=sys.stdout)
    logging.getLogger("ckptstore").setLevel(logging.INFO)
    train(**json.loads(sys.argv[1]))
