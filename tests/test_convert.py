"""Streaming conversion torch <-> safetensors on every store; results read by the stock libraries."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import ckptstore
from ckptstore import CheckpointManager, CorruptCheckpointError, UnsafeCheckpointError, load_partial
from ckptstore.convert import CHUNK_BYTES, convert
from ckptstore.storage import open_parent, open_storage


def awkward_state() -> dict:
    """Tied weights, transposed and sliced views, nested values, non-finite floats, an empty tensor."""
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    return {
        "model": {"emb.weight": w, "head.weight": w, "t": w.t(), "rows": w[2:4], "e": torch.empty(0, 3)},
        "half": torch.randn(4, dtype=torch.float16),
        "epoch": 3, "history": [0.5, float("nan")], "lr": (0.1, 1e-3),
    }


def read_back(store, name: str) -> bytes:
    return open_storage(store.url, store.storage_options).read(name)


def test_torch_to_safetensors_to_torch_keeps_everything(store):
    state = awkward_state()
    src = store.join("src.pt")
    ckptstore.save(state, src, storage_options=store.storage_options)
    st, pt = store.join("out.safetensors"), store.join("back.pt")
    convert(src, st, storage_options=store.storage_options)
    convert(st, pt, storage_options=store.storage_options)

    flat = safetensors.torch.load(read_back(store, "out.safetensors"))  # the stock reader
    assert torch.equal(flat["model/t"], state["model"]["t"])  # views are written contiguous
    assert "model/head.weight" not in flat  # tied: stored once
    for got in (ckptstore.load(st, storage_options=store.storage_options),
                torch.load(io.BytesIO(read_back(store, "back.pt")), weights_only=True)):
        model = got["model"]
        assert all(torch.equal(model[k], state["model"][k]) for k in state["model"])
        assert model["emb.weight"].data_ptr() == model["head.weight"].data_ptr()  # still tied
        assert torch.equal(got["half"], state["half"]) and got["half"].dtype == torch.float16
        assert got["epoch"] == 3 and got["lr"] == (0.1, 1e-3) and np.isnan(got["history"][1])
    assert zipfile.ZipFile(io.BytesIO(read_back(store, "back.pt"))).testzip() is None  # every record's CRC32 right


def test_converted_torch_file_is_laid_out_for_partial_loads(store):
    """Storages are 64-byte aligned as torch.save aligns them, so ranged partial loads work."""
    source = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    src = store.join("w.safetensors")
    with open_storage(store.url, store.storage_options).open_write("w.safetensors") as f:
        f.write(safetensors.torch.save(source.state_dict()))
    dst = store.join("w.pt")
    convert(src, dst, storage_options=store.storage_options)
    target = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    report = load_partial(dst, target, strict=True, storage_options=store.storage_options)
    assert len(report.loaded) == 6
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_checkpoint_converts_to_a_stock_file(store, fmt):
    mgr = CheckpointManager(store.url, format=fmt, storage_options=store.storage_options)
    model = nn.Linear(4, 2)
    info = mgr.save({"model": model, "epoch": 7, "seen": np.arange(3)}, step=1)
    for ext in ("pt", "safetensors"):
        out = store.join("exports", f"ck.{ext}")
        convert(info.url, out, storage_options=store.storage_options)
        got = ckptstore.load(out, storage_options=store.storage_options)
        assert torch.equal(got["model"]["weight"], model.weight) and got["epoch"] == 7
    stock = torch.load(io.BytesIO(open_storage(store.join("exports"), store.storage_options).read("ck.pt")), weights_only=True)
    assert torch.equal(stock["model"]["bias"], model.bias)


def test_a_damaged_checkpoint_leaves_no_destination(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    info = mgr.save({"w": torch.randn(1000)}, step=0)
    path = f"{info.name}/{info.files[0].path}"
    data = bytearray(mgr.storage.read(path))
    data[-3] ^= 0x01  # one bit of one tensor
    with mgr.storage.open_write(path) as f:
        f.write(bytes(data))
    out = store.join("out.pt")
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        convert(info.url, out, storage_options=store.storage_options)
    storage, name = open_parent(out, store.storage_options)
    assert not storage.exists(name)


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


def test_a_hostile_pickle_is_refused_before_anything_is_written(store):
    src = store.join("evil.pt")
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2), "x": Boom()}, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with open_storage(store.url, store.storage_options).open_write("evil.pt") as f:
        f.write(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"refuses too \(unpickling it can run code\)"):
        convert(src, store.join("evil.safetensors"), storage_options=store.storage_options)
    assert not open_storage(store.url, store.storage_options).exists("evil.safetensors")


def test_big_tensors_stream_in_chunks_and_progress_counts_every_byte(tmp_path):
    big = torch.randn(CHUNK_BYTES // 4 * 2 + 123)  # more than two chunks
    torch.save({"big": big, "small": torch.ones(3)}, tmp_path / "a.pt")
    seen: list[int] = []
    written = convert(tmp_path / "a.pt", tmp_path / "a.safetensors", progress=seen.append)
    assert sum(seen) == written == (tmp_path / "a.safetensors").stat().st_size
    assert max(seen) <= 2 * 2**20  # handed on in 2 MiB slices
    assert torch.equal(safetensors.torch.load_file(tmp_path / "a.safetensors")["big"], big)


def test_same_format_is_a_byte_copy(tmp_path, store):
    torch.save({"w": torch.arange(10)}, tmp_path / "a.pt")
    convert(tmp_path / "a.pt", store.join("copy.pt"), storage_options=store.storage_options)
    assert read_back(store, "copy.pt") == (tmp_path / "a.pt").read_bytes()


def test_small_tensors_cost_no_request_each(store, storage_reads):
    """The source is read in 16 MiB blocks: 300 small tensors take a handful of reads, not 300+."""
    state = {f"layer{i}.weight": torch.randn(64) for i in range(300)}
    src = store.join("many.pt")
    ckptstore.save(state, src, storage_options=store.storage_options)
    storage_reads.clear()  # the reads of the conversion alone
    reads = storage_reads
    convert(src, store.join("many.safetensors"), storage_options=store.storage_options)
    # the format sniff, the planner's head read, the zip directory (one tail read on remote stores, zipfile's
    # few exact reads on a local disk, where a read costs no round trip) and the data blocks
    assert len(reads) <= (10 if store.kind in ("local", "file") else 6), reads
    got = ckptstore.load(store.join("many.safetensors"), storage_options=store.storage_options)
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_every_source_byte_is_fetched_once(tmp_path, storage_reads):
    """Blocks are aligned, so tensors that straddle them cost no re-reads."""
    state = {f"t{i}": torch.randn(int(CHUNK_BYTES / 4 * 0.7)) for i in range(4)}  # 0.7 blocks each
    torch.save(state, tmp_path / "a.pt")
    fetched = storage_reads
    convert(tmp_path / "a.pt", tmp_path / "a.safetensors")
    size = (tmp_path / "a.pt").stat().st_size
    # on top: the planner's head read, the format sniff (16 bytes), zipfile's reads of the end record,
    # the directory and data.pkl's header (a few KiB here)
    assert size <= sum(fetched) <= size + 2**16 + 16 + 2**14


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors"])
def test_a_file_in_neither_format_is_refused_not_copied(tmp_path, name):
    (tmp_path / name).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError):
        convert(tmp_path / name, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
