"""Sharded state through ``torch.distributed.checkpoint`` (DCP): saved by every rank, restored on any number.

State that holds DTensors (FSDP2's ``fully_shard``, ``distribute_tensor``) is written by every
rank at once with DCP's own writer and read back with its reader and planner, so a checkpoint
saved on N ranks loads on any number (DCP reshards). The files, their names, checksums and the
safe reading of DCP's metadata are :mod:`ckptstore.dcp_files`; this module is what a save and
a restore do with them:

* **Models and optimizers** are saved the way DCP recommends, by ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` (optimizer state keyed by parameter name, so it reshards), and
  restored by their ``set_*`` twins (``get_optimizer_state_dict`` gives a fresh optimizer its state first).
* **Restore** checks the CRC32C of every file (each rank a share) and every saved global shape
  against the live one before any byte moves; every rank learns whether any rank failed.
* **Failures** inside DCP become the failing rank's own error and a RankError on the others.

It is imported only by a job that saves DTensors or reads a sharded checkpoint: DCP's
import costs a CLI a third of a second.

Example:
    >>> model = torch.nn.Linear(2, 2)
    >>> sorted(model_and_optimizers({"model": model, "epoch": 1})[0]["model"])
    ['bias', 'weight']
"""

from __future__ import annotations

import os
import re
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .commit import verify_file
from .dcp_files import SavedShards
from .errors import CkptStoreError, CorruptCheckpointError, RankError, StateMismatchError, StorageError
from .inplace import restore_into
from .manifest import CheckpointInfo, FileEntry
from .ranks import Ranks, is_collective_failure, others
from .serializers import Source, read_checked
from .storage import FsspecStorage, open_storage
from .tree import canonicalize, flatten


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


# -- restoring -------------------------------------------------------------------------------
def restore_shards(
    storage: FsspecStorage, info: CheckpointInfo, state: Mapping[str, Any], ranks: Ranks, *, verify: bool = True, strict: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Restore a sharded checkpoint into ``state`` in place, on any number of ranks (every rank
    calls it at once); return the saved values not restored in place and the entries of
    ``state`` the checkpoint lacks (an error if ``strict``).

    Before any live byte changes: ``verify`` checks every file's size and CRC32C (each rank a
    share of the files), and the saved global shapes are checked against the live ones. A saved
    tensor of an entry of ``state`` with no live counterpart is read into a new CPU tensor.
    """
    with tempfile.TemporaryDirectory(prefix="ckptstore-shards-") as folder:
        copies = _checked_copies(storage, info, ranks, folder) if verify else None
        return _restore_checked(storage, info, state, ranks, strict, copies)


def _checked_copies(storage: FsspecStorage, info: CheckpointInfo, ranks: Ranks, folder: str) -> FsspecStorage | None:
    """Check the CRC32C of this rank's share of the files (its own shards first: the ones it will most
    likely read); on a remote store keep each checked file in ``folder``, so the load reads it from
    there, not twice from the store. Raises CorruptCheckpointError on every rank if any found damage."""
    problem = None
    try:
        for entry in share(info.files, ranks.rank, ranks.world):
            path = f"{info.name}/{entry.path}"
            if storage.local_path(path) is not None:
                verify_file(storage, path, entry)
                continue
            with open(os.path.join(folder, entry.path), "wb") as copy:
                read_checked(Source(storage, path, entry.size), entry.crc32c, copy_to=copy)
    except CorruptCheckpointError as err:
        problem = str(err)
    problems = [p for p in ranks.gather(problem) if p is not None]
    if problems:
        raise CorruptCheckpointError("; ".join(problems))
    return None if storage.is_local else open_storage(folder)


def share(files: Sequence[FileEntry], rank: int, world: int) -> list[FileEntry]:
    """The files ``rank`` checks: every ``.rank<r>-`` file with r mod world = rank, and a round-robin share of the rest.

    Example:
        >>> names = ["s.dcp-metadata", "s.rank0-0.distcp", "s.rank1-0.distcp", "s.tree.json"]
        >>> [f.path for f in share([FileEntry(n, 1, 0) for n in names], 1, 2)]
        ['s.rank1-0.distcp', 's.tree.json']
    """
    owner = {e.path: int(m.group(1)) % world for e in files if (m := _RANK_FILE.search(e.path))}
    rest = [e for e in files if e.path not in owner]
    return [e for e in files if owner.get(e.path) == rank] + rest[rank::world]


_RANK_FILE = re.compile(r"\.rank(\d+)-\d+\.distcp$")


def _restore_checked(
    storage: FsspecStorage, info: CheckpointInfo, state: Mapping[str, Any], ranks: Ranks, strict: bool, copies: FsspecStorage | None,
) -> tuple[dict[str, Any], list[str]]:
    failed: list[BaseException] = []  # a box, not a local: see ranks.raise_dropped
    try:
        saved = SavedShards(storage, info.name, [f.path for f in info.files])
        live, pairs = model_and_optimizers(state)
        targets = _targets(saved, state, live, strict, storage.url(info.name))
    except Exception as err:  # every rank must reach the check below, or the others wait in DCP's load
        failed.append(err)
    ranks.check_all(failed, f"planning the restore of {info.url}")
    try:
        saved.load(targets, ranks, copies)
    except FAILURES as err:
        raise own_error(err, ranks.rank, ranks.world) from None
    tree = saved.tree(targets, entries=state)  # saved entries holding tensors that state did not ask for are not read
    restored = _apply(state, tree, pairs)
    return {k: v for k, v in tree.items() if k not in restored}, [k for k in state if k not in saved.skeleton]


def _targets(
    saved: SavedShards, state: Mapping[str, Any], live: Mapping[str, Any], strict: bool, where: str,
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
    return {k: live_tensors[k] if k in live_tensors else torch.empty(shape, dtype=dtype)
            for k, (shape, dtype) in shapes.items() if k.split("/")[0] in state}


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
