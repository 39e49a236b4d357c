"""Restoring in place: put a loaded state tree into the caller's live objects.

Mirrors ``torch.distributed.checkpoint``: the caller passes the state it wants filled.
Stateful entries get ``load_state_dict``; tensors (also inside nested dicts and lists) are
filled with ``copy_`` so pre-allocated memory, and every reference to it, sees the restored
values. Everything else cannot be updated in place (ints, strings, ...) and is handed back.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import StateMismatchError
from .tree import decanonicalize, is_stateful


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
