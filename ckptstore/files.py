"""Single-file helpers: ``torch.save``/``torch.load``, ``exists`` and ``delete`` for any URL.

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

from . import shards
from . import tree as treelib
from .errors import ConfigError, CorruptCheckpointError
from .safetensors_header import header_length, parse_header
from .serializers import ChecksumWriter, MapLocation, SafetensorsFormat, Source, TorchFormat, format_for_path, get_format
from .sniff import HEAD_BYTES, file_format
from .storage import open_parent
from .torch_zip import data_pickles


def save(
    obj: Any, url: str | os.PathLike[str], *, format: str | None = None, storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``obj`` to ``url`` atomically, in bounded memory: the bytes stream to the store.

    ``format``: ``"safetensors"`` stores a state tree (see :mod:`ckptstore.tree`: no pickle),
    ``"torch"`` is a plain ``torch.save`` of ``obj``, whole modules included; ``None`` (the
    default) picks safetensors for a ``.safetensors`` name and torch for any other.

    Example:
        >>> save({"w": torch.ones(2)}, "memory://doc/files/w.pt")
        >>> load("memory://doc/files/w.pt")["w"]
        tensor([1., 1.])
        >>> save({"w": torch.ones(2)}, "memory://doc/files/w.bin", format="safetensors")
        >>> exists("memory://doc/files/w.bin"), delete("memory://doc/files/w.bin"), exists("memory://doc/files/w.bin")
        (True, None, False)
    """
    fmt = format_for_path(os.fspath(url)) if format is None else get_format(format)
    storage, name = open_parent(url, storage_options)
    storage.makedirs()
    if isinstance(fmt, SafetensorsFormat):
        tree = treelib.canonicalize(obj)
        with storage.open_write(name) as raw:
            fmt.write(tree, ChecksumWriter(raw))
    else:
        with storage.open_write(name) as raw:
            torch.save(obj, raw)


def exists(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> bool:
    """True if a file is at ``url``, asked of the store (no cached listing). See :func:`save`."""
    storage, name = open_parent(url, storage_options)
    return storage.is_file(name)


def delete(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the file at ``url``; nothing there is fine. It never deletes a folder (see :func:`save`).

    Raises:
        ConfigError: ``url`` is a folder.
    """
    storage, name = open_parent(url, storage_options)
    if not storage.is_file(name) and storage.exists(name):
        raise ConfigError(f"{storage.url(name)} is a folder; ckptstore.delete removes one file")
    storage.delete(name)


def verify(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
    """Check a single file's structure and, for torch zips, every record's CRC32; raise if damaged.

    Safetensors files carry no checksum of their own: their header is validated and the data
    section must have exactly the size the header claims. (Checkpoints get CRC32C from their
    manifest: see :meth:`CheckpointManager.verify`.)
    """
    storage, name = open_parent(url, storage_options)
    where = storage.url(name)
    size = storage.size(name)
    with storage.open_read(name) as f:
        if file_format(f.read(HEAD_BYTES), where) == "torch":
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
    length = header_length(storage.read(name, 0, min(8, size)), size, where)
    parse_header(storage.read(name, 8, 8 + length), size, where)


def load(
    url: str | os.PathLike[str], *, map_location: MapLocation = None, weights_only: bool = True, mmap: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a file written by :func:`save`, ``torch.save`` (any version) or ``safetensors`` from any URL.

    A Hugging Face shard index (``*.index.json``), or the folder that holds one, loads every
    shard into one flat dict.

    The format is found from the file's first bytes, not its name. The returned tensors own
    their memory. ``mmap=True`` memory-maps a torch file instead of reading it (no copy in
    RAM), as ``torch.load(mmap=True)`` does; the tensors then *are* the file: rewriting it in
    place (``torch.save`` to the same path, Lightning's ``last.ckpt``) changes them, and
    truncating it makes touching them kill the process (SIGBUS). Remote files are mapped from
    a private temporary copy, which nobody else writes.

    Raises:
        UnsafeCheckpointError: the file needs unpickling and ``weights_only`` is True.
        CorruptCheckpointError: the file is truncated, or in neither format (the message says which).
        CheckpointNotFound: nothing at ``url``.
    """
    index = shards.find(url, storage_options)
    if index is not None:  # a Hugging Face sharded checkpoint: one flat dict of every shard's tensors
        return {k: v for shard in index.shards
                for k, v in load(index.storage.url(shard), map_location=map_location, weights_only=weights_only, mmap=mmap,
                                 storage_options=storage_options).items()}
    storage, name = open_parent(url, storage_options)
    size = storage.size(name)
    kind = file_format(storage.read(name, 0, min(HEAD_BYTES, size)), storage.url(name))
    if kind == "torch-legacy" and mmap:
        raise ConfigError(f"{storage.url(name)} is a torch file from before torch 1.6, which cannot be memory-mapped; "
                          "load it with mmap=False")
    source = Source(storage, name, size)
    if kind == "safetensors":
        return treelib.decanonicalize(SafetensorsFormat().read(source, map_location, weights_only, None))
    return TorchFormat().read(source, map_location, weights_only, None, mmap=mmap)
