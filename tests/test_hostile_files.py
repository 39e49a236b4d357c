"""Hostile and broken files end in a clean ckptstore error: never a crash, a hang, or a huge allocation."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import uuid
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore import CkptStoreError, CorruptCheckpointError, UnsafeCheckpointError
from ckptstore.storage import open_storage
from test_foreign_files import put


def load_bytes(data: bytes, name: str = "f.safetensors", **kwargs):
    storage = open_storage(f"memory://hostile-{uuid.uuid4().hex}")
    with storage.open_write(name) as f:
        f.write(data)
    try:
        return ckptstore.load(storage.url(name), **kwargs)
    finally:
        storage.fs.rm(storage.root, recursive=True)


def header_file(doc: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD = header_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "too short"),
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 2**62) + b"{}", "over the"),
        (struct.pack("<Q", 1000) + b"{}", "truncated"),
        (header_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "data section is 4"),
        (header_file({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8), "needs"),
        (header_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**60]}}, b"\0" * 8), "needs"),
        (header_file({"w": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
        (header_file({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "invalid shape"),
        (header_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "needs"),
        (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlaps"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (header_file([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        (header_file({"__metadata__": {"ckptstore.tree": "{bad"}}), "skeleton is not valid JSON"),
        (header_file({"__metadata__": {"ckptstore.tree": '{"x": {"__tensor__": "nope"}}'}}), "lacks"),
        (header_file({"__metadata__": {"k": 1}}), "__metadata__"),
    ],
)
def test_broken_safetensors_files(data, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        load_bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_safetensors_files_end_in_clean_errors(data):
    """Mutate a valid file (flip, cut, splice): every outcome is a value or a CkptStoreError."""
    blob = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if op == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        elif op == "insert":
            i = data.draw(st.integers(0, len(blob)))
            blob[i:i] = data.draw(st.binary(max_size=16))
        else:
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    with contextlib.suppress(CkptStoreError):
        load_bytes(bytes(blob))


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "??"]),
    shape=st.lists(st.integers(-1, 2**33), max_size=4),
    offsets=st.lists(st.integers(-1, 2**40), min_size=0, max_size=3),
    data_len=st.integers(0, 64),
)
def test_fuzzed_safetensors_headers(dtype, shape, offsets, data_len):
    """Arbitrary tensor entries: the validator refuses before allocating what the header claims."""
    blob = header_file({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, b"\0" * data_len)
    try:
        value = load_bytes(blob)
    except CkptStoreError:
        return
    assert value["t"].numel() * value["t"].element_size() <= data_len


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_torch_file_with_arbitrary_globals_is_refused(capsys):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1), "evil": Evil()}, buf)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        load_bytes(buf.getvalue(), "model.pt")
    assert "pwned" not in capsys.readouterr().out


class MakesADirectory:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_a_checkpoint_whose_pickle_calls_a_function_is_refused_by_restore_without_calling_it(store, tmp_path):
    """Someone with write access to the bucket replaces a checkpoint (data file and a matching
    manifest) with one whose data.pkl calls ``os.mkdir``. ``restore`` plans the file with the
    restricted unpickler, then reads it whole with ``weights_only=True``: refused, never called."""
    import crc32c

    mgr = ckptstore.CheckpointManager(store.url, storage_options=store.storage_options, format="torch")
    info = mgr.save({"model": {"w": torch.ones(2)}}, step=1)
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "hook": MakesADirectory(str(tmp_path / "pwned"))}, buf)
    data = buf.getvalue()
    storage = open_storage(info.url, store.storage_options)
    manifest = json.loads(storage.read("manifest.json"))
    manifest["files"][0].update(size=len(data), crc32c=f"{crc32c.crc32c(data):08x}")
    put(store, f"{info.name}/{info.files[0].path}", data)
    storage.fs.pipe_file(storage._full("manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        mgr.restore({"model": {"w": torch.zeros(2)}})
    assert not (tmp_path / "pwned").exists()


def test_torch_file_with_os_system_in_its_pickle_is_refused():
    """A hand-made zip whose data.pkl calls os.system: refused before any import or call."""
    buf = io.BytesIO()
    payload = b"cos\nsystem\n(S'echo pwned'\ntR."
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    with pytest.raises(UnsafeCheckpointError):
        load_bytes(buf.getvalue(), "model.pt")


@pytest.mark.parametrize("data, match", [
    (b"", r"model\.pt is neither a torch file nor a safetensors file \(it is empty\)"),
    (b"PK\x03\x04garbage", r"model\.pt is not a readable torch file: .*not a ZIP archive"),
    (pickle.dumps({"a": 1})[:5], r"model\.pt is neither a torch file nor a safetensors file \(it is a pickle that is not a torch file\)"),
    (b"\0" * 100, r"model\.pt is neither a torch file nor a safetensors file \(it starts with 0000000000000000\)"),
], ids=["empty", "cut-zip", "cut-pickle", "zeros"])
def test_broken_torch_files(data, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        load_bytes(data, "model.pt")


def load_error(store, url: str, **kwargs) -> str:
    with pytest.raises(CkptStoreError) as err:
        ckptstore.load(url, storage_options=store.storage_options, **kwargs)
    return f"{type(err.value).__name__}: {err.value}"


def test_broken_safetensors_files_are_named_with_what_is_wrong(store):
    """The whole message, URL included: it is all the user has to find the file."""
    cases = {
        "two.safetensors": (b"\x01\x02", "{url} is 2 bytes, too short for a safetensors header"),
        "eight.safetensors": (struct.pack("<Q", 2), "{url} claims a 2-byte header but the file is 8 bytes (truncated?)"),
        "json.safetensors": (struct.pack("<Q", 4) + b"{x}}", "{url}: the safetensors header is not valid JSON (Expecting "
                                                             "property name enclosed in double quotes: line 1 column 2 (char 1))"),
    }
    for name, (data, message) in cases.items():
        url = put(store, name, data)
        assert load_error(store, url) == "CorruptCheckpointError: " + message.format(url=url)


def raise_unpickling_error(text: str) -> None:
    raise pickle.UnpicklingError(text)


class FailsToUnpickle:
    """A trusted pickle whose own code fails, in words that mention weights_only."""

    def __reduce__(self):
        return (raise_unpickling_error, ("this object has no weights_only form",))


def test_torch_files_that_cannot_be_unpickled_say_whether_trusting_them_would_help(store):
    """Refused under weights_only: "pass weights_only=False". Broken, or failing once trusted: corrupt,
    never advice to pass what the caller passed already."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1), "evil": Evil()}, buf)
    url = put(store, "evil.pt", buf.getvalue())
    assert load_error(store, url) == (
        f"UnsafeCheckpointError: {url} holds pickled objects beyond tensors and plain containers; loading them runs "
        "arbitrary code. If you trust this file, pass weights_only=False")
    buf = io.BytesIO()
    torch.save({"obj": FailsToUnpickle()}, buf)
    url = put(store, "fails.pt", buf.getvalue())
    assert load_error(store, url, weights_only=False) == (
        f"CorruptCheckpointError: {url} is not a readable torch file: this object has no weights_only form")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    url = put(store, "garbage.pt", buf.getvalue())
    assert load_error(store, url, weights_only=False) == (
        f"CorruptCheckpointError: {url} is not a readable torch file: pickle data was truncated")
