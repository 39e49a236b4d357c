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

Deleting runs the other way round: the manifest first (the checkpoint vanishes atomically),
then the data. A folder that holds only ckptstore data files and no manifest, and has been
idle for a while, is an abandoned save (a killed job); :func:`clean_abandoned` removes it.
"Idle for a while" matters: the folder of a save in progress elsewhere (a second process,
or the old instance of a reclaimed spot job still flushing its last checkpoint) looks the
same, and deleting it would let that writer commit a manifest whose data is gone. As a
second guard a writer checks its data file after committing and un-commits if it vanished.
Folders that hold anything else are never touched, so a root can share a prefix with logs.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointExists, CheckpointNotFound, CorruptCheckpointError, StorageError
from .manifest import MANIFEST_NAME, CheckpointInfo, FileEntry
from .serializers import ChecksumWriter, Format, MapLocation, Source, get_format, read_checked
from .storage import FsspecStorage
from .tree import iter_tensors

log = logging.getLogger("ckptstore")

_DATA_FILE = re.compile(r"^(?:state-[0-9a-f]{8}\.(?:safetensors|pt)|\..+\.tmp)$")


@dataclass(frozen=True)
class Scan:
    """What a root holds: committed checkpoints, unreadable manifests, abandoned folders."""

    committed: list[CheckpointInfo]
    corrupt: list[str]
    abandoned: dict[str, float]  # folder -> newest modification time of its files
    stray: list[str]


def write_checkpoint(
    storage: FsspecStorage, name: str, step: int, fmt: Format, tree: Any, metrics: Mapping[str, float]
) -> CheckpointInfo:
    """Write ``tree`` as checkpoint ``name`` and commit it; raise CheckpointExists if taken.

    The caller checks for a committed ``name`` first (one listing); the create-only manifest
    write settles any race after that check.
    """
    manifest_path = f"{name}/{MANIFEST_NAME}"
    data_name = f"state-{uuid.uuid4().hex[:8]}{fmt.extension}"
    size_hint = sum(t.numel() * t.element_size() for t in iter_tensors(tree))
    with storage.open_write(f"{name}/{data_name}", size_hint) as raw:
        out = ChecksumWriter(raw)
        fmt.write(tree, out)
    info = CheckpointInfo(
        name=name, step=step, format=fmt.name, metrics=dict(metrics),
        files=(FileEntry(data_name, out.size, out.crc),), url=storage.url(name),
    )
    try:
        storage.write_new(manifest_path, info.to_json())
    except FileExistsError as err:  # another writer committed this step first: keep theirs
        storage.delete(f"{name}/{data_name}")
        raise _exists(storage, name) from err
    if not storage.exists(f"{name}/{data_name}"):  # removed under us by a concurrent cleanup
        storage.delete(manifest_path)
        raise StorageError(
            f"{storage.url(name)}: the data file vanished while committing (another process cleaned the "
            "folder); the checkpoint was un-committed. Do not let two jobs write the same root"
        )
    return info


def _exists(storage: FsspecStorage, name: str) -> CheckpointExists:
    return CheckpointExists(
        f"checkpoint {name} is already committed under {storage.url()}; save with a new step, "
        "or delete it first (ckptstore prune / CheckpointManager.delete)"
    )


def scan(storage: FsspecStorage) -> Scan:
    """List the root once and read every manifest (concurrently where the store can)."""
    folders: dict[str, list[str]] = {}
    newest: dict[str, float] = {}
    for path, mtime in storage.list_files().items():
        folder, _, rest = path.partition("/")
        if rest and "/" not in rest:
            folders.setdefault(folder, []).append(rest)
            newest[folder] = max(newest.get(folder, 0.0), mtime)
    manifests = [f"{f}/{MANIFEST_NAME}" for f, files in folders.items() if MANIFEST_NAME in files]
    committed, corrupt = [], []
    for path, data in sorted(storage.read_many(manifests).items()):
        folder = path.split("/")[0]
        try:
            info = CheckpointInfo.from_json(data, url=storage.url(folder))
            if info.name != folder:
                raise CorruptCheckpointError(f"{storage.url(path)} names {info.name!r}, not its folder {folder!r}")
            committed.append(info)
        except CorruptCheckpointError as err:
            log.warning("ignoring %s: %s", folder, err)
            corrupt.append(folder)
    abandoned = {
        f: newest[f] for f, files in sorted(folders.items())
        if MANIFEST_NAME not in files and all(_DATA_FILE.match(n) for n in files)
    }
    stray = [
        f"{i.name}/{n}" for i in committed for n in folders[i.name]
        if n != MANIFEST_NAME and _DATA_FILE.match(n) and n not in {e.path for e in i.files}
    ]
    committed.sort(key=lambda i: (i.step, i.created))
    return Scan(committed, sorted(corrupt), abandoned, stray)


def read_checkpoint(
    storage: FsspecStorage, info: CheckpointInfo, *, map_location: MapLocation = None,
    weights_only: bool = True, verify: bool = True,
) -> Any:
    """Read a committed checkpoint's canonical tree, checking sizes and CRC32C.

    Raises:
        CorruptCheckpointError: a data file is missing, truncated, altered or unparsable.
    """
    fmt = get_format(info.format)
    path, entry = data_file(storage, info)
    return fmt.read(Source(storage, path, entry.size), map_location, weights_only, entry.crc32c if verify else None)


def data_file(storage: FsspecStorage, info: CheckpointInfo) -> tuple[str, FileEntry]:
    """The path (under the root) and manifest entry of a checkpoint's one data file, its size checked.

    Raises:
        CorruptCheckpointError: the manifest lists other than one file, or it is missing or resized.
    """
    if len(info.files) != 1:
        raise CorruptCheckpointError(f"{info.url}: expected one data file, the manifest lists {len(info.files)}")
    entry = info.files[0]
    path = f"{info.name}/{entry.path}"
    _check_size(storage, path, entry.size)
    return path, entry


def verify_checkpoint(storage: FsspecStorage, info: CheckpointInfo, progress: Callable[[int], None] | None = None) -> None:
    """Stream every data file once and check its size and CRC32C, in bounded memory."""
    for entry in info.files:
        path = f"{info.name}/{entry.path}"
        _check_size(storage, path, entry.size)
        verify_file(storage, path, entry, progress)


def verify_file(storage: FsspecStorage, path: str, entry: FileEntry, progress: Callable[[int], None] | None = None) -> None:
    """Stream ``path`` once and check it against ``entry``'s CRC32C; ``progress(n)`` per chunk read."""
    read_checked(Source(storage, path, entry.size), entry.crc32c, progress=progress)


def _check_size(storage: FsspecStorage, path: str, expected: int) -> None:
    where = storage.url(path)
    try:
        actual = storage.size(path)
    except CheckpointNotFound as err:
        raise CorruptCheckpointError(f"{where} is listed in the manifest but missing") from err
    if actual != expected:
        raise CorruptCheckpointError(f"{where} is {actual} bytes, the manifest says {expected} (truncated or replaced)")


def delete_checkpoint(storage: FsspecStorage, name: str) -> None:
    """Un-commit ``name`` (manifest first, atomically), then delete its data."""
    storage.delete(f"{name}/{MANIFEST_NAME}")
    storage.delete(name)


def clean_abandoned(storage: FsspecStorage, found: Scan, idle_seconds: float, now: float | None = None) -> list[str]:
    """Delete abandoned saves idle for ``idle_seconds``, and stray data files in committed folders."""
    now = time.time() if now is None else now
    gone = [folder for folder, mtime in found.abandoned.items() if now - mtime >= idle_seconds]
    for folder in gone:
        log.info("removing abandoned partial checkpoint %s", storage.url(folder))
        storage.delete(folder)
    for path in found.stray:
        storage.delete(path)
    return gone
