"""Incomplete multipart uploads (issue 13, point 5): what a writer killed mid-upload leaves on S3,
billed until aborted. Saves and prune abort them once idle; an upload still gaining parts is not."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from ckptstore import CheckpointManager, CkptStoreError, cleanup
from ckptstore.cli import main
from ckptstore.storage import open_storage


def manager(store, **kwargs) -> CheckpointManager:
    return CheckpointManager(store.url, storage_options=store.storage_options, **kwargs)


class Uploads:
    """Raw multipart uploads on the store's bucket, through the same s3fs client."""

    def __init__(self, store) -> None:
        self.storage = open_storage(store.url, store.storage_options)
        self.fs = self.storage.fs
        self.bucket, _, self.prefix = self.storage.root.partition("/")

    def start(self, key: str, parts: int = 1) -> str:
        upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=key)["UploadId"]
        for n in range(1, parts + 1):
            self.add_part(key, upload_id, n)
        return upload_id

    def add_part(self, key: str, upload_id: str, number: int) -> None:
        self.fs.call_s3("upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=b"x" * 1024)

    def keys(self) -> list[str]:
        return sorted(u["Key"] for u in self.fs.call_s3("list_multipart_uploads", Bucket=self.bucket).get("Uploads", []))


@pytest.fixture
def s3(remote_store):
    if remote_store.kind != "s3":
        pytest.skip("multipart uploads are an S3 object; GCS resumable sessions cannot be listed (they expire in a week)")
    return remote_store


def test_a_save_aborts_the_root_s_idle_uploads_and_nothing_outside_it(s3):
    raw = Uploads(s3)
    raw.start(f"{raw.prefix}/step_00000001/state-0a1b2c3d.safetensors", parts=2)
    outside = raw.start(f"{raw.prefix}-other/step_00000001/state-0a1b2c3d.safetensors")
    assert [u.parts for u in manager(s3).incomplete_uploads()] == [2]
    manager(s3, abandoned_after=0).save({"w": torch.ones(4)}, step=2)
    assert raw.keys() == [f"{raw.prefix}-other/step_00000001/state-0a1b2c3d.safetensors"]  # another root's: untouched
    assert manager(s3).incomplete_uploads() == [] and outside


def test_an_upload_still_gaining_parts_is_never_idle(s3):
    raw = Uploads(s3)
    key = f"{raw.prefix}/step_00000001/state-0a1b2c3d.safetensors"
    upload_id = raw.start(key)
    storage, clock, later = raw.storage, cleanup.IdleClock(), time.time() + 10_000
    assert cleanup.abort_idle_uploads(storage, 600, clock, now=later, monotonic=0.0) == []  # first seen now
    raw.add_part(key, upload_id, 2)  # a live writer elsewhere
    assert cleanup.abort_idle_uploads(storage, 600, clock, now=later, monotonic=700.0) == []  # changed: watched anew
    assert [u.parts for u in cleanup.abort_idle_uploads(storage, 600, clock, now=later, monotonic=1300.0)] == [2]
    assert raw.keys() == []


def test_a_fresh_manager_watches_before_it_aborts(s3):
    raw = Uploads(s3)
    raw.start(f"{raw.prefix}/step_00000001/state-0a1b2c3d.safetensors")
    manager(s3).save({"w": torch.ones(4)}, step=2)  # abandoned_after=600: seen for the first time, kept
    assert len(raw.keys()) == 1


KILLED_MID_UPLOAD = """
import json, os, signal, sys, torch
from ckptstore import CheckpointManager, Transfers
url, opts = sys.argv[1], json.loads(sys.argv[2])
mgr = CheckpointManager(url, storage_options=opts, transfers=Transfers(part_bytes=16 * 2**20, in_flight=1))
real = mgr.storage.open_write
class Dying:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, data):
        self.n += memoryview(data).nbytes
        if self.n > 33 * 2**20:  # sending the second 16 MiB part waited for the first (one in flight): die
            os.kill(os.getpid(), signal.SIGKILL)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
import contextlib
@contextlib.contextmanager
def dying(path, *args, **kwargs):
    with real(path, *args, **kwargs) as f:
        yield Dying(f)
mgr.storage.open_write = dying
mgr.save({"w": torch.zeros(10 * 2**20)}, step=1)
"""


def test_a_writer_killed_mid_upload_leaves_an_upload_that_prune_shows_then_aborts(s3, capsys):
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_UPLOAD, s3.url, json.dumps(s3.storage_options)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr
    [left] = manager(s3).incomplete_uploads()
    assert left.path.startswith("step_00000001/state-") and left.parts >= 1
    options = [arg for k, v in s3.storage_options.items() for arg in ("--storage-option", f"{k}={json.dumps(v)}")]
    assert main(["prune", s3.url, *options]) == 0
    assert f"incomplete upload of {left.path} ({left.parts} parts" in capsys.readouterr().out
    assert main(["prune", s3.url, "--abandoned-after", "0", "--yes", *options]) == 0
    assert f"aborted incomplete upload of {left.path}" in capsys.readouterr().out
    assert manager(s3).incomplete_uploads() == []


def test_stores_without_multipart_uploads_have_none(store):
    assert manager(store).incomplete_uploads() == []


def test_a_nested_root_sees_its_own_uploads_and_a_missing_bucket_is_named(s3):
    """The root's prefix is everything after the bucket, however deep; listing the uploads of a
    root whose bucket is gone names that root."""
    raw = Uploads(s3)
    raw.start(f"{raw.prefix}/runs/exp1/step_00000001/state-0a1b2c3d.safetensors", parts=3)
    nested = CheckpointManager(f"{s3.url}/runs/exp1", storage_options=s3.storage_options)
    assert [(u.path, u.parts) for u in nested.incomplete_uploads()] == [("step_00000001/state-0a1b2c3d.safetensors", 3)]
    CheckpointManager(f"{s3.url}/runs/exp1", storage_options=s3.storage_options, abandoned_after=0).prune()
    assert raw.keys() == [] and nested.incomplete_uploads() == []  # aborted under its full key
    gone = open_storage(f"s3://no-such-bucket-{raw.bucket}/run", s3.storage_options)
    with pytest.raises(CkptStoreError, match=rf"^s3://no-such-bucket-{raw.bucket}/run does not exist$"):
        gone.incomplete_uploads(older_than=0.0)

