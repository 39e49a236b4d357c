"""A restore is all or nothing: on any failure every live tensor and Stateful is as it was.

What is proved here, on every store and in both formats: a mismatch that torch's own
``load_state_dict`` would refuse (optimizer parameter groups, module keys or shapes, a value
where a tensor is expected), a user Stateful that raises, a torch file whose member is not
where its directory says, and a data file deleted by a concurrent prune each leave every
live tensor bit-identical (module parameters and buffers, optimizer state, plain tensors),
and every other Stateful's state unchanged. A pruned "latest" falls back to a checkpoint
that retention keeps and restores exactly that one, never a mix.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import re
from collections.abc import Callable
from typing import Any

import crc32c
import pytest
import torch
from torch import nn

from ckptstore import CheckpointManager, CorruptCheckpointError, RNGState, StateMismatchError
from ckptstore.manifest import MANIFEST_NAME
from ckptstore.partial import LoadReport, plan
from ckptstore.serializers import ChecksumReader
from ckptstore.storage import FsspecStorage, open_storage

FORMATS = ["safetensors", "torch"]


def manager(store, fmt, **kwargs) -> CheckpointManager:
    return CheckpointManager(store.url, storage_options=store.storage_options, format=fmt, **kwargs)


def trained(seed: int, steps: int = 2, groups: int = 1, track_stats: bool = True) -> dict[str, Any]:
    """A model with buffers, Adam with state (in ``groups`` parameter groups), a scheduler."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=track_stats), nn.ReLU(), nn.Linear(16, 4))
    params = list(model.parameters())
    opt = torch.optim.Adam([{"params": params[: len(params) // 2]}, {"params": params[len(params) // 2 :]}]
                           if groups == 2 else params, lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched}


def fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """Copies of every live tensor and every Stateful's state in ``state``, by entry."""
    out: dict[str, Any] = {}
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            out |= {f"{name}.{k}": t.detach().clone() for k, t in obj.state_dict(keep_vars=True).items()}
        elif isinstance(obj, torch.Tensor):
            out[name] = obj.clone()
        elif isinstance(obj, RNGState):
            out[name] = (torch.get_rng_state(), random.getstate())
        else:  # optimizer (its state tensors deep-copied), scheduler, user Stateful
            out[name] = copy.deepcopy(obj.state_dict())
    return out


def same(a: Any, b: Any) -> bool:
    """Bit-identical tensors (dtype and shape too), equal everything else, recursively."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def assert_unchanged(state: dict[str, Any], before: dict[str, Any]) -> None:
    after = fingerprint(state)
    assert after.keys() == before.keys()
    changed = [k for k in before if not same(before[k], after[k])]
    assert not changed, f"changed by a failed restore: {changed}"


def assert_holds(state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Every live tensor and Stateful of ``state`` equals the one of ``saved`` exactly."""
    want, got = fingerprint(saved), fingerprint(state)
    assert got.keys() == want.keys()
    differ = [k for k in want if not same(want[k], got[k])]
    assert not differ, f"not the saved values: {differ}"


# ---------------------------------------------------------------- point 7: mismatches and raising Statefuls


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_with_other_param_groups_changes_nothing(store, fmt):
    """Found in issue 9: the live Adam's exp_avg (and the model) changed before torch refused the groups."""
    mgr = manager(store, fmt)
    mgr.save(trained(seed=1, groups=2), step=1)
    live = trained(seed=2, steps=1)  # one group, with exp_avg to overwrite
    before = fingerprint(live)
    with pytest.raises(StateMismatchError, match=r"state\['optimizer'\] \(Adam\) has parameter groups of \[6\] parameters, "
                                                 r"the checkpoint \[3, 3\]"):
        mgr.restore(live)
    assert_unchanged(live, before)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", ["optimizer", "model"])
def test_optimizer_listed_before_the_model_changes_nothing(store, fmt, bad):
    """Found in issue 9: the entry listed first was loaded before the later one was refused."""
    mgr = manager(store, fmt)
    saved = trained(seed=1)
    mgr.save({"optimizer": saved["optimizer"], "model": saved["model"]}, step=1)
    live = trained(seed=2, steps=1, groups=2 if bad == "optimizer" else 1, track_stats=bad != "model")
    live = {"optimizer": live["optimizer"], "model": live["model"]}
    before = fingerprint(live)
    message = r"parameter groups of \[3, 3\]" if bad == "optimizer" else (
        r"state\['model'\] \(Sequential\) does not match the checkpoint: missing keys \[\], "
        r"unexpected keys \['1.running_mean', '1.running_var', '1.num_batches_tracked'\]")
    with pytest.raises(StateMismatchError, match=message):
        mgr.restore(live)
    assert_unchanged(live, before)


class Counter:
    """A user's Stateful that checks the saved version, after having taken the count (a bug, but common)."""

    def __init__(self, version: int, count: int = 0):
        self.version, self.count = version, count

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        if state["version"] != self.version:
            raise ValueError(f"saved by version {state['version']}, this is version {self.version}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stateful_that_raises_changes_nothing(store, fmt):
    """Found in issue 9: the modules and Statefuls around a raising one had already changed (RNG included)."""
    mgr = manager(store, fmt)
    saved = trained(seed=1)
    head = nn.Linear(4, 2)
    mgr.save({**saved, "rng": RNGState(), "counter": Counter(1, 5), "head": head, "ema": torch.ones(3)}, step=1)
    torch.manual_seed(7)
    live = {**trained(seed=2, steps=1), "rng": RNGState(), "counter": Counter(2), "head": nn.Linear(4, 2),
            "ema": torch.zeros(3)}
    before = fingerprint(live)
    with pytest.raises(StateMismatchError, match=r"state\['counter'\]: Counter.load_state_dict refused the checkpoint "
                                                 r"\(ValueError: saved by version 1, this is version 2\)") as info:
        mgr.restore(live)
    assert isinstance(info.value.__cause__, ValueError)
    assert_unchanged(live, before)
    assert live["counter"].count == 0  # its own partial load was undone too


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("map_location", [None, "callable"])
def test_module_shape_mismatch_changes_nothing(store, fmt, map_location):
    """Streamed, and (torch with a callable map_location) read whole: torch copies the keys that fit, then raises."""
    mgr = manager(store, fmt)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    mgr.save({"w": torch.ones(3), "model": model, "optimizer": opt}, step=1)
    live_model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3))
    live_opt = torch.optim.SGD(live_model.parameters(), lr=0.5, momentum=0.9)
    live_model(torch.randn(4, 8)).sum().backward()
    live_opt.step()
    live = {"w": torch.zeros(3), "model": live_model, "optimizer": live_opt}
    before = fingerprint(live)
    with pytest.raises(StateMismatchError, match=r"state\['model'\]\['1.weight'\] has shape \(3, 16\), the checkpoint"):
        mgr.restore(live, map_location=(lambda t, _: t) if map_location else None)
    assert_unchanged(live, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_value_where_a_tensor_is_expected_changes_nothing(store, fmt):
    """Found while fixing issue 9: the model landed, then the plain tensor's type check raised."""
    mgr = manager(store, fmt)
    mgr.save({**trained(seed=1), "w": 3}, step=1)
    live = {**trained(seed=2, steps=1), "w": torch.zeros(2)}
    before = fingerprint(live)
    with pytest.raises(StateMismatchError, match=r"state\['w'\] is a tensor but the checkpoint holds a int"):
        mgr.restore(live)
    assert_unchanged(live, before)


class Hooked(nn.Module):
    """A module whose loading runs user code (a post hook), so it cannot be checked up front."""

    def __init__(self, extra: bool = False):
        super().__init__()
        self.a = nn.Linear(4, 4)
        if extra:
            self.b = nn.Parameter(torch.zeros(2))
        self.register_load_state_dict_post_hook(lambda module, keys: None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_hooked_module_that_torch_refuses_changes_nothing(store, fmt):
    """torch copies a.weight and a.bias, then raises for the missing b: the copies are undone."""
    mgr = manager(store, fmt)
    mgr.save({"model": nn.Linear(2, 2), "hooked": Hooked()}, step=1)
    live = {"model": nn.Linear(2, 2), "hooked": Hooked(extra=True)}
    before = fingerprint(live)
    with pytest.raises(StateMismatchError, match=r"(?s)state\['hooked'\]: Hooked.load_state_dict refused .*Missing key\(s\)") as info:
        mgr.restore(live)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_unchanged(live, before)


def test_a_torch_member_not_where_planned_changes_nothing(store):
    """A zip local header that disagrees with the directory (checksum still right): caught before any byte lands."""
    mgr = manager(store, "torch")
    info = mgr.save(trained(seed=1), step=1)
    storage = open_storage(store.url, store.storage_options)
    path = f"{info.name}/{info.files[0].path}"
    header_at = plan(storage, path, LoadReport()).sources["model/0.weight"].zip_header[0]
    data = bytearray(storage.read(path))
    data[header_at + 28] += 64  # the extra field's length: the member's data now starts 64 bytes later
    with storage.open_write(path) as f:
        f.write(bytes(data))
    entry = dataclasses.replace(info.files[0], crc32c=crc32c.crc32c(bytes(data)))
    with storage.open_write(f"{info.name}/{MANIFEST_NAME}") as f:
        f.write(dataclasses.replace(info, files=(entry,)).to_json())
    live = trained(seed=2, steps=1)
    before = fingerprint(live)
    # the checkpoint's URL on every store (a remote one is restored from a checked local copy, never named)
    where = re.escape(storage.url(path))
    with pytest.raises(CorruptCheckpointError) as err:
        mgr.restore(live, which=1)
    assert re.fullmatch(f"{where}: the zip member at {header_at} is not laid out as torch\\.save writes it; "
                        "load it with ckptstore\\.load instead", str(err.value)), str(err.value)
    assert_unchanged(live, before)
    data[header_at] ^= 0xFF  # no local header at all where the directory points
    with storage.open_write(path) as f:
        f.write(bytes(data))
    entry = dataclasses.replace(info.files[0], crc32c=crc32c.crc32c(bytes(data)))
    storage.delete(f"{info.name}/{MANIFEST_NAME}")
    with storage.open_write(f"{info.name}/{MANIFEST_NAME}") as f:
        f.write(dataclasses.replace(info, files=(entry,)).to_json())
    with pytest.raises(CorruptCheckpointError) as err:
        mgr.restore(live, which=1)
    assert re.fullmatch(f"{where}: bad zip local header at {header_at}", str(err.value)), str(err.value)
    assert_unchanged(live, before)


class Shadow:
    """A Stateful whose state is the model's weight itself (saved once, as a tied tensor)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.seen = weight, torch.empty(0)

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["w"].clone()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stateful_sharing_a_tensor_with_the_model_sees_the_saved_values(store, fmt):
    """User Statefuls load before the model's bytes land; a tensor they share must not be the live one."""
    mgr = manager(store, fmt)
    model = nn.Linear(4, 4)
    mgr.save({"model": model, "shadow": Shadow(model.weight)}, step=1)
    live = nn.Linear(4, 4)
    shadow = Shadow(live.weight)
    mgr.restore({"model": live, "shadow": shadow})
    assert torch.equal(shadow.seen, model.weight) and torch.equal(live.weight, model.weight)


# ---------------------------------------------------------------- point 8: a restore racing a prune


def prune_at_first_read(monkeypatch, data_file: str, prune: Callable[[], Any]) -> list[str]:
    """Run ``prune`` (another manager's save, which prunes) when a restore first reads ``data_file``."""
    fired: list[str] = []

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self, path, *args, **kwargs):
            if path.endswith(data_file) and not fired:
                fired.append(path)
                prune()
            return method(self, path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(FsspecStorage, "read", wrap(FsspecStorage.read))  # local disks: the header, first
    monkeypatch.setattr(FsspecStorage, "open_read", wrap(FsspecStorage.open_read))
    monkeypatch.setattr(FsspecStorage, "open_stream", wrap(FsspecStorage.open_stream))  # others: the download
    return fired


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_pruned_mid_restore_is_unusable_and_latest_falls_back(store, fmt, monkeypatch, caplog):
    """Found in issue 9: an evaluator read part of "latest" while the trainer pruned it, then raised a bare
    FileNotFoundError with the state mixed. Retention keeps step 1 (best loss) and the newest step."""
    trainer = manager(store, fmt, keep_last=1, keep_best=1, monitor="loss")
    saved = {step: trained(seed=step) for step in (1, 2, 3, 4)}
    infos = {step: trainer.save({**saved[step], "step": step}, step=step, metrics={"loss": 0.1 * step}) for step in (1, 2)}
    evaluator = manager(store, fmt)
    live = trained(seed=9, steps=1)
    before = fingerprint(live)

    def save(step: int) -> Callable[[], Any]:
        return lambda: trainer.save({**saved[step], "step": step}, step=step, metrics={"loss": 0.9})

    fired = prune_at_first_read(monkeypatch, infos[2].files[0].path, save(3))
    data_url = f"{infos[2].url}/{infos[2].files[0].path}"
    with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(data_url)} vanished while it was being restored"):
        evaluator.restore(live, which=2)
    assert fired and [i.step for i in trainer.checkpoints()] == [1, 3]
    assert_unchanged(live, before)

    monkeypatch.undo()
    info = next(i for i in trainer.checkpoints() if i.step == 3)
    fired = prune_at_first_read(monkeypatch, info.files[0].path, save(4))
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert evaluator.restore(live) == {"step": 4}  # "latest" lists again: the save that pruned 3 is the newest
    assert fired and any("vanished" in r.getMessage() for r in caplog.records)
    assert_holds(live, saved[4])

    monkeypatch.undo()
    info = next(i for i in trainer.checkpoints() if i.step == 4)
    fired = prune_at_first_read(monkeypatch, info.files[0].path, lambda: trainer.delete(4))
    assert evaluator.restore(live) == {"step": 1}  # nothing newer appeared: it falls back to what retention kept
    assert fired
    assert_holds(live, saved[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_deleted_while_its_checksum_is_read_restores_one_checkpoint_whole(store, fmt, monkeypatch, caplog):
    """Deleted during the CRC pass (local disks: after the restore opened it) or the download (other stores).

    Local disks restore it whole from the descriptor they hold. A remote download either had every
    byte already (one block) or fails and "latest" falls back; a named step raises. Never a mix.
    """
    def big(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)])  # 12 MiB: several blocks of a download

    trainer = manager(store, fmt, keep_last=1, keep_best=1, monitor="loss")
    saved = {step: {"model": big(step), "step": step} for step in (1, 2, 3, 4)}
    for step in (1, 2):
        trainer.save(saved[step], step=step, metrics={"loss": 0.1 * step})
    evaluator = manager(store, fmt)

    def prune_during_checksum(step: int) -> list[int]:
        fired: list[int] = []
        read = ChecksumReader.readinto

        def readinto(self, buffer):
            if not fired:
                fired.append(step)
                trainer.save(saved[step + 1], step=step + 1, metrics={"loss": 0.9})
            return read(self, buffer)

        monkeypatch.setattr(ChecksumReader, "readinto", readinto)
        return fired

    local_disk = store.kind in ("local", "file")
    live = {"model": big(9)}
    before = fingerprint(live)
    fired = prune_during_checksum(2)
    try:
        values = evaluator.restore(live, which=2)
    except CorruptCheckpointError as err:
        assert not local_disk and "vanished" in str(err)
        assert_unchanged(live, before)
    else:
        assert values == {"step": 2}
        assert_holds(live, {"model": saved[2]["model"]})
    assert fired and [i.step for i in trainer.checkpoints()] == [1, 3]

    monkeypatch.undo()
    fired = prune_during_checksum(3)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        values = evaluator.restore(live)
    assert fired and values["step"] in ((3,) if local_disk else (3, 4))  # remote: "latest" lists again, finds 4
    assert values["step"] == 3 or any("vanished" in r.getMessage() for r in caplog.records)
    assert_holds(live, {"model": saved[values["step"]]["model"]})
