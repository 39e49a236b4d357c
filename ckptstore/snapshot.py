"""A host copy of a canonical state tree, so that training can go on while it is written.

:func:`snapshot` returns the tree with every tensor replaced by a CPU copy that owns its
memory; containers are new, scalars are immutable, so nothing the caller mutates afterwards
reaches the copy. Tensors that share a storage (tied weights, views) are copied as that
storage once and viewed again, so the checkpoint stores them once, as a blocking save would.
A DTensor's copy is this rank's shard, on the same mesh and placements.
CUDA tensors are copied into pinned host memory on a side stream that first waits for the
current one (it sees every queued update); the copy is complete when :func:`snapshot` returns.

The cost is one host copy of the state's tensors (what ``torch.save`` would serialise), held
until the background write finishes; :class:`~ckptstore.CheckpointManager` keeps at most one.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import torch

from .tree import iter_tensors


def snapshot(tree: Any) -> Any:
    """``tree`` with each tensor replaced by a CPU copy (see module doc); the copy is done on return.

    Example:
        >>> w = torch.zeros(2)
        >>> copy = snapshot({"w": w, "epoch": 1})
        >>> _ = w.add_(1)
        >>> copy
        {'w': tensor([0., 0.]), 'epoch': 1}
    """
    groups: dict[tuple[int, torch.device], list[torch.Tensor]] = defaultdict(list)
    for t in iter_tensors(tree):
        if _plain(t):
            groups[(t.untyped_storage().data_ptr(), t.device)].append(t)
    copies: dict[int, torch.Tensor] = {}
    stream = _side_stream(groups)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for members in groups.values():
            _copy_group(members, copies)
    if stream is not None:
        stream.synchronize()
    return _replace(tree, copies)


def _plain(t: torch.Tensor) -> bool:
    """A strided tensor without lazy conjugate or negative bits: its storage and view describe it."""
    return t.layout == torch.strided and not t.is_quantized and not (t.is_conj() or t.is_neg()) and not _is_dtensor(t)


def _is_dtensor(t: torch.Tensor) -> bool:
    return callable(getattr(t, "to_local", None))


def _copy_group(members: list[torch.Tensor], copies: dict[int, torch.Tensor]) -> None:
    """Copy tensors that share one storage: alone, the tensor; together, the storage once, then each view."""
    first = members[0]
    if len({id(t) for t in members}) == 1:
        copies[id(first)] = _to_host(first.detach())
        return
    storage = first.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage)
    host = _to_host(whole).untyped_storage()
    for t in members:
        copies[id(t)] = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.shape, t.stride())


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()
    host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=True)
    return host


def _side_stream(groups: dict[tuple[int, torch.device], list[torch.Tensor]]) -> Any:
    devices = {device for _, device in groups if device.type == "cuda"}
    if not devices:
        return None
    stream = torch.cuda.Stream(device=next(iter(devices)))
    stream.wait_stream(torch.cuda.current_stream(next(iter(devices))))
    return stream


def _replace(tree: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor) and _is_dtensor(tree):  # this rank's shard, copied, on the same mesh and placements
        dtensor: Any = tree
        return type(dtensor).from_local(snapshot(dtensor.to_local()), dtensor.device_mesh, dtensor.placements, run_check=False,
                                     shape=tree.shape, stride=tree.stride())
    if isinstance(tree, torch.Tensor):
        copy = copies.get(id(tree))
        if copy is None:  # sparse, quantized, conjugate views: a copy of their own
            copy = tree.detach().to("cpu", copy=True)
        if isinstance(tree, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=tree.requires_grad)
        return copy
    if isinstance(tree, dict):
        return type(tree)((k, _replace(v, copies)) for k, v in tree.items())
    if isinstance(tree, list):
        return [_replace(v, copies) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_replace(v, copies) for v in tree)
    return tree
