"""Real faults: a writer killed with SIGKILL mid-save, a disk that fills up mid-save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ckptstore import scan
from ckptstore import CheckpointManager, StorageError

SAVER = textwrap.dedent(
    """
    import json, sys, torch
    from ckptstore import CheckpointManager
    args = json.loads(sys.argv[1])
    mgr = CheckpointManager(args["root"], keep_last=2, storage_options=args["storage_options"], format=args["fmt"])
    start = (mgr.latest().step + 1) if mgr.latest() else 0
    for step in range(start, start + 1000):
        state = {"w": torch.full((args["numel"],), float(step)), "step": step}
        mgr.save(state, step=step)
        print(step, flush=True)
    """
)


def settle(storage, quiet_seconds: float = 0.5, timeout: float = 20.0) -> None:
    """Wait until the listing stops changing: a request the killed writer had already sent
    (a PUT, a multipart completion) may still finish on the server after the kill."""
    deadline = time.monotonic() + timeout
    before = storage.list_files()
    while time.monotonic() < deadline:
        time.sleep(quiet_seconds)
        after = storage.list_files()
        if after == before:
            return
        before = after


def spawn_saver(store, fmt: str, numel: int) -> subprocess.Popen[str]:
    args = json.dumps({"root": store.url, "storage_options": store.storage_options, "fmt": fmt, "numel": numel})
    return subprocess.Popen([sys.executable, "-c", SAVER, args], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_sigkill_mid_save_never_exposes_a_partial_checkpoint(process_store, fmt):
    """Kill a writer that saves back to back, three times; every committed checkpoint must load."""
    store = process_store
    numel = 2**20 if store.kind in ("local", "file") else 2**18  # 4 MiB locally, 1 MiB over HTTP
    rng = random.Random(0)
    for _ in range(3):
        proc = spawn_saver(store, fmt, numel)
        assert proc.stdout is not None
        proc.stdout.readline()  # one save committed: the writer is now in its save loop
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        mgr = CheckpointManager(store.url, storage_options=store.storage_options)
        settle(mgr.storage)
        infos = mgr.checkpoints()
        assert infos, "the first committed save must survive the kill"
        for info in infos:
            values = mgr.restore(which=info.step)
            assert values["step"] == info.step
            assert torch.equal(values["w"], torch.full((numel,), float(info.step)))

    patient = CheckpointManager(store.url, storage_options=store.storage_options)
    patient.save({"w": torch.zeros(1), "step": -1}, step=10_000)
    fresh = scan.scan(mgr.storage).abandoned  # a just-killed save looks like one in progress: kept
    eager = CheckpointManager(store.url, storage_options=store.storage_options, abandoned_after=0)
    eager.save({"w": torch.zeros(1), "step": -1}, step=10_001)  # idle long enough: cleaned
    found = scan.scan(mgr.storage)
    assert found.abandoned == {} and found.stray == {}
    assert set(fresh) <= {f"step_{s:08d}" for s in range(10_000)}


def test_full_disk_fails_the_save_and_keeps_earlier_checkpoints(tmp_path):
    """A 1 MiB tmpfs fills during the second save: StorageError, the first checkpoint intact."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_file_size_limit covers the same path")
    try:
        mgr = CheckpointManager(mount / "run")
        mgr.save({"w": torch.ones(1000)}, step=0)
        with pytest.raises(StorageError, match="no space left"):
            mgr.save({"w": torch.ones(2**20)}, step=1)  # 4 MiB into what is left of 1 MiB
        assert [c.step for c in mgr.checkpoints()] == [0]
        assert torch.equal(mgr.restore()["w"], torch.ones(1000))
        assert not any((mount / "run").glob("step_00000001/*")), "the temp file must be removed"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_file_size_limit_fails_the_save_and_keeps_earlier_checkpoints(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse a write mid-file (EFBIG), as a full disk would."""
    code = textwrap.dedent(
        f"""
        import resource, signal, torch
        from ckptstore import CheckpointManager, StorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        mgr = CheckpointManager({str(tmp_path / "run")!r})
        mgr.save({{"w": torch.ones(1000)}}, step=0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            mgr.save({{"w": torch.ones(2**20)}}, step=1)
        except StorageError as err:
            print("refused:", err)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "refused:" in out.stdout and "File too large" in out.stdout, out.stderr
    mgr = CheckpointManager(tmp_path / "run")
    assert [c.step for c in mgr.checkpoints()] == [0]
    assert torch.equal(mgr.restore()["w"], torch.ones(1000))
    assert os.listdir(tmp_path / "run" / "step_00000001") == []  # the temp file was removed
