"""The Hugging Face Trainer through ckptstore.hf (issue 16, point 2): a real Trainer and a tiny
GPT-2 built from a config (no hub), checkpoints committed to the store, the job SIGKILLed
mid-training, resumed on a "fresh machine" (an empty output_dir) from the store, and ending
bit-identical to an uninterrupted run, with the retention the user asked for."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ckptstore import CheckpointManager, ConfigError
from ckptstore.hf import resume_path
from ckptstore.storage import open_storage

WORKER = Path(__file__).with_name("hf_worker.py")


def job(store_url: str, options: dict, tmp: Path, tag: str, **kw) -> tuple[list[str], Path]:
    out = tmp / f"{tag}.pt"
    args = dict(root=store_url, storage_options=options, output_dir=str(tmp / f"{tag}-output"), out=str(out),
                resume=False, hang_at=None, saves=str(tmp / "saves.jsonl"))
    return [sys.executable, str(WORKER), json.dumps({**args, **kw})], out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf-ref")
    command, out = job(str(tmp / "root"), {}, tmp, "ref")
    subprocess.run(command, check=True, timeout=300)
    return torch.load(out, weights_only=True)


def kept_by_policy(saves: list[dict]) -> list[int]:
    """keep_last=2 and keep_best=1 by eval_loss over every save the two processes made."""
    newest = sorted(s["step"] for s in saves)[-2:]
    best = min(saves, key=lambda s: s["eval_loss"])["step"]
    return sorted({*newest, best})


@pytest.mark.parametrize("process_store", [
    pytest.param("s3", id="s3", marks=pytest.mark.remote),
    pytest.param("local", id="local", marks=pytest.mark.long),  # make test-long: 25 s each
    pytest.param("file", id="file", marks=pytest.mark.long),
    pytest.param("gcs", id="gcs", marks=[pytest.mark.remote, pytest.mark.long]),
], indirect=True)
def test_a_killed_trainer_resumes_from_the_store_bit_identical(process_store, uninterrupted, tmp_path):
    opts = process_store.storage_options
    command, _ = job(process_store.url, opts, tmp_path, "killed", hang_at=5)
    victim = subprocess.Popen(command)
    hanging = tmp_path / "killed.pt.hanging"
    deadline = time.monotonic() + 240
    while not hanging.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hanging.exists(), f"the job never reached step 5 (exit code {victim.poll()})"
    victim.send_signal(signal.SIGKILL)  # mid-training: step 5 done, checkpoint 6 never written
    victim.wait(timeout=30)
    assert [c.name for c in CheckpointManager(process_store.url, storage_options=opts).checkpoints()] == [
        "checkpoint-2", "checkpoint-4"]

    command, out = job(process_store.url, opts, tmp_path, "resumed", resume=True)  # a fresh machine: new output_dir
    subprocess.run(command, check=True, timeout=300)
    resumed = torch.load(out, weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), f"{key} differs from the uninterrupted run"
    saves = [json.loads(line) for line in (tmp_path / "saves.jsonl").read_text().splitlines()]
    assert [s["step"] for s in saves] == [2, 4, 6, 8]  # the resumed job went on from step 4
    kept = CheckpointManager(process_store.url, storage_options=opts).checkpoints()
    assert [c.step for c in kept] == kept_by_policy(saves)
    assert all(c.format == "folder" and any(f.path.endswith("/optimizer.pt") for f in c.files) for c in kept)


def checkpoint_folder(where: Path, step: int) -> Path:
    where.mkdir(parents=True)
    (where / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (where / "model.safetensors").write_bytes(os.urandom(256))
    return where


def test_resume_path_skips_a_damaged_checkpoint_loudly(store, tmp_path, caplog):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    mgr.save_folder(checkpoint_folder(tmp_path / "a", 2), step=2, name="checkpoint-2")
    bad = mgr.save_folder(checkpoint_folder(tmp_path / "b", 4), step=4, name="checkpoint-4")
    storage = open_storage(store.url, store.storage_options)
    damaged = next(f for f in bad.files if f.path.endswith("model.safetensors"))
    with storage.open_write(f"{bad.name}/{damaged.path}") as f:
        f.write(os.urandom(damaged.size))  # same size, other bytes: only the CRC32C can tell
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        path = resume_path(store.url, tmp_path / "local", storage_options=store.storage_options)
    assert path == str(tmp_path / "local" / "checkpoint-2")
    assert json.loads((Path(path) / "trainer_state.json").read_text()) == {"global_step": 2}
    assert os.listdir(tmp_path / "local") == ["checkpoint-2"]  # nothing of the damaged one, no temporary folder
    assert any("checkpoint-4 is unusable" in r.getMessage() and "fails its checksum" in r.getMessage() for r in caplog.records)


def test_resume_path_on_an_empty_root_is_a_fresh_start_with_a_warning(store, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert resume_path(store.url, tmp_path / "local", storage_options=store.storage_options) is None
    assert any("no checkpoint under" in r.getMessage() and "starting fresh" in r.getMessage() for r in caplog.records)
    assert os.listdir(tmp_path / "local") == []


def test_resume_path_never_mixes_into_a_local_folder(store, tmp_path):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    mgr.save_folder(checkpoint_folder(tmp_path / "a", 2), step=2, name="checkpoint-2")
    (tmp_path / "local" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "local" / "checkpoint-2" / "half-written.bin").write_bytes(b"x")  # what a killed Trainer leaves
    with pytest.raises(ConfigError, match=r"checkpoint-2 exists and is not empty; pass resume_path a new local_dir$"):
        resume_path(store.url, tmp_path / "local", storage_options=store.storage_options)
    assert os.listdir(tmp_path / "local") == ["checkpoint-2"]
    assert os.listdir(tmp_path / "local" / "checkpoint-2") == ["half-written.bin"]


def test_a_half_written_local_folder_fools_get_last_checkpoint_not_resume_path(store, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    mgr.save_folder(checkpoint_folder(tmp_path / "out" / "checkpoint-4", 4), step=4, name="checkpoint-4")
    (tmp_path / "out" / "checkpoint-6").mkdir()  # the Trainer was killed while it wrote checkpoint-6
    (tmp_path / "out" / "checkpoint-6" / "model.safetensors").write_bytes(b"\0" * 10)
    assert get_last_checkpoint(str(tmp_path / "out")).endswith("checkpoint-6")  # HF's own choice: the torn one
    assert resume_path(store.url, tmp_path / "fresh", storage_options=store.storage_options).endswith("checkpoint-4")


def test_the_callback_replaces_a_damaged_checkpoint_it_resumed_past(store, tmp_path, caplog):
    """Resumed from checkpoint-2 past a damaged checkpoint-4, the Trainer's next save of step 4 replaces it
    (the module-level resume_path has no callback to tell: the save would say step 4 is taken)."""
    from ckptstore.hf import CkptStoreCallback

    first = CkptStoreCallback(store.url, storage_options=store.storage_options)
    first.manager.save_folder(checkpoint_folder(tmp_path / "a", 2), step=2, name="checkpoint-2")
    bad = first.manager.save_folder(checkpoint_folder(tmp_path / "b", 4), step=4, name="checkpoint-4")
    storage = open_storage(store.url, store.storage_options)
    damaged = next(f for f in bad.files if f.path.endswith("model.safetensors"))
    with storage.open_write(f"{bad.name}/{damaged.path}") as f:
        f.write(os.urandom(damaged.size))
    callback = CkptStoreCallback(store.url, storage_options=store.storage_options)  # the restarted job's
    assert callback.resume_path(tmp_path / "local").endswith("checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        again = callback.manager.save_folder(checkpoint_folder(tmp_path / "c", 4), step=4, name="checkpoint-4")
    assert again.files != bad.files and [c.name for c in callback.manager.checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert any("removing" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records)
    assert resume_path(store.url, tmp_path / "again", storage_options=store.storage_options).endswith("checkpoint-4")
