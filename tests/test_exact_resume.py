"""Exact resume: N steps in one go equals N/2 steps, a save, and a fresh process doing N/2 more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import resume_worker
import torch

TOTAL, HALF = 12, 6
WORKER = Path(resume_worker.__file__)


def in_fresh_process(**kwargs) -> None:
    subprocess.run([sys.executable, str(WORKER), json.dumps(kwargs)], check=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    in_fresh_process(root=str(out.parent / "ckpt"), storage_options={}, fmt="torch", stop=TOTAL, out=str(out))
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_resumed_run_is_bit_identical(store, fmt, uninterrupted, tmp_path):
    args = {"root": store.url, "storage_options": store.storage_options, "fmt": fmt}
    if store.kind == "memory":  # memory:// lives in one process: resume in-process, with fresh objects
        resume_worker.run(**args, stop=HALF)
        torch.manual_seed(999)  # scramble the RNGs: the checkpoint must restore them
        resumed = resume_worker.run(**args, stop=TOTAL)
    else:
        in_fresh_process(**args, stop=HALF)
        out = tmp_path / "resumed.pt"
        in_fresh_process(**args, stop=TOTAL, out=str(out))
        resumed = torch.load(out, weights_only=True)
    assert resumed["losses"] == uninterrupted["losses"]
    for key, ref in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], ref), key
    torch.testing.assert_close(resumed["optimizer"], uninterrupted["optimizer"], rtol=0, atol=0)
