"""The spot story, end to end (issue 13, point 6): ``examples/spot_training.py`` killed again and
again (SIGKILL and SIGTERM, some during a background save), restarted each time with the same
command, ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptstore import CheckpointManager, RNGState

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "spot_training.py"
STEPS, SAVE_EVERY = 48, 4


def command(url: str, options: dict) -> list[str]:
    return [sys.executable, str(EXAMPLE), url, "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--clouds", "",
            "--step-seconds", "0.02", "--storage-options", json.dumps(options)]


def final_state(url: str, options: dict) -> dict:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    values = CheckpointManager(url, storage_options=options).restore({"model": model, "optimizer": opt, "scheduler": sched,
                                                                      "rng": RNGState()})
    assert values["step"] == STEPS - 1
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# make test tells the story on S3 (the spot user's store); local disk, file:// and GCS take the same code paths
# and run in make test-long (make test stays under 15 minutes)
SLOWER_STORES = ("local", "file", "gcs")


def test_killed_six_times_it_ends_bit_identical_to_an_uninterrupted_run(process_store, tmp_path):
    if process_store.kind in SLOWER_STORES:
        pytest.skip("local, file:// and gs:// run in make test-long (test_killed_six_times_on_the_slower_stores)")
    spot_story(process_store, tmp_path)


@pytest.mark.long
def test_killed_six_times_on_the_slower_stores(process_store, tmp_path):
    if process_store.kind not in SLOWER_STORES:
        pytest.skip("make test runs it (test_killed_six_times_it_ends_bit_identical_to_an_uninterrupted_run)")
    spot_story(process_store, tmp_path)


def spot_story(store, tmp_path) -> None:
    """Train, SIGKILL or SIGTERM six times at random steps (half of them mid-save), resume each
    time, and end bit-identical to a run never interrupted."""
    reference = str(tmp_path / "uninterrupted")
    subprocess.run(command(reference, {}), check=True, capture_output=True, timeout=120)

    rng = random.Random(13)
    kills = [signal.SIGKILL, signal.SIGTERM] * 3
    log = []
    for sig in kills:
        proc = subprocess.Popen(command(store.url, store.storage_options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        first = proc.stdout.readline().strip()
        start = 0 if first == "fresh start" else int(first.rsplit(" ", 1)[1])
        during_a_save = rng.random() < 0.5
        target = min(STEPS - 2, start + rng.randint(2, 8))
        if during_a_save:  # right after a step that started a background save
            target = min(STEPS - 2, (target // SAVE_EVERY) * SAVE_EVERY + SAVE_EVERY)
        for line in proc.stdout:
            if line.startswith(f"step {target} ") or line.startswith("done"):
                break
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        log.append((sig.name, start, target, proc.returncode))
    finished = subprocess.run(command(store.url, store.storage_options), check=False, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0 and finished.stdout.strip().endswith("done"), (finished.stderr, log)

    assert [code for name, _, _, code in log if name == "SIGKILL"] == [-9] * 3, log
    assert any(start > 0 for _, start, _, _ in log), log  # it did resume, not start over
    assert same(final_state(store.url, store.storage_options), final_state(reference, {})), log
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    assert mgr.verify() == {c.name: None for c in mgr.checkpoints()}
