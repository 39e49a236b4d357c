"""dtypes, odd shapes, devices and map_location, in both formats."""

from __future__ import annotations

import io
import json
import uuid

import crc32c
import pytest
import torch

from ckptstore import CheckpointManager, LoadReport, UnsupportedValueError
from ckptstore.safetensors_header import DTYPE_CODES
from ckptstore.serializers import STAGING_BYTES, ChecksumWriter, place
from ckptstore.storage import open_storage
from ckptstore.transfer import SourceTensor, Transfer

FORMATS = ["safetensors", "torch"]
FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, *FLOAT8]


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    values = torch.linspace(-3, 3, steps=int(torch.tensor(shape).prod())).reshape(shape)
    return values.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_and_odd_shapes(fmt):
    mgr = CheckpointManager(f"memory://dtypes-{uuid.uuid4().hex}", format=fmt)
    state = {str(d): sample(d) for d in DTYPES}
    state.update({"zero_d": torch.tensor(7, dtype=torch.int64), "empty": torch.empty(0, 3, dtype=torch.bfloat16),
                  "strided": torch.arange(20.0).reshape(4, 5).t(), "view": torch.arange(10.0)[2:7]})
    mgr.save(state, step=0)
    back = mgr.restore()
    for key, t in state.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape, key
        as_bits = (lambda x: x.view(torch.uint8)) if t.dtype in FLOAT8 else (lambda x: x)  # float8 has no equal()
        assert torch.equal(as_bits(back[key]), as_bits(t)), key


def test_float8_has_a_safetensors_code():
    assert all(d in DTYPE_CODES for d in FLOAT8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_meta_tensors_are_refused(fmt):
    mgr = CheckpointManager(f"memory://meta-{uuid.uuid4().hex}", format=fmt)
    with pytest.raises(UnsupportedValueError, match="meta"):
        mgr.save({"model": torch.nn.Linear(2, 2, device="meta")}, step=0)
    assert mgr.checkpoints() == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda t, loc: t])
def test_map_location_forms(fmt, map_location):
    mgr = CheckpointManager(f"memory://map-{uuid.uuid4().hex}", format=fmt)
    mgr.save({"w": torch.ones(2)}, step=0)
    assert mgr.restore(map_location=map_location)["w"].device.type == "cpu"


def test_saved_device_is_recorded_and_remapped(tmp_path):
    """The skeleton records each tensor's device; map_location remaps it as torch.load would."""
    from safetensors import safe_open

    mgr = CheckpointManager(tmp_path)
    info = mgr.save({"w": torch.ones(2)}, step=0)
    with safe_open(str(tmp_path / info.name / info.files[0].path), "pt") as f:
        assert json.loads(f.metadata()["ckptstore.tree"])["w"] == {"__tensor__": "w", "device": "cpu"}
    assert place(torch.ones(1), "cuda:1", {"cuda:1": "cpu"}).device.type == "cpu"
    seen = []
    place(torch.ones(1), "cuda:1", lambda t, loc: seen.append(loc) or t)
    assert seen == ["cuda:1"]
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            place(torch.ones(1), "cuda:1", None)  # as torch.load without map_location on a CPU machine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_tensors_go_through_the_staging_buffer(fmt):
    mgr = CheckpointManager(f"memory://cuda-{uuid.uuid4().hex}", format=fmt)
    w = torch.randn(5 * 2**20 + 5, device="cuda")  # > one 16 MiB staging chunk
    mgr.save({"w": w}, step=0)
    assert torch.equal(mgr.restore()["w"], w)
    assert mgr.restore(map_location="cpu")["w"].device.type == "cpu"


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device: it drives the device paths (a transfer's
    os.pread and alternating staging buffers, a writer's staging buffer) on a machine without
    one, where the bytes can be checked. Only CUDA's events and pinned memory stay untested."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def test_the_device_path_lands_every_byte_through_the_staging_buffers(store):
    data = bytes(range(256)) * 1024  # 256 KiB, after a 16-byte "header"
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    with storage.open_write("x.bin") as f:
        f.write(b"h" * 16 + data)
    dest = torch.zeros(len(data), dtype=torch.uint8).as_subclass(OnAnotherDevice)
    transfer = Transfer(storage, "x.bin", 2**16, LoadReport())  # 64 KiB chunks: four copies, two buffers
    transfer.run([(SourceTensor("x", torch.uint8, (len(data),), 16, 16 + len(data)), dest)])
    assert bytes(dest.as_subclass(torch.Tensor).numpy()) == data
    assert transfer._copies == 4 and len(transfer._staging) == 2


def test_tensors_off_the_cpu_are_written_through_one_reusable_staging_buffer():
    t = torch.arange(STAGING_BYTES // 4 + 3, dtype=torch.float32)  # one 16 MiB staging chunk and 12 bytes
    expected = t.numpy().tobytes()
    out = io.BytesIO()
    writer = ChecksumWriter(out)
    writer.write_tensor(t.as_subclass(OnAnotherDevice))
    assert out.getvalue() == expected and (writer.size, writer.crc) == (len(expected), crc32c.crc32c(expected))
    staging = writer._staging
    assert staging is not None and staging.dtype == torch.uint8 and staging.numel() == STAGING_BYTES
    assert staging.is_pinned() == torch.cuda.is_available()
    writer.write_tensor(torch.ones(2).as_subclass(OnAnotherDevice))
    assert writer._staging is staging  # one buffer per file
