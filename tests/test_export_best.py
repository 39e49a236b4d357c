"""``export_best``: the best weights ever committed, recorded, repaired after a failure or a kill."""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile

import crc32c
import pytest
import torch
from safetensors.torch import load as load_safetensors

from ckptstore import CheckpointManager, ConfigError, StorageError
from ckptstore.storage import open_storage

EXPORT = "model_best.safetensors"


def manager(store, **kwargs):
    kwargs = {"keep_last": 1, "monitor": "val_loss", "export_best": EXPORT, **kwargs}
    return CheckpointManager(store.url, storage_options=store.storage_options, **kwargs)


def state(step: int) -> dict:
    return {"model": {"w": torch.full((8,), float(step))}, "step": step}


def exported(store) -> tuple[float, dict]:
    """The exported weights' step (all values equal it) and the record."""
    storage = open_storage(store.url, store.storage_options)
    weights = load_safetensors(storage.read(EXPORT))
    record = json.loads(storage.read(f"{EXPORT}.json"))
    assert weights["w"].unique().numel() == 1
    return weights["w"][0].item(), record


def test_the_export_holds_the_best_ever_even_after_retention_pruned_it(store):
    """keep_best=0: losses 0.10, 0.50, 0.60, 0.40 must end with the 0.10 model exported."""
    mgr = manager(store)
    for step, loss in enumerate([0.10, 0.50, 0.60, 0.40]):
        mgr.save(state(step), step=step, metrics={"val_loss": loss})
    assert [c.step for c in mgr.checkpoints()] == [3]  # step 0 is long gone
    step, record = exported(store)
    assert step == 0 and (record["checkpoint"], record["value"], record["monitor"]) == ("step_00000000", 0.10, "val_loss")
    mgr.save(state(4), step=4, metrics={"val_loss": 0.05})
    assert exported(store)[0] == 4


def test_a_failed_export_is_repaired_by_the_next_save_and_nothing_is_pruned_meanwhile(store, caplog):
    mgr = manager(store)
    mgr.save(state(0), step=0, metrics={"val_loss": 0.5})
    real = mgr.storage.open_write

    def refuse_the_export(path, *args, **kwargs):
        if path == EXPORT:
            raise StorageError(f"cannot write {path}: the connection was reset")
        return real(path, *args, **kwargs)

    mgr.storage.open_write = refuse_the_export
    info = mgr.save(state(1), step=1, metrics={"val_loss": 0.1})  # committed: the save itself succeeded
    assert "could not update the best-model export" in caplog.text
    assert exported(store)[0] == 0  # stale...
    assert [c.step for c in mgr.checkpoints()] == [0, 1]  # ...so retention waited: step 1 is not lost
    mgr.storage.open_write = real
    mgr.save(state(2), step=2, metrics={"val_loss": 0.9})  # not a new best: it still repairs the export
    step, record = exported(store)
    assert step == 1 and record["checkpoint"] == info.name
    assert [c.step for c in mgr.checkpoints()] == [2]


def test_prune_repairs_a_stale_export_before_deleting(store):
    mgr = manager(store, keep_last=None)
    mgr.save(state(0), step=0, metrics={"val_loss": 0.5})
    no_export = CheckpointManager(store.url, storage_options=store.storage_options, monitor="val_loss")
    no_export.save(state(1), step=1, metrics={"val_loss": 0.1})  # a job that did not export
    assert exported(store)[0] == 0
    manager(store).prune()
    assert exported(store)[0] == 1


KILLED_DURING_EXPORT = textwrap.dedent(
    """
    import json, os, signal, sys, torch
    from ckptstore import CheckpointManager
    args = json.loads(sys.argv[1])
    mgr = CheckpointManager(args["root"], storage_options=args["options"], keep_last=1, monitor="val_loss",
                            export_best="model_best.safetensors")
    mgr.save({"model": {"w": torch.zeros(8)}}, step=0, metrics={"val_loss": 0.5})
    real = mgr.storage.open_write
    def open_write(path, *a, **k):
        if path == "model_best.safetensors":
            os.kill(os.getpid(), signal.SIGKILL)  # a spot instance reclaimed mid-export
        return real(path, *a, **k)
    mgr.storage.open_write = open_write
    mgr.save({"model": {"w": torch.ones(8)}}, step=1, metrics={"val_loss": 0.1})
    """
)


def test_a_kill_during_the_export_is_repaired_by_the_next_save(process_store):
    store = process_store
    args = json.dumps({"root": store.url, "options": store.storage_options})
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_EXPORT, args], timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert exported(store)[0] == 0  # step 1 committed, the export still holds step 0
    manager(store).save(state(2), step=2, metrics={"val_loss": 0.7})
    assert exported(store)[0] == 1


def test_export_mistakes_fail_before_anything_is_written(store):
    with pytest.raises(ConfigError, match="`export_best` needs `monitor`"):
        CheckpointManager(store.url, storage_options=store.storage_options, export_best=EXPORT)
    mgr = manager(store, export_key="net")
    with pytest.raises(ConfigError, match=r"state\['net'\].*entries: \['model', 'step'\]"):
        mgr.save(state(0), step=0, metrics={"val_loss": 0.5})
    assert mgr.checkpoints() == [] and mgr.uncommitted() == {}


def tensor_byte(data: bytes, fmt: str) -> int:
    """The offset of a byte of tensor data: the last one in a safetensors file, inside a torch zip's data/0 record."""
    if fmt == "safetensors":
        return len(data) - 3
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + 1


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_an_export_is_never_written_from_a_damaged_checkpoint(store, caplog, fmt):
    """The best checkpoint's data file altered in place (same size): re-exporting it fails its
    CRC32C, the export stays absent, and retention waits, so the best checkpoint is not pruned."""
    mgr = manager(store, format=fmt)
    best = mgr.save(state(0), step=0, metrics={"val_loss": 0.1})
    storage = open_storage(store.url, store.storage_options)
    storage.delete(EXPORT)
    path = f"{best.name}/{best.files[0].path}"
    data = bytearray(storage.read(path))
    data[tensor_byte(data, fmt)] ^= 0xFF  # a tensor byte: the file still parses, only its checksum tells
    with storage.open_write(path) as f:
        f.write(bytes(data))
    mgr.save(state(1), step=1, metrics={"val_loss": 0.5})
    assert "could not update the best-model export" in caplog.text
    assert (f"{storage.url(path)} fails its checksum (crc32c {crc32c.crc32c(bytes(data)):08x}, manifest "
            f"{best.files[0].crc32c:08x}): the bytes were altered") in caplog.text
    assert not storage.exists(EXPORT)
    assert [c.step for c in mgr.checkpoints()] == [0, 1]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_an_export_never_unpickles_what_a_checkpoint_file_was_replaced_with(store, caplog, capsys):
    """The best checkpoint's torch file replaced by one whose pickle calls a function, with a
    manifest to match (size and CRC32C): re-exporting it is refused, nothing runs, nothing is pruned."""
    mgr = manager(store, format="torch")
    best = mgr.save(state(0), step=0, metrics={"val_loss": 0.1})
    storage = open_storage(store.url, store.storage_options)
    storage.delete(EXPORT)
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(8)}, "evil": Evil()}, buf)
    path = f"{best.name}/{best.files[0].path}"
    with storage.open_write(path) as f:
        f.write(buf.getvalue())
    manifest = json.loads(storage.read(f"{best.name}/manifest.json"))
    manifest["files"][0].update(size=len(buf.getvalue()), crc32c=f"{crc32c.crc32c(buf.getvalue()):08x}")
    storage.delete(f"{best.name}/manifest.json")
    storage.write_new(f"{best.name}/manifest.json", json.dumps(manifest).encode())
    mgr.save(state(1), step=1, metrics={"val_loss": 0.5})
    assert "could not update the best-model export" in caplog.text and "weights_only=False" in caplog.text
    assert "pwned" not in capsys.readouterr().out
    assert not storage.exists(EXPORT) and [c.step for c in mgr.checkpoints()] == [0, 1]


def test_an_export_deleted_by_hand_is_written_again_by_the_next_save(store):
    """The record stays, the file is gone: the next save re-exports the best (from the stored
    checkpoint, before retention prunes it), and does not crash after its commit."""
    mgr = manager(store)
    mgr.save(state(0), step=0, metrics={"val_loss": 0.1})
    open_storage(store.url, store.storage_options).delete(EXPORT)
    mgr.save(state(1), step=1, metrics={"val_loss": 0.5})
    step, record = exported(store)
    assert step == 0 and record["checkpoint"] == "step_00000000"
