"""Will torch accept this saved value into this live object? Checked before any byte changes.

:mod:`ckptstore.inplace` restores all or nothing. ``load_state_dict`` is not atomic (a
module copies the keys that fit, then raises for the others), so for what torch's own code
loads (plain tensors, modules that load key for key, optimizers without overrides or hooks)
these functions raise :class:`StateMismatchError` wherever torch would, before the first live
byte changes. Objects that run other code are not predicted here: :mod:`ckptstore.inplace`
snapshots and undoes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .errors import StateMismatchError
from .manifest import CheckpointInfo

log = logging.getLogger("ckptstore")


@dataclass(frozen=True)
class Marker:
    """Stands for the saved tensor ``key`` (of ``shape``) in the tree while checking."""

    key: str
    shape: tuple[int, ...]


def check_tensor(live: torch.Tensor, saved: Any, path: str, *, module: bool) -> None:
    """Raise unless ``saved`` is a tensor of ``live``'s shape (``module``: torch's one-element rule too)."""
    if not isinstance(saved, (torch.Tensor, Marker)):
        raise StateMismatchError(f"state{path} is a tensor but the checkpoint holds a {type(saved).__name__}")
    shape = tuple(saved.shape)
    if tuple(live.shape) == shape or (module and live.dim() == 0 and shape == (1,)):
        return  # torch loads a one-element tensor into a 0-d parameter
    what = f"the checkpoint's {saved.key!r}" if isinstance(saved, Marker) else "the checkpoint"
    raise StateMismatchError(
        f"state{path} has shape {tuple(live.shape)}, {what} {shape}; use load_partial to load only matching tensors"
    )


def check_module(module: torch.nn.Module, saved: Any, path: str) -> dict[str, torch.Tensor]:
    """Raise where a strict ``module.load_state_dict(saved)`` would; return the module's live tensors by key."""
    if not isinstance(saved, dict):
        raise StateMismatchError(f"state{path} is a module but the checkpoint holds a {type(saved).__name__}")
    tensors = module.state_dict(keep_vars=True)
    missing = [k for k in tensors if k not in saved]
    unexpected = [k for k in saved if not isinstance(k, str) or _unexpected(module, k)]
    if missing or unexpected:
        raise StateMismatchError(
            f"state{path} ({type(module).__name__}) does not match the checkpoint: missing keys {missing}, "
            f"unexpected keys {unexpected}; use load_partial to load only matching tensors"
        )
    for k, t in tensors.items():
        check_tensor(t, saved[k], f"{path}[{k!r}]", module=True)
    return tensors


def _unexpected(module: torch.nn.Module, key: str) -> bool:
    """True where torch's strict loading calls ``key`` unexpected: its dotted path does not
    name a child module and then a parameter or persistent buffer (keys under a child that is
    None are ignored)."""
    head, dot, rest = key.partition(".")
    while dot:
        if head not in module._modules:
            return True
        child = module._modules[head]
        if child is None:
            return False
        module, (head, dot, rest) = child, rest.partition(".")
    buffers = module._buffers
    return module._parameters.get(head) is None and (buffers.get(head) is None or head in module._non_persistent_buffers_set)


def check_optimizer(optimizer: torch.optim.Optimizer, saved: Any, path: str) -> None:
    """Raise where ``optimizer.load_state_dict(saved)`` would: structure, group count and sizes."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and isinstance(saved.get("state"), dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise StateMismatchError(f"state{path} is an optimizer but the checkpoint holds no optimizer state_dict")
    live_sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved_sizes = [len(g["params"]) for g in groups]
    if live_sizes != saved_sizes:
        raise StateMismatchError(
            f"state{path} ({type(optimizer).__name__}) has parameter groups of {live_sizes} parameters, the "
            f"checkpoint {saved_sizes}; build the optimizer over the same parameters, in the same groups, as the "
            "run that saved it"
        )


def loads_key_for_key(module: torch.nn.Module) -> bool:
    """True when ``load_state_dict`` copies each saved key into the parameter of that name:
    no load or state_dict hooks anywhere in the tree, no extra state, and no loading logic
    outside torch.

    Otherwise a hook or override may route saved tensor X into parameter Y, which bytes
    landed early by key would corrupt; such modules get their tensors as new ones, and are
    loaded as user code (see the module doc).
    """
    top = type(module)
    if top.state_dict is not torch.nn.Module.state_dict or top.load_state_dict is not torch.nn.Module.load_state_dict:
        return False
    for m in module.modules():
        hooks = (m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks, m._state_dict_hooks, m._state_dict_pre_hooks)
        cls = type(m)
        if (any(hooks) or not cls._load_from_state_dict.__module__.startswith("torch.nn.")
                or cls.get_extra_state is not torch.nn.Module.get_extra_state
                or cls.set_extra_state is not torch.nn.Module.set_extra_state):
            return False
    return True


def loads_as_torch(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer's ``state_dict``/``load_state_dict`` are torch's, without hooks."""
    cls, base = type(optimizer), torch.optim.Optimizer
    hooks = (optimizer._optimizer_state_dict_pre_hooks, optimizer._optimizer_state_dict_post_hooks,
             optimizer._optimizer_load_state_dict_pre_hooks, optimizer._optimizer_load_state_dict_post_hooks)
    return cls.state_dict is base.state_dict and cls.load_state_dict is base.load_state_dict and not any(hooks)


def check_entries(target: dict[str, Any] | None, saved: dict[str, Any], strict: bool, info: CheckpointInfo) -> list[str]:
    """The entries of ``target`` that ``saved`` lacks: a StateMismatchError naming them if ``strict``, else logged."""
    missing = sorted(str(k) for k in (target or {}) if k not in saved)
    if missing and strict:
        raise StateMismatchError(
            f"{info.url} holds no {missing} (it holds {sorted(map(str, saved))}); nothing was restored. "
            "Pass strict=False to restore the rest and leave those as they are"
        )
    if missing:
        log.warning("%s holds no %s: left as they are (strict=False)", info.url, missing)
    return missing
