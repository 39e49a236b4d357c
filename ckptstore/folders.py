"""Folder checkpoints: the files a framework wrote into a local folder, committed as one checkpoint.

The Hugging Face Trainer writes ``checkpoint-N/`` (weights, optimizer, scheduler, RNG states,
``trainer_state.json``); other tools write folders too. :func:`write_folder` uploads each file
to ``<name>/files-<token>/<its path in the folder>``, computing its CRC32C on the way, then
commits them all with one manifest (format ``"folder"``), written last and create-only, as
every checkpoint is (see :mod:`ckptstore.commit`). The random token keeps two writers of one
step apart. :func:`download_folder` brings a committed one back, each file checked against its
size and CRC32C, into a new local folder that appears whole or not at all.

Example:
    >>> import tempfile, pathlib
    >>> from ckptstore.storage import open_storage
    >>> src = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (src / "weights.bin").write_bytes(b"abc")
    >>> info = write_folder(open_storage("memory://doc/folders"), "checkpoint-1", 1, src, {}, None)
    >>> [f.path.split("/", 1)[1] for f in info.files]
    ['weights.bin']
    >>> dest = pathlib.Path(tempfile.mkdtemp()) / "checkpoint-1"
    >>> download_folder(open_storage("memory://doc/folders"), info, dest)
    >>> (dest / "weights.bin").read_bytes()
    b'abc'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .commit import check_size, commit_manifest, new_token
from .errors import ConfigError
from .localdisk import fsync_folder
from .manifest import FOLDER_FORMAT, CheckpointInfo, FileEntry
from .serializers import CHUNK_BYTES, ChecksumWriter, Source, read_checked
from .storage import FsspecStorage, check_relative_path


def files_in(folder: str | os.PathLike[str]) -> list[str]:
    """Every file below the local ``folder``, as sorted ``/``-separated relative paths.

    Raises:
        ConfigError: ``folder`` is not a folder, or holds no file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; save_folder saves the files of a local folder")
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    if not found:
        raise ConfigError(f"{root} holds no file; there is nothing to save")
    return [check_relative_path(p) for p in found]


def write_folder(
    storage: FsspecStorage, name: str, step: int, folder: str | os.PathLike[str], metrics: Mapping[str, float],
    monitor: tuple[str, str] | None,
) -> CheckpointInfo:
    """Upload every file of ``folder`` under checkpoint ``name`` and commit them with one manifest.

    Raises CheckpointExists (another writer committed ``name`` first) or StorageError; files
    uploaded before a failure are an unfinished save, removed once idle.
    """
    prefix = f"files-{new_token()}"

    def upload(rel: str) -> FileEntry:
        local = Path(folder, rel)
        with open(local, "rb") as src, storage.open_write(f"{name}/{prefix}/{rel}", local.stat().st_size) as raw:
            out = ChecksumWriter(raw)
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)
        return FileEntry(f"{prefix}/{rel}", out.size, out.crc)

    # one file after another: uploading 4 at once measured no faster on S3 (moto) and held twice the memory
    # (benchmarks/RESULTS.md, "Integrations")
    entries = tuple(upload(rel) for rel in files_in(folder))
    info = CheckpointInfo(name=name, step=step, format=FOLDER_FORMAT, metrics=dict(metrics), files=entries,
                          url=storage.url(name), monitor=monitor)
    return commit_manifest(storage, info)


def download_folder(storage: FsspecStorage, info: CheckpointInfo, dest: str | os.PathLike[str]) -> None:
    """Download folder checkpoint ``info`` into the new local folder ``dest``, every file checked.

    The files land in a temporary folder beside ``dest``, renamed to ``dest`` once all of them
    passed their size and CRC32C checks: ``dest`` never holds part of a checkpoint.

    Raises:
        ConfigError: ``info`` is not a folder checkpoint, or ``dest`` exists and is not an empty folder.
        CorruptCheckpointError: a file is missing, resized or fails its CRC32C.
    """
    if info.format != FOLDER_FORMAT:
        raise ConfigError(f"{info.url} is a {info.format} checkpoint, not a folder checkpoint; restore it with "
                          "CheckpointManager.restore")
    final = Path(dest)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ConfigError(f"{final} exists and is not an empty folder; restore_folder needs a new one")
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        for entry in info.files:
            path = f"{info.name}/{entry.path}"
            local = partial / entry.path.split("/", 1)[1]
            local.parent.mkdir(parents=True, exist_ok=True)
            check_size(storage, path, entry.size)
            with open(local, "wb") as out:
                read_checked(Source(storage, path, entry.size), entry.crc32c, copy_to=out)
                out.flush()
                os.fsync(out.fileno())  # on disk before the rename makes the folder whole
        with contextlib.suppress(FileNotFoundError):
            final.rmdir()  # empty (checked above): the rename needs its name free
        partial.rename(final)
        fsync_folder(str(final.parent))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

