"""Damaged checkpoints on every store: detected by size and CRC32C, named, and survived."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from ckptstore import CheckpointManager, CorruptCheckpointError
from ckptstore.storage import open_storage


def corrupt(store, info, how: str) -> str:
    storage = open_storage(store.url, store.storage_options)
    path = f"{info.name}/{info.files[0].path}"
    data = bytearray(storage.read(path))
    if how == "missing":
        storage.delete(path)
        return "missing"
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how.startswith("flip"):
        where = {"flip_header": 20, "flip_middle": len(data) // 2, "flip_last": len(data) - 1}[how]
        data[where] ^= 0x01
    elif how == "manifest_size":
        manifest = json.loads(storage.read(f"{info.name}/manifest.json"))
        manifest["files"][0]["size"] += 8
        storage.delete(f"{info.name}/manifest.json")
        storage.write_new(f"{info.name}/manifest.json", json.dumps(manifest).encode())
        return "manifest says"
    with storage.open_write(path) as f:
        f.write(bytes(data))
    header_damage = "checksum|unknown dtype|invalid|not valid"
    return {"truncated": "manifest says", "flip_header": header_damage, "flip_middle": "checksum", "flip_last": "checksum"}[how]


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("how", ["truncated", "flip_header", "flip_middle", "flip_last", "missing", "manifest_size"])
def test_damage_is_detected_and_latest_falls_back(store, fmt, how, caplog):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options, format=fmt)
    mgr.save({"w": torch.arange(1000.0), "step": 0}, step=0)
    bad = mgr.save({"w": torch.arange(1000.0) + 1, "step": 1}, step=1)
    expected = corrupt(store, bad, how)
    with pytest.raises(CorruptCheckpointError, match=expected) as err:
        mgr.restore(which=1)  # a specific step fails loudly ...
    assert bad.name in str(err.value)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        values = mgr.restore()  # ... "latest" falls back to the newest good one
    assert values["step"] == 0 and torch.equal(values["w"], torch.arange(1000.0))
    assert values.checkpoint.step == 0  # the caller can tell which one it got
    assert any(bad.name in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", ["truncated", "flip_header", "flip_middle", "flip_last", "missing", "manifest_size"])
def test_verify_names_the_damaged_checkpoint_and_passes_the_good_one(store, how):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    good = mgr.save({"w": torch.arange(1000.0)}, step=0)
    bad = mgr.save({"w": torch.arange(1000.0) + 1}, step=1)
    expected = corrupt(store, bad, how).replace("|unknown dtype|invalid|not valid", "")  # verify reads bytes, never parses
    read: list[int] = []
    report = mgr.verify(progress=read.append)
    if how == "missing":  # a manifest without its data is not a checkpoint: listed apart, never verified
        assert report == {good.name: None} and "data file is missing" in mgr.uncommitted()[bad.name]
        return
    assert set(report) == {good.name, bad.name} and report[good.name] is None
    assert report[bad.name] is not None and re.search(expected, report[bad.name]), report[bad.name]
    assert sum(read) >= good.size  # the good one was read whole, with progress reported as it went


def test_a_manifest_listing_two_data_files_is_refused_by_name(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    info = mgr.save({"w": torch.ones(4)}, step=0)
    storage = open_storage(store.url, store.storage_options)
    manifest = json.loads(storage.read(f"{info.name}/manifest.json"))
    manifest["files"].append(dict(manifest["files"][0]))
    storage.delete(f"{info.name}/manifest.json")
    storage.write_new(f"{info.name}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CorruptCheckpointError) as err:
        mgr.restore(which=0)
    assert str(err.value) == f"{storage.url(info.name)}: expected one data file, the manifest lists 2"


def test_every_checkpoint_corrupt_raises(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    info = mgr.save({"w": torch.ones(10)}, step=0)
    corrupt(store, info, "flip_middle")
    with pytest.raises(CorruptCheckpointError, match="every checkpoint"):
        mgr.restore()


def test_verify_false_skips_the_checksum(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    info = mgr.save({"w": torch.zeros(1000)}, step=0)
    corrupt(store, info, "flip_last")
    values = mgr.restore(verify=False)
    assert values["w"].count_nonzero() == 1  # the flipped byte, loaded as the caller asked


def test_unreadable_manifest_is_skipped_not_deleted(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options, keep_last=1)
    mgr.save({"x": 0}, step=0)
    storage = open_storage(store.url, store.storage_options)
    storage.write_new("step_00000007/manifest.json", b"{not json")
    assert [c.step for c in mgr.checkpoints()] == [0]
    mgr.save({"x": 1}, step=1)
    assert storage.exists("step_00000007/manifest.json")  # left for a human: never auto-deleted
