"""Single-file helpers: ``torch.save``/``torch.load`` for any URL, written atomically.

``save`` writes through :meth:`FsspecStorage.open_write`, so the file appears whole or not
at all (and an earlier file of the same name survives a failed save). The format follows
the extension: ``.safetensors`` stores a state tree (see :mod:`ckptstore.tree`), anything
else is a plain ``torch.save`` of ``obj``, including whole modules. ``load`` refuses pickled
objects unless the caller passes ``weights_only=False``, as ``torch.load`` does since 2.6.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import torch

from . import tree as treelib
from .serializers import ChecksumWriter, MapLocation, SafetensorsFormat, Source, format_for_path
from .storage import FsspecStorage, open_storage


def _split(url: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[FsspecStorage, str]:
    url = os.fspath(url)
    parent, name = posixpath.split(url.rstrip("/"))
    return open_storage(parent or ".", storage_options), name


def save(obj: Any, url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
    """Save ``obj`` to ``url`` atomically: ``.safetensors`` as a state tree, else ``torch.save``.

    Example:
        >>> save({"w": torch.ones(2)}, "memory://doc/files/w.pt")
        >>> load("memory://doc/files/w.pt")["w"]
        tensor([1., 1.])
    """
    storage, name = _split(url, storage_options)
    storage.makedirs()
    fmt = format_for_path(name)
    if isinstance(fmt, SafetensorsFormat):
        tree = treelib.canonicalize(obj)
        with storage.open_write(name) as raw:
            fmt.write(tree, ChecksumWriter(raw))
    else:
        with storage.open_write(name) as raw:
            torch.save(obj, raw)


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
    storage, name = _split(url, storage_options)
    fmt = format_for_path(name)
    tree = fmt.read(Source(storage, name, storage.size(name)), map_location, weights_only, None)
    return treelib.decanonicalize(tree) if isinstance(fmt, SafetensorsFormat) else tree
