"""Sharded checkpoints as Hugging Face writes them: shards plus ``*.index.json``.

``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) maps each tensor name to
the shard file that holds it: ``{"metadata": {...}, "weight_map": {"lm_head.weight":
"model-00002-of-00002.safetensors", ...}}``, the shards in the same folder. The index file, or
the folder that holds one, is accepted wherever a file is; a partial load reads the headers
of the shards that hold a tensor the target has, and then only those tensors' byte ranges.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointNotFound, CorruptCheckpointError
from .storage import FsspecStorage, open_parent, open_storage

INDEX_SUFFIX = ".index.json"
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")  # a name with one is not a folder


@dataclass(frozen=True)
class ShardIndex:
    """An index file's ``weight_map`` (tensor name -> shard file name), with the folder's storage.

    Example:
        >>> store = open_storage("memory://doc/shards")
        >>> store.makedirs()
        >>> with store.open_write("model.safetensors.index.json") as f:
        ...     _ = f.write(b'{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}')
        >>> find("memory://doc/shards").shards
        ['s1.safetensors', 's2.safetensors']
    """

    storage: FsspecStorage
    file: str
    weight_map: dict[str, str]

    @property
    def shards(self) -> list[str]:
        """The shard file names, sorted."""
        return sorted(set(self.weight_map.values()))

    @property
    def url(self) -> str:
        return self.storage.url(self.file)


def find(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> ShardIndex | None:
    """The index ``url`` names, or the one in the folder ``url`` names; None for anything else.

    A folder with several index files is ambiguous: the error lists them. A ckptstore
    checkpoint folder holds none (callers that read its manifest first skip this listing).
    """
    url = os.fspath(url).rstrip("/")
    if url.endswith(INDEX_SUFFIX):
        storage, name = open_parent(url, storage_options)
        return read_index(storage, name)
    if posixpath.basename(url).endswith(FILE_SUFFIXES):
        return None
    folder = open_storage(url, storage_options)
    listed = folder.list_files()
    found = sorted(p for p in listed if "/" not in p and p.endswith(INDEX_SUFFIX))
    if len(found) > 1:
        raise CorruptCheckpointError(f"{url} holds several shard indexes ({', '.join(found)}); name the one to read")
    return read_index(folder, found[0]) if found else None


def read_index(storage: FsspecStorage, name: str) -> ShardIndex:
    """Parse and check an index file: every shard must be a plain file name in the same folder."""
    where = storage.url(name)
    try:
        doc = json.loads(storage.read(name))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to file names")
    except CheckpointNotFound:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{where} is not a shard index: {err!r}") from err
    for shard in set(weight_map.values()):
        if "/" in shard or shard in ("", ".", "..") or "\\" in shard:
            raise CorruptCheckpointError(f"{where} names the shard {shard!r}, which is not a file beside it")
    return ShardIndex(storage, name, dict(weight_map))
