"""The single-file API on every store: save with a chosen format, exists, delete (issue 16, point 3).

Integrations (Lightning's CheckpointIO, say) need these without dropping to fsspec and
repeating the storage options.
"""

from __future__ import annotations

import pytest
import torch
import safetensors.torch

import ckptstore
from ckptstore.errors import ConfigError

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}


@pytest.mark.parametrize("format", ["safetensors", "torch"])
def test_format_is_the_callers_choice_whatever_the_name(store, format):
    url = store.join("weights.bin")
    ckptstore.save(STATE, url, format=format, storage_options=store.storage_options)
    head = store.filesystem().cat_file(store.path("weights.bin"), start=0, end=2)
    assert (head == b"PK") is (format == "torch")  # a torch zip starts with PK, safetensors with its header length
    if format == "safetensors":  # stock safetensors reads it
        assert safetensors.torch.load(store.filesystem().cat_file(store.path("weights.bin"))).keys() == {"w", "b"}
    got = ckptstore.load(url, storage_options=store.storage_options)
    assert got.keys() == STATE.keys()
    for key, tensor in STATE.items():
        assert torch.equal(got[key], tensor) and got[key].dtype == tensor.dtype


def test_unknown_format_is_refused_before_anything_is_written(store):
    with pytest.raises(ConfigError, match=r"^unknown format 'pickle'; choose one of \['safetensors', 'torch'\]$"):
        ckptstore.save(STATE, store.join("w.pt"), format="pickle", storage_options=store.storage_options)
    assert not ckptstore.exists(store.join("w.pt"), storage_options=store.storage_options)


def test_exists_and_delete_one_file(store):
    opts = store.storage_options
    url, other = store.join("a", "w.pt"), store.join("a", "keep.pt")
    assert ckptstore.exists(url, storage_options=opts) is False
    ckptstore.delete(url, storage_options=opts)  # nothing there: fine, as a retried delete must be
    ckptstore.save(STATE, url, storage_options=opts)
    ckptstore.save(STATE, other, storage_options=opts)
    assert ckptstore.exists(url, storage_options=opts) is True
    ckptstore.delete(url, storage_options=opts)
    assert ckptstore.exists(url, storage_options=opts) is False
    assert ckptstore.exists(other, storage_options=opts) is True  # only the file asked for
    ckptstore.delete(store.join("a", "never-written.pt"), storage_options=opts)  # missing, in a folder that exists: fine
    assert ckptstore.exists(other, storage_options=opts) is True
    assert ckptstore.exists(store.join("a"), storage_options=opts) is False  # a folder is not a file


def test_delete_refuses_a_folder_and_keeps_its_files(store):
    opts = store.storage_options
    ckptstore.save(STATE, store.join("run", "w.pt"), storage_options=opts)
    with pytest.raises(ConfigError) as err:
        ckptstore.delete(store.join("run"), storage_options=opts)
    assert str(err.value) == f"{store.join('run')} is a folder; ckptstore.delete removes one file"
    assert ckptstore.exists(store.join("run", "w.pt"), storage_options=opts)
