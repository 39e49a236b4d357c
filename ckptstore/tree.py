"""The state tree: what a checkpoint holds, independent of the file format.

A training state is a nested value. Saving first *canonicalises* it:

* anything with ``state_dict()`` and ``load_state_dict()`` (modules, optimizers,
  schedulers, GradScaler, :class:`~ckptstore.RNGState`, any ``Stateful``) becomes its
  ``state_dict()``;
* numpy arrays become tensors tagged ``{"__ndarray__": tensor}`` (restored as arrays);
  numpy scalars become Python scalars;
* dicts, lists, tuples, tensors, ``None``, bool, int, float, str, bytes, ``torch.dtype`` and
  ``torch.device`` pass through; anything else raises :class:`UnsupportedValueError`, so a
  checkpoint never needs pickle to load.

The safetensors format then *flattens* the canonical tree into ``{key: tensor}`` plus a JSON
skeleton in which each tensor is ``{"__tensor__": key, "device": "cpu"}``. Keys are the path
of dict keys and list indices joined by ``/`` (``model/fc.weight``,
``optimizer/state/0/exp_avg``); tensors that are the same view of the same storage (tied
weights) are stored once and come back as one tensor.
"""

from __future__ import annotations

import base64
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from .errors import UnsupportedValueError

NDARRAY_TAG = "__ndarray__"
TENSOR_TAG = "__tensor__"  # a skeleton's node for a tensor: {"__tensor__": key, "device": ...}
_TENSOR, _TUPLE, _ITEMS, _FLOAT, _BYTES, _DTYPE, _DEVICE = (
    TENSOR_TAG, "__tuple__", "__items__", "__float__", "__bytes__", "__dtype__", "__device__",
)
_SCALARS = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)
_KEY_TYPES = (str, int, float, bool, type(None), tuple)
_PLAIN: tuple[Any, ...] = (bool, int, float, str, bytes)
T = TypeVar("T")


def is_stateful(value: Any) -> bool:
    """True for objects saved through ``state_dict()`` and restored by ``load_state_dict()``."""
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def canonicalize(value: Any, path: str = "state") -> Any:
    """Return ``value`` as a tree of containers, tensors and plain scalars (see module doc).

    Example:
        >>> canonicalize({"epoch": 3, "lr": (0.1, 0.01)})
        {'epoch': 3, 'lr': (0.1, 0.01)}
    """
    if is_stateful(value) and not isinstance(value, torch.Tensor):
        return canonicalize(value.state_dict(), f"{path}.state_dict()")
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise UnsupportedValueError(
                f"{path} is a tensor on the 'meta' device, which has no data to save; "
                "materialise it (e.g. module.to_empty(device='cpu') and initialise it) first"
            )
        return value
    if type(value) in _SCALARS:
        return value
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, _KEY_TYPES):
                raise UnsupportedValueError(f"{path} has a key of type {type(k).__name__}; use str, int, float, bool or tuples of them")
        items = ((k, canonicalize(v, f"{path}[{k!r}]")) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)):
        children = [canonicalize(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return children if isinstance(value, list) else tuple(children)
    numpy_value = _from_numpy(value, path)
    if numpy_value is not None:
        return numpy_value
    for base in _PLAIN:  # IntEnum, str enums, ...: keep the plain value
        if isinstance(value, base):
            return base(value)
    raise UnsupportedValueError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint cannot "
        "hold without pickle. Store tensors, numbers, strings, bytes, None and dicts/lists/tuples "
        "of them, or give the object state_dict()/load_state_dict() methods"
    )


def _from_numpy(value: Any, path: str) -> Any:
    numpy = sys.modules.get("numpy")  # only arrays that exist can be numpy: no import needed
    if numpy is None:
        return None
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, numpy.ndarray):
        try:
            return {NDARRAY_TAG: torch.from_numpy(numpy.ascontiguousarray(value)).clone()}
        except TypeError as err:
            raise UnsupportedValueError(f"{path} is a numpy array of dtype {value.dtype}, which torch cannot hold") from err
    return None


def decanonicalize(value: Any) -> Any:
    """Undo :func:`canonicalize`'s tags: ``{"__ndarray__": t}`` becomes a numpy array again."""
    if isinstance(value, dict):
        if len(value) == 1 and NDARRAY_TAG in value and isinstance(value[NDARRAY_TAG], torch.Tensor):
            return value[NDARRAY_TAG].cpu().numpy()
        return type(value)((k, decanonicalize(v)) for k, v in value.items())
    if isinstance(value, list):
        return [decanonicalize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decanonicalize(v) for v in value)
    return value


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a canonical tree into ``{key: tensor}`` and a JSON-serialisable skeleton.

    Example:
        >>> tensors, skeleton = flatten({"w": torch.zeros(2), "epoch": 1})
        >>> list(tensors), skeleton
        (['w'], {'w': {'__tensor__': 'w', 'device': 'cpu'}, 'epoch': 1})
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}

    def tensor_ref(t: torch.Tensor, key: str) -> dict[str, str]:
        to_local = getattr(t, "to_local", None)  # a DTensor's: its shard on this rank
        local = to_local() if callable(to_local) else t
        identity = (local.untyped_storage().data_ptr(), t.device, local.storage_offset(), tuple(t.shape), local.stride(), t.dtype)
        if t.numel() > 0 and identity in seen:  # tied weights: one copy, restored tied
            return {_TENSOR: seen[identity], "device": str(t.device)}
        unique = key or "tensor"
        n = 1
        while unique in tensors:
            n += 1
            unique = f"{key}#{n}"
        tensors[unique] = t
        seen[identity] = unique
        return {_TENSOR: unique, "device": str(t.device)}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            return tensor_ref(value, key)
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v, _join(key, k)) for k, v in value.items()}
            return {_ITEMS: [[encode(k, ""), encode(v, _join(key, k))] for k, v in value.items()]}
        if isinstance(value, list):
            return [encode(v, _join(key, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, _join(key, i)) for i, v in enumerate(value)]}
        if isinstance(value, float) and not math.isfinite(value):
            return {_FLOAT: repr(value)}
        if isinstance(value, bytes):
            return {_BYTES: base64.b64encode(value).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {_DTYPE: str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {_DEVICE: str(value)}
        return value

    skeleton = encode(tree, "")
    return tensors, skeleton


def _join(key: str, child: Any) -> str:
    """The flat key of ``child`` under ``key``: path segments joined by ``/``."""
    return f"{key}/{child}" if key else str(child)


def unflatten(skeleton: Any, load_tensor: Callable[[str, str], Any]) -> Any:
    """Rebuild the canonical tree; ``load_tensor(key, saved_device)`` supplies each tensor.

    A key referenced twice (tied weights) is loaded once and shared.
    """
    loaded: dict[str, Any] = {}

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        if _TENSOR in node:
            key = node[_TENSOR]
            if key not in loaded:
                loaded[key] = load_tensor(key, node.get("device", "cpu"))
            return loaded[key]
        if _TUPLE in node:
            return tuple(decode(v) for v in node[_TUPLE])
        if _ITEMS in node:
            return {decode(k): decode(v) for k, v in node[_ITEMS]}
        if _FLOAT in node:
            return float(node[_FLOAT])
        if _BYTES in node:
            return base64.b64decode(node[_BYTES])
        if _DTYPE in node:
            return getattr(torch, node[_DTYPE])
        if _DEVICE in node:
            return torch.device(node[_DEVICE])
        return {k: decode(v) for k, v in node.items()}

    return decode(skeleton)


def holds_dtensors(tree: Any) -> bool:
    """True if a canonical tree holds a DTensor (sharded state, saved by every rank: :mod:`ckptstore.sharded`).

    No DTensor exists unless ``torch.distributed.tensor`` was imported, so this imports nothing.

    Example:
        >>> holds_dtensors({"w": torch.zeros(2)})
        False
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(t, module.DTensor) for t in iter_tensors(tree))


def iter_tensors(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a canonical tree, depth first."""
    return leaves(tree, torch.Tensor)


def leaves(tree: Any, kind: type[T]) -> Iterator[T]:
    """Every value of type ``kind`` in a tree of dicts, lists and tuples, depth first.

    Example:
        >>> list(leaves({"a": [1, "x"], "b": 2}, int))
        [1, 2]
    """
    if isinstance(tree, kind):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v, kind)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v, kind)
