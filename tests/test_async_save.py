"""Background saves and save intervals (issue 13, points 1 and 2), on every store.

A background save is slowed down on purpose (its data write sleeps first) wherever a test
needs the training loop to act while the bytes are still on their way.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import gc
import threading
import time
import weakref

import pytest
import torch
from torch import nn

import ckptstore
from ckptstore import CheckpointManager, ConfigError, StorageError
from ckptstore.background import SaveHandle
from ckptstore.partial import describe
from ckptstore.snapshot import snapshot


def manager(store, **kwargs) -> CheckpointManager:
    return CheckpointManager(store.url, storage_options=store.storage_options, **kwargs)


def slow_writes(mgr: CheckpointManager, seconds: float, started: threading.Event | None = None) -> None:
    """Every data write of ``mgr`` waits ``seconds`` before its first byte."""
    real = mgr.storage.open_write

    def open_write(path, *args, **kwargs):
        if started is not None:
            started.set()
        time.sleep(seconds)
        return real(path, *args, **kwargs)

    mgr.storage.open_write = open_write


def fail_commits(mgr: CheckpointManager) -> threading.Event:
    """Every manifest write of ``mgr`` fails; the event is set once one has."""
    failed = threading.Event()

    def write_new(path, data):
        failed.set()
        raise StorageError(f"injected: the store refused {path}")

    mgr.storage.write_new = write_new
    return failed


def test_a_background_save_commits_what_the_state_was_when_save_returned(store):
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    mgr = manager(store)
    started = threading.Event()
    slow_writes(mgr, 0.3, started)
    handle = mgr.save({"model": model, "optimizer": opt, "epoch": 1}, step=1, blocking=False)
    assert isinstance(handle, SaveHandle) and not handle.done()
    assert started.wait(5)  # the write is under way, its bytes not yet out ...
    with torch.no_grad():  # ... while training goes on in place
        for p in model.parameters():
            p.add_(100)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    info = handle.result(timeout=60)
    assert handle.done() and info.step == 1 and mgr.latest().name == info.name
    live, live_opt = nn.Linear(16, 4), torch.optim.Adam(nn.Linear(16, 4).parameters())
    assert manager(store).restore({"model": live, "optimizer": live_opt}) == {"epoch": 1}
    assert all(torch.equal(v, expected[k]) for k, v in live.state_dict().items())
    assert torch.equal(live_opt.state_dict()["state"][0]["exp_avg"], expected_avg)


def test_a_restore_right_after_a_background_save_sees_it(store):
    mgr = manager(store)
    slow_writes(mgr, 0.2)
    mgr.save({"w": torch.full((4,), 7.0)}, step=3, blocking=False)
    w = torch.zeros(4)
    assert mgr.restore({"w": w}).checkpoint.step == 3 and torch.equal(w, torch.full((4,), 7.0))


def test_tied_weights_are_copied_once_and_stored_once(store):
    emb = nn.Embedding(10, 4)
    tied = nn.ModuleDict({"emb": emb, "head": nn.Linear(4, 10, bias=False)})
    tied["head"].weight = emb.weight
    copy = snapshot(ckptstore.tree.canonicalize({"m": tied}))
    a, b = copy["m"]["emb.weight"], copy["m"]["head.weight"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() != emb.weight.untyped_storage().data_ptr()
    mgr = manager(store)
    info = mgr.save({"m": tied}, step=0, blocking=False).result(timeout=60)
    assert [t["name"] for t in describe(info.url, store.storage_options)["tensors"]] == ["m/emb.weight"]


@pytest.mark.parametrize("outcome", ["committed", "failed"])
def test_the_next_save_copies_the_state_only_once_the_last_copy_is_freed(store, monkeypatch, outcome):
    """At most one host copy at a time, as the README promises, also when the last save failed
    (its traceback's frames would otherwise keep the copy alive)."""
    mgr = manager(store)
    copies: list[weakref.ref] = []

    def tracked(tree):
        gc.collect()
        assert all(ref() is None for ref in copies), "the previous save's host copy is still alive"
        frozen = snapshot(tree)
        copies.append(weakref.ref(frozen["w"]))
        return frozen

    monkeypatch.setattr(ckptstore.manager, "snapshot", tracked)
    if outcome == "failed":
        fail_commits(mgr)
    first = mgr.save({"w": torch.zeros(1024)}, step=1, blocking=False)
    while not first.done():
        time.sleep(0.01)
    if outcome == "failed":
        with pytest.raises(StorageError):
            first.result()
        mgr.storage.write_new = type(mgr.storage).write_new.__get__(mgr.storage)
    mgr.save({"w": torch.ones(1024)}, step=2, blocking=False).result()
    assert len(copies) == 2


def test_one_save_in_flight_the_next_waits_for_it(store):
    mgr = manager(store)
    slow_writes(mgr, 0.3)
    first = mgr.save({"w": torch.ones(4)}, step=1, blocking=False)
    second = mgr.save({"w": torch.ones(4)}, step=2, blocking=False)
    assert first.done()  # the second save began only once the first had finished
    assert second.result(timeout=60).step == 2 and [c.step for c in mgr.checkpoints()] == [1, 2]


def test_a_failure_raises_from_result_and_only_once(store, caplog):
    mgr = manager(store)
    fail_commits(mgr)
    handle = mgr.save({"w": torch.ones(4)}, step=1, blocking=False)
    with caplog.at_level(logging.ERROR, logger="ckptstore"), pytest.raises(StorageError, match="injected") as raised:
        handle.result(timeout=60)
    assert "background save of step 1" in "".join(raised.value.__notes__)
    assert any("background save of step 1 failed" in r.getMessage() for r in caplog.records)  # also logged when it happened
    mgr.wait()  # seen already: not raised again
    del mgr.storage.write_new  # the store recovers
    assert mgr.save({"w": torch.ones(4)}, step=2).step == 2


def test_an_unseen_failure_raises_from_the_next_save_or_wait(store):
    mgr = manager(store)
    failed = fail_commits(mgr)
    mgr.save({"w": torch.ones(4)}, step=1, blocking=False)
    assert failed.wait(60)
    del mgr.storage.write_new
    with pytest.raises(StorageError, match="injected"):  # the next save does not start over a failure nobody saw
        mgr.save({"w": torch.ones(4)}, step=2, blocking=False)
    assert mgr.checkpoints() == []
    fail_commits(mgr)
    mgr.save({"w": torch.ones(4)}, step=2, blocking=False)
    with pytest.raises(StorageError, match="injected"):
        mgr.wait()
    mgr.wait()


def test_leaving_the_with_block_waits_and_raises_a_failure(store):
    with manager(store) as mgr:
        slow_writes(mgr, 0.2)
        handle = mgr.save({"w": torch.ones(4)}, step=1, blocking=False)
    assert handle.done() and handle.result().step == 1
    with pytest.raises(StorageError, match="injected"), manager(store) as mgr:
        fail_commits(mgr)
        mgr.save({"w": torch.ones(4)}, step=2, blocking=False)


EXITS_DURING_A_SAVE = """
import sys, time, torch, json
from ckptstore import CheckpointManager
root, opts = sys.argv[1], json.loads(sys.argv[2])
mgr = CheckpointManager(root, storage_options=opts)
real = mgr.storage.open_write
def slow(*args, **kwargs):
    time.sleep(0.5)
    return real(*args, **kwargs)
mgr.storage.open_write = slow
mgr.save({"w": torch.full((1024,), 5.0)}, step=9, blocking=False)
print("returned", flush=True)
"""


def test_the_interpreter_waits_for_a_background_save_before_it_exits(process_store):
    store = process_store
    out = subprocess.run([sys.executable, "-c", EXITS_DURING_A_SAVE, store.url, json.dumps(store.storage_options)],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout == "returned\n"
    w = torch.zeros(1024)
    assert manager(store).restore({"w": w}).checkpoint.step == 9 and torch.equal(w, torch.full((1024,), 5.0))


# -- save intervals -------------------------------------------------------------------------------


def test_should_save_by_steps_never_repeats_a_saved_step():
    mgr = CheckpointManager("memory://intervals/steps", save_interval_steps=10)
    assert [s for s in range(35) if mgr.should_save(s)] == [0, 10, 20, 30]
    mgr.save({"x": 1}, step=20)
    assert not mgr.should_save(20) and not mgr.should_save(10) and mgr.should_save(30)


def test_should_save_by_seconds_counts_from_the_last_save(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    mgr = CheckpointManager("memory://intervals/seconds", save_interval_seconds=60)
    assert not mgr.should_save(1)
    now[0] += 60
    assert mgr.should_save(2)
    mgr.save({"x": 1}, step=2)
    now[0] += 59
    assert not mgr.should_save(3)
    now[0] += 1
    assert mgr.should_save(4)


def test_should_save_without_intervals_is_every_new_step():
    mgr = CheckpointManager("memory://intervals/none")
    mgr.save({"x": 1}, step=5)
    assert [s for s in range(8) if mgr.should_save(s)] == [6, 7]


@pytest.mark.parametrize("kwargs, field", [({"save_interval_steps": 0}, "save_interval_steps"),
                                           ({"save_interval_steps": 2.5}, "save_interval_steps"),
                                           ({"save_interval_seconds": -1}, "save_interval_seconds"),
                                           ({"save_interval_seconds": True}, "save_interval_seconds")])
def test_bad_intervals_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"`{field}` must be None or an? (integer|number) > 0"):
        CheckpointManager("memory://intervals/bad", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_are_copied_to_pinned_host_memory_before_save_returns():
    w = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    copy = snapshot({"w": w})
    w.add_(1)
    assert copy["w"].device.type == "cpu" and copy["w"].is_pinned()
    assert torch.equal(copy["w"], torch.arange(1 << 20, dtype=torch.float32))
