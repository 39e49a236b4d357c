"""Sharded state through ``torch.distributed.checkpoint`` (DCP), under ckptstore's layout and commit.

State that holds DTensors (FSDP2's ``fully_shard``, ``distribute_tensor``) is written by every
rank at once with DCP's own writer and read back with its reader and planner, so a checkpoint
saved on N ranks loads on any number (DCP reshards). What ckptstore adds is what DCP leaves to
its storage layer:

* **Files** go through ckptstore's storage (:mod:`ckptstore.storage`: atomic local writes,
  concurrent multipart uploads, retries and timeouts), straight into the checkpoint folder,
  named after the save's random token: ``state-<token>.rank<r>-<n>.distcp`` (rank ``r``'s
  tensors), ``state-<token>.dcp-metadata`` (DCP's plan of where each shard lies) and
  ``state-<token>.tree.json`` (everything that is not a tensor, and where each tensor goes).
* **Checksums**: each file's size and CRC32C are taken on the way out; rank 0 gathers them
  and lists them all in the one manifest it writes last (:mod:`ckptstore.commit`).
* **No pickle from the store**: DCP's metadata file is a pickle; it is read by a restricted
  unpickler that admits DCP's own metadata classes and nothing else.
* **Models and optimizers** are saved the way DCP recommends, by
  ``get_model_state_dict`` / ``get_optimizer_state_dict`` (optimizer state keyed by
  parameter name, so it reshards), and restored by their ``set_*`` twins.

It is imported only by a job that saves DTensors or reads a sharded checkpoint: DCP's
import costs a CLI a third of a second.

Example:
    >>> from ckptstore.storage import open_storage
    >>> store = open_storage("memory://doc/sharded")
    >>> written = write_shards(store, "step_1", "0123abcd", {"w": torch.ones(2), "epoch": 3}, Ranks())
    >>> sorted(written)  # doctest: +NORMALIZE_WHITESPACE
    ['step_1/state-0123abcd.dcp-metadata', 'step_1/state-0123abcd.rank0-0.distcp', 'step_1/state-0123abcd.tree.json']
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import posixpath
import traceback
import warnings
from collections.abc import Container, Iterator, Mapping
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter, _StoragePrefix
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import empty as distributed_empty

from .errors import CkptStoreError, CorruptCheckpointError, RankError, StateMismatchError, StorageError, UnsafeCheckpointError
from .commit import verify_checkpoint
from .inplace import restore_into
from .manifest import CheckpointInfo
from .ranks import Ranks, is_collective_failure, others
from .serializers import ChecksumWriter
from .storage import FsspecStorage
from .tree import TENSOR_TAG, canonicalize, flatten, unflatten

SHARD_SUFFIX = ".distcp"
METADATA_SUFFIX = ".dcp-metadata"
TREE_SUFFIX = ".tree.json"


def model_and_optimizers(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``state`` with each module and optimizer replaced by DCP's view of it (see module doc),
    and which module each optimizer was paired with: ``{optimizer key: module key}``.

    An optimizer is paired with the module whose parameters it steps; one with no such module
    in ``state`` cannot be saved by parameter name and is left as it is.
    """
    modules = {k: v for k, v in state.items() if isinstance(v, torch.nn.Module)}
    out = dict(state)
    pairs: dict[str, str] = {}
    for key, module in modules.items():
        out[key] = get_model_state_dict(module)
    for key, value in state.items():
        if isinstance(value, torch.optim.Optimizer) and (owner := _owner(value, modules)) is not None:
            out[key] = get_optimizer_state_dict(modules[owner], value)
            pairs[key] = owner
    return out, pairs


def _owner(optimizer: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module]) -> str | None:
    """The key of the module whose parameters include every parameter ``optimizer`` steps."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for key, module in modules.items():
        if stepped <= {id(p) for p in module.parameters()}:
            return key
    return None


# -- writing ---------------------------------------------------------------------------------
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


FAILURES = (Exception, CheckpointException)  # what a DCP save or load raises (CheckpointException is a BaseException)


def own_error(err: BaseException, rank: int, world: int) -> Exception:
    """What a failed DCP save or load means on ``rank``: its own error where it failed itself
    (DCP gathers every rank's), else a RankError naming the ranks that failed or died.

    The frames of DCP's exceptions are cleared: DCP keeps each exception in a local of the frame
    that caught it, a cycle that would free the process groups those frames hold at an
    unpredictable time (after ``destroy_process_group``, torch then aborts the process at exit).
    """
    for chained in (err, *(f[0] for f in getattr(err, "failures", {}).values())):
        traceback.clear_frames(chained.__traceback__)
    if isinstance(err, CheckpointException):
        failures = err.failures
        if rank in failures:
            mine = failures[rank][0]
            return mine if isinstance(mine, CkptStoreError) else StorageError(f"rank {rank}: {type(mine).__name__}: {mine}")
        return RankError(f"rank {', '.join(map(str, sorted(failures)))} failed: " + "; ".join(
            f"rank {r}: {type(f[0]).__name__}: {f[0]}" for r, f in sorted(failures.items())))
    if is_collective_failure(err):  # a collective inside DCP: a rank died or hung
        return RankError(f"rank {rank}: {others(rank, world)} died or did not answer in time: {str(err).splitlines()[0][:300]}")
    return err if isinstance(err, Exception) else RankError(str(err))


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


# -- restoring -------------------------------------------------------------------------------
def restore_shards(
    storage: FsspecStorage, info: CheckpointInfo, state: Mapping[str, Any], ranks: Ranks, *, verify: bool = True, strict: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Restore a sharded checkpoint into ``state`` in place, on any number of ranks (every rank
    calls it at once); return the saved values not restored in place and the entries of
    ``state`` the checkpoint lacks (an error if ``strict``).

    Before any live byte changes: ``verify`` checks every file's size and CRC32C (each rank a
    share of the files), and the saved global shapes are checked against the live ones. Saved
    tensors with no live counterpart (a fresh optimizer's state) get new ones, sharded like the
    parameter they belong to.
    """
    if verify:
        problem = None
        try:
            verify_checkpoint(storage, dataclasses.replace(info, files=info.files[ranks.rank :: ranks.world]))
        except CorruptCheckpointError as err:
            problem = str(err)
        problems = [p for p in ranks.gather(problem) if p is not None]
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
    failed: list[BaseException] = []  # a box, not a local: see ranks.raise_dropped
    try:
        saved = SavedShards(storage, info.name, [f.path for f in info.files])
        live, pairs = model_and_optimizers(state)
        targets = _targets(saved, state, live, pairs, strict, storage.url(info.name))
    except Exception as err:  # every rank must reach the check below, or the others wait in DCP's load
        failed.append(err)
    ranks.check_all(failed, f"planning the restore of {info.url}")
    try:
        saved.load(targets, ranks)
    except FAILURES as err:
        raise own_error(err, ranks.rank, ranks.world) from None
    tree = saved.tree(targets, entries=state)  # saved entries holding tensors that state did not ask for are not read
    restored = _apply(state, tree, pairs)
    return {k: v for k, v in tree.items() if k not in restored}, [k for k in state if k not in saved.skeleton]


def _targets(
    saved: SavedShards, state: Mapping[str, Any], live: Mapping[str, Any], pairs: Mapping[str, str], strict: bool, where: str,
) -> dict[str, torch.Tensor]:
    """The tensor each saved tensor of an entry in ``state`` loads into; raise before any byte moves if one cannot."""
    missing = [k for k in state if k not in saved.skeleton]
    if missing and strict:
        raise StateMismatchError(f"{where} holds no {', '.join(map(repr, missing))} (pass strict=False to restore the rest)")
    live_tensors, _ = flatten(canonicalize(live))
    shapes = saved.shapes()
    wrong = {k: (shape, tuple(live_tensors[k].shape)) for k, (shape, _) in shapes.items()
             if k in live_tensors and tuple(live_tensors[k].shape) != shape}
    if wrong:
        raise StateMismatchError(f"{where}: saved and live shapes differ: " + ", ".join(
            f"{k} {a} vs {b}" for k, (a, b) in sorted(wrong.items())[:8]))
    return {k: live_tensors[k] if k in live_tensors else _new_target(k, shape, dtype, live_tensors, pairs)
            for k, (shape, dtype) in shapes.items() if k.split("/")[0] in state}


def _new_target(
    key: str, shape: tuple[int, ...], dtype: torch.dtype, live: Mapping[str, torch.Tensor], pairs: Mapping[str, str],
) -> torch.Tensor:
    """A tensor to load saved ``key`` into: a DTensor sharded like its parameter for optimizer
    state (``<optimizer>/state/<parameter>/<name>``), else a plain CPU tensor."""
    parts = key.split("/")
    if len(parts) == 4 and parts[1] == "state" and parts[0] in pairs:
        param = live.get(f"{pairs[parts[0]]}/{parts[2]}")
        if isinstance(param, DTensor) and tuple(param.shape) == shape:
            return distributed_empty(shape, dtype=dtype, device_mesh=param.device_mesh, placements=param.placements)
        if param is not None and tuple(param.shape) == shape:
            return torch.empty(shape, dtype=dtype, device=param.device)
    return torch.empty(shape, dtype=dtype)


def _apply(state: Mapping[str, Any], tree: Mapping[str, Any], pairs: Mapping[str, str]) -> set[str]:
    """Hand each restored entry to its live object; return the keys restored in place."""
    present = [k for k in state if k in tree]
    modules = [k for k in present if isinstance(state[k], torch.nn.Module)]
    others = [k for k in present if k not in modules and k not in pairs]
    kept = restore_into({k: state[k] for k in others}, {k: tree[k] for k in others})  # all or nothing, checked first
    for key in modules:
        set_model_state_dict(state[key], tree[key])
    for key in pairs:
        set_optimizer_state_dict(state[pairs[key]], state[key], tree[key])
    return {k for k in present if k not in kept}


# -- one process: conversion -------------------------------------------------
def read_tree(storage: FsspecStorage, folder: str, files: list[str]) -> Any:
    """The whole saved tree in one process, every tensor whole on the CPU (for a conversion to one file)."""
    saved = SavedShards(storage, folder, files)
    tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in saved.shapes().items()}
    saved.load(tensors)
    return saved.tree(tensors)


# -- reading ---------------------------------------------------------------------------------
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

    def load(self, targets: dict[str, torch.Tensor], ranks: Ranks | None = None) -> None:
        """Fill ``targets`` (a subset of the saved keys, each of its saved global shape) in place;
        DTensors get their own shard, resharded by DCP's planner."""
        ranks = ranks or Ranks()
        reader = _Reader(_StoreFiles(self.storage), self.folder, self.meta_name, self.metadata)
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
    """DCP's file reader over ckptstore's storage, with the metadata already read safely."""

    def __init__(self, files: _StoreFiles, folder: str, meta_name: str, metadata: dcp_metadata.Metadata) -> None:
        super().__init__(folder)
        self.fs, self.path = files, folder  # type: ignore[assignment]
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        return self._metadata


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

