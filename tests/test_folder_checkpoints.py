"""Folder checkpoints on every store (issue 16, point 4): the files a framework wrote, saved
as one checkpoint with the same commit, checksum and retention rules as a state."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore import CheckpointManager, CheckpointExists, ConfigError, CorruptCheckpointError
from ckptstore.storage import open_storage


def framework_folder(where: Path, step: int) -> Path:
    """A folder as the HF Trainer writes one: weights, optimizer, nested files, an empty file."""
    where.mkdir(parents=True)
    ckptstore.save({"w": torch.full((64,), float(step))}, where / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(3) * step}}}, where / "optimizer.pt")
    (where / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (where / "sub" / "deeper").mkdir(parents=True)
    (where / "sub" / "deeper" / "rng_state_0.pth").write_bytes(os.urandom(1000))
    (where / "empty.txt").write_bytes(b"")
    return where


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manager(store, **kwargs) -> CheckpointManager:
    return CheckpointManager(store.url, storage_options=store.storage_options, **kwargs)


def test_a_folder_round_trips_byte_for_byte_with_a_checksum_per_file(store, tmp_path):
    mgr = manager(store)
    src = framework_folder(tmp_path / "checkpoint-3", 3)
    info = mgr.save_folder(src, step=3, metrics={"loss": 0.5})
    assert info.format == "folder" and info.step == 3 and info.metrics == {"loss": 0.5}
    assert sorted(f.path.split("/", 1)[1] for f in info.files) == sorted(contents(src))
    assert len({f.path.split("/", 1)[0] for f in info.files}) == 1  # one save's token for all its files
    manifest = json.loads(open_storage(store.url, store.storage_options).read(f"{info.name}/manifest.json"))
    assert manifest["format"] == "folder" and all(len(f["crc32c"]) == 8 for f in manifest["files"])
    assert mgr.verify() == {info.name: None}
    back = mgr.restore_folder(tmp_path / "back" / "checkpoint-3")
    assert back is not None and back.name == info.name
    assert contents(tmp_path / "back" / "checkpoint-3") == contents(src)
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["checkpoint-3"]  # no temporary folder left beside it


def test_retention_keeps_the_best_and_last_and_leaves_nothing_behind(store, tmp_path):
    mgr = manager(store, keep_last=1, keep_best=1, monitor="loss")
    for step, loss in [(1, 0.3), (2, 0.1), (3, 0.4), (4, 0.5)]:
        mgr.save_folder(framework_folder(tmp_path / f"c{step}", step), step=step, metrics={"loss": loss})
    assert [c.step for c in mgr.checkpoints()] == [2, 4]
    manifest = json.loads(open_storage(store.url, store.storage_options).read("step_00000004/manifest.json"))
    assert manifest["monitor"] == {"metric": "loss", "mode": "min"}  # a tool listing the root can mark the best
    listed = open_storage(store.url, store.storage_options).list_files()
    assert {p.split("/")[0] for p in listed} == {"step_00000002", "step_00000004"}
    if store.kind in ("local", "file"):  # the pruned folders' subfolders went too
        assert sorted(os.listdir(store.path())) == ["step_00000002", "step_00000004"]


def test_a_damaged_file_is_named_and_latest_falls_back(store, tmp_path, caplog):
    mgr = manager(store)
    mgr.save_folder(framework_folder(tmp_path / "c1", 1), step=1)
    bad = mgr.save_folder(framework_folder(tmp_path / "c2", 2), step=2)
    storage = open_storage(store.url, store.storage_options)
    victim = next(f for f in bad.files if f.path.endswith("optimizer.pt"))
    data = bytearray(storage.read(f"{bad.name}/{victim.path}"))
    data[len(data) // 2] ^= 1
    with storage.open_write(f"{bad.name}/{victim.path}") as f:
        f.write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"optimizer\.pt fails its checksum") as err:
        mgr.restore_folder(tmp_path / "asked", which=2)
    assert bad.name in str(err.value) and not (tmp_path / "asked").exists()  # nothing half-downloaded
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        got = mgr.restore_folder(tmp_path / "latest")
    assert got is not None and got.step == 1
    assert contents(tmp_path / "latest") == contents(tmp_path / "c1")
    assert any(bad.name in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)


def test_folder_and_state_checkpoints_are_not_confused(store, tmp_path):
    mgr = manager(store)
    mgr.save({"w": torch.ones(2)}, step=1)
    with pytest.raises(ConfigError, match=r"step_00000001 is a safetensors checkpoint, not a folder checkpoint; restore it "
                                          r"with CheckpointManager.restore$"):
        mgr.restore_folder(tmp_path / "x", which=1)
    mgr.save_folder(framework_folder(tmp_path / "c2", 2), step=2)
    with pytest.raises(ConfigError, match=r"step_00000002 is a folder checkpoint \(the files a framework wrote\), not a "
                                          r"state: bring it back with restore_folder\(dest\)$"):
        mgr.restore({"w": torch.zeros(2)})  # loud, never a silent fall back to step 1


def test_bad_arguments_are_refused_before_anything_is_written(store, tmp_path):
    mgr = manager(store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty holds no file; there is nothing to save$"):
        mgr.save_folder(tmp_path / "empty", step=1)
    with pytest.raises(ConfigError, match=r"nowhere is not a folder; save_folder saves the files of a local folder$"):
        mgr.save_folder(tmp_path / "nowhere", step=1)
    assert mgr.checkpoints() == [] and open_storage(store.url, store.storage_options).list_files() == {}
    mgr.save_folder(framework_folder(tmp_path / "c1", 1), step=1)
    with pytest.raises(CheckpointExists, match="step 1 is already committed"):
        mgr.save_folder(tmp_path / "c1", step=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"busy exists and is not an empty folder; restore_folder needs a new one$"):
        mgr.restore_folder(tmp_path / "busy")
    assert contents(tmp_path / "busy") == {"mine.txt": b"keep me"}
    assert mgr.restore_folder(tmp_path / "fresh-root-restore", which="latest") is not None
    assert manager(type(store)(store.join("none"), store.storage_options, store.kind)).restore_folder(tmp_path / "y") is None


def test_an_unfinished_folder_save_is_cleaned_once_idle(store, tmp_path):
    storage = open_storage(store.url, store.storage_options)
    with storage.open_write("step_00000001/files-0123abcd/sub/model.safetensors") as f:
        f.write(b"half a save")  # a writer killed before its manifest
    mgr = manager(store, abandoned_after=0)
    [(folder, reason)] = mgr.uncommitted().items()  # seen as an unfinished save, files below the folder included
    assert folder == "step_00000001" and reason.startswith("unfinished save (no manifest), idle ")
    mgr.save_folder(framework_folder(tmp_path / "c2", 2), step=2)
    assert {p.split("/")[0] for p in storage.list_files()} == {"step_00000002"}


def test_export_best_refuses_folders(store, tmp_path):
    mgr = manager(store, monitor="loss", export_best="best.safetensors")
    with pytest.raises(ConfigError, match="a folder checkpoint has none it can read"):
        mgr.save_folder(framework_folder(tmp_path / "c1", 1), step=1, metrics={"loss": 1.0})


def test_tools_name_a_folder_checkpoint_and_read_its_files(store, tmp_path, capsys):
    from ckptstore.cli import main

    mgr = manager(store)
    info = mgr.save_folder(framework_folder(tmp_path / "c1", 1), step=1, name="checkpoint-1")
    refusal = (rf"^{info.url} is a folder checkpoint \(the files a framework wrote\), not one state: name one of its "
               r"files \(.*/files-[0-9a-f]{8}/empty\.txt, .*/files-[0-9a-f]{8}/model\.safetensors, .*, \.\.\.\), or bring it "
               r"back with CheckpointManager.restore_folder$")
    with pytest.raises(ConfigError, match=refusal):
        mgr.load_partial(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=refusal):
        ckptstore.load_partial(info.url, {"w": torch.zeros(64)}, storage_options=store.storage_options)
    weights = next(f for f in info.files if f.path.endswith("model.safetensors"))
    report = ckptstore.load_partial(f"{info.url}/{weights.path}", target := {"w": torch.zeros(64)},
                                    storage_options=store.storage_options)
    assert report.loaded == ["w"] and torch.equal(target["w"], torch.ones(64))  # one of its files, as the framework wrote it
    if store.kind in ("local", "file"):  # the CLI on a path: ls shows the format, verify checks every file
        assert main(["ls", store.url]) == 0 and " folder " in capsys.readouterr().out
        assert main(["verify", store.url]) == 0
        assert main(["inspect", info.url]) != 0 and "is a folder checkpoint" in capsys.readouterr().err


def test_files_stream_in_bounded_pieces_and_land_beside_the_destination(store, tmp_path, monkeypatch):
    """A big file is never read whole (its chunks are at most CHUNK_BYTES), and the download's temporary
    folder is a sibling of the destination (one filesystem: the final rename is atomic), even a new, deep one."""
    from ckptstore import folders
    from ckptstore.serializers import CHUNK_BYTES

    src = tmp_path / "big"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(2 * CHUNK_BYTES + 123))
    written: list[int] = []
    real_write = folders.ChecksumWriter.write
    monkeypatch.setattr(folders.ChecksumWriter, "write", lambda self, data: written.append(len(data)) or real_write(self, data))
    mgr = manager(store)
    mgr.save_folder(src, step=1)
    assert sum(written) == 2 * CHUNK_BYTES + 123 and max(written) <= CHUNK_BYTES
    landed: list[Path] = []
    real_read = folders.read_checked
    monkeypatch.setattr(folders, "read_checked", lambda source, crc, copy_to: landed.append(Path(copy_to.name))
                        or real_read(source, crc, copy_to=copy_to))
    dest = tmp_path / "deep" / "er" / "checkpoint-1"  # its parents do not exist yet
    mgr.restore_folder(dest)
    assert (dest / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert [p.parent.parent for p in landed] == [dest.parent]  # <dest's folder>/<temporary>/weights.bin
