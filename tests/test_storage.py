"""FsspecStorage's own promises, on every store."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from ckptstore.errors import StorageError
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


@pytest.mark.remote
def test_an_unreachable_endpoint_is_a_storage_error():
    """botocore's EndpointConnectionError is no OSError; it still becomes a one-line StorageError.

    (gcsfs raises aiohttp's ClientConnectorError, an OSError, after six hard-coded retries,
    30-70 s, so it is left out here; the same clause handles it.)
    """
    pytest.importorskip("s3fs")
    from ckptstore import CheckpointManager, StorageError

    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageError, match=r"cannot reach .*127\.0\.0\.1:9.*check the URL, the endpoint and the network"):
        CheckpointManager("s3://bucket/run", storage_options=options)


def test_read_many_leaves_out_files_deleted_since_they_were_listed(store):
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    storage.write_new("a.json", b"a")
    storage.write_new("b.json", b"b")
    listed = sorted(storage.list_files())
    storage.delete("a.json")  # another process prunes between our listing and our read
    assert storage.read_many(listed) == {"b.json": b"b"}


def test_a_range_past_the_end_of_a_file_names_the_file(store):
    """A file shorter than its plan (truncated since) is a clear error that says which file."""
    from ckptstore import StorageError

    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    storage.write_new("short.bin", b"x" * 10)
    with pytest.raises(StorageError, match=r"read 6 bytes for \[4, 20\) from .*short\.bin: the file is shorter than expected"):
        storage.read_ranges("short.bin", [(0, 4), (4, 20)])


def test_ranges_of_a_missing_file_say_it_does_not_exist(store):
    from ckptstore import CheckpointNotFound

    storage = open_storage(store.url, store.storage_options)
    with pytest.raises(CheckpointNotFound, match=r"nope\.bin does not exist$"):
        storage.read_ranges("nope.bin", [(0, 4), (8, 12)])


def test_an_empty_range_is_empty_on_every_store(store):
    """S3 answers a request for zero bytes with the whole object: an empty range never asks."""
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    storage.write_new("f.bin", b"0123456789")
    assert storage.read("f.bin", 4, 4) == b"" and storage.read("f.bin", 4, 6) == b"45"


@pytest.mark.parametrize("info, expected", [
    ({"mtime": 5.0, "updated": "2000-01-01T00:00:00Z"}, 5.0),
    ({"LastModified": datetime(2026, 1, 2, tzinfo=timezone.utc)}, 1767312000.0),
    ({"updated": "2026-01-02T00:00:00Z"}, 1767312000.0),
    ({"created": 7}, 7.0),
    ({}, 0.0),
], ids=["local", "s3", "gcs-iso-string", "memory", "unknown"])
def test_a_listing_entry_s_age_is_read_whatever_the_store_calls_it(info, expected):
    """Each store names and types the modification time its own way; an unknown one is "old"."""
    from ckptstore.storage import _mtime

    assert _mtime(info) == expected


def test_the_transfers_asked_for_are_the_ones_used(store):
    from ckptstore import Transfers

    mine = Transfers(part_bytes=6 * 2**20, in_flight=2)
    assert open_storage(store.url, store.storage_options, mine).transfers is mine
    assert open_storage(store.url, store.storage_options).transfers == Transfers()


def test_version_tells_one_write_of_a_file_from_the_next(store):
    """The export record relies on it: same size, same call twice -> same token; a rewrite -> a new one."""
    storage = open_storage(store.url, store.storage_options)
    published: list[str] = []
    with storage.open_write("f.bin", published=published) as f:
        f.write(b"a" * 100)
    first = storage.version("f.bin")
    assert published == [first] and storage.version("f.bin") == first
    time.sleep(0.01)  # mtime resolution on local disks
    with storage.open_write("f.bin", published=published) as f:
        f.write(b"b" * 100)  # the same size
    assert published[1] == storage.version("f.bin") != first


@pytest.mark.parametrize("path", ["C:", "a//b", "a/", "../x", "/x", "~/x", "s3://b/x", "a\\b", "step\x00_1", "a/./b"])
def test_a_path_that_is_not_plainly_below_the_root_is_refused(path):
    from ckptstore import InvalidNameError
    from ckptstore.storage import check_relative_path

    with pytest.raises(InvalidNameError) as err:
        check_relative_path(path)
    assert str(err.value) == (f"path {path!r} must be relative to the checkpoint root, without '..', a leading '/', a URL "
                              "scheme or empty segments; use a plain name like 'step_00000010'")


@pytest.mark.parametrize("path", [5, "", None])
def test_a_path_that_is_not_a_string_is_refused(path):
    from ckptstore import InvalidNameError
    from ckptstore.storage import check_relative_path

    with pytest.raises(InvalidNameError) as err:
        check_relative_path(path)  # type: ignore[arg-type]
    assert str(err.value) == f"path {path!r} must be a non-empty string"


def _refuse(*args, **kwargs):
    raise PermissionError(13, "injected refusal")


@pytest.mark.parametrize(("call", "fs_method", "op", "where"), [
    (lambda s: s.list_files(), "find", "list", ""),
    (lambda s: s.read_many(["a/manifest.json", "b/manifest.json"]), "cat_ranges", "read", "a/manifest.json"),
    (lambda s: s.check_not_a_file(), "isfile", "reach", ""),
])
def test_a_refused_call_names_what_it_did_and_where(store, monkeypatch, call, fs_method, op, where):
    """Each store call's error says which operation failed on which URL (the user's way to the cause)."""
    storage = open_storage(store.url, store.storage_options)
    monkeypatch.setattr(storage.fs, fs_method, _refuse)
    with pytest.raises(StorageError) as err:
        call(storage)
    assert str(err.value) == (f"cannot {op} {storage.url(where)}: access denied ([Errno 13] injected refusal); check the credentials "
                              "(environment or storage_options) and the bucket policy")


@pytest.mark.parametrize(("call", "op", "where"), [
    (lambda s: s.write_new("X/manifest.json", b"{}"), "write", "X/manifest.json"),
    (lambda s: s.delete("X/state-01234567.pt"), "delete", "X/state-01234567.pt"),
    (lambda s: open_storage(s.url("X/run")).makedirs(), "write", "X/run"),
])
def test_a_file_in_the_way_on_a_local_disk_is_named(tmp_path, call, op, where):
    storage = open_storage(str(tmp_path))
    (tmp_path / "X").write_bytes(b"a file where a folder should be")
    with pytest.raises(StorageError) as err:
        call(storage)
    assert str(err.value) == f"cannot {op} {storage.url(where)}: part of the path is a file, not a folder; fix the path"
