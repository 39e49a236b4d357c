"""FsspecStorage's own promises, on every store."""

from __future__ import annotations

import pytest

from ckptstore.storage import open_storage


def test_a_failed_write_publishes_nothing_and_keeps_the_old_file(store):
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    with storage.open_write("f.bin") as f:
        f.write(b"old")
    with pytest.raises(RuntimeError, match="mid-write"), storage.open_write("f.bin") as f:
        f.write(b"new and partial")
        assert storage.read("f.bin") == b"old"  # not visible while being written
        raise RuntimeError("mid-write")
    assert storage.read("f.bin") == b"old"
    with pytest.raises(RuntimeError), storage.open_write("g.bin") as f:
        f.write(b"partial")
        raise RuntimeError
    assert not storage.exists("g.bin")
