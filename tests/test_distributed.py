"""The manager inside torch.distributed jobs: two real processes (gloo, CPU) per test, on every
store another process can reach (memory:// lives in one process).

Each test runs a scenario of ``dist_worker.py`` on 2 ranks and checks what every rank saw, then
the store itself, from this process: replicated state written once, sharded state written by
every rank and restored on 2 and on 1, a rank that fails or is SIGKILLed mid-save.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import ckptstore
from ckptstore import CheckpointManager
from ckptstore.cli import main
from ckptstore.convert import convert
from ckptstore.partial import describe
from ckptstore.scan import scan
from ckptstore.storage import open_storage
from conftest import REMOTE_KINDS, _make_store, _params

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(params=_params(["local", *REMOTE_KINDS]))
def process_store(request, tmp_path):
    """Local disk, S3 and GCS (file:// is local disk again, and memory:// lives in one process)."""
    yield from _make_store(request.param, request, tmp_path)

JOB_SECONDS = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(scenario: str, store, out: Path, world: int = 2, **extra) -> tuple[list[dict], list[int]]:
    """Run ``scenario`` on ``world`` ranks; return what each rank wrote and their exit codes."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.dumps({"scenario": scenario, "root": store.url, "storage_options": store.storage_options, "out": str(out), **extra})
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), cfg], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=JOB_SECONDS)[0])
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    results = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    if scenario != "killed":
        assert codes == [0] * world, "\n".join(logs)[-4000:]
    return results, codes


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_replicated_state_is_written_once_and_every_rank_learns_the_outcome(process_store, tmp_path):
    ranks, _ = run_job("replicated", process_store, tmp_path / "job")
    zero, one = ranks
    assert zero["saves"] == one["saves"]  # every rank returns the same CheckpointInfo, the background save's too
    assert [s["step"] for s in zero["saves"]] == [1, 2, 3, 4]
    assert all(len(s["files"]) == 1 for s in zero["saves"])  # written once, by rank 0
    assert zero["kept"] == one["kept"] == [2, 3, 4]  # keep_last=2 and the best (step 2) across ranks
    assert zero["again"]["type"] == one["again"]["type"] == "CheckpointExists"  # a refusal reaches every rank
    assert zero["again"]["message"] == one["again"]["message"]
    assert zero["restored"] == one["restored"] == {"name": "step_00000004", "epoch": 4}
    assert zero["same_model"] and one["same_model"]
    assert zero["preempted"] == one["preempted"] == [True, True]  # a notice on rank 1 only stops both
    assert zero["timed"] is one["timed"] is True  # save_interval_seconds: due on one rank's clock, due on both
    assert zero["alone"] == 1 and "alone" not in one  # distributed=False: a manager on rank 0 alone does not wait for rank 1
    assert zero["pruned"] == one["pruned"] == [] and zero["deleted"] == one["deleted"] == 2
    mgr = CheckpointManager(process_store.url, storage_options=process_store.storage_options)
    assert [i.step for i in mgr.checkpoints()] == [3, 4] and set(mgr.verify().values()) == {None}


def test_sharded_state_is_written_by_every_rank_and_restores_on_two_and_on_one(process_store, tmp_path, capsys):
    ranks, _ = run_job("sharded", process_store, tmp_path / "job")
    zero, one = ranks
    assert zero["saves"] == one["saves"]
    for save in zero["saves"]:
        assert save["format"] == "dcp"
        shards = [f for f in save["files"] if f.endswith(".distcp")]
        assert {f.split(".")[1].split("-")[0] for f in shards} == {"rank0", "rank1"}  # each rank wrote its own
        assert sum(f.endswith((".dcp-metadata", ".tree.json")) for f in save["files"]) == 2
    assert zero["kept"] == one["kept"] == [2, 3]
    assert zero["restored"] == one["restored"] == {"name": "step_00000003", "epoch": 3, "lr": [0.1]}
    for rank in ranks:
        assert rank["same_model"] and rank["same_optim"] and rank["same_after_a_step"]
    assert zero["refused"]["type"] == "RankError" and "rank 1" in zero["refused"]["message"]
    assert one["refused"]["type"] == "StorageError" and "injected" in one["refused"]["message"]
    assert zero["kept_after_refusal"] == one["kept_after_refusal"] == [3, 4]  # nothing committed, nothing lost
    assert zero["fell_back_to"] == one["fell_back_to"] == "step_00000004"  # rank 0 found step 5 damaged: both fell back

    options = process_store.storage_options
    mgr = CheckpointManager(process_store.url, storage_options=options)
    assert set(mgr.verify().values()) == {None}
    saved = torch.load(tmp_path / "job" / "step4.pt", weights_only=True)
    # on one process: the whole state, resharded by DCP's planner, optimizer state included
    m, opt = model(), None
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    restored = mgr.restore({"model": m, "optim": opt})
    assert restored["epoch"] == 4 and restored.checkpoint.step == 4
    assert all(torch.equal(saved["model"][k], v) for k, v in m.state_dict().items())
    state = opt.state_dict()["state"]
    assert {f"{i}/{k}": v for i, s in state.items() for k, v in s.items()}.keys() == saved["optim"].keys()
    assert all(torch.equal(saved["optim"][f"{i}/{k}"], v) for i, s in state.items() for k, v in s.items())

    # a partial load: only the tensors whose shape fits, reported
    target = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    report = ckptstore.load_partial(process_store.join("step_00000004"), target, storage_options=options)
    assert report.loaded == ["0.bias", "0.weight"] and sorted(report.skipped_shape) == ["2.bias", "2.weight"]
    assert torch.equal(target[0].weight, saved["model"]["0.weight"])

    # the CLI reads it like any checkpoint: ls, verify, inspect (global shapes, every rank's shard)
    opts = [a for k, v in options.items() for a in ("--storage-option", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    assert main(["ls", process_store.url, *opts]) == 0 and main(["verify", process_store.url, *opts]) == 0
    listed = capsys.readouterr().out
    assert "step_00000004" in listed and "dcp" in listed and "OK      step_00000004" in listed
    desc = describe(process_store.join("step_00000004"), options)
    assert {"name": "model/0.weight", "dtype": "float32", "shape": [16, 8], "bytes": 512} in desc["tensors"]
    assert len(desc["values"]["shards"]) == 2 and desc["checkpoint"]["format"] == "dcp"

    # converted into one stock file each of the stock readers opens
    for name in ("whole.safetensors", "whole.pt"):
        written = convert(process_store.join("step_00000004"), str(tmp_path / name), storage_options=options)
        assert written == os.path.getsize(tmp_path / name)
    with safe_open(str(tmp_path / "whole.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model/2.weight"), saved["model"]["2.weight"])
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert torch.equal(whole["model"]["0.weight"], saved["model"]["0.weight"]) and whole["epoch"] == 4


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_save_commits_nothing_and_the_other_rank_raises(process_store, tmp_path):
    ranks, codes = run_job("killed", process_store, tmp_path / "job", rank_timeout=30)
    zero = ranks[0]
    assert codes[1] == -9 and codes[0] == 0
    assert "saved" not in zero and zero["error"]["type"] == "RankError", zero
    assert zero["seconds"] < 30  # a dead peer is seen at once, not after the timeout
    storage = open_storage(process_store.url, process_store.storage_options)
    found = scan(storage)
    assert [i.step for i in found.committed] == [1]  # step 2 never committed; step 1 is intact
    assert "step_00000002" in found.abandoned  # rank 0's shard (and rank 1's part, if any) are left
    mgr = CheckpointManager(process_store.url, storage_options=process_store.storage_options, abandoned_after=0)
    assert set(mgr.verify().values()) == {None}
    mgr.prune()  # the next save (or a prune) removes the partial shards
    assert scan(storage).abandoned == {} and not any(p.startswith("step_00000002/") for p in storage.list_files())
    m = model()
    assert mgr.restore({"model": m}, strict=False).checkpoint.step == 1


@pytest.mark.timeout(120)
def test_a_rank_that_hangs_mid_save_is_named_after_rank_timeout(tmp_path):
    """Not dead, only stuck (a stalled upload): the others give up after rank_timeout, not never."""
    store = type("S", (), {"url": str(tmp_path / "root"), "storage_options": {}})()
    ranks, _ = run_job("killed", store, tmp_path / "job", rank_timeout=3, hang=8)
    zero = ranks[0]
    assert zero["error"]["type"] == "RankError" and "rank 1" in zero["error"]["message"], zero
    assert 2.5 < zero["seconds"] < 7.5  # about rank_timeout, not the 8 s the other rank hangs
    assert [i.step for i in CheckpointManager(store.url).checkpoints()] == [1]


@pytest.mark.parametrize("fsdp", [pytest.param(False, id="ddp", marks=pytest.mark.long), pytest.param(True, id="fsdp")])
def test_the_example_resumes_under_torchrun_on_two_ranks_then_one(tmp_path, fsdp):
    """examples/ddp_train.py as the README runs it: killed-and-restarted is a second run; FSDP2 also on one rank.
    (DDP's path is test_replicated_...'s; its example run is in make test-long.)"""
    example = Path(__file__).parents[1] / "examples" / "ddp_train.py"
    root = str(tmp_path / "runs")

    def torchrun(ranks: int, steps: int) -> str:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                               str(free_port()), str(example), root, "--steps", str(steps), *(["--fsdp"] if fsdp else [])],
                              check=False, capture_output=True, text=True, timeout=JOB_SECONDS,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    first = torchrun(2, 15)
    assert "fresh start" in first and "step 14:" in first and ("4 files" if fsdp else "1 files") in first
    again = torchrun(2 if not fsdp else 1, 25)  # FSDP2 resumes on one rank: DCP reshards
    assert "resuming after step 14" in again and "step 24:" in again
    assert [i.step for i in CheckpointManager(root).checkpoints()] == [20, 24]
