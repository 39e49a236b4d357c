"""Single-file helpers: ``torch.save``/``torch.load`` for any URL, written atomically.

``save`` writes through :meth:`FsspecStorage.open_write`, so the file appears whole or not
at all (and an earlier file of the same name survives a failed save). The format follows
the extension: ``.safetensors`` stores a state tree (see :mod:`ckptstore.tree`), anything
else is a plain ``torch.save`` of ``obj``, including whole modules. ``load`` refuses pickled
objects unless the caller passes ``weights_only=False``, as ``torch.load`` does since 2.6.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch

from . import tree as treelib
from .errors import CorruptCheckpointError
from .safetensors_header import header_length, parse_header
from .serializers import ChecksumWriter, MapLocation, SafetensorsFormat, Source, format_for_path
from .storage import open_parent
from .torch_zip import data_pickles


def save(obj: Any, url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
    """Save ``obj`` to ``url`` atomically: ``.safetensors`` as a state tree, else ``torch.save``.

    Example:
        >>> save({"w": torch.ones(2)}, "memory://doc/files/w.pt")
        >>> load("memory://doc/files/w.pt")["w"]
        tensor([1., 1.])
    """
    storage, name = open_parent(url, storage_options)
    storage.makedirs()
    fmt = format_for_path(name)
    if isinstance(fmt, SafetensorsFormat):
        tree = treelib.canonicalize(obj)
        with storage.open_write(name) as raw:
            fmt.write(tree, ChecksumWriter(raw))
    else:
        with storage.open_write(name) as raw:
            torch.save(obj, raw)


def verify(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
    """Check a single file's structure and, for torch zips, every record's CRC32; raise if damaged.

    Safetensors files carry no checksum of their own: their header is validated and the data
    section must have exactly the size the header claims. (Checkpoints get CRC32C from their
    manifest: see :meth:`CheckpointManager.verify`.)
    """
    storage, name = open_parent(url, storage_options)
    where = storage.url(name)
    with storage.open_read(name) as f:
        if f.read(4) == b"PK\x03\x04":
            f.seek(0)
            try:
                archive = zipfile.ZipFile(f)
                bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
                raise CorruptCheckpointError(f"{where} is not a readable torch zip: {err}") from err
            if bad is not None:
                raise CorruptCheckpointError(f"{where}: record {bad} fails its CRC32")
            if len(data_pickles(archive.namelist())) != 1:
                raise CorruptCheckpointError(f"{where} is a sound zip archive but not a torch checkpoint (no single "
                                             "<archive>/data.pkl)")
            return
    size = storage.size(name)
    length = header_length(storage.read(name, 0, min(8, size)), size, where)
    parse_header(storage.read(name, 8, 8 + length), size, where)


def load(
    url: str | os.PathLike[str], *, map_location: MapLocation = None, weights_only: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a file written by :func:`save`, ``torch.save`` or ``safetensors`` from any URL.

    Raises:
        UnsafeCheckpointError: the file needs unpickling and ``weights_only`` is True.
        CorruptCheckpointError: the file is truncated or not in its format.
        CheckpointNotFound: nothing at ``url``.
    """
    storage, name = open_parent(url, storage_options)
    fmt = format_for_path(name)
    tree = fmt.read(Source(storage, name, storage.size(name)), map_location, weights_only, None)
    return treelib.decanonicalize(tree) if isinstance(fmt, SafetensorsFormat) else tree
