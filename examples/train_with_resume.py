"""A training loop that survives preemption: run it, kill it (Ctrl-C or kill -9), run it again.

    python examples/train_with_resume.py ./runs/example
    python examples/train_with_resume.py s3://bucket/runs/example
"""

import argparse

import torch
from torch import nn

from ckptstore import CheckpointManager, RNGState

parser = argparse.ArgumentParser(description="A training loop that resumes from its latest checkpoint.")
parser.add_argument("root", nargs="?", default="./runs/example", help="any fsspec URL: a path, s3://..., gs://...")
root = parser.parse_args().root
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
mgr = CheckpointManager(root, keep_last=3, keep_best=1, monitor="val_loss", export_best="model_best.safetensors")

state = {"model": model, "optimizer": opt, "scheduler": sched, "rng": RNGState()}
values = mgr.restore(state)
start = 0 if values is None else values["epoch"] + 1
print("fresh start" if values is None else f"resuming after epoch {values['epoch']}")

x, y = torch.randn(1024, 16), torch.randn(1024, 1)
for epoch in range(start, 20):
    for idx in torch.randperm(1024).split(64):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    sched.step()
    with torch.no_grad():
        val_loss = nn.functional.mse_loss(model(x[:128]), y[:128]).item()
    info = mgr.save({**state, "epoch": epoch}, step=epoch, metrics={"val_loss": val_loss})
    print(f"epoch {epoch}: val_loss={val_loss:.4f} -> {info.url}")
