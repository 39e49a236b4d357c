"""Damaged checkpoints on every store: detected by size and CRC32C, named, and survived."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import zipfile

import crc32c
import pytest
import safetensors.torch
import torch

from ckptstore import CheckpointExists, CheckpointManager, CorruptCheckpointError, files
from ckptstore.serializers import ChecksumReader, SafetensorsFormat, Source, read_checked
from ckptstore.storage import open_parent, open_storage
from test_foreign_files import put


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


# -- single files: ``ckptstore verify <file>`` (files.verify), no manifest to compare with --------------


def zip_of(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buf.getvalue()


def torch_file_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def member_data_offset(data: bytes, suffix: str) -> tuple[str, int]:
    """The zip member ending with ``suffix`` and the file offset of its first data byte."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.filename, info.header_offset + 30 + name_len + extra_len


def test_verify_of_a_single_file_checks_each_torch_record_and_each_safetensors_header(store):
    """Sound files of both formats pass; a flipped tensor byte, a cut zip, a zip of something else
    and a damaged safetensors header are each refused in a message naming the file and the damage."""
    good_pt = torch_file_bytes({"w": torch.arange(64.0)})
    files.verify(put(store, "good.pt", good_pt), storage_options=store.storage_options)
    files.verify(put(store, "good.safetensors", safetensors.torch.save({"w": torch.arange(64.0) + 1})),
                 storage_options=store.storage_options)

    member, offset = member_data_offset(good_pt, "/data/0")
    flipped = bytearray(good_pt)
    flipped[offset + 5] ^= 0x01  # the zip still opens: only the record's CRC32 tells
    cases = {
        "flipped.pt": (bytes(flipped), "{url}: record " + member + " fails its CRC32"),
        "cut.pt": (good_pt[: len(good_pt) // 2], "{url} is not a readable torch zip: File is not a zip file"),
        "other.zip": (zip_of({"notes/readme.txt": "hi"}), "{url} is a sound zip archive but not a torch checkpoint "
                                                         "(no single <archive>/data.pkl)"),
        "short.safetensors": (b"\x01\x02\x03", "{url} is 3 bytes, too short for a safetensors header"),
        "bad.safetensors": (struct.pack("<Q", 4) + b"{x}}", "{url}: the safetensors header is not valid JSON "
                                                             "(Expecting property name enclosed in double quotes: "
                                                             "line 1 column 2 (char 1))"),
    }
    for name, (data, message) in cases.items():
        url = put(store, name, data)
        with pytest.raises(CorruptCheckpointError) as err:
            files.verify(url, storage_options=store.storage_options)
        assert str(err.value) == message.format(url=url)


def test_verify_reads_a_safetensors_header_and_load_sniffs_only_the_first_bytes(store, storage_reads):
    """A safetensors file has no checksum to compute: its prefix and header are all verify reads.
    load finds the format from a few bytes, then streams the tensors once (not through ``read``)."""
    url = put(store, "big.safetensors", safetensors.torch.save({"w": torch.zeros(2**16)}))
    read = storage_reads
    read.clear()  # verify's reads alone
    files.verify(url, storage_options=store.storage_options)
    assert 0 < sum(read) < 1000  # the 256 KiB of tensor data stay unread
    read.clear()
    assert files.load(url, storage_options=store.storage_options)["w"].shape == (2**16,)
    assert 0 < sum(read) <= 16


def test_a_file_that_shrinks_while_it_is_read_is_named_as_truncated(store):
    """The size was taken, then the file was cut (another writer): the reader says where it ended."""
    data = safetensors.torch.save({"w": torch.arange(100.0)})
    url = put(store, "w.safetensors", data[:-40])
    storage, name = open_parent(url, store.storage_options)
    source = Source(storage, name, len(data))  # the size it had when it was listed
    for read in (lambda: read_checked(source, None), lambda: SafetensorsFormat().read(source, None, True, None)):
        with pytest.raises(CorruptCheckpointError) as err:
            read()
        assert str(err.value) == f"{url} ended after {len(data) - 40} bytes; the file is truncated"


class Trickle(io.RawIOBase):
    """A stream that hands out at most 1000 bytes a call, as network files may."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), 1000, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_a_stream_that_returns_short_reads_is_read_whole_and_checksummed():
    data = bytes(range(256)) * 20
    reader = ChecksumReader(Trickle(data), "memory://x/w.bin")
    assert reader.read(len(data)) == data and (reader.size, reader.crc) == (len(data), crc32c.crc32c(data))


def test_a_run_that_went_back_past_a_damaged_checkpoint_replaces_it_when_it_gets_there(store, caplog):
    """restore() falls back past a damaged newest checkpoint; the resumed run's save of that step replaces
    it (with a warning) instead of dying on "step 2 is already committed". A save of a step a restore did
    not go back past is still refused."""
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    mgr.save({"w": torch.zeros(1000), "step": 1}, step=1)
    bad = mgr.save({"w": torch.ones(1000), "step": 2}, step=2)
    corrupt(store, bad, "flip_middle")
    with pytest.raises(CheckpointExists, match="step 2 is already committed"):
        mgr.save({"w": torch.full((1000,), 2.0), "step": 2}, step=2)  # no restore went back past it: refused as ever
    resumed = CheckpointManager(store.url, storage_options=store.storage_options)  # the restarted job
    assert resumed.restore()["step"] == 1
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        again = resumed.save({"w": torch.full((1000,), 2.0), "step": 2}, step=2)
    assert any(f"removing {bad.url}: it was unusable when this run went back to an older checkpoint" in r.getMessage()
               for r in caplog.records)
    assert [c.step for c in resumed.checkpoints()] == [1, 2] and again.files != bad.files
    assert torch.equal(resumed.restore()["w"], torch.full((1000,), 2.0))
