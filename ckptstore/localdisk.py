"""Durable local writes: whole files appear atomically and survive a power loss.

The local half of :class:`ckptstore.storage.FsspecStorage` (fsspec's LocalFileSystem writes in
place and its create-only write checks, then writes). Every file goes through a same-folder
temp file ``.<name>.<12 hex>.tmp``, ``fsync``, then ``os.replace`` (or ``os.link`` for a
create-only write, which refuses an existing name atomically) and an ``fsync`` of the folder;
every new folder is made durable by an ``fsync`` of its parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from typing import IO


def version_token(st: os.stat_result) -> str:
    """A file's version as :meth:`FsspecStorage.version` spells it on a local disk: size, inode, mtime."""
    return f"{st.st_size}:{st.st_ino}:{st.st_mtime}"


@contextlib.contextmanager
def atomic_file(final_path: str, published: list[str] | None = None) -> Iterator[IO[bytes]]:
    """Write a same-folder temp file, fsync it, rename it into place, fsync the folder.

    ``published`` gets the file's version (inode and mtime survive the rename).
    """
    folder = os.path.dirname(final_path)
    make_folder(folder)
    tmp = os.path.join(folder, f".{os.path.basename(final_path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        os.replace(tmp, final_path)
        if published is not None:
            published.append(version_token(st))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def create_only(final_path: str, data: bytes) -> None:
    """Atomically create ``final_path``; ``os.link`` refuses an existing name."""
    folder = os.path.dirname(final_path)
    make_folder(folder)
    tmp = os.path.join(folder, f".{os.path.basename(final_path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, final_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_folder(folder)


def make_folder(folder: str) -> None:
    """Create ``folder`` and its missing parents, each made durable by an fsync of its parent.

    Without the parent's fsync a crash can forget a new checkpoint folder, and with it the
    files that were fsynced inside it.
    """
    missing = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError as err:  # a file where a folder should be: not "exists" (a create-only refusal means that)
        raise NotADirectoryError(errno.ENOTDIR, f"a file is in the way of the folder {folder}", err.filename) from err
    for created in reversed(missing):
        fsync_folder(os.path.dirname(created))


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
