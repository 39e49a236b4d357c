"""DCP's files under ckptstore's storage: how the shards of a sharded checkpoint are written and read.

``torch.distributed.checkpoint`` leaves storage to a ``StorageWriter``/``StorageReader``;
these are its own ``FileSystemWriter``/``FileSystemReader``, changed only where ckptstore's
layout differs:

* every file goes through :class:`~ckptstore.storage.FsspecStorage` (atomic local writes,
  concurrent multipart uploads, retries and timeouts) straight into the checkpoint folder,
  named after the save's random token: ``state-<token>.rank<r>-<n>.distcp`` (rank ``r``'s
  shards), ``state-<token>.dcp-metadata`` (DCP's plan of where each shard lies, written in
  place: a rename is a copy on object stores) and ``state-<token>.tree.json`` (the state's
  structure and non-tensor values);
* each file's size and CRC32C are taken on the way out, for the manifest;
* DCP's metadata is a pickle: it is read by a restricted unpickler that admits DCP's own
  metadata classes and nothing else.

Example:
    >>> from ckptstore.storage import open_storage
    >>> store = open_storage("memory://doc/dcp_files")
    >>> written = write_shards(store, "step_1", "0123abcd", {"w": torch.ones(2), "epoch": 3}, Ranks())
    >>> sorted(written)  # doctest: +NORMALIZE_WHITESPACE
    ['step_1/state-0123abcd.dcp-metadata', 'step_1/state-0123abcd.rank0-0.distcp', 'step_1/state-0123abcd.tree.json']
    >>> SavedShards(store, "step_1", [p.split("/")[1] for p in written]).shapes()
    {'w': ((2,), torch.float32)}
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import io
import json
import os
import pickle
import posixpath
import warnings
from collections.abc import Callable, Container, Iterator, Mapping
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter, _StoragePrefix
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future
from torch.distributed.tensor import DTensor

from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .ranks import Ranks
from .serializers import ChecksumWriter
from .storage import FsspecStorage
from .tree import TENSOR_TAG, flatten, unflatten

SHARD_SUFFIX = ".distcp"
METADATA_SUFFIX = ".dcp-metadata"
TREE_SUFFIX = ".tree.json"

def write_shards(storage: FsspecStorage, folder: str, token: str, tree: Any, ranks: Ranks) -> dict[str, tuple[int, int]]:
    """Write this rank's part of ``tree`` (every rank calls it at once); return the files it
    wrote: ``{path under the root: (size, crc32c)}``. Rank 0 also writes the tree file.
    """
    tensors, skeleton = flatten(tree)
    files = _StoreFiles(storage, size_hint=sum(_local_bytes(t) for t in tensors.values()))
    writer = _Writer(files, folder, token)
    with _one_process_is_meant():
        dcp.save(tensors, storage_writer=writer, process_group=ranks.group, no_dist=not ranks.distributed)
    if ranks.leader:
        with files.create_stream(posixpath.join(folder, f"state-{token}{TREE_SUFFIX}"), "wb") as out:
            out.write(json.dumps({"tree": skeleton}).encode())
    return files.written


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` this rank holds: a DTensor's local shard, a plain tensor whole."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


class _StoreFiles(FileSystemBase):
    """DCP's file interface over a ckptstore storage; remembers the size and CRC32C of what it writes."""

    def __init__(self, storage: FsspecStorage, size_hint: int = 0) -> None:
        self.storage, self.size_hint = storage, size_hint  # the hint sizes upload parts: S3 allows 10,000
        self.written: dict[str, tuple[int, int]] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        path = os.fspath(path)
        if "r" in mode:
            with self.storage.open_read(path) as f:
                yield f  # type: ignore[misc]
            return
        with self.storage.open_write(path, self.size_hint) as raw:
            out = _CountingStream(raw)
            yield out
        self.written[path] = (out.checksum.size, out.checksum.crc)

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return posixpath.join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike[str]) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        raise NotImplementedError("ckptstore writes DCP's metadata in place: a rename is a copy on object stores")

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        """Folders need no creating: a write creates its parents."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.storage.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.storage.delete(os.fspath(path))


class _CountingStream(io.RawIOBase):
    """A write stream with ``tell()`` (DCP records each item's offset) that checksums as it goes."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.checksum = ChecksumWriter(raw)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.checksum.write(data)

    def tell(self) -> int:
        return self.checksum.size

    def close(self) -> None:
        """DCP closes the stream before the storage commits it; the commit happens on leaving ``create_stream``."""


class _Writer(FileSystemWriter):
    """DCP's file writer with ckptstore's file names, no existence probe and no rename."""

    def __init__(self, files: _StoreFiles, folder: str, token: str) -> None:
        super().__init__(folder, single_file_per_rank=True, sync_files=False, overwrite=True)
        self.fs, self.path, self.token = files, folder, token  # type: ignore[assignment]

    def _metadata_exists(self) -> bool:
        return False  # the token is new: nothing can be there

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"state-{self.token}.rank{i}-")) for i, p in enumerate(plans)]

    def finish(self, metadata: dcp_metadata.Metadata, results: list[list[Any]]) -> None:
        """Record where every item lies and write the metadata once, in place (the manifest commits it)."""
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_meta = self.storage_meta()
        with self.fs.create_stream(posixpath.join(self.path, f"state-{self.token}{METADATA_SUFFIX}"), "wb") as out:
            pickle.dump(metadata, out)


def read_tree(storage: FsspecStorage, folder: str, files: list[str]) -> Any:
    """The whole saved tree in one process, every tensor whole on the CPU (for a conversion to one file)."""
    saved = SavedShards(storage, folder, files)
    tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in saved.shapes().items()}
    saved.load(tensors)
    return saved.tree(tensors)


class SavedShards:
    """A committed sharded checkpoint: its tree, its DCP metadata, and a reader for its shards.

    ``files``: the checkpoint's data file names (from its manifest), ``folder``: its folder.
    """

    def __init__(self, storage: FsspecStorage, folder: str, files: list[str]) -> None:
        self.storage, self.folder = storage, folder
        meta = _one(files, METADATA_SUFFIX, storage.url(folder))
        tree = _one(files, TREE_SUFFIX, storage.url(folder))
        self.metadata = _read_metadata(storage, posixpath.join(folder, meta))
        try:
            self.skeleton = json.loads(storage.read(posixpath.join(folder, tree)))["tree"]
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(f"{storage.url(posixpath.join(folder, tree))} is not a ckptstore tree file: {err!r}") from err
        self.meta_name = meta

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every saved tensor's global shape and dtype, by flat key."""
        return {
            k: (tuple(m.size), m.properties.dtype) for k, m in self.metadata.state_dict_metadata.items()
            if isinstance(m, dcp_metadata.TensorStorageMetadata)
        }

    def load(self, targets: dict[str, torch.Tensor], ranks: Ranks | None = None, copies: FsspecStorage | None = None) -> None:
        """Fill ``targets`` (a subset of the saved keys, each of its saved global shape) in place;
        DTensors get their own shard, resharded by DCP's planner."""
        ranks = ranks or Ranks()
        reader = _Reader(_StoreFiles(self.storage), self.folder, self.meta_name, self.metadata, copies)
        planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
        with _one_process_is_meant():
            dcp.load(targets, storage_reader=reader, planner=planner, process_group=ranks.group, no_dist=not ranks.distributed)

    def tree(self, tensors: Mapping[str, torch.Tensor], entries: Container[str] | None = None, *, placeholders: bool = False) -> Any:
        """The saved canonical tree with ``tensors`` (by flat key) in place of each saved tensor;
        of ``entries`` only, and the saved entries that hold no tensor, if given. ``placeholders``:
        each tensor shown as ``"<tensor key>"`` instead (for ``inspect``)."""
        skeleton = self.skeleton if entries is None else {
            k: v for k, v in self.skeleton.items() if k in entries or not _holds_tensor(v)}
        return unflatten(skeleton, lambda key, _device: f"<tensor {key}>" if placeholders else tensors[key])


class _Reader(FileSystemReader):
    """DCP's file reader over ckptstore's storage, with the metadata already read safely, that
    fetches exactly the byte range of each item it loads.

    DCP's own reader opens each file as a stream and lets ``torch.load`` seek about in every
    item; through a remote store's read-ahead that moved three times the file's bytes. Here the
    items of a file are fetched as exact ranges (adjacent ones joined up to a part's size),
    ``transfers.in_flight`` parts at once on a remote store and one at a time on a local disk,
    then each is loaded from memory; files the restore already checked and kept locally
    (``copies``) are read from there.
    """

    def __init__(self, files: _StoreFiles, folder: str, meta_name: str, metadata: dcp_metadata.Metadata,
                 copies: FsspecStorage | None) -> None:
        super().__init__(folder)
        self.fs, self.path = files, folder  # type: ignore[assignment]
        self._storage, self._metadata, self._copies = files.storage, metadata, copies

    def _fetch(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Byte ranges of the file ``name``: from a checked local copy of it if the restore kept one, else from the store."""
        if self._copies is not None and self._copies.exists(name):
            return self._copies.read_ranges(name, ranges)
        return self._storage.read_ranges(posixpath.join(self.path, name), ranges)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            items.sort(key=lambda item: self.storage_data[item.storage_index].offset)
            transfers = self._storage.transfers
            in_flight = 1 if self._storage.is_local else transfers.in_flight  # a local read is as fast alone
            for batch in _batches(items, lambda item: self.storage_data[item.storage_index].length, in_flight * transfers.part_bytes):
                where = [self.storage_data[item.storage_index] for item in batch]
                if any(w.transform_descriptors for w in where):
                    raise CorruptCheckpointError(f"{self._storage.url(name)}: stream transforms are not supported")
                runs = _runs([(w.offset, w.offset + w.length) for w in where], transfers.part_bytes)
                fetched = self._fetch(name, runs)
                starts = [start for start, _ in runs]
                for item, w in zip(batch, where):
                    run = bisect.bisect_right(starts, w.offset) - 1
                    at = w.offset - starts[run]
                    _load_item(planner, item, memoryview(fetched[run])[at : at + w.length])
        done: Future[None] = Future()
        done.set_result(None)
        return done


SMALL_ITEM = 256 * 2**10  # an item this small rides along with the run before it


def _batches(items: list[Any], size: Callable[[Any], int], most: int) -> Iterator[list[Any]]:
    """``items`` in runs of at most ``most`` bytes (an item larger than that alone)."""
    batch: list[Any] = []
    total = 0
    for item in items:
        if batch and total + size(item) > most:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size(item)
    if batch:
        yield batch


def _runs(ranges: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """Sorted ``ranges`` joined where one ends where the next begins, each run at most ``most``
    bytes unless the range joined is small (a bias after its weight): a few requests for many
    small items, several in flight for big ones."""
    runs: list[tuple[int, int]] = []
    for start, end in ranges:
        if runs and runs[-1][1] == start and (end - runs[-1][0] <= most or end - start <= SMALL_ITEM):
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _load_item(planner: LoadPlanner, item: Any, data: memoryview) -> None:
    """Hand one fetched item to DCP's planner: bytes as they are, a tensor narrowed to the requested chunk."""
    if item.type == LoadItemType.BYTE_IO:
        planner.load_bytes(item, io.BytesIO(data.tobytes()))
        return
    tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
        tensor = tensor.narrow(dim, start, length)
    target = planner.resolve_tensor(item).detach()
    if target.size() != tensor.size():
        raise CorruptCheckpointError(f"a saved chunk of {item.storage_index.fqn} is {tuple(tensor.size())}, "
                                     f"the plan expects {tuple(target.size())}")
    target.copy_(tensor)
    planner.commit_tensor(item, target)


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Silence DCP's warning that it assumes one process when none is initialized: that is what ckptstore asks."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _holds_tensor(node: Any) -> bool:
    """True if a skeleton node refers to a saved tensor."""
    if isinstance(node, dict):
        return TENSOR_TAG in node or any(_holds_tensor(v) for v in node.values())
    return isinstance(node, list) and any(_holds_tensor(v) for v in node)


def _one(files: list[str], suffix: str, where: str) -> str:
    found = [f for f in files if f.endswith(suffix)]
    if len(found) != 1:
        raise CorruptCheckpointError(f"{where}: a sharded checkpoint lists one *{suffix} file, its manifest lists {len(found)}")
    return found[0]


# DCP's metadata is a pickle of these classes (and torch's size, dtype, layout and memory format).
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("collections", "OrderedDict"),
     ("torch.serialization", "_get_layout")}  # a layout by name: torch.load's weights_only unpickler admits it too


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"DCP metadata names {module}.{name}, which is not one of DCP's metadata classes")


def _read_metadata(storage: FsspecStorage, path: str) -> dcp_metadata.Metadata:
    where = storage.url(path)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(storage.read(path))).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{where}: {err}; it is not read (it could run code)") from None
    except Exception as err:  # any malformed pickle
        raise CorruptCheckpointError(f"{where} is not DCP metadata: {err!r}") from err
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CorruptCheckpointError(f"{where} is not DCP metadata: it holds a {type(metadata).__name__}")
    return metadata

