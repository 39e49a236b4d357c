"""Restoring in place: put a checkpoint into the caller's live modules, optimizers and tensors.

Mirrors ``torch.distributed.checkpoint``: the caller passes the state it wants filled.
Stateful entries get ``load_state_dict``; tensors (also inside nested dicts and lists) are
filled with ``copy_`` so pre-allocated memory, and every reference to it, sees the restored
values. Everything else cannot be updated in place (ints, strings, ...) and is handed back.

:func:`restore_checkpoint` streams instead of reading the whole file into new tensors and
copying them (which holds the state twice in RAM):

1. **Plan** the data file from its header (:func:`ckptstore.partial.plan`) and build the
   saved tree with a marker in place of each tensor.
2. **Pair** each marker with the live tensor at the same place, walking the tree as
   :func:`restore_into` does: plain tensors, a module's ``state_dict(keep_vars=True)`` (its
   parameters and buffers themselves), an optimizer's ``state_dict()["state"]`` (its live
   per-parameter tensors). Only these two ``state_dict`` implementations are known to alias
   live memory without side effects, so other Stateful objects (schedulers, RNGState, an
   overriding subclass) are not asked. A module's or plain tensor's shape mismatch raises
   :class:`StateMismatchError` here, before any tensor byte is read.
3. **Land** each saved tensor's bytes straight in its live partner when they fit as they
   are: same shape and dtype, contiguous on both sides, and no other saved tensor restores
   into overlapping memory (then the order of ``load_state_dict``'s copies would decide the
   result). Every other saved tensor is read into a new tensor and placed by
   ``map_location``, as before. Live tensors keep their device, as ``copy_`` keeps it.
4. **Apply** the saved tree, now holding those live tensors themselves, with
   :func:`restore_into`: ``load_state_dict`` runs exactly as before (a ``copy_`` of a tensor
   onto itself is a no-op), with its hooks, key checks and optimizer casts.

Integrity. No live byte changes before the checksum passes. Local files get their CRC32C
pass first (the bytes are then in the page cache, so landing them costs a memory read, not
a second disk read). Remote files are downloaded once to a local temporary file, checksummed
on the way (bounded memory; it needs local disk space for one checkpoint), and restored from
there. (A first version checked remote bytes while they streamed into the live tensors; on
damage, a "latest" fallback left the tensors that the older checkpoint lacks holding bad
bytes.)

Modules whose loading is not torch's key-for-key copy (load or state_dict hooks anywhere in
the tree, ``_load_from_state_dict`` defined outside ``torch.nn``, an overridden
``state_dict``/``load_state_dict``) get their tensors as new ones, as before: a hook may route
saved tensor X into parameter Y, which bytes landed early by key would corrupt.

Where the header cannot be planned (a torch file whose ``data.pkl`` holds more than the
planner's restricted unpickler accepts) or a callable ``map_location`` must see torch's own
storages, the whole file is read as before and :func:`restore_into` copies it.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from . import commit
from .errors import CorruptCheckpointError, StateMismatchError, UnsafeCheckpointError
from .manifest import CheckpointInfo
from .partial import DEFAULT_MAX_BUFFER, LoadReport, Plan, plan
from .serializers import MapLocation, Source, place, read_checked
from .storage import FsspecStorage, open_storage
from .transfer import SourceTensor, Transfer, byte_view, landable, scratch, shaped
from .tree import decanonicalize, is_stateful

log = logging.getLogger("ckptstore")


def restore_into(target: dict[str, Any] | None, loaded: dict[str, Any]) -> dict[str, Any]:
    """Fill ``target`` from ``loaded`` in place; return the values that were not consumed.

    Returned: every saved entry except Stateful objects restored in place (plain values
    such as ``epoch``, nested containers with their tensors restored, and saved entries that
    ``target`` did not ask for).

    Example:
        >>> w = torch.zeros(2)
        >>> restore_into({"w": w, "epoch": 0}, {"w": torch.ones(2), "epoch": 4})
        {'epoch': 4}
        >>> w
        tensor([1., 1.])
    """
    values: dict[str, Any] = {}
    for key, saved in loaded.items():
        live = target.get(key) if target is not None else None
        if isinstance(live, torch.Tensor) or is_stateful(live):
            _fill(live, saved, repr(key))
        else:
            values[key] = _fill(live, saved, repr(key))
    return values


def _fill(live: Any, saved: Any, path: str) -> Any:
    """Restore ``saved`` into ``live`` where possible; return the value as the caller sees it."""
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise StateMismatchError(f"state[{path}] is a tensor but the checkpoint holds a {type(saved).__name__}")
        if live.shape != saved.shape:
            raise StateMismatchError(
                f"state[{path}] has shape {tuple(live.shape)}, the checkpoint {tuple(saved.shape)}; "
                "use load_partial to load only matching tensors"
            )
        with torch.no_grad():
            live.copy_(saved)
        return live
    if is_stateful(live):
        live.load_state_dict(decanonicalize(saved))
        return live
    if isinstance(live, dict) and isinstance(saved, dict):
        return type(saved)((k, _fill(live.get(k), v, f"{path}][{k!r}")) for k, v in saved.items())
    if isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved):
        return [_fill(a, b, f"{path}][{i}") for i, (a, b) in enumerate(zip(live, saved))]
    return decanonicalize(saved)


def restore_checkpoint(
    storage: FsspecStorage, info: CheckpointInfo, target: dict[str, Any] | None, *,
    map_location: MapLocation = None, weights_only: bool = True, verify: bool = True,
    max_buffer: int = DEFAULT_MAX_BUFFER,
) -> tuple[dict[str, Any], LoadReport]:
    """Restore checkpoint ``info`` into ``target``, streaming tensor bytes into live tensors.

    Returns what :func:`restore_into` returns, and a report: ``loaded`` lists the saved keys
    that landed in live memory; ``bytes_read``/``requests`` count the reads of the data file
    (0 where it was read whole, see the module doc).

    Raises:
        CorruptCheckpointError: the data file is missing, resized, damaged or fails its CRC32C.
        StateMismatchError: a live tensor's shape differs from the saved one.
    """
    path, entry = commit.data_file(storage, info)
    if verify and storage.local_path(path) is None:  # remote: a checked local copy first
        with tempfile.TemporaryDirectory(prefix="ckptstore-restore-") as folder:
            name = posixpath.basename(path)
            with open(os.path.join(folder, name), "wb") as copy:
                read_checked(Source(storage, path, entry.size), entry.crc32c, copy_to=copy)
            return _restore(open_storage(folder), name, storage, info, target, map_location, weights_only, verify, max_buffer)
    if verify:
        commit.verify_file(storage, path, entry)
    return _restore(storage, path, storage, info, target, map_location, weights_only, verify, max_buffer)


def _restore(
    data: FsspecStorage, path: str, storage: FsspecStorage, info: CheckpointInfo, target: dict[str, Any] | None,
    map_location: MapLocation, weights_only: bool, verify: bool, max_buffer: int,
) -> tuple[dict[str, Any], LoadReport]:
    """Restore from the verified data file ``path`` of ``data`` (``storage``/``info``: the checkpoint)."""
    report = LoadReport()
    try:
        planned: Plan | None = plan(data, path, report, info.files[0].size)
    except (CorruptCheckpointError, UnsafeCheckpointError) as err:
        log.info("%s cannot be planned from its header (%s); reading it whole", info.url, err)
        planned = None
    if planned is None or (info.format == "torch" and callable(map_location)):
        loaded = commit.read_checkpoint(storage, info, map_location=map_location, weights_only=weights_only, verify=verify)
        return restore_into(target, _checked_dict(loaded, info)), LoadReport()

    sources = planned.sources
    needed: dict[str, None] = {}  # saved keys the tree refers to, in order

    def mark(key: str, _device: str) -> _Saved:
        if key not in sources:
            raise CorruptCheckpointError(f"{info.url}: the state refers to tensor {key!r}, which the file lacks")
        needed[key] = None
        return _Saved(key)

    markers = _checked_dict(planned.build(mark), info)
    pairs: list[_Pair] = []
    _pair(target, markers, "", True, sources, pairs)
    direct = _destinations(pairs, sources)
    fresh = {k: scratch(sources[k]) for k in needed if k not in direct}
    jobs = [(sources[k], byte_view(direct[k]) if k in direct else fresh[k].view(torch.uint8)) for k in needed]
    Transfer(data, path, max_buffer, report).run(jobs)
    report.loaded = sorted(direct)
    placed: dict[str, torch.Tensor] = {}

    def load(key: str, device: str) -> torch.Tensor:
        if key in direct:
            return direct[key]
        if key not in placed:
            placed[key] = place(shaped(sources[key], fresh[key]), device, map_location)
        return placed[key]

    return restore_into(target, planned.build(load)), report


def _checked_dict(tree: Any, info: CheckpointInfo) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"{info.url} holds a {type(tree).__name__}, not a state dict")
    return tree


@dataclass(frozen=True)
class _Saved:
    """Stands for the saved tensor ``key`` in the tree while pairing."""

    key: str


@dataclass(frozen=True)
class _Pair:
    """``live`` is restored from the saved tensor ``key`` (``path`` names it for messages)."""

    live: torch.Tensor
    key: str
    path: str


def _pair(live: Any, saved: Any, path: str, checked: bool, sources: dict[str, SourceTensor], out: list[_Pair]) -> None:
    """Collect the live tensors that restoring ``saved`` into ``live`` writes, as :func:`_fill` would.

    ``checked``: a shape mismatch is an error (plain tensors and modules; an optimizer simply
    adopts the saved tensors).
    """
    if isinstance(saved, _Saved):
        if not isinstance(live, torch.Tensor) or is_lazy(live):
            return  # restore_into explains a type mismatch; lazy modules materialise on load
        src = sources[saved.key]
        if checked and live.dim() == 0 and src.shape == (1,):
            return  # torch loads a one-element tensor into a 0-d parameter; let it
        if checked and tuple(live.shape) != src.shape:
            raise StateMismatchError(
                f"state{path} has shape {tuple(live.shape)}, the checkpoint's {saved.key!r} {src.shape}; "
                "use load_partial to load only matching tensors"
            )
        out.append(_Pair(live, saved.key, path))
    elif isinstance(live, torch.nn.Module):
        if _loads_key_for_key(live) and isinstance(saved, dict):
            for k, t in live.state_dict(keep_vars=True).items():
                if isinstance(saved.get(k), _Saved):
                    _pair(t, saved[k], f"{path}[{k!r}]", True, sources, out)
    elif isinstance(live, torch.optim.Optimizer):
        if type(live).state_dict is torch.optim.Optimizer.state_dict and isinstance(saved, dict) and "state" in saved:
            _pair(live.state_dict()["state"], saved["state"], f"{path}['state']", False, sources, out)
    elif is_stateful(live):
        return
    elif isinstance(live, dict) and isinstance(saved, dict):
        for k, v in saved.items():
            if k in live:
                _pair(live[k], v, f"{path}[{k!r}]", checked, sources, out)
    elif isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved):
        for i, (a, b) in enumerate(zip(live, saved)):
            _pair(a, b, f"{path}[{i}]", checked, sources, out)


def _loads_key_for_key(module: torch.nn.Module) -> bool:
    """True when ``load_state_dict`` copies each saved key into the parameter of that name:
    no load or state_dict hooks anywhere in the tree, and no loading logic outside torch.

    Otherwise a hook or override may route saved tensor X into parameter Y, which bytes
    landed early by key would corrupt; such modules get their tensors as new ones.
    """
    top = type(module)
    if top.state_dict is not torch.nn.Module.state_dict or top.load_state_dict is not torch.nn.Module.load_state_dict:
        return False
    for m in module.modules():
        hooks = (m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks, m._state_dict_hooks, m._state_dict_pre_hooks)
        if any(hooks) or not type(m)._load_from_state_dict.__module__.startswith("torch.nn."):
            return False
    return True


def _destinations(pairs: list[_Pair], sources: dict[str, SourceTensor]) -> dict[str, torch.Tensor]:
    """Saved key -> the live tensor its bytes land in directly (see the module doc, step 3)."""
    spans: list[tuple[str, int, int, int]] = []
    for i, p in enumerate(pairs):
        extent = _extent(p.live)
        if extent is not None:
            spans.append((str(p.live.device), *extent, i))
    spans.sort()
    blocked: set[str] = set()
    cluster: list[_Pair] = []
    device, end = "", 0
    for dev, lo, hi, i in spans:
        if cluster and (dev != device or lo >= end):
            blocked |= _conflicts(cluster)
            cluster = []
        if not cluster:
            device, end = dev, hi
        cluster.append(pairs[i])
        end = max(end, hi)
    blocked |= _conflicts(cluster)
    direct: dict[str, torch.Tensor] = {}
    for p in pairs:
        if p.key not in blocked and p.key not in direct and landable(sources[p.key], p.live):
            direct[p.key] = p.live
    return direct


def _conflicts(cluster: list[_Pair]) -> set[str]:
    """The keys of pairs sharing memory, unless they are one saved tensor into one view."""
    keys = {p.key for p in cluster}
    views = {(p.live.data_ptr(), tuple(p.live.shape), p.live.stride(), p.live.dtype) for p in cluster}
    return keys if len(keys) > 1 or len(views) > 1 else set()


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """The half-open address range ``[lo, hi)`` that ``t`` touches (None: no memory)."""
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return None
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
