"""Whole training state through both formats: every value type, tied weights, stock readers."""

from __future__ import annotations

import io
import json
import math
import random
import uuid
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ckptstore import UnsupportedValueError
from ckptstore import tree as treelib
from ckptstore.serializers import ChecksumWriter, Source, get_format
from ckptstore.storage import open_storage

FORMATS = ["safetensors", "torch"]


def roundtrip(value, fmt_name):
    """Write ``value`` to a memory:// file and read it back; return (value, file bytes)."""
    fmt = get_format(fmt_name)
    storage = open_storage(f"memory://roundtrip-{uuid.uuid4().hex}")
    with storage.open_write("f") as raw:
        out = ChecksumWriter(raw)
        fmt.write(treelib.canonicalize(value), out)
    tree = fmt.read(Source(storage, "f", out.size), None, True, out.crc)
    data = storage.read("f")
    storage.fs.rm(storage.root, recursive=True)
    return treelib.decanonicalize(tree), data


def nested_state():
    return {
        "ints": [0, -1, 2**62, True, False, None],
        "floats": (0.5, math.inf, -math.inf, 1e-300),
        "strings": {"a": "héllo", "__dunder__": "kept", "": "empty key"},
        "int_keys": {0: "zero", 1: {"deep": [torch.arange(3)]}, (1, "t"): 2.5},
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "np": np.arange(6, dtype=np.int32).reshape(2, 3),
        "np_scalar": np.float64(2.0),
        "dtypes": {str(d): torch.ones(2, dtype=d) for d in (torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                                            torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)},
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_values_roundtrip(fmt):
    state = nested_state()
    back, _ = roundtrip(state, fmt)
    expected = dict(state, np_scalar=2.0)
    assert_same(expected, back)
    nan_back, _ = roundtrip({"x": math.nan}, fmt)
    assert math.isnan(nan_back["x"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_scheduler_and_rng_roundtrip(fmt):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    random.seed(7)
    np.random.seed(7)
    from ckptstore import RNGState

    back, _ = roundtrip({"opt": opt, "sched": sched, "rng": RNGState()}, fmt)
    assert_same(opt.state_dict(), back["opt"])
    assert isinstance(back["opt"]["state"][0]["step"], torch.Tensor)  # Adam's step tensors survive
    assert back["sched"] == sched.state_dict()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    RNGState().load_state_dict(back["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_weights_saved_once_restored_tied(fmt):
    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    back, data = roundtrip({"model": model}, fmt)
    sd = back["model"]
    assert sd["emb.weight"] is sd["head.weight"] or sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    assert len(data) < 1.5 * emb.weight.nbytes  # stored once, not twice


def test_safetensors_opens_with_stock_safe_open(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    _, data = roundtrip({"model": model, "epoch": 3}, "safetensors")
    path = tmp_path / "state.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        loaded = {k.removeprefix("model/"): f.get_tensor(k) for k in f.keys() if k.startswith("model/")}  # noqa: SIM118 (safe_open, not a dict)
        skeleton = json.loads(f.metadata()["ckptstore.tree"])
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    fresh.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert skeleton["epoch"] == 3


def test_torch_opens_with_stock_weights_only_load():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, data = roundtrip({"model": model, "optimizer": opt, "epoch": 3}, "torch")
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(ckpt["model"])
    assert torch.equal(fresh.weight, model.weight) and ckpt["epoch"] == 3


def test_safetensors_bytes_are_the_stock_librarys():
    """Golden bytes: a plain state_dict is byte-identical to safetensors.torch.save's output."""
    import safetensors.torch

    weights = {"w": torch.tensor([1.0, 2.0])}
    out = io.BytesIO()
    get_format("safetensors").write_plain(weights, ChecksumWriter(out))
    golden = (
        b"X\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   '
        b"\x00\x00\x80?\x00\x00\x00@"
    )
    assert out.getvalue() == golden
    assert golden == safetensors.torch.save(weights, metadata={"format": "pt"})
    out = io.BytesIO()  # a state tree: its skeleton as compact JSON beside "format": "pt" (what transformers checks)
    writer = ChecksumWriter(out)
    get_format("safetensors").write(treelib.canonicalize({"w": weights["w"], "n": 1}), writer)
    assert out.getvalue() == (
        b"\xa8\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"format":"pt","ckptstore.tree":"{\\"w\\":{\\"__tensor__\\":\\"w\\",\\"device\\":\\"cpu\\"},\\"n\\":1}"},'
        b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}      '
        b"\x00\x00\x80?\x00\x00\x00@"
    )
    assert writer._staging is None  # CPU tensors are written from their own memory, never staged
    _, skeleton = treelib.flatten({"w": weights["w"], "n": 1})
    assert skeleton == {"w": {"__tensor__": "w", "device": "cpu"}, "n": 1}


@pytest.mark.parametrize(
    "value, match",
    [
        ({"obj": object()}, r"state\['obj'\] is a builtins.object"),
        ({"m": torch.empty(2, device="meta")}, "meta"),
        ({"k": {frozenset(): 1}}, "key of type frozenset"),
        ({"s": np.array(["a"])}, "numpy array of dtype <U1"),
    ],
)
def test_unsupported_values_are_refused_before_writing(value, match):
    with pytest.raises(UnsupportedValueError, match=match):
        treelib.canonicalize(value)


def test_ordered_dict_keeps_its_type_in_torch_format():
    back, _ = roundtrip({"sd": OrderedDict(a=torch.ones(1))}, "torch")
    assert isinstance(back["sd"], OrderedDict)
