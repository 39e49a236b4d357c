"""Files other tools wrote (issue 11, points 1 to 3): owned memory, the format found from the
content, and torch files from before torch 1.6, on every store."""

from __future__ import annotations

import importlib
import io
import json
import re
import subprocess
import sys
from types import SimpleNamespace
from typing import ClassVar

import pytest
import safetensors.torch
import torch
from fsspec.implementations.memory import MemoryFileSystem

import ckptstore
from ckptstore import ConfigError, CorruptCheckpointError, StateMismatchError, StorageError, UnsafeCheckpointError, files
from ckptstore.cli import main
from ckptstore.convert import convert
from ckptstore.partial import describe
from ckptstore.storage import open_storage

STATE = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.tensor([1, 2, 3], dtype=torch.int64)}


def put(store, name: str, data: bytes) -> str:
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    with storage.open_write(name) as f:
        f.write(data)
    return storage.url(name)


def torch_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def cli_options(store) -> list[str]:
    return [arg for k, v in store.storage_options.items() for arg in ("--storage-option", f"{k}={json.dumps(v)}")]


# -- point 1: tensors own their memory; mmap is an opt-in -------------------------------------------------


def test_load_returns_tensors_that_a_rewrite_in_place_does_not_change(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.zeros(1000)}, path)
    owned = ckptstore.load(path)["w"]
    mapped = ckptstore.load(path, mmap=True)["w"]
    torch.save({"w": torch.ones(1000)}, path)  # the same inode, rewritten: what torch.save and Lightning do
    assert owned.sum() == 0  # a copy: unchanged
    assert mapped.sum() == 1000  # the opt-in: the tensor is the file, as documented


def test_touching_loaded_tensors_after_the_file_is_truncated_does_not_kill_the_process(tmp_path):
    """Run in a child: were the tensors mapped, the truncation would end it with SIGBUS."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2**20)}, path)
    script = (f"import ckptstore; w = ckptstore.load({str(path)!r})['w']; open({str(path)!r}, 'wb').close(); "
              "print(float(w.sum()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == str(float(2**20)), (done.returncode, done.stderr[-500:])


def test_a_legacy_file_cannot_be_memory_mapped_and_says_so(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(torch_bytes(STATE, _use_new_zipfile_serialization=False))
    with pytest.raises(ConfigError) as err:
        ckptstore.load(path, mmap=True)
    assert str(err.value) == (f"{path} is a torch file from before torch 1.6, which cannot be memory-mapped; "
                              "load it with mmap=False")


# -- point 2: the format comes from the content, not the name ---------------------------------------------


def test_a_safetensors_file_named_bin_and_a_torch_file_named_safetensors_read_everywhere(store):
    st = put(store, "model.bin", safetensors.torch.save(STATE))
    pt = put(store, "weights.safetensors", torch_bytes(STATE))
    opts = store.storage_options
    for url in (st, pt):
        assert same(ckptstore.load(url, storage_options=opts), STATE)
        target = {k: torch.zeros_like(v) for k, v in STATE.items()}
        assert ckptstore.load_partial(url, target, storage_options=opts).loaded == ["b", "w"] and same(target, STATE)
        assert sorted(t["name"] for t in describe(url, opts)["tensors"]) == ["b", "w"]
    convert(st, store.join("from_bin.pt"), storage_options=opts)
    assert same(ckptstore.load(store.join("from_bin.pt"), storage_options=opts), STATE)


@pytest.mark.parametrize(("content", "seen"), [
    (b"hello, this is text", "it starts with 68656c6c"),
    (b"\x1f\x8b\x08\x00 gzip", "it is a gzip file"),
    (b"\x93NUMPY\x01\x00", "it is a numpy .npy file"),
    (b"", "it is empty"),
])
def test_a_file_in_neither_format_gets_one_line_saying_what_it_is_not(store, capsys, content, seen):
    url = put(store, "mystery.bin", content)
    opts = store.storage_options
    calls = [
        lambda: ckptstore.load(url, storage_options=opts),
        lambda: ckptstore.load_partial(url, {"w": torch.zeros(1)}, storage_options=opts),
        lambda: describe(url, opts),
        lambda: convert(url, store.join("out.safetensors"), storage_options=opts),
    ]
    for call in calls:
        with pytest.raises(CorruptCheckpointError, match=rf"is neither a torch file nor a safetensors file \({seen}"):
            call()
    for command in ("inspect", "verify"):
        assert main([command, url, *cli_options(store)]) == 1
        out = capsys.readouterr()
        assert "neither a torch file nor a safetensors file" in out.out + out.err and "Traceback" not in out.err


# -- point 3: torch files from before 1.6 -----------------------------------------------------------------


def test_a_legacy_torch_file_reads_through_every_entry_point_and_says_it_was_read_whole(store):
    data = torch_bytes(STATE, _use_new_zipfile_serialization=False)
    url = put(store, "zoo_model.pth", data)
    opts = store.storage_options
    assert same(ckptstore.load(url, storage_options=opts), torch.load(io.BytesIO(data), weights_only=True))
    target = {k: torch.zeros_like(v) for k, v in STATE.items()}
    report = ckptstore.load_partial(url, target, storage_options=opts)
    assert report.loaded == ["b", "w"] and same(target, STATE)
    assert report.read_whole and report.bytes_read >= len(data)  # no index: the report says so
    described = describe(url, opts)
    assert described["read_whole"] and described["url"] == url
    assert {t["name"]: t["shape"] for t in described["tensors"]} == {"w": [3, 4], "b": [3]}
    for dst in ("converted.safetensors", "converted.pt"):
        convert(url, store.join(dst), storage_options=opts)
        assert same(ckptstore.load(store.join(dst), storage_options=opts), STATE)


class Custom:
    """Any class: unpickling it would run code."""


def test_a_legacy_file_with_pickled_objects_is_refused_as_unsafe(store):
    url = put(store, "unsafe.pt", torch_bytes({"w": torch.ones(1), "obj": Custom()}, _use_new_zipfile_serialization=False))
    with pytest.raises(ckptstore.UnsafeCheckpointError, match="weights_only=False"):
        ckptstore.load_partial(url, {"w": torch.zeros(1)}, storage_options=store.storage_options)


# -- points 6 and 7: key mapping that cannot silently load nothing; tied weights ---------------------------


class Tied(torch.nn.Module):
    """GPT-2's shape in small: the output head is the embedding (one parameter, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight


def test_a_lightning_style_nested_file_hints_at_its_addressing_and_loads_with_it(store):
    source = torch.nn.Linear(4, 4)
    url = put(store, "epoch=0.ckpt", torch_bytes({"epoch": 0, "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}))
    opts = store.storage_options
    with pytest.raises(ckptstore.StateMismatchError,
                       match=r"key_map=\{'state_dict/model.': ''\} would match 2 of 2.*addressed with '/'"):
        ckptstore.load_partial(url, torch.nn.Linear(4, 4), key_map={"state_dict.": ""}, storage_options=opts)
    target = torch.nn.Linear(4, 4)
    report = ckptstore.load_partial(url, target, key="state_dict", key_map={"model.": ""}, storage_options=opts)
    assert report.loaded == ["bias", "weight"] and torch.equal(target.weight, source.weight)


def test_min_loaded_refuses_a_load_of_almost_nothing(store):
    source = {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2), "d": torch.ones(2)}
    url = put(store, "four.safetensors", safetensors.torch.save({"a": source["a"]}))
    opts = store.storage_options
    assert ckptstore.load_partial(url, dict(source), storage_options=opts).loaded == ["a"]  # partial is allowed ...
    with pytest.raises(ckptstore.StateMismatchError, match=r"only 1 of the target's 4 tensors matched"):
        ckptstore.load_partial(url, dict(source), min_loaded=0.5, storage_options=opts)  # ... down to a bar the caller sets
    assert ckptstore.load_partial(url, dict(source), min_loaded=0.25, storage_options=opts).loaded == ["a"]  # the bar itself passes


def test_a_tied_weight_stored_once_counts_as_loaded_so_strict_passes(store):
    torch.manual_seed(0)
    source = Tied()
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}  # stored once, as HF does
    url = put(store, "model.safetensors", safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))
    target = Tied()
    report = ckptstore.load_partial(url, target, strict=True, storage_options=store.storage_options)
    assert "lm_head.weight" in report.loaded and report.missing == []
    assert torch.equal(target.lm_head.weight, source.wte.weight)
    untied = {"wte.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(10, 4)}  # separate memory: really missing
    assert ckptstore.load_partial(url, untied, storage_options=store.storage_options).missing == ["lm_head.weight"]


# -- point 8: every dtype safetensors writes is read, or refused as unsupported, never called corrupt -----


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,
                                   torch.uint16, torch.uint32, torch.uint64, torch.bfloat16, torch.complex64, torch.bool])
def test_every_safetensors_dtype_reads_back_bit_for_bit(store, dtype):
    raw = torch.arange(16, dtype=torch.uint8).reshape(4, 4)
    value = raw.view(dtype) if torch.empty((), dtype=dtype).element_size() == 1 else raw.view(-1).view(dtype).reshape(2, -1)
    url = put(store, "dtypes.safetensors", safetensors.torch.save({"x": value}))  # the stock writer
    opts = store.storage_options
    for got in (ckptstore.load(url, storage_options=opts)["x"],
                _partial(url, torch.zeros_like(value), opts)):
        assert got.dtype == dtype and got.shape == value.shape
        assert torch.equal(got.view(torch.uint8), value.view(torch.uint8))


def _partial(url, target, opts):
    ckptstore.load_partial(url, {"x": target}, storage_options=opts)
    return target


def test_a_dtype_torch_cannot_hold_is_refused_as_unsupported_not_corrupt(store):
    header = json.dumps({"x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}).encode()
    url = put(store, "f6.safetensors", len(header).to_bytes(8, "little") + header + b"\0\0\0")
    with pytest.raises(ckptstore.UnsupportedValueError, match=r"dtype F6_E2M3.*unsupported dtype"):
        ckptstore.load(url, storage_options=store.storage_options)


# -- point 5: sharded checkpoints (shards + *.index.json), as Hugging Face writes them --------------------


def sharded(store, kind: str) -> dict[str, torch.Tensor]:
    """Two shards and an index, written as save_pretrained lays them out; returns every tensor."""
    torch.manual_seed(0)
    first = {"embed.weight": torch.randn(1024, 16), "layer.0.weight": torch.randn(16, 16)}
    second = {"layer.1.weight": torch.randn(16, 16), "head.weight": torch.randn(4, 16)}
    ext, stem = (".safetensors", "model") if kind == "safetensors" else (".bin", "pytorch_model")
    files = {f"{stem}-00001-of-00002{ext}": first, f"{stem}-00002-of-00002{ext}": second}
    for name, part in files.items():
        put(store, f"hf/{name}", safetensors.torch.save(part) if kind == "safetensors" else torch_bytes(part))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: name for name, part in files.items() for k in part}}
    put(store, f"hf/{stem}{ext}.index.json", json.dumps(index).encode())
    return {**first, **second}


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_sharded_checkpoint_loads_by_its_folder_or_its_index_reading_only_the_shards_needed(store, kind):
    everything = sharded(store, kind)
    opts = store.storage_options
    index = store.join("hf/model.safetensors.index.json" if kind == "safetensors" else "hf/pytorch_model.bin.index.json")
    for url in (store.join("hf"), index):
        assert same(ckptstore.load(url, storage_options=opts), everything)
        assert sorted(t["name"] for t in describe(url, opts)["tensors"]) == sorted(everything)
    target = {"layer.1.weight": torch.zeros(16, 16), "head.weight": torch.zeros(4, 16)}  # all in the second shard
    report = ckptstore.load_partial(store.join("hf"), target, storage_options=opts)
    assert report.loaded == ["head.weight", "layer.1.weight"] and torch.equal(target["head.weight"], everything["head.weight"])
    assert report.unexpected == ["embed.weight", "layer.0.weight"]  # known from the index, their shard never read
    first_shard_bytes = (1024 * 16 + 16 * 16) * 4
    assert report.bytes_read < first_shard_bytes  # the second shard's header and its two tensors' ranges only
    with pytest.raises(ConfigError, match="sharded checkpoint; convert its shards one by one"):
        convert(store.join("hf"), store.join("one.safetensors"), storage_options=opts)


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_sharded_load_honours_strict_and_the_key_map(store, kind):
    """The options a single file takes hold for shards too: strict refuses keys the target
    lacks, and key_map renames (the target's names need not be the index's)."""
    everything = sharded(store, kind)
    opts = store.storage_options
    target = {"layer.1.weight": torch.zeros(16, 16), "head.weight": torch.zeros(4, 16)}
    with pytest.raises(StateMismatchError, match=r"unexpected \['embed.weight', 'layer.0.weight'\]"):
        ckptstore.load_partial(store.join("hf"), target, strict=True, storage_options=opts)
    renamed = {"block.weight": torch.zeros(16, 16)}
    report = ckptstore.load_partial(store.join("hf"), renamed, key_map={"layer.1.": "block."}, storage_options=opts)
    assert report.loaded == ["block.weight"] and torch.equal(renamed["block.weight"], everything["layer.1.weight"])


def test_a_sharded_load_takes_the_key_device_and_strict_dtype_as_a_file_does(store):
    """Shards whose names are nested (``model/a``): ``key`` picks the entry, ``device`` where the
    tensors go, ``strict_dtype`` refuses a cast; as for a single file."""
    files = {"s-00001-of-00002.safetensors": {"model/a": torch.arange(4.0), "opt/x": torch.ones(2)},
             "s-00002-of-00002.safetensors": {"model/b": torch.ones(3, dtype=torch.float16)}}
    for name, part in files.items():
        put(store, f"nested/{name}", safetensors.torch.save(part))
    index = {"weight_map": {k: name for name, part in files.items() for k in part}}
    put(store, "nested/s.safetensors.index.json", json.dumps(index).encode())
    opts, url = store.storage_options, store.join("nested")
    target = {"a": torch.zeros(4), "b": torch.zeros(3)}
    report = ckptstore.load_partial(url, target, key="model", storage_options=opts)
    assert report.loaded == ["a", "b"] and report.cast == {"b": (torch.float16, torch.float32)}
    assert torch.equal(target["a"], torch.arange(4.0)) and torch.equal(target["b"], torch.ones(3))
    with pytest.raises(StateMismatchError, match="strict_dtype"):
        ckptstore.load_partial(url, {"b": torch.zeros(3)}, key="model", strict_dtype=True, storage_options=opts)
    on_meta = {"a": torch.zeros(4)}
    ckptstore.load_partial(url, on_meta, key="model", device="meta", storage_options=opts)
    assert on_meta["a"].device.type == "meta"
    with pytest.raises(StateMismatchError, match=r"/nested/s.safetensors.index.json holds no tensor under 'optim'; pass key= "
                                                 r"with the state entry that holds the weights$"):
        ckptstore.load_partial(url, {"x": torch.zeros(2)}, key="optim", storage_options=opts)  # "opt" is the entry


def test_describe_of_shards_refuses_a_pickled_object_unless_trusted(store):
    """A shard whose pickle holds an object beyond what ``torch.load(weights_only=True)`` allows
    is refused by describe, as a single file is; trusted, its tensors are listed."""
    import datetime

    put(store, "unsafe/pytorch_model-00001-of-00001.bin", torch_bytes({"w": torch.ones(2), "when": datetime.date(2020, 1, 1)}))
    put(store, "unsafe/pytorch_model.bin.index.json",
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}).encode())
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        describe(store.join("unsafe"), store.storage_options)
    assert [t["name"] for t in describe(store.join("unsafe"), store.storage_options, weights_only=False)["tensors"]] == ["w"]


def test_a_pre_1_6_torch_shard_is_named_as_one_that_cannot_be_planned(store):
    """A shard written by torch before 1.6 has no index: a partial load says so, with its URL,
    rather than failing inside zipfile."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    put(store, "old/pytorch_model-00001-of-00001.bin", buf.getvalue())
    put(store, "old/pytorch_model.bin.index.json", json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}).encode())
    shard = store.join("old/pytorch_model-00001-of-00001.bin")
    with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(shard)} is a torch file from before torch 1.6: it has no index"):
        ckptstore.load_partial(store.join("old"), {"w": torch.zeros(2)}, storage_options=store.storage_options)
    assert torch.equal(ckptstore.load(store.join("old"), storage_options=store.storage_options)["w"], torch.ones(2))


def test_a_file_named_with_a_trailing_slash_is_still_that_file(store):
    url = store.join("slash.safetensors")
    ckptstore.save(STATE, url, storage_options=store.storage_options)
    assert same(ckptstore.load(url + "/", storage_options=store.storage_options), STATE)


def test_a_shard_index_that_points_outside_its_folder_is_refused(store):
    url = put(store, "evil/model.safetensors.index.json", json.dumps({"weight_map": {"w": "../secret.safetensors"}}).encode())
    with pytest.raises(CorruptCheckpointError, match="not a file beside it"):
        ckptstore.load_partial(url, {"w": torch.zeros(1)}, storage_options=store.storage_options)


# -- point 4: the torch planner accepts what torch.load(weights_only=True) accepts -----------------------


class Registered:
    """A user class, allowed only once registered with torch.serialization.add_safe_globals."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def test_the_planner_accepts_bytes_sets_complex_as_torch_load_weights_only_does(store):
    state = {"w": torch.ones(2), "hp": {"tags": {"a", "b"}, "blob": b"\x00\x01", "z": 1 + 2j, "raw": bytearray(b"xy")}}
    url = put(store, "values.pt", torch_bytes(state))
    opts = store.storage_options
    stock = torch.load(io.BytesIO(torch_bytes(state)), weights_only=True)
    assert describe(url, opts)["values"]["hp"] == stock["hp"]
    target = {"w": torch.zeros(2)}
    assert ckptstore.load_partial(url, target, storage_options=opts).loaded == ["w"] and torch.equal(target["w"], state["w"])
    convert(url, store.join("copy.pt"), storage_options=opts)
    assert ckptstore.load(store.join("copy.pt"), storage_options=opts)["hp"] == stock["hp"]


def test_a_user_class_needs_safe_globals_or_weights_only_false_as_in_torch_load(store):
    url = put(store, "custom.pt", torch_bytes({"w": torch.ones(2), "cfg": Registered(3)}))
    opts = store.storage_options
    with pytest.raises(ckptstore.UnsafeCheckpointError, match=r"Registered, which torch.load\(weights_only=True\) refuses too.*"
                                                              r"weights_only=False"):
        describe(url, opts)
    assert describe(url, opts, weights_only=False)["values"]["cfg"].value == 3  # trusted: the caller's explicit choice
    with torch.serialization.safe_globals([Registered]):  # torch's own registry, honoured as torch.load honours it
        assert describe(url, opts)["values"]["cfg"].value == 3
        assert ckptstore.load_partial(url, {"w": torch.zeros(2)}, storage_options=opts).loaded == ["w"]


# -- point 4: sparse and quantized tensors: their parts read whole, built by torch's own functions ----------


def built_by_torch() -> dict:
    """Tensors torch rebuilds from parts: sparse COO and CSR, quantized per tensor and per channel."""
    return {
        "coo": torch.sparse_coo_tensor([[0, 2], [1, 1]], [1.0, 3.0], (4, 3)),
        "csr": torch.eye(4).to_sparse_csr(),
        "q": torch.quantize_per_tensor(torch.linspace(-1, 1, 16).reshape(4, 4), 0.1, 2, torch.qint8),
        "qc": torch.quantize_per_channel(torch.linspace(-1, 1, 12).reshape(3, 4), torch.tensor([0.1, 0.2, 0.3], dtype=torch.double),
                                         torch.tensor([0, 1, 2]), 0, torch.quint8),
        "w": torch.arange(6.0),
    }


def blank_like(state: dict) -> dict:
    """Targets of the same layouts and shapes (CSR: the same number of elements) holding other values."""
    csr = state["csr"]
    return {
        "coo": torch.zeros(4, 3).to_sparse(),
        "csr": torch.sparse_csr_tensor(csr.crow_indices(), csr.col_indices(), torch.zeros_like(csr.values()), csr.shape),
        "q": torch.quantize_per_tensor(torch.zeros(4, 4), 1.0, 0, torch.qint8),
        "qc": torch.quantize_per_channel(torch.zeros(3, 4), torch.ones(3, dtype=torch.double), torch.zeros(3, dtype=torch.long),
                                         0, torch.quint8),
        "w": torch.zeros(6),
    }


def as_dense(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if t.is_quantized else t.to_dense()


@pytest.mark.filterwarnings("ignore:.*(Sparse CSR|quantize_per).*:UserWarning")
def test_sparse_and_quantized_tensors_are_described_loaded_in_place_and_reported(store):
    state = built_by_torch()
    data = torch_bytes({**state, "unused": torch.zeros(2**20)})  # 4 MiB the target does not have
    url, opts = put(store, "parts.pt", data), store.storage_options
    shown = {t["name"]: (t.get("layout"), t["dtype"], tuple(t["shape"])) for t in describe(url, opts)["tensors"]}
    assert shown == {"coo": ("sparse_coo", "float32", (4, 3)), "csr": ("sparse_csr", "float32", (4, 4)),
                     "q": ("quantized", "qint8", (4, 4)), "qc": ("quantized", "quint8", (3, 4)), "w": (None, "float32", (6,)),
                     "unused": (None, "float32", (2**20,))}
    target = blank_like(state)
    live = dict(target)
    report = ckptstore.load_partial(url, target, storage_options=opts)
    assert report.loaded == sorted(state) and report.rebuilt == ["coo", "csr", "q", "qc"]  # the report says which
    assert report.unexpected == ["unused"]
    stock = torch.load(io.BytesIO(data), weights_only=True)
    for k in state:
        assert target[k] is live[k], k  # copied into the target's own tensors
        assert target[k].layout == stock[k].layout and torch.equal(as_dense(target[k]), as_dense(stock[k])), k
    assert (target["q"].q_scale(), target["q"].q_zero_point()) == (0.1, 2)
    assert torch.equal(target["qc"].q_per_channel_scales(), stock["qc"].q_per_channel_scales())
    assert report.bytes_read < 256 * 2**10  # the parts and the index, not the 4 MiB the target lacks


@pytest.mark.filterwarnings("ignore:.*(Sparse CSR|quantize_per).*:UserWarning")
def test_a_sparse_or_quantized_tensor_meeting_a_dense_target_fails_loudly_before_anything_lands(store):
    state = built_by_torch()
    url, opts = put(store, "parts.pt", torch_bytes(state)), store.storage_options
    for key, pattern in [("coo", r"coo: the file holds a sparse_coo torch.float32 tensor.*strided torch.float32"),
                         ("q", r"q: the file holds a quantized torch.qint8 tensor.*strided torch.float32")]:
        target = {key: torch.full(tuple(state[key].shape), 7.0), "w": torch.zeros(6)}
        with pytest.raises(ckptstore.StateMismatchError, match=pattern + r".*ckptstore\.load"):
            ckptstore.load_partial(url, target, storage_options=opts)
        assert target["w"].sum() == 0 and bool((target[key] == 7).all())  # nothing half-loaded


def test_a_hostile_sparse_tensor_is_called_corrupt_where_stock_torch_load_accepts_it(store):
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 99]]), torch.tensor([1.0, 2.0]), (4,), check_invariants=False)
    data = torch_bytes({"s": bad})
    torch.load(io.BytesIO(data), weights_only=True)  # stock torch checks no sparse invariants by default
    url = put(store, "hostile-sparse.pt", data)
    with pytest.raises(CorruptCheckpointError, match=r"hostile-sparse\.pt \(s\): a saved sparse_coo tensor cannot be rebuilt.*99"):
        ckptstore.load_partial(url, {"s": torch.zeros(4).to_sparse()}, storage_options=store.storage_options)


def test_convert_refuses_a_sparse_tensor_for_safetensors_and_copies_it_for_torch(store):
    state = {"coo": built_by_torch()["coo"], "w": torch.arange(6.0)}
    url, opts = put(store, "sparse.pt", torch_bytes(state)), store.storage_options
    dst = open_storage(store.url, opts)
    with pytest.raises(ckptstore.UnsupportedValueError, match=r"'coo' is a sparse_coo tensor, which safetensors cannot hold.*to_dense"):
        convert(url, dst.url("sparse.safetensors"), storage_options=opts)
    assert not dst.exists("sparse.safetensors")  # refused before anything was written
    convert(url, dst.url("copy.pt"), storage_options=opts)
    copied = ckptstore.load(dst.url("copy.pt"), storage_options=opts)
    assert torch.equal(copied["coo"].to_dense(), state["coo"].to_dense()) and torch.equal(copied["w"], state["w"])


def test_inspect_shows_a_sparse_tensor_s_layout(store, capsys):
    url = put(store, "sparse.pt", torch_bytes({"coo": built_by_torch()["coo"]}))
    assert main(["inspect", url, *cli_options(store)]) == 0
    assert "sparse_coo: parts read whole" in capsys.readouterr().out


def test_a_nested_tensor_cannot_be_planned_and_says_what_reads_it(store):
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    url = put(store, "nested.pt", torch_bytes({"n": nested}))
    with pytest.raises(ckptstore.UnsupportedValueError, match=r"_rebuild_nested_tensor.*ckptstore\.load reads the file whole"):
        describe(url, store.storage_options)
    assert torch.equal(ckptstore.load(url, storage_options=store.storage_options)["n"][1], torch.ones(3))


def test_inspect_names_its_own_flag_for_a_file_it_must_trust(store, capsys):
    url = put(store, "custom.pt", torch_bytes({"w": torch.ones(2), "cfg": Registered(3)}))
    assert main(["inspect", url, *cli_options(store)]) == 1
    err = capsys.readouterr().err
    assert "ckptstore inspect --trust-pickle" in err and "weights_only=False" not in err
    assert main(["inspect", url, "--trust-pickle", *cli_options(store)]) == 0


def test_convert_of_a_file_it_must_trust_needs_the_opt_in_and_then_keeps_the_objects(store, capsys):
    url = put(store, "custom.pt", torch_bytes({"w": torch.ones(2), "cfg": Registered(3)}))
    opts = store.storage_options
    with pytest.raises(ckptstore.UnsafeCheckpointError, match="weights_only=False"):
        convert(url, store.join("copy.pt"), storage_options=opts)
    assert main(["convert", url, store.join("copy.pt"), *cli_options(store)]) == 1
    assert "ckptstore convert --trust-pickle" in capsys.readouterr().err
    convert(url, store.join("copy.pt"), storage_options=opts, weights_only=False)
    assert ckptstore.load(store.join("copy.pt"), weights_only=False, storage_options=opts)["cfg"].value == 3


# -- what the caller passes to load reaches every file it reads: map_location, weights_only, mmap, options --


def test_save_writes_the_format_its_extension_names(store):
    """``.safetensors``: a file stock safetensors reads; anything else: a torch.save file."""
    storage = open_storage(store.url, store.storage_options)
    ckptstore.save(STATE, store.join("w.safetensors"), storage_options=store.storage_options)
    assert same(safetensors.torch.load(storage.read("w.safetensors")), STATE)
    ckptstore.save(STATE, store.join("w.bin"), storage_options=store.storage_options)
    assert same(torch.load(io.BytesIO(storage.read("w.bin")), weights_only=True), STATE)


def file_of_kind(store, kind: str) -> str:
    """A file holding ``STATE``: a stock safetensors file, one ckptstore wrote (with its state
    tree), a torch file, or a Hugging Face sharded folder of either format."""
    if kind == "stock.safetensors":
        return put(store, "stock.safetensors", safetensors.torch.save(STATE))
    if kind == "tree.safetensors":
        ckptstore.save(STATE, store.join("tree.safetensors"), storage_options=store.storage_options)
        return store.join("tree.safetensors")
    if kind == "torch":
        return put(store, "w.pt", torch_bytes(STATE))
    sharded(store, kind.removeprefix("sharded-"))
    return store.join("hf")


@pytest.mark.parametrize("kind, mmap", [("stock.safetensors", False), ("tree.safetensors", False), ("torch", False),
                                        ("torch", True), ("sharded-safetensors", False), ("sharded-torch", True)])
def test_load_puts_tensors_where_map_location_says_in_every_format(store, kind, mmap):
    url = file_of_kind(store, kind)
    for map_location, device in [("meta", "meta"), ({"cpu": "meta"}, "meta"), ({"cuda:0": "meta"}, "cpu")]:
        loaded = ckptstore.load(url, map_location=map_location, mmap=mmap, storage_options=store.storage_options)
        assert {t.device.type for t in loaded.values()} == {device}, map_location


def file_mapped(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory is a mapping of a file (what mmap=True promises), from /proc/self/maps."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= ptr < high:
                return len(fields) == 6 and fields[5].startswith("/")
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("kind", ["torch", "sharded-torch"])
def test_mmap_maps_the_tensors_of_a_file_on_any_store_and_of_every_shard(store, kind):
    url = file_of_kind(store, kind)
    mapped = ckptstore.load(url, mmap=True, storage_options=store.storage_options)
    owned = ckptstore.load(url, storage_options=store.storage_options)
    assert all(file_mapped(t) for t in mapped.values()) and not any(file_mapped(t) for t in owned.values())


class Trusted:
    """A pickled object that only ``weights_only=False`` loads."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_weights_only_false_loads_pickled_objects_from_a_file_and_from_every_shard(store, mmap):
    url = put(store, "trusted.pt", torch_bytes({"w": torch.ones(2), "obj": Trusted(7)}))
    assert ckptstore.load(url, weights_only=False, mmap=mmap, storage_options=store.storage_options)["obj"].value == 7
    put(store, "hf/pytorch_model-00001-of-00002.bin", torch_bytes({"a": Trusted(1)}))
    put(store, "hf/pytorch_model-00002-of-00002.bin", torch_bytes({"b": Trusted(2)}))
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    put(store, "hf/pytorch_model.bin.index.json", json.dumps(index).encode())
    loaded = ckptstore.load(store.join("hf"), weights_only=False, mmap=mmap, storage_options=store.storage_options)
    assert {k: v.value for k, v in loaded.items()} == {"a": 1, "b": 2}
    with pytest.raises(UnsafeCheckpointError):
        ckptstore.load(store.join("hf"), mmap=mmap, storage_options=store.storage_options)


class LockedMemoryFileSystem(MemoryFileSystem):
    """``memory://`` behind a token: a store that cannot be opened without its storage_options."""

    protocol = ("lockedmem",)
    store: ClassVar[dict] = {}  # its own files, apart from memory://'s (a class-level dict there too)
    pseudo_dirs: ClassVar[list[str]] = [""]

    def __init__(self, token: str | None = None, **kwargs) -> None:
        if token != "open sesame":
            raise PermissionError("lockedmem:// takes storage_options={'token': ...}")
        super().__init__(**kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("lockedmem://", "memory://", 1) if isinstance(path, str) else path)


@pytest.fixture
def locked_store(monkeypatch):
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "lockedmem", LockedMemoryFileSystem)
    monkeypatch.setattr(LockedMemoryFileSystem, "store", {})
    monkeypatch.setattr(LockedMemoryFileSystem, "pseudo_dirs", [""])
    return SimpleNamespace(url="lockedmem://run", storage_options={"token": "open sesame"},
                           join=lambda *parts: "/".join(["lockedmem://run", *parts]))


def test_storage_options_reach_every_file_that_save_verify_and_load_open(locked_store):
    store, opts = locked_store, locked_store.storage_options
    url = store.join("w.safetensors")
    ckptstore.save(STATE, url, storage_options=opts)
    files.verify(url, storage_options=opts)
    assert same(ckptstore.load(url, storage_options=opts), STATE)
    everything = sharded(store, "safetensors")
    assert same(ckptstore.load(store.join("hf/model.safetensors.index.json"), storage_options=opts), everything)
    with pytest.raises(StorageError, match="lockedmem:// takes storage_options"):
        ckptstore.load(url)  # the options are what open the store
    # a checkpoint folder and a sharded folder, planned: the manifest probe and the file beside it
    info = ckptstore.CheckpointManager(store.join("ck"), storage_options=opts).save({"model": STATE}, step=1)
    for where in (info.url, store.join("hf")):
        assert describe(where, opts)["tensors"]
    target = {k: torch.zeros_like(v) for k, v in STATE.items()}
    assert ckptstore.load_partial(info.url, target, storage_options=opts).loaded == ["b", "w"]
    assert ckptstore.load_partial(store.join("hf"), {"head.weight": torch.zeros(4, 16)}, storage_options=opts).loaded
