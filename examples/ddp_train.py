"""A multi-process training job that checkpoints to a URL and resumes, on any number of ranks.

    torchrun --nproc-per-node 2 examples/ddp_train.py ./runs/ddp                 # DDP: rank 0 writes
    torchrun --nproc-per-node 2 examples/ddp_train.py s3://bucket/runs/fsdp --fsdp  # FSDP2: every rank writes its shard

Run it, kill it (Ctrl-C, or kill -9 one rank: the others raise instead of hanging), run it
again: every rank resumes from the same newest checkpoint. An FSDP2 run may resume on a
different number of ranks (torch.distributed.checkpoint reshards). The same code runs on every
rank; ckptstore decides who writes, who commits and who prunes.
"""

import argparse
import json

import torch
import torch.distributed as dist
from torch import nn

from ckptstore import CheckpointManager

parser = argparse.ArgumentParser(description="DDP or FSDP2 training that resumes from its latest checkpoint.")
parser.add_argument("root", help="any fsspec URL every node can reach: a shared path, s3://..., gs://...")
parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) instead of DDP")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--save-every", type=int, default=10)
parser.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON (endpoint, ...)")
args = parser.parse_args()

dist.init_process_group("gloo")  # "nccl" on GPUs; ckptstore agrees over a gloo group of its own either way
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
if args.fsdp:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    trained = model
else:
    trained = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
mgr = CheckpointManager(args.root, keep_last=2, save_interval_steps=args.save_every, storage_options=args.storage_options)

restored = mgr.restore({"model": model, "optimizer": opt})  # every rank: the same checkpoint, agreed by rank 0
start = 0 if restored is None else restored["step"] + 1
if rank == 0:
    print("fresh start" if restored is None else f"resuming after step {restored['step']} ({restored.checkpoint.url})")

data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
for step in range(start, args.steps):
    x = torch.randn(16, 32, generator=data)
    loss = (trained(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if mgr.should_save(step) or step == args.steps - 1:
        info = mgr.save({"model": model, "optimizer": opt, "step": step}, step=step, metrics={"loss": loss.item()})
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} -> {info.url} ({len(info.files)} files)")
dist.destroy_process_group()
