"""Partial loads from third-party files on every store: match by name and shape, read only those bytes."""

from __future__ import annotations

import io
import json
import os
import uuid

import pytest
import safetensors.torch
import torch
from torch import nn

import ckptstore
from ckptstore import (
    CheckpointManager,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
    load_partial,
)
from ckptstore.partial import LoadReport
from ckptstore.transfer import SourceTensor, Transfer
from ckptstore.storage import FsspecStorage, open_storage
from test_foreign_files import put, torch_bytes


def pretrained() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({
        "embed": nn.Embedding(100, 16),
        "block": nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)),
        "head": nn.Linear(16, 10),       # the fine-tuned model has a reshaped head
        "aux": nn.Linear(16, 4),         # the fine-tuned model drops this layer
    })


def finetune_target() -> nn.Module:
    torch.manual_seed(1)
    return nn.ModuleDict({
        "embed": nn.Embedding(100, 16),
        "block": nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)),
        "head": nn.Linear(16, 3),
        "adapter": nn.Linear(16, 16),    # new in the fine-tuned model
    })


def upload(store, name: str, data: bytes) -> str:
    storage = open_storage(store.url, store.storage_options)
    with storage.open_write(name) as f:
        f.write(data)
    return storage.url(name)


def stock_file(kind: str, state: dict[str, torch.Tensor]) -> bytes:
    if kind == "safetensors":
        return safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_third_party_file_extra_missing_and_reshaped_layers(store, kind):
    source = pretrained()
    url = upload(store, f"model.{'safetensors' if kind == 'safetensors' else 'pt'}", stock_file(kind, source.state_dict()))
    target = finetune_target()
    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_partial(url, target, storage_options=store.storage_options)

    shared = [k for k in source.state_dict() if k.startswith(("embed", "block"))]
    assert report.loaded == sorted(shared)
    assert report.skipped_shape == {"head.weight": ((10, 16), (3, 16)), "head.bias": ((10,), (3,))}
    assert report.missing == ["adapter.bias", "adapter.weight"]
    assert report.unexpected == ["aux.bias", "aux.weight"]
    src, dst = source.state_dict(), target.state_dict()
    for k in shared:
        assert torch.equal(dst[k], src[k]), k
    for k in ("head.weight", "head.bias", "adapter.weight", "adapter.bias"):
        assert torch.equal(dst[k], untouched[k]), k  # left alone
    needed = sum(src[k].numel() * src[k].element_size() for k in shared)
    assert needed <= report.bytes_read <= 1.05 * needed + 64 * 1024  # the header and zip directory are small


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_ddp_prefix_key_map_and_strict(store, kind):
    source = nn.Linear(4, 4)
    ddp_state = {f"module.{k}": v for k, v in source.state_dict().items()}
    url = upload(store, f"ddp.{kind}", stock_file(kind, ddp_state))
    target = nn.Linear(4, 4)
    report = load_partial(url, target, key_map={"module.": ""}, strict=True, storage_options=store.storage_options)
    assert report.loaded == ["bias", "weight"] and torch.equal(target.weight, source.weight)
    report = load_partial(url, nn.Linear(4, 4), key_map=lambda k: k.removeprefix("module.") if "bias" in k else None,
                          storage_options=store.storage_options)
    assert report.loaded == ["bias"] and report.missing == ["weight"] and report.unexpected == []
    with pytest.raises(StateMismatchError, match=r"missing \['bias', 'weight'\]"):
        load_partial(url, nn.Linear(4, 4), strict=True, storage_options=store.storage_options)


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
@pytest.mark.parametrize("extra", ["target", "file"])
def test_strict_refuses_one_key_too_many_on_either_side(store, kind, extra):
    """strict=True fails on a key the file lacks alone, or on a key the target lacks alone,
    not only when both sides disagree."""
    source = nn.Linear(4, 4).state_dict()
    saved = {**source, "extra": torch.ones(2)} if extra == "file" else source
    url = upload(store, f"strict-{extra}.{kind}", stock_file(kind, saved))
    target = {**{k: torch.zeros_like(v) for k, v in source.items()}, **({"extra": torch.zeros(2)} if extra == "target" else {})}
    expected = r"missing \['extra'\]" if extra == "target" else r"unexpected \['extra'\]"
    with pytest.raises(StateMismatchError, match=expected):
        load_partial(url, target, strict=True, storage_options=store.storage_options)
    assert load_partial(url, target, storage_options=store.storage_options).loaded == ["bias", "weight"]


def test_describe_of_a_checkpoint_folder_names_its_manifest_facts(store):
    """``ckptstore inspect`` shows these: the step, metrics and format of the checkpoint."""
    from ckptstore import CheckpointManager
    from ckptstore.partial import describe

    mgr = CheckpointManager(store.url, storage_options=store.storage_options, format="torch")
    info = mgr.save({"model": {"w": torch.ones(3)}}, step=7, metrics={"loss": 0.25})
    shown = describe(info.url, store.storage_options)["checkpoint"]
    assert shown == {"name": "step_00000007", "step": 7, "metrics": {"loss": 0.25}, "format": "torch",
                     "created": info.created.isoformat(), "size": info.size}


def test_a_cast_lands_in_the_target_s_own_tensor_object(store):
    """A tensor that needs a cast goes through a temporary, then is copied into the target's
    own tensor, not swapped for a new one: an optimizer holding the parameter sees the values."""
    source = {"w": torch.arange(6.0).reshape(2, 3).half()}
    url = upload(store, "cast.safetensors", stock_file("safetensors", source))
    module = nn.Linear(3, 2, bias=False)
    param = module.weight
    assert load_partial(url, module, key_map={"w": "weight"}, storage_options=store.storage_options).cast
    assert module.weight is param and torch.equal(param.detach(), source["w"].float())
    tensors = {"w": torch.zeros(2, 3)}
    held = tensors["w"]
    load_partial(url, tensors, storage_options=store.storage_options)
    assert tensors["w"] is held and torch.equal(held, source["w"].float())


def safetensors_with_header_of(length: int, tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file whose JSON header is exactly ``length`` bytes (padded by its metadata)."""
    for pad in range(length - 300, length):
        data = safetensors.torch.save(tensors, metadata={"pad": "x" * pad})
        if int.from_bytes(data[:8], "little") == length:
            return data
    raise AssertionError(f"no padding gives a {length}-byte header")


@pytest.mark.parametrize("header, requests", [(64 * 2**10 - 8, 2), (100_000, 3)], ids=["fills-the-first-read", "longer"])
def test_a_safetensors_header_is_read_in_one_request_when_it_fits_the_first_read(store, header, requests):
    """The first read is 64 KiB: a header that ends exactly there needs no second request; a
    longer one (thousands of tensors, or big metadata) is read in one more."""
    tensors = {"a": torch.arange(4.0), "b": torch.ones(300_000)}
    url = upload(store, "header.safetensors", safetensors_with_header_of(header, tensors))
    target = {"a": torch.zeros(4)}
    report = load_partial(url, target, storage_options=store.storage_options)
    assert report.loaded == ["a"] and torch.equal(target["a"], tensors["a"])
    assert report.requests == requests  # the header (and, longer, its rest), then a's range


def test_describe_of_a_safetensors_checkpoint_shows_the_saved_tree(store):
    """A ckptstore safetensors file keeps the state's structure in its metadata; describe shows
    it with each tensor as a placeholder, beside the plain values."""
    from ckptstore import CheckpointManager
    from ckptstore.partial import describe
    from ckptstore.serializers import TREE_METADATA_KEY

    mgr = CheckpointManager(store.url, storage_options=store.storage_options, format="safetensors")
    info = mgr.save({"model": {"w": torch.ones(3)}, "epoch": 4, "note": "warmup"}, step=1)
    tree = describe(info.url, store.storage_options)["values"][TREE_METADATA_KEY]
    assert tree["epoch"] == 4 and tree["note"] == "warmup" and tree["model"]["w"].startswith("<tensor ")


def test_device_puts_the_loaded_tensors_there_in_the_target_s_dtype(store):
    """``device=`` different from the target's: the loaded tensors are new ones on that device
    (here ``meta``, the one a CPU-only machine has besides the CPU), cast to the target's dtype."""
    source = {"w": torch.arange(6.0).half(), "b": torch.ones(2)}
    url = upload(store, "device.safetensors", stock_file("safetensors", source))
    target = {"w": torch.zeros(6), "b": torch.zeros(2)}
    report = load_partial(url, target, device="meta", storage_options=store.storage_options)
    assert report.loaded == ["b", "w"]
    assert [(t.device.type, t.dtype) for t in target.values()] == [("meta", torch.float32)] * 2


def test_a_torch_file_that_cannot_be_planned_is_named_by_its_url(store):
    """A torch zip whose end was cut off: the error says which file, first."""
    from ckptstore import CorruptCheckpointError

    url = upload(store, "cut.pt", stock_file("torch", {"w": torch.ones(4)})[:-30])
    with pytest.raises(CorruptCheckpointError) as raised:
        load_partial(url, {"w": torch.zeros(4)}, storage_options=store.storage_options)
    assert str(raised.value) == f"{url} is not a torch zip file: File is not a zip file"


def test_dtype_differences_are_cast_and_reported(store):
    source = {"w": torch.randn(8, 8), "v": torch.arange(5.0)[1:4]}  # a view: only its bytes are planned
    url = upload(store, "mixed.pt", stock_file("torch", source))
    target = {"w": torch.zeros(8, 8, dtype=torch.bfloat16), "v": torch.zeros(3)}
    report = load_partial(url, target, storage_options=store.storage_options)
    assert report.cast == {"w": (torch.float32, torch.bfloat16)}
    assert torch.equal(target["w"], source["w"].to(torch.bfloat16)) and torch.equal(target["v"], source["v"])
    with pytest.raises(StateMismatchError, match="strict_dtype"):
        load_partial(url, {"w": torch.zeros(8, 8, dtype=torch.float16)}, strict_dtype=True, storage_options=store.storage_options)


def test_from_a_managed_checkpoint(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options, monitor="loss")
    good, bad = pretrained(), pretrained()
    with torch.no_grad():
        bad["block"][0].weight.add_(1)
    mgr.save({"model": good, "optimizer": torch.optim.SGD(good.parameters(), lr=0.1)}, step=0, metrics={"loss": 0.1})
    mgr.save({"model": bad}, step=1, metrics={"loss": 0.5})
    target = finetune_target()
    report = mgr.load_partial(target, which="best")
    assert "block.0.weight" in report.loaded and "aux.weight" in report.unexpected
    assert torch.equal(target["block"][0].weight, good["block"][0].weight)
    report = mgr.load_partial({"0.weight": torch.zeros(32, 16)}, key_map={"block.": ""})  # latest, renamed
    assert report.loaded == ["0.weight"]


def test_small_max_buffer_splits_big_tensors_without_changing_the_result(tmp_path):
    source = {"big": torch.randn(300_000), "small": torch.randn(10)}
    path = tmp_path / "big.safetensors"
    path.write_bytes(stock_file("safetensors", source))
    target = {"big": torch.zeros(300_000), "small": torch.zeros(10)}
    report = load_partial(path, target, max_buffer=2**18)  # 256 KiB budget for a 1.2 MB tensor
    assert torch.equal(target["big"], source["big"]) and report.requests > 4


def test_staging_buffers_alternate_and_copy_exactly():
    """The device path's staging logic, exercised on the CPU (CUDA adds only non_blocking)."""
    transfer = Transfer(open_storage("memory://staging"), "x", 2**18, LoadReport())
    dest = torch.zeros(10, dtype=torch.uint8)
    import numpy as np

    for i in range(4):
        transfer._stage(np.full(10, i, dtype=np.uint8), dest)
        assert dest.tolist() == [i] * 10
    assert len(transfer._staging) == 2 and transfer._copies == 4
    for buffer in transfer._staging:  # two chunks of bytes: the memory the docstring promises, pinned where CUDA is
        assert buffer.dtype == torch.uint8 and buffer.numel() == transfer.chunk
        assert buffer.is_pinned() == torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_target_through_pinned_staging(tmp_path):
    source = pretrained()
    path = tmp_path / "m.safetensors"
    path.write_bytes(stock_file("safetensors", source.state_dict()))
    target = finetune_target().cuda()
    report = load_partial(path, target, device="cuda:0", max_buffer=2**16)
    assert report.loaded and torch.equal(target["block"][0].weight.cpu(), source["block"][0].weight)


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


def test_hostile_and_broken_files(store):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "evil": Evil()}, buf)
    url = upload(store, "evil.pt", buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"builtin\w*\.exec"):
        load_partial(url, {"w": torch.zeros(2)}, storage_options=store.storage_options)
    good = stock_file("safetensors", {"w": torch.ones(1000)})
    url = upload(store, "cut.safetensors", good[: len(good) // 2])
    with pytest.raises(CorruptCheckpointError, match="data section"):
        load_partial(url, {"w": torch.zeros(1000)}, storage_options=store.storage_options)
    url = upload(store, "huge.safetensors", (2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptCheckpointError, match="over the"):
        load_partial(url, {"w": torch.zeros(1)}, storage_options=store.storage_options)
    url = upload(store, "cut.pt", stock_file("torch", {"w": torch.ones(1000)})[:-300])
    with pytest.raises(CorruptCheckpointError):
        load_partial(url, {"w": torch.zeros(1000)}, storage_options=store.storage_options)


def test_single_file_helper_writes_what_load_partial_reads(tmp_path):
    model = pretrained()
    ckptstore.save(model.state_dict(), tmp_path / "m.pt")
    target = finetune_target()
    assert "embed.weight" in load_partial(tmp_path / "m.pt", target).loaded


def test_tied_storages_and_coalescing_stay_within_five_percent(store):
    """Tied weights (one storage, two keys) and many small tensors: exact values, <= 5% extra bytes."""
    emb = torch.randn(50, 8)
    source = {"emb.weight": emb, "head.weight": emb, **{f"b{i}": torch.randn(i + 1) for i in range(60)}}
    url = upload(store, "tied.pt", stock_file("torch", source))
    target = {"emb.weight": torch.zeros(50, 8), "head.weight": torch.zeros(50, 8),
              **{f"b{i}": torch.zeros(i + 1) for i in range(0, 60, 3)}}
    report = load_partial(url, target, storage_options=store.storage_options)
    assert all(torch.equal(target[k], source[k]) for k in target)
    needed = emb.numel() * 4 + sum((i + 1) * 4 for i in range(0, 60, 3))
    assert needed <= report.bytes_read <= 1.05 * needed + 64 * 1024  # + the zip directory and data.pkl


SAME_SIZE_DTYPES = [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.int32, torch.float32),
                    (torch.float32, torch.int32), (torch.float64, torch.int64), (torch.int16, torch.float16)]


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_dtypes_of_the_same_size_are_cast_not_reinterpreted(store, kind):
    """fp16's -3 landed as raw bytes in a bf16 tensor reads -32: only an equal dtype may skip the cast (issue 12)."""
    source = {f"{a}-{b}": torch.tensor([-3.0, 0.5, 2.0, 96.0]).to(a) for a, b in SAME_SIZE_DTYPES}
    url = upload(store, f"same-size.{'safetensors' if kind == 'safetensors' else 'pt'}", stock_file(kind, source))
    target = {f"{a}-{b}": torch.zeros(4, dtype=b) for a, b in SAME_SIZE_DTYPES}
    report = load_partial(url, target, storage_options=store.storage_options)
    assert report.cast == {f"{a}-{b}": (a, b) for a, b in SAME_SIZE_DTYPES}
    for key, tensor in target.items():
        assert torch.equal(tensor, source[key].to(tensor.dtype)), (key, tensor)


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_transposed_shape_is_skipped_though_the_element_count_agrees(store, kind):
    url = upload(store, f"t.{'safetensors' if kind == 'safetensors' else 'pt'}",
                 stock_file(kind, {"w": torch.arange(24.0).reshape(4, 6), "b": torch.ones(6)}))
    target = {"w": torch.zeros(6, 4), "b": torch.zeros(6)}
    report = load_partial(url, target, storage_options=store.storage_options)
    assert report.skipped_shape == {"w": ((4, 6), (6, 4))} and report.loaded == ["b"]
    assert not target["w"].any()


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_only_the_needed_ranges_are_read_from_a_large_file(store, kind):
    """16 tensors of 256 KiB; the target wants two far apart. A first read of the whole file, or ranges
    coalesced across the 2.25 MiB between them, would read megabytes; the bound is their 512 KiB plus
    the header, the zip directory and data.pkl (issue 12: the old bound exceeded its small files)."""
    source = {f"layer{i:02d}": torch.full((2**16,), float(i)) for i in range(16)}
    url = upload(store, f"large.{'safetensors' if kind == 'safetensors' else 'pt'}", stock_file(kind, source))
    target = {"layer02": torch.zeros(2**16), "layer12": torch.zeros(2**16)}
    report = load_partial(url, target, storage_options=store.storage_options)
    needed = 2 * 2**18
    assert report.loaded == ["layer02", "layer12"]
    # torch on a remote store also reads the file's last 64 KiB at once (the zip directory: one request, not a dozen)
    tail = 64 * 2**10 if kind == "torch" and store.kind not in ("local", "file") else 0
    assert needed <= report.bytes_read <= needed + 96 * 2**10 + tail, report.bytes_read
    # safetensors: the head, then one range per tensor; torch: the head and the tail (remote) or the head
    # and zipfile's six exact reads of the directory and data.pkl (local, torch 2.13), then one range each
    assert report.requests == (3 if kind == "safetensors" else 4 if tail else 9), report.requests
    assert torch.equal(target["layer02"], source["layer02"]) and torch.equal(target["layer12"], source["layer12"])


def stored_bytes(url: str, name: str, data: bytes, storage_options: dict | None = None):
    storage = open_storage(url, storage_options)
    storage.makedirs()
    with storage.open_write(name) as f:
        f.write(data)
    return storage


def test_cpu_destinations_on_a_remote_store_receive_the_bytes_in_their_own_memory():
    """No staging buffer for the CPU: the ranges land in the destination itself."""
    data = bytes(range(256)) * 4
    transfer = Transfer(stored_bytes(f"memory://land-{uuid.uuid4().hex}", "x.bin", data), "x.bin", 2**18, LoadReport())
    dest = torch.zeros(len(data), dtype=torch.uint8)
    transfer.run([(SourceTensor("x", torch.uint8, (len(data),), 0, len(data)), dest)])
    assert bytes(dest.numpy()) == data and transfer._staging == []


def test_a_short_read_is_refused_before_it_lands():
    """The check that guards the device path (os.pread of a file cut since it was planned)."""
    url = f"memory://short-{uuid.uuid4().hex}"
    transfer = Transfer(open_storage(url), "x.bin", 2**18, LoadReport())
    with pytest.raises(CorruptCheckpointError) as err:
        transfer._land(memoryview(b"abc"), torch.zeros(5, dtype=torch.uint8))
    assert str(err.value) == f"{url}/x.bin: short read (3 of 5 bytes)"


def test_a_local_file_cut_after_it_was_planned_is_named_where_it_ends(tmp_path):
    storage = stored_bytes(str(tmp_path), "x.bin", b"\x07" * 1000)
    transfer = Transfer(storage, "x.bin", 2**18, LoadReport())
    dest = torch.zeros(1500, dtype=torch.uint8)
    with pytest.raises(CorruptCheckpointError) as err:
        transfer.run([(SourceTensor("x", torch.uint8, (1500,), 0, 1500), dest)])
    assert str(err.value) == f"{storage.url('x.bin')} ended before byte 1500"


def test_a_filesystem_that_returns_short_reads_still_lands_every_byte(tmp_path, monkeypatch):
    """FUSE and network filesystems may return fewer bytes than asked for, as Linux does past 2 GiB."""
    source = {"w": torch.randn(3000), "b": torch.randn(10)}
    path = tmp_path / "m.safetensors"
    path.write_bytes(stock_file("safetensors", source))
    preadv = os.preadv

    def at_most_1000_bytes(fd, buffers, offset):
        return preadv(fd, [memoryview(buffers[0])[:1000]], offset)

    monkeypatch.setattr(os, "preadv", at_most_1000_bytes)
    target = {"w": torch.zeros(3000), "b": torch.zeros(10)}
    assert load_partial(path, target).loaded == ["b", "w"]
    assert all(torch.equal(target[k], source[k]) for k in source)


def data_read(url: str, target: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bytes and requests a partial load of ``target`` spends on tensor data: its report less the
    header reads, measured as a load of ``baseline`` (one tensor, one request) less that tensor."""
    report, base = load_partial(url, target), load_partial(url, baseline)
    (only,) = baseline.values()
    return (report.bytes_read - (base.bytes_read - only.numel() * only.element_size()),
            report.requests - (base.requests - 1))


def test_ranged_reads_coalesce_across_small_gaps_wasting_at_most_5_percent():
    """10,000 needed bytes, then twenty 100-byte tensors each followed by a 100-byte one not wanted:
    the first five gaps fit in 5% of the bytes needed (500 of 12,000), so they join the first request."""
    tensors = {"a_big": torch.ones(2500)}
    for i in range(20):
        tensors[f"b{i:02d}_keep"] = torch.full((25,), float(i))
        tensors[f"b{i:02d}_skip"] = torch.zeros(25)
    url = f"memory://coalesce-{uuid.uuid4().hex}"
    stored_bytes(url, "m.safetensors", safetensors.torch.save(tensors))
    target = {k: torch.zeros_like(v) for k, v in tensors.items() if not k.endswith("skip")}
    nbytes, requests = data_read(f"{url}/m.safetensors", target, {"a_big": torch.zeros(2500)})
    assert (nbytes, requests) == (12_000 + 500, 1 + 14)
    assert all(torch.equal(target[k], tensors[k]) for k in target)

    adjacent = {f"s{i:03d}": torch.tensor([i], dtype=torch.uint8) for i in range(200)}  # one byte each, no gaps
    stored_bytes(url, "adjacent.safetensors", safetensors.torch.save(adjacent))
    target = {k: torch.zeros_like(v) for k, v in adjacent.items()}
    assert data_read(f"{url}/adjacent.safetensors", target, {"s000": torch.zeros(1, dtype=torch.uint8)}) == (200, 1)
    assert all(torch.equal(target[k], adjacent[k]) for k in target)

    exactly = {"a": torch.ones(475), "b": torch.zeros(25), "c": torch.full((25,), 2.0)}  # a 100-byte gap: 5% of 2,000
    stored_bytes(url, "exactly.safetensors", safetensors.torch.save(exactly))
    target = {"a": torch.zeros(475), "c": torch.zeros(25)}
    assert data_read(f"{url}/exactly.safetensors", target, {"a": torch.zeros(475)}) == (2100, 1)
    assert torch.equal(target["c"], exactly["c"])


def whole(storage, name: str, start: int, end: int, **kwargs) -> tuple[bytes, LoadReport]:
    """Read ``[start, end)`` of ``name`` through a Transfer; the bytes and its report."""
    report, dest = LoadReport(), torch.zeros(end - start, dtype=torch.uint8)
    max_buffer = kwargs.pop("max_buffer", 2**20)
    Transfer(storage, name, max_buffer, report, **kwargs).run([(SourceTensor("x", torch.uint8, (end - start,), start, end), dest)])
    return bytes(dest.numpy()), report


def test_a_range_is_read_in_chunks_of_a_quarter_of_max_buffer_but_at_least_64_kib(store):
    data = bytes(range(256)) * 4096  # 1 MiB, after a 16-byte "header"
    storage = stored_bytes(store.url, "x.bin", b"h" * 16 + data, store.storage_options)
    for max_buffer, requests in [(2**16, 16), (2**20, 4), (2**22, 1)]:
        got = whole(storage, "x.bin", 16, 16 + len(data), max_buffer=max_buffer)
        assert got == (data, LoadReport(bytes_read=len(data), requests=requests))
    with pytest.raises(ConfigError) as err:
        Transfer(storage, "x.bin", 2**16 - 1, LoadReport())
    assert str(err.value) == "`max_buffer` must be at least 64 KiB, got 65535"
    too_small = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError) as err:  # a caller's bug, named before anything is read
        Transfer(storage, "x.bin", 2**16, LoadReport()).run([(SourceTensor("w", torch.uint8, (8,), 16, 24), too_small)])
    assert str(err.value) == "w: destination of 4 bytes for [16, 24)"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc/self/fd")
def test_a_local_transfer_reads_the_descriptor_it_was_given_not_the_name(tmp_path):
    """The file the caller checked, even once another file took its name; the caller's descriptor
    is left open for the caller, and one the transfer opened itself is closed."""
    storage = stored_bytes(str(tmp_path), "x.bin", b"checked!" * 100)
    fd = os.open(tmp_path / "x.bin", os.O_RDONLY)
    try:
        (tmp_path / "x.bin").unlink()
        (tmp_path / "x.bin").write_bytes(b"replaced" * 100)
        assert whole(storage, "x.bin", 0, 800, fd=fd)[0] == b"checked!" * 100
        os.fstat(fd)  # still open
        before = len(os.listdir("/proc/self/fd"))
        assert whole(storage, "x.bin", 0, 800)[0] == b"replaced" * 100
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)


def test_requests_are_fetched_in_batches_of_at_most_max_buffer_bytes(monkeypatch):
    """The bytes in flight at once: whole batches of requests up to ``max_buffer``, never more."""
    url = f"memory://batches-{uuid.uuid4().hex}"
    data = bytes(range(256)) * 4096  # 1 MiB, after a 16-byte "header"
    storage = stored_bytes(url, "x.bin", b"h" * 16 + data)
    calls: list[list[int]] = []
    read_ranges = FsspecStorage.read_ranges

    def recorded(self, path, ranges):
        calls.append([end - start for start, end in ranges])
        return read_ranges(self, path, ranges)

    monkeypatch.setattr(FsspecStorage, "read_ranges", recorded)
    assert whole(storage, "x.bin", 16, 16 + len(data), max_buffer=2**18)[0] == data  # 64 KiB chunks, 4 a batch
    assert calls == [[2**16] * 4] * 4
    calls.clear()
    dests = [torch.zeros(1024, dtype=torch.uint8) for _ in range(400)]  # 400 adjacent 1 KiB tensors
    jobs = [(SourceTensor(f"t{i}", torch.uint8, (1024,), 16 + 1024 * i, 16 + 1024 * (i + 1)), d) for i, d in enumerate(dests)]
    Transfer(storage, "x.bin", 2**18, LoadReport()).run(jobs)
    assert b"".join(bytes(d.numpy()) for d in dests) == data[: 400 * 1024]
    assert calls == [[2**16] * 4, [2**16, 2**16, 16 * 1024]]  # coalesced 64 at a time, 4 requests a batch



# -- survivors of the mutation sample ending in 7 (docs/mutation.md) -------------------------------------
def test_a_checkpoint_folder_is_never_listed_for_a_shard_index(store, monkeypatch):
    """Its manifest says what it is: a listing for *.index.json would be a wasted round trip (a LIST on S3)."""
    info = CheckpointManager(store.url, storage_options=store.storage_options).save({"model": {"w": torch.ones(3)}}, step=1)
    listings: list[str] = []
    real = FsspecStorage.list_files
    monkeypatch.setattr(FsspecStorage, "list_files", lambda self, under="": listings.append(self.url(under)) or real(self, under))
    target = {"w": torch.zeros(3)}
    assert load_partial(info.url, target, storage_options=store.storage_options).loaded == ["w"]
    assert listings == [] and torch.equal(target["w"], torch.ones(3))


def test_a_torch_file_named_safetensors_loads_by_its_content(store):
    """The name suggested no zip directory to fetch with the first bytes: the planner fetches it then."""
    w = torch.arange(50_000.0)  # 200 kB: the zip's directory is past the first read
    url = put(store, "misnamed.safetensors", torch_bytes({"w": w}))
    target = {"w": torch.zeros(50_000)}
    assert load_partial(url, target, storage_options=store.storage_options).loaded == ["w"]
    assert torch.equal(target["w"], w)


def test_a_sharded_load_counts_the_requests_of_every_shard(store):
    """report.requests adds up over the shards it read (it was once reset by each shard's first read)."""
    first, second = {"a": torch.arange(20_000.0)}, {"b": torch.arange(30_000.0)}
    put(store, "idx/pytorch_model-00001-of-00002.bin", torch_bytes(first))
    put(store, "idx/pytorch_model-00002-of-00002.bin", torch_bytes(second))
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    put(store, "idx/pytorch_model.bin.index.json", json.dumps(index).encode())
    url, opts = store.join("idx"), store.storage_options
    only_a = load_partial(url, {"a": torch.zeros(20_000)}, storage_options=opts)
    only_b = load_partial(url, {"b": torch.zeros(30_000)}, storage_options=opts)
    both = load_partial(url, {"a": torch.zeros(20_000), "b": torch.zeros(30_000)}, storage_options=opts)
    assert both.loaded == ["a", "b"] and only_a.requests > 0 and only_b.requests > 0
    assert both.requests == only_a.requests + only_b.requests
    assert both.bytes_read == only_a.bytes_read + only_b.bytes_read


def test_a_module_on_the_meta_device_is_filled_on_the_device_asked_for(store):
    """A model built on meta (no memory) gets real tensors where device= says, every one of them."""
    source = nn.Linear(4, 3)
    url = put(store, "w.safetensors", safetensors.torch.save(source.state_dict()))
    with torch.device("meta"):
        target = nn.Linear(4, 3)
    report = load_partial(url, target, device="cpu", storage_options=store.storage_options)
    assert report.loaded == ["bias", "weight"]
    assert target.weight.device.type == "cpu" and torch.equal(target.weight, source.weight)
    assert target.bias.device.type == "cpu" and torch.equal(target.bias, source.bias)
