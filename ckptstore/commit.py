"""Commit protocol: write the payload, then the manifest, last and create-only.

One protocol for every store, because object stores cannot rename (s3fs and gcsfs "rename"
is a copy plus a delete, not atomic) and a local disk can do everything an object store can:

1. ``<name>/state-<token>.<ext>`` is streamed through ``Storage.open_write``: on local disks
   a same-folder temp file, fsync, rename, fsync of the folder; on object stores one PUT or
   one completed multipart upload, aborted if the writer fails. The random token means two
   writers racing for the same step never write into each other's file.
2. ``<name>/manifest.json`` (sizes and CRC32C of every data file) is written with
   ``Storage.write_new``: a create-only write (``os.link`` locally, ``If-None-Match: *`` on
   S3). A checkpoint exists iff its manifest does, so readers never see a partial one, and
   of two writers of one step exactly one commits.

A lost reply is not a lost race. The manifest write can succeed on the server while its
reply is lost (a reset connection); the client retries and the create-only retry is refused.
So on ``FileExistsError`` the writer reads the manifest that is there: if it names this
writer's own data file (its random token, size and CRC32C), the commit was its own and the save
succeeded; otherwise another writer won and this one deletes its data file.

A manifest whose data file is not in the same listing is not a checkpoint either (``broken``):
it is what a save leaves when a cleaner removed its data and a failure stopped it before it
could un-commit, and counting it would let retention prune a real checkpoint for a phantom.

Deleting runs the other way round: the manifest first (the checkpoint vanishes atomically),
then exactly the data files it listed. Unfinished saves and temp files are removed by
:mod:`ckptstore.cleanup`; as a second guard a writer checks its data file after committing
and un-commits if it vanished. Folders that hold anything else are never touched, so a root
can share a prefix with logs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .errors import CheckpointExists, CheckpointNotFound, CkptStoreError, ConfigError, CorruptCheckpointError, StorageError
from .manifest import MANIFEST_NAME, CheckpointInfo, FileEntry, is_tombstone
from .serializers import ChecksumWriter, Format, Source, get_format, read_checked
from .scan import Scan
from .storage import FsspecStorage
from .tree import iter_tensors

log = logging.getLogger("ckptstore")

def write_checkpoint(
    storage: FsspecStorage, name: str, step: int, fmt: Format, tree: Any, metrics: Mapping[str, float],
    monitor: tuple[str, str] | None = None,
) -> CheckpointInfo:
    """Write ``tree`` as checkpoint ``name`` and commit it; raise CheckpointExists if taken.

    ``monitor``: the (metric, mode) the manager ranks by, recorded in the manifest.

    The caller checks for a committed ``name`` first (one listing); the create-only manifest
    write settles any race after that check.
    """
    data_name = f"state-{new_token()}{fmt.extension}"
    size_hint = sum(t.numel() * t.element_size() for t in iter_tensors(tree))
    with storage.open_write(f"{name}/{data_name}", size_hint) as raw:
        out = ChecksumWriter(raw)
        fmt.write(tree, out)
    info = CheckpointInfo(
        name=name, step=step, format=fmt.name, metrics=dict(metrics),
        files=(FileEntry(data_name, out.size, out.crc),), url=storage.url(name), monitor=monitor,
    )
    return commit_manifest(storage, info)


def new_token() -> str:
    """A save's random token: its data files are named after it, so two writers of one step never share a file."""
    return uuid.uuid4().hex[:8]


def commit_manifest(storage: FsspecStorage, info: CheckpointInfo) -> CheckpointInfo:
    """Commit the data files ``info`` lists (written already) by writing its manifest, create-only.

    Raises CheckpointExists (another writer committed first: this one's data files are
    deleted) or StorageError (not committed: the files are an unfinished save, removed once idle).
    """
    name = info.name
    manifest_path = f"{name}/{MANIFEST_NAME}"
    try:
        storage.write_new(manifest_path, info.to_json())
    except FileExistsError as err:
        there = _read_if_present(storage, manifest_path)
        if there is None or not _names_our_files(there, info.files):
            for entry in info.files:
                storage.delete(f"{name}/{entry.path}")
            raise _refused(storage, name, there) from err
        log.info("%s: the manifest write's reply was lost; the manifest there is ours, so the commit stands", info.url)
    except StorageError:  # it may have happened with its reply lost: look before giving up
        there = _read_if_present(storage, manifest_path)
        if there is None or not _names_our_files(there, info.files):
            raise  # not committed; the data files are an unfinished save, removed once idle
        log.info("%s: the manifest write failed after it was stored; the manifest there is ours", info.url)
    if not _all_present(storage, info):  # removed under us by a concurrent cleanup
        delete_manifest_if(storage, name, lambda data: _names_our_files(data, info.files))
        raise StorageError(
            f"{storage.url(name)}: {'the' if len(info.files) == 1 else 'a'} data file vanished while committing "
            "(another process cleaned the "
            "folder); the checkpoint was un-committed. Do not let two jobs write the same root"
        )
    return info


def _all_present(storage: FsspecStorage, info: CheckpointInfo) -> bool:
    """Whether every data file ``info`` lists is there: one HEAD for one file, one listing of the
    folder for many (a sharded checkpoint of a thousand ranks: 1 LIST page, not 1,000 HEADs)."""
    if len(info.files) == 1:
        return storage.exists(f"{info.name}/{info.files[0].path}")
    listed = storage.list_files(info.name)
    return all(f"{info.name}/{entry.path}" in listed for entry in info.files)


def check_free(storage: FsspecStorage, found: Scan, step: int, name: str, allow_older: bool) -> None:
    """Raise unless a save of ``step`` as ``name`` may go ahead on the root ``found`` describes.

    Refused: a committed step or name, a damaged folder of that name, and a step older than
    the newest committed one unless ``allow_older`` (retention would delete it at once and
    ``restore()`` would resume from the newer step).
    """
    clash = next((i for i in found.committed if i.step == step or i.name == name), None)
    if clash is not None:
        taken = f"step {step}" if clash.step == step else f"the name {name!r} (step {clash.step})"
        raise CheckpointExists(f"{taken} is already committed as {clash.url}; save a new step or delete that one first")
    if name in found.corrupt:
        raise CheckpointExists(unreadable_manifest_message(storage, name))
    if name in found.broken:
        raise CheckpointExists(
            f"{storage.url(name)} holds a manifest whose data file is missing (a save that failed while it "
            f"committed, or damage); it is removed once idle for abandoned_after, or now with delete({name!r})"
        )
    newest = found.committed[-1] if found.committed else None
    if newest is not None and step < newest.step and not allow_older:
        raise ConfigError(
            f"step {step} is older than the newest checkpoint under {storage.url()} (step {newest.step}): retention "
            f"would treat it as old and restore() would resume from step {newest.step}. A new run needs a new "
            "root; after a rollback, delete the newer checkpoints first, or pass allow_older=True to keep both"
        )


def _read_if_present(storage: FsspecStorage, path: str) -> bytes | None:
    try:
        return storage.read(path)
    except CheckpointNotFound:
        return None


def _names_our_files(manifest: bytes, ours: tuple[FileEntry, ...]) -> bool:
    """True if ``manifest`` lists exactly the data files ``ours`` (names with a random token, sizes, CRC32C)."""
    try:
        return set(ours) == set(CheckpointInfo.from_json(manifest, url="").files)
    except CorruptCheckpointError:
        return False


def _refused(storage: FsspecStorage, name: str, there: bytes | None) -> CkptStoreError:
    """The error for a manifest write refused because ``there`` (None: gone again) was first."""
    url = storage.url(name)
    if is_tombstone(there):
        return StorageError(
            f"{url}: another process judged this save abandoned and is removing it, so it was not committed "
            "(two jobs on one root, or abandoned_after shorter than a save takes); save again"
        )
    if there is None:
        return StorageError(f"{url}: another process committed and removed this step while it was saved; save again")
    try:
        CheckpointInfo.from_json(there, url=url)
    except CorruptCheckpointError:
        return CheckpointExists(unreadable_manifest_message(storage, name))
    return CheckpointExists(
        f"checkpoint {name} is already committed under {storage.url()}; save with a new step, "
        f"or delete it first (CheckpointManager.delete({name!r}) or: ckptstore delete {storage.url()} {name})"
    )


def unreadable_manifest_message(storage: FsspecStorage, name: str) -> str:
    """What to do about a checkpoint folder whose manifest cannot be read."""
    return (
        f"{storage.url(name)} holds an unreadable manifest, so it is not a checkpoint but its name is taken; "
        f"look at it (ckptstore ls --all {storage.url()}), then remove it with "
        f"CheckpointManager.delete({name!r}) or: ckptstore delete {storage.url()} {name}"
    )


def read_checkpoint(storage: FsspecStorage, info: CheckpointInfo) -> Any:
    """Read a committed checkpoint's canonical tree onto the CPU, checking its size and CRC32C.

    Raises:
        CorruptCheckpointError: a data file is missing, truncated, altered or unparsable.
    """
    fmt = get_format(info.format)
    path, entry = data_file(storage, info)
    return fmt.read(Source(storage, path, entry.size), None, True, entry.crc32c)


def data_file(storage: FsspecStorage, info: CheckpointInfo) -> tuple[str, FileEntry]:
    """The path (under the root) and manifest entry of a checkpoint's one data file, its size checked.

    Raises:
        CorruptCheckpointError: the manifest lists other than one file, or it is missing or resized.
    """
    if len(info.files) != 1:
        raise CorruptCheckpointError(f"{info.url}: expected one data file, the manifest lists {len(info.files)}")
    entry = info.files[0]
    path = f"{info.name}/{entry.path}"
    check_size(storage, path, entry.size)
    return path, entry


def verify_checkpoint(storage: FsspecStorage, info: CheckpointInfo, progress: Callable[[int], None] | None = None) -> None:
    """Stream every data file once and check its size and CRC32C, in bounded memory."""
    for entry in info.files:
        path = f"{info.name}/{entry.path}"
        check_size(storage, path, entry.size)
        verify_file(storage, path, entry, progress)


def verify_file(storage: FsspecStorage, path: str, entry: FileEntry, progress: Callable[[int], None] | None = None) -> None:
    """Stream ``path`` once and check it against ``entry``'s CRC32C; ``progress(n)`` per chunk read."""
    read_checked(Source(storage, path, entry.size), entry.crc32c, progress=progress)


def check_size(storage: FsspecStorage, path: str, expected: int) -> None:
    """Raise CorruptCheckpointError unless the file ``path`` has the ``expected`` size a manifest lists."""
    where = storage.url(path)
    try:
        actual = storage.size(path)
    except CheckpointNotFound as err:
        raise CorruptCheckpointError(f"{where} is listed in the manifest but missing") from err
    if actual != expected:
        raise CorruptCheckpointError(f"{where} is {actual} bytes, the manifest says {expected} (truncated or replaced)")


def delete_checkpoint(storage: FsspecStorage, info: CheckpointInfo) -> None:
    """Un-commit ``info`` (manifest first, atomically), then delete exactly the files it lists."""
    delete_manifest_if(storage, info.name, lambda data: _names_our_files(data, info.files))
    storage.delete_many([f"{info.name}/{entry.path}" for entry in info.files])
    storage.remove_folder(info.name)


def delete_manifest_if(storage: FsspecStorage, name: str, still: Callable[[bytes], bool]) -> None:
    """Delete ``name``'s manifest if it is ``still`` the one the caller means.

    A manifest path can be reused: once one process deleted it, another can commit a new
    checkpoint of the same name there. Reading it right before the delete keeps a late
    deleter from removing that new one (a narrow window remains between the read and the
    delete; no portable conditional delete exists across fsspec stores).
    """
    path = f"{name}/{MANIFEST_NAME}"
    there = _read_if_present(storage, path)
    if there is not None and still(there):
        storage.delete(path)


def delete_damaged(storage: FsspecStorage, name: str, files: tuple[str, ...]) -> None:
    """Delete a folder whose manifest is unreadable or lacks its data: the manifest first, then the files listed."""
    storage.delete(f"{name}/{MANIFEST_NAME}")  # asked for by name: whatever it holds now
    for path in files:
        storage.delete(path)
    storage.remove_folder(name)
