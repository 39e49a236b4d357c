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
then the data. A folder that holds only ckptstore data files and no manifest is an abandoned
save (a killed job); :func:`clean_abandoned` removes it. Folders that hold anything else are
never touched, so a checkpoint root can share a bucket prefix with other files.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointExists, CheckpointNotFound, CorruptCheckpointError
from .manifest import MANIFEST_NAME, CheckpointInfo, FileEntry
from .serializers import ChecksumReader, ChecksumWriter, Format, MapLocation, Source, check_crc, crc_of_stream, get_format
from .storage import FsspecStorage
from .tree import iter_tensors

log = logging.getLogger("ckptstore")

_DATA_FILE = re.compile(r"^(?:state-[0-9a-f]{8}\.(?:safetensors|pt)|\..+\.tmp)$")


@dataclass(frozen=True)
class Scan:
    """What a root holds: committed checkpoints, unreadable manifests, abandoned folders."""

    committed: list[CheckpointInfo]
    corrupt: list[str]
    abandoned: list[str]
    stray: list[str]


def write_checkpoint(
    storage: FsspecStorage, name: str, step: int, fmt: Format, tree: Any, metrics: Mapping[str, float]
) -> CheckpointInfo:
    """Write ``tree`` as checkpoint ``name`` and commit it; raise CheckpointExists if taken."""
    manifest_path = f"{name}/{MANIFEST_NAME}"
    if storage.exists(manifest_path):
        raise _exists(storage, name)
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
    return info


def _exists(storage: FsspecStorage, name: str) -> CheckpointExists:
    return CheckpointExists(
        f"checkpoint {name} is already committed under {storage.url()}; save with a new step, "
        "or delete it first (ckptstore prune / CheckpointManager.delete)"
    )


def scan(storage: FsspecStorage) -> Scan:
    """List the root once and read every manifest (concurrently where the store can)."""
    folders: dict[str, list[str]] = {}
    for path in storage.list_files():
        folder, _, rest = path.partition("/")
        if rest and "/" not in rest:
            folders.setdefault(folder, []).append(rest)
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
    abandoned = [
        f for f, files in folders.items()
        if MANIFEST_NAME not in files and all(_DATA_FILE.match(n) for n in files)
    ]
    stray = [
        f"{i.name}/{n}" for i in committed for n in folders[i.name]
        if n != MANIFEST_NAME and _DATA_FILE.match(n) and n not in {e.path for e in i.files}
    ]
    committed.sort(key=lambda i: (i.step, i.created))
    return Scan(committed, sorted(corrupt), sorted(abandoned), stray)


def read_checkpoint(
    storage: FsspecStorage, info: CheckpointInfo, *, map_location: MapLocation = None,
    weights_only: bool = True, verify: bool = True,
) -> Any:
    """Read a committed checkpoint's canonical tree, checking sizes and CRC32C.

    Raises:
        CorruptCheckpointError: a data file is missing, truncated, altered or unparsable.
    """
    fmt = get_format(info.format)
    if len(info.files) != 1:
        raise CorruptCheckpointError(f"{info.url}: expected one data file, the manifest lists {len(info.files)}")
    entry = info.files[0]
    path = f"{info.name}/{entry.path}"
    _check_size(storage, path, entry.size)
    return fmt.read(Source(storage, path, entry.size), map_location, weights_only, entry.crc32c if verify else None)


def verify_checkpoint(storage: FsspecStorage, info: CheckpointInfo) -> None:
    """Stream every data file once and check its size and CRC32C, in bounded memory."""
    for entry in info.files:
        path = f"{info.name}/{entry.path}"
        where = storage.url(path)
        _check_size(storage, path, entry.size)
        with storage.open_read(path) as raw:
            check_crc(crc_of_stream(ChecksumReader(raw, where), entry.size), entry.crc32c, where)


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


def clean_abandoned(storage: FsspecStorage, found: Scan) -> list[str]:
    """Delete abandoned partial saves and stray data files inside committed folders."""
    for folder in found.abandoned:
        log.info("removing abandoned partial checkpoint %s", storage.url(folder))
        storage.delete(folder)
    for path in found.stray:
        storage.delete(path)
    return list(found.abandoned)
