"""Durability on a local disk, seen through a spy on the system calls, not through timing.

A file is durable under its final name only if its bytes reach the disk before the name does
(``fsync`` of the temp file, then ``os.replace`` or ``os.link``) and the new name itself
reaches the disk (``fsync`` of the folder) before anyone is told it exists. A commit is
durable only if the data file is, before its manifest is linked. Power cannot be cut in a
test; the order of these calls is what decides what a power cut leaves, so it is checked.
"""

from __future__ import annotations

import os

import pytest
import torch

import ckptstore
from ckptstore import CheckpointManager


@pytest.fixture
def syscalls(monkeypatch) -> list[tuple[str, ...]]:
    """Every fsync (by the path its descriptor names), replace and link, in order."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    def link(src, dst, **kwargs):
        events.append(("link", os.fspath(src), os.fspath(dst)))
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    return events


def check_published_durably(events: list[tuple[str, ...]], final: str) -> int:
    """Assert ``final`` was fsynced as a temp file, then named, then its folder fsynced; return where it was named."""
    named = [i for i, e in enumerate(events) if e[0] in ("replace", "link") and e[2] == final]
    assert len(named) == 1, (final, events)
    i = named[0]
    temp = events[i][1]
    assert os.path.dirname(temp) == os.path.dirname(final) and temp != final  # a same-folder temp file
    assert ("fsync", temp) in events[:i], f"{final}: renamed into place before its bytes were fsynced"
    assert ("fsync", os.path.dirname(final)) in events[i + 1 :], f"{final}: its folder was not fsynced after the rename"
    return i


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_commit_is_durable_data_first_then_the_manifest(tmp_path, syscalls, fmt, scheme):
    root = tmp_path / "run"
    info = CheckpointManager(f"{scheme}{root}", format=fmt).save({"w": torch.ones(8)}, step=1)
    folder = os.path.join(root, info.name)
    data = check_published_durably(syscalls, os.path.join(folder, info.files[0].path))
    manifest = check_published_durably(syscalls, os.path.join(folder, "manifest.json"))
    assert syscalls[manifest][0] == "link"  # create-only: refuses an existing manifest atomically
    assert data < manifest and ("fsync", folder) in syscalls[data + 1 : manifest], \
        "the manifest was linked before the data file's name was on disk"


def test_a_plain_save_is_fsynced_before_it_is_renamed_and_its_folder_after(tmp_path, syscalls):
    path = tmp_path / "w.safetensors"
    ckptstore.save({"w": torch.ones(4)}, path)
    check_published_durably(syscalls, str(path))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
