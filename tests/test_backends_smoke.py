"""The fixtures work, and the backend behaviour ckptstore relies on (or must work around) is pinned.

Raw fsspec only, no ckptstore import. Each expectation table below is what the installed
versions actually do (see docs/backend-notes.md); a change in s3fs, gcsfs, moto or the emulator
that alters one of them makes a test fail on purpose.
"""

from __future__ import annotations

import errno
import hashlib
import urllib.request
import uuid

import fsspec
import pytest

from conftest import ALL_KINDS, S3_KEY, S3_SECRET, Store

DATA = b"0123456789"
KiB, MiB = 2**10, 2**20


def open_root(store: Store) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(store.url, **store.storage_options)
    if store.kind in ("local", "file"):
        fs.makedirs(root, exist_ok=True)  # LocalFileSystem does not create parents (auto_mkdir=False)
    return fs, root.rstrip("/")


# ---------------------------------------------------------------- the fixtures themselves


def test_store_is_fresh_empty_and_reachable(store):
    assert store.kind in ALL_KINDS
    scheme = {"local": "/", "file": "file://", "memory": "memory://", "s3": "s3://", "gcs": "gs://"}[store.kind]
    assert store.url.startswith(scheme)
    assert isinstance(store.storage_options, dict)
    fs, root = fsspec.core.url_to_fs(store.url, **store.storage_options)
    assert fs.find(root) == []
    if store.kind in ("s3", "gcs"):
        bucket = root.split("/")[0]
        assert fs.exists(bucket)
    if store.kind == "gcs":
        import gcsfs

        assert type(fs) is gcsfs.core.GCSFileSystem  # not the gRPC-probing ExtendedGcsFileSystem
    assert store.path("a", "b") == f"{root.rstrip('/')}/a/b"
    assert store.join("x") == f"{store.url}/x"


@pytest.mark.parametrize("n", range(2))
def test_each_test_gets_a_clean_slate(store, n):
    """Run twice per backend: the second run must not see the first run's object."""
    fs, root = open_root(store)
    assert fs.find(root) == []
    fs.pipe_file(f"{root}/leftover", b"x")
    if store.kind == "s3":
        assert len(fs.ls("", detail=False, refresh=True)) == 1  # moto was reset: only this test's bucket
    if store.kind == "gcs":
        assert len(fs.ls("", detail=False, refresh=True)) == 1  # emulator wiped


def test_roundtrip_listing_and_info(store):
    fs, root = open_root(store)
    if store.kind in ("local", "file"):
        fs.makedirs(f"{root}/sub", exist_ok=True)
    fs.pipe_file(f"{root}/a.bin", DATA)
    fs.pipe_file(f"{root}/sub/b.bin", b"b")
    assert fs.cat_file(f"{root}/a.bin") == DATA
    assert fs.info(f"{root}/a.bin")["size"] == len(DATA)
    assert fs.info(f"{root}/a.bin")["type"] == "file"
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/a.bin", f"{root}/sub"]
    assert fs.find(root) == [f"{root}/a.bin", f"{root}/sub/b.bin"]
    assert fs.isdir(f"{root}/sub")


# ---------------------------------------------------------------- a. create-only writes

# s3: IfNoneMatch="*" (moto answers 412 -> FileExistsError). gcs: ifGenerationMatch=0, which the
# emulator ignores, so the second write silently overwrites. local: fsspec's generic pipe_file
# (exists() then write: not atomic). memory: open("xb") (exists() then write).
CREATE_ONLY = {"local": True, "file": True, "memory": True, "s3": True, "gcs": False}


def test_pipe_file_mode_create(store):
    fs, root = open_root(store)
    p = f"{root}/once.bin"
    fs.pipe_file(p, b"first", mode="create")
    if CREATE_ONLY[store.kind]:
        with pytest.raises(FileExistsError):
            fs.pipe_file(p, b"second", mode="create")
        assert fs.cat_file(p) == b"first"
    else:
        fs.pipe_file(p, b"second", mode="create")
        assert fs.cat_file(p) == b"second"


def test_open_xb_is_create_only(store):
    fs, root = open_root(store)
    p = f"{root}/once.bin"
    with fs.open(p, "xb") as f:
        f.write(b"first")
    if CREATE_ONLY[store.kind]:
        with pytest.raises(FileExistsError), fs.open(p, "xb") as f:
            f.write(b"second")
        assert fs.cat_file(p) == b"first"
    else:
        with fs.open(p, "xb") as f:
            f.write(b"second")
        assert fs.cat_file(p) == b"second"


# s3fs commits an *empty* "xb" file with touch(), which sends no IfNoneMatch: not exclusive.
EMPTY_XB_EXCLUSIVE = {"local": True, "file": True, "memory": True, "s3": False, "gcs": False}


def test_open_xb_of_an_empty_file(store):
    fs, root = open_root(store)
    p = f"{root}/empty.bin"
    fs.open(p, "xb").close()
    if EMPTY_XB_EXCLUSIVE[store.kind]:
        with pytest.raises(FileExistsError):
            fs.open(p, "xb").close()
    else:
        fs.open(p, "xb").close()
    # pipe_file(b"", mode="create") does go through put_object with IfNoneMatch on s3
    if CREATE_ONLY[store.kind]:
        with pytest.raises(FileExistsError):
            fs.pipe_file(p, b"", mode="create")


@pytest.mark.slow
def test_multipart_create_only(remote_store):
    """11 MiB in 5 MiB parts: s3fs puts IfNoneMatch on CompleteMultipartUpload; moto honours it."""
    fs, root = open_root(remote_store)
    p = f"{root}/big.bin"
    data = b"a" * (11 * MiB)
    kw = {"chunksize": 5 * MiB} if remote_store.kind == "s3" else {}
    fs.pipe_file(p, data, mode="create", **kw)
    with fs.open(f"{root}/big2.bin", "xb", block_size=5 * MiB) as f:
        f.write(data)
    if CREATE_ONLY[remote_store.kind]:
        with pytest.raises(FileExistsError):
            fs.pipe_file(p, b"b" * (11 * MiB), mode="create", **kw)
        with pytest.raises(FileExistsError), fs.open(f"{root}/big2.bin", "xb", block_size=5 * MiB) as f:
            f.write(b"b" * (11 * MiB))
        assert fs.cat_file(p, start=0, end=1) == b"a"
        assert fs.cat_file(f"{root}/big2.bin", start=0, end=1) == b"a"
        # pipe_file aborts its multipart upload on failure; S3File (open "xb") does not: the refused
        # upload stays pending (and billed, on AWS) until aborted or expired by a lifecycle rule
        pending = fs.call_s3("list_multipart_uploads", Bucket=root.split("/")[0]).get("Uploads", [])
        assert [u["Key"] for u in pending] == [f"{root.split('/', 1)[1]}/big2.bin"]
    else:
        fs.pipe_file(p, b"b" * (11 * MiB), mode="create", **kw)
        assert fs.cat_file(p, start=0, end=1) == b"b"


# ---------------------------------------------------------------- b. ranged reads


def expected_range(kind: str, start: int | None, end: int | None) -> bytes | type[BaseException]:
    size = len(DATA)
    if kind == "s3":
        if start is not None and end is not None and 0 <= start == end:
            return DATA  # "bytes=5-4" is an invalid range: the server ignores it and sends everything
        if start is not None and start >= size and (end is None or end > start):
            return OSError  # 416 InvalidRange -> OSError(EINVAL)
    if kind == "gcs" and start is not None and start < 0 and end is None:
        return DATA  # the emulator ignores suffix ranges ("bytes=-3"); real GCS honours them
    return DATA[start:end]


RANGES = [(2, 5), (None, 3), (0, None), (-3, None), (8, 20), (5, 5), (0, 0), (10, None), (12, 15)]


@pytest.mark.parametrize(("start", "end"), RANGES, ids=[f"{s}:{e}" for s, e in RANGES])
def test_cat_file_range(store, start, end):
    fs, root = open_root(store)
    p = f"{root}/r.bin"
    fs.pipe_file(p, DATA)
    want = expected_range(store.kind, start, end)
    if isinstance(want, bytes):
        assert fs.cat_file(p, start=start, end=end) == want
    else:
        with pytest.raises(want) as info:
            fs.cat_file(p, start=start, end=end)
        assert type(info.value) is OSError and info.value.errno == errno.EINVAL


def test_s3fs_cat_file_positional_args_are_not_start_end(remote_store):
    """s3fs: cat_file(path, version_id=None, start=None, end=None): always pass start=/end= by keyword."""
    fs, root = open_root(remote_store)
    p = f"{root}/r.bin"
    fs.pipe_file(p, DATA)
    if remote_store.kind == "s3":
        import botocore.exceptions

        with pytest.raises(botocore.exceptions.ParamValidationError):
            fs.cat_file(p, 2, 5)  # 2 is taken as VersionId
        assert fs.cat_file(p, None, 3) == DATA[3:]  # start=3, end=None
    else:
        assert fs.cat_file(p, 2, 5) == DATA[2:5]


def test_cat_ranges(store):
    fs, root = open_root(store)
    p, q = f"{root}/p.bin", f"{root}/q.bin"
    fs.pipe_file(p, DATA)
    fs.pipe_file(q, DATA[::-1])
    got = fs.cat_ranges([p, q, p], [0, 1, 8], [2, 4, 20])
    assert got == [b"01", b"876", b"89"]
    # zero-length range: s3 sends the whole object (see test_cat_file_range)
    assert fs.cat_ranges([p], [3], [3]) == ([DATA] if store.kind == "s3" else [b""])
    # a missing path: on_error defaults to "return", so the FileNotFoundError comes back *in the list*
    out = fs.cat_ranges([p, f"{root}/nope"], [0, 0], [2, 2])
    assert out[0] == b"01" and isinstance(out[1], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges([f"{root}/nope"], [0], [2], on_error="raise")


# ---------------------------------------------------------------- c. streaming writes


@pytest.mark.slow
def test_streaming_write_20mib(store):
    fs, root = open_root(store)
    p = f"{root}/stream.bin"
    chunk = bytes(range(256)) * KiB  # 256 KiB
    digest = hashlib.sha256()
    kw = {"block_size": 5 * MiB} if store.kind in ("s3", "gcs") else {}
    with fs.open(p, "wb", **kw) as f:
        for i in range(80):
            piece = chunk[i:] + chunk[:i]
            digest.update(piece)
            f.write(piece)
        if store.kind == "s3":
            assert f.mpu and len(f.parts) >= 3  # multipart upload in 5 MiB parts
        if store.kind == "gcs":
            assert f.location  # resumable upload session
    assert fs.size(p) == 20 * MiB
    assert hashlib.sha256(fs.cat_file(p)).hexdigest() == digest.hexdigest()
    assert fs.cat_file(p, start=10 * MiB, end=10 * MiB + 3) == (chunk[40:] + chunk[:40])[:3]


def test_exception_inside_with_commits_the_partial_object(store):
    """fsspec's __exit__ calls close() whatever happened: a failed write leaves what was written so far."""
    fs, root = open_root(store)
    p = f"{root}/partial.bin"
    with pytest.raises(RuntimeError), fs.open(p, "wb") as f:
        f.write(b"abc")
        raise RuntimeError("boom")
    fs.invalidate_cache()
    assert fs.cat_file(p) == b"abc"


@pytest.mark.slow
def test_exception_mid_multipart_commits_the_parts_written(remote_store):
    fs, root = open_root(remote_store)
    p = f"{root}/partial.bin"
    with pytest.raises(RuntimeError), fs.open(p, "wb", block_size=5 * MiB) as f:
        for _ in range(40):
            f.write(b"z" * (256 * KiB))
        raise RuntimeError("boom")
    assert fs.size(p) == 10 * MiB


# After discard(): does the object exist, and what does a later close() do?
#  s3: nothing is written; close() raises AttributeError (buffer is None): set f.closed = True instead.
#  gcs (small, no resumable session yet): discard() does nothing and close() still uploads.
#  local: needs autocommit=False (temp file + rename); discard() deletes the temp file.
#  memory: the object is in the store from open() on; discard() does nothing.
DISCARD = {"local": (False, False), "file": (False, False), "memory": (True, True), "s3": (False, False), "gcs": (False, True)}


def test_discard(store):
    fs, root = open_root(store)
    p = f"{root}/discarded.bin"
    f = fs.open(p, "wb", autocommit=False) if store.kind in ("local", "file") else fs.open(p, "wb")
    f.write(b"xyz")
    f.discard()
    fs.invalidate_cache()
    after_discard, after_close = DISCARD[store.kind]
    assert fs.exists(p) is after_discard
    if store.kind == "s3":
        with pytest.raises(AttributeError):
            f.close()
        f.closed = True  # else __del__ retries close() and prints "Exception ignored"
    else:
        f.close()
    fs.invalidate_cache()
    assert fs.exists(p) is after_close


# ---------------------------------------------------------------- d. errors


def test_missing_object_errors(store):
    fs, root = open_root(store)
    nope = f"{root}/nope"
    for call in (lambda: fs.cat_file(nope), lambda: fs.info(nope), lambda: fs.ls(nope), lambda: fs.open(nope, "rb"),
                 lambda: fs.rm(nope, recursive=True)):
        with pytest.raises(FileNotFoundError):
            call()
    assert fs.find(nope) == []
    assert fs.exists(nope) is False
    if store.kind == "s3":
        fs.rm_file(nope)  # S3 DELETE is idempotent: no error
        assert fs.rm(nope) == [nope]
    else:
        with pytest.raises(FileNotFoundError):
            fs.rm_file(nope)


def test_missing_bucket_errors(remote_store):
    fs, _ = open_root(remote_store)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    calls = {
        "read": lambda: fs.cat_file(f"{bucket}/x"),
        "info": lambda: fs.info(f"{bucket}/x"),
        "pipe": lambda: fs.pipe_file(f"{bucket}/x", b"1"),
        "ls": lambda: fs.ls(f"{bucket}/"),
        "find": lambda: fs.find(f"{bucket}/"),
    }

    def stream() -> None:
        with fs.open(f"{bucket}/x", "wb") as f:
            f.write(b"1")

    calls["open-wb"] = stream
    if remote_store.kind == "s3":
        calls["info-bucket"] = lambda: fs.info(bucket)
    for name, call in calls.items():
        with pytest.raises(FileNotFoundError):
            call()
            pytest.fail(name)
    assert fs.exists(f"{bucket}/x") is False


@pytest.mark.remote
def test_moto_accepts_any_credentials_unless_auth_is_switched_on(s3_endpoint):
    """moto checks nothing by default; POST /moto-api/reset-auth with a count (0) makes it check (process-wide)."""
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    good = fsspec.filesystem("s3", key=S3_KEY, secret=S3_SECRET, **opts)
    bad = fsspec.filesystem("s3", key="AKIAWRONG", secret="wrong", **opts)
    bucket = f"auth-{uuid.uuid4().hex[:8]}"
    good.mkdir(bucket)
    bad.pipe_file(f"{bucket}/a", b"1")
    assert bad.cat_file(f"{bucket}/a") == b"1"

    def reset_auth(count: str) -> None:
        req = urllib.request.Request(f"{s3_endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    reset_auth("0")
    try:
        bad.invalidate_cache()
        for call in (lambda: bad.cat_file(f"{bucket}/a"), lambda: bad.pipe_file(f"{bucket}/b", b"1"),
                     lambda: bad.info(bucket), lambda: bad.ls(bucket), lambda: bad.exists(f"{bucket}/a")):
            with pytest.raises(PermissionError):
                call()
    finally:
        reset_auth("inf")
    assert good.cat_file(f"{bucket}/a") == b"1"
    good.rm(bucket, recursive=True)


# ---------------------------------------------------------------- e. prefixes and "directories"


# Does "dir/sub" still exist after its last object is deleted? Object stores: no (directories are
# implied by keys). local: yes (a real directory). memory: no, unless created with makedirs (pseudo_dirs).
DIR_SURVIVES = {"local": True, "file": True, "memory": False, "s3": False, "gcs": False}


def test_directories_after_delete_and_recursive_rm(store):
    fs, root = open_root(store)
    d = f"{root}/dir"
    if store.kind in ("local", "file"):
        with pytest.raises(FileNotFoundError):
            fs.pipe_file(f"{d}/sub/b", b"b")  # no parent: local needs makedirs; the others do not
        fs.makedirs(f"{d}/sub")
    fs.pipe_file(f"{d}/a", b"a")
    fs.pipe_file(f"{d}/sub/b", b"b")
    assert fs.find(d, withdirs=True) == [d, f"{d}/a", f"{d}/sub", f"{d}/sub/b"]
    assert sorted(fs.ls(d, detail=False)) == [f"{d}/a", f"{d}/sub"]
    fs.rm_file(f"{d}/sub/b")
    assert fs.exists(f"{d}/sub") is DIR_SURVIVES[store.kind]
    assert fs.isdir(f"{d}/sub") is DIR_SURVIVES[store.kind]
    fs.pipe_file(f"{d}/sub/c", b"c")
    fs.rm(d, recursive=True)
    assert fs.exists(d) is False
    assert fs.find(root) == []


def test_listing_cache_goes_stale_when_another_instance_writes(remote_store):
    """s3fs/gcsfs cache listings forever; writes through *another* instance (or process) are not seen
    by exists()/info()/ls() once the parent was listed. find() and refresh=True go to the server."""
    fs, root = open_root(remote_store)
    protocol = "s3" if remote_store.kind == "s3" else "gs"
    assert fsspec.filesystem(protocol, **remote_store.storage_options) is fs  # one cached instance per options
    fs.pipe_file(f"{root}/a", b"a")
    assert fs.ls(root, detail=False) == [f"{root}/a"]
    other = fsspec.filesystem(protocol, skip_instance_cache=True, **remote_store.storage_options)
    other.pipe_file(f"{root}/b", b"b")
    assert fs.ls(root, detail=False) == [f"{root}/a"]  # stale
    assert fs.exists(f"{root}/b") is False  # stale
    assert fs.find(root) == [f"{root}/a", f"{root}/b"]
    assert fs.ls(root, detail=False, refresh=True) == [f"{root}/a", f"{root}/b"]
    other.rm_file(f"{root}/a")
    assert fs.exists(f"{root}/a") is True  # stale
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/a")  # reads always go to the server
    uncached = fsspec.filesystem(protocol, use_listings_cache=False, **remote_store.storage_options)
    assert uncached.ls(root, detail=False) == [f"{root}/b"]
    fs.invalidate_cache()
    assert fs.ls(root, detail=False) == [f"{root}/b"]
    assert fs.exists(f"{root}/a") is False
