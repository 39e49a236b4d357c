"""Plan a ``torch.save`` zip file without loading it: which bytes hold which tensor.

A torch file is a zip archive: ``<archive>/data.pkl`` describes the object and names its
storages, ``<archive>/data/<key>`` holds each storage's raw bytes, uncompressed. The
planner reads the central directory and ``data.pkl`` by range, and unpickles ``data.pkl``
with a restricted unpickler: only containers, dtypes and torch's tensor-rebuild functions
resolve, each replaced by a stand-in that records (storage, offset, shape, stride, dtype)
without allocating anything. Any other global raises :class:`UnsafeCheckpointError` before it
is imported, so a hostile pickle never runs.

Sparse and quantized tensors are not one strided view of one storage: torch rebuilds them
from parts (indices and values; a storage and quantizer parameters). They are planned as a
:class:`RebuiltRef`, the storages they need plus torch's own rebuild function and its
arguments, and built after those storages are read whole.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import _weights_only_unpickler

from .errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedValueError

MAX_PICKLE_BYTES = 64 * 2**20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
LOCAL_HEADER_SIZE = 30


@dataclass(frozen=True)
class StorageRef:
    """A storage record inside the zip: its member name, size in bytes and saved device."""

    member: str
    nbytes: int
    location: str = "cpu"  # the device it was saved from ("cuda:0"), for map_location


@dataclass(frozen=True)
class TensorRef:
    """A tensor described by ``data.pkl``: a strided view of one storage."""

    storage: StorageRef
    dtype: torch.dtype
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def span(self) -> tuple[int, int]:
        """The half-open byte range ``[start, end)`` of the storage that the view touches."""
        if math.prod(self.shape) == 0:
            return self.offset * self.itemsize, self.offset * self.itemsize
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.offset * self.itemsize, (last + 1) * self.itemsize


@dataclass(frozen=True)
class PickledStorage:
    """A storage as ``data.pkl`` names it: its record and the dtype it was saved as."""

    ref: StorageRef
    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class RebuiltRef:
    """A tensor that torch rebuilds from parts (sparse, quantized): ``rebuild(*args)`` once the
    storages it names are read. ``layout`` is ``"sparse_coo"``, ``"sparse_csr"``..., or ``"quantized"``."""

    rebuild: Callable[..., torch.Tensor]
    args: tuple[Any, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str

    def storages(self) -> list[StorageRef]:
        """The storage records it is built from, each once."""
        found: dict[str, StorageRef] = {}
        _walk_parts(self.args, lambda ref: found.setdefault(ref.member, ref))
        return list(found.values())

    def build(self, buffers: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        """The tensor, from ``buffers`` (each storage's bytes as a flat uint8 tensor, by member), with
        sparse invariants checked as ``torch.load`` checks them.

        Raises:
            CorruptCheckpointError: the parts do not make a valid tensor (indices out of range...).
        """
        try:
            with torch.sparse.check_sparse_tensor_invariants():
                tensor = self.rebuild(*_real_parts(self.args, buffers, where))
                torch._utils._validate_loaded_sparse_tensors()
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise CorruptCheckpointError(f"{where}: a saved {self.layout} tensor cannot be rebuilt: {err}") from err
        return tensor


def _walk_parts(value: Any, visit: Callable[[StorageRef], Any]) -> None:
    if isinstance(value, PickledStorage):
        visit(value.ref)
    elif isinstance(value, TensorRef):
        visit(value.storage)
    elif isinstance(value, RebuiltRef):
        _walk_parts(value.args, visit)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_parts(v, visit)
    elif isinstance(value, dict):
        for v in value.values():
            _walk_parts(v, visit)


def _real_parts(value: Any, buffers: dict[str, torch.Tensor], where: str) -> Any:
    """``value`` with each stand-in replaced by the real storage or tensor over ``buffers``."""
    if isinstance(value, PickledStorage):
        untyped = buffers[value.ref.member].untyped_storage()
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=value.dtype, _internal=True)
    if isinstance(value, TensorRef):
        untyped = buffers[value.storage.member].untyped_storage()
        return torch.empty(0, dtype=value.dtype).set_(untyped, value.offset, value.shape, value.stride)
    if isinstance(value, RebuiltRef):
        return value.build(buffers, where)
    if type(value) in (list, tuple):
        return type(value)(_real_parts(v, buffers, where) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _real_parts(v, buffers, where)) for k, v in value.items())
    return value


def read_plan(
    f: IO[bytes], where: str, trusted: bool = False,
) -> tuple[dict[str, TensorRef | RebuiltRef], dict[str, tuple[int, int]], Any]:
    """Return ``({key: TensorRef}, {member: (header_offset, predicted data start)}, object)``.

    ``data.pkl`` is unpickled with what ``torch.load(weights_only=True)`` allows (its list and
    the user's safe globals, tensors replaced by references); ``trusted`` allows any global, as
    ``weights_only=False`` does.

    ``object`` is the saved object with every tensor replaced by its :class:`TensorRef`, or its
    :class:`RebuiltRef` for a sparse or quantized one.

    Keys are the path to each tensor joined by ``/`` (a plain state_dict keeps its own keys).
    """
    try:
        archive = zipfile.ZipFile(f)
        infos = {i.filename: i for i in archive.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CorruptCheckpointError(f"{where} is not a torch zip file: {err}") from err
    pkl = data_pickles(infos)
    if len(pkl) != 1:
        raise CorruptCheckpointError(f"{where} has no single <archive>/data.pkl; not a torch.save file")
    prefix = pkl[0][: -len("data.pkl")]
    info = infos[pkl[0]]
    if info.file_size > MAX_PICKLE_BYTES or info.compress_type != zipfile.ZIP_STORED:
        raise CorruptCheckpointError(f"{where}: data.pkl is {info.file_size} bytes or compressed; refusing to plan it")
    try:
        payload = archive.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CorruptCheckpointError(f"{where}: cannot read data.pkl: {err}") from err
    obj = _PlanUnpickler(io.BytesIO(payload), prefix, infos, where, trusted).load_checked()
    tensors: dict[str, TensorRef | RebuiltRef] = collect(obj, lambda v: isinstance(v, (TensorRef, RebuiltRef)))
    starts = {name: predicted_data_start(i.header_offset, name, i.file_size) for name, i in infos.items()}
    offsets = {name: (i.header_offset, starts[name]) for name, i in infos.items()}
    return tensors, offsets, obj


def predicted_data_start(header_offset: int, name: str, size: int, alignment: int = 64) -> int:
    """Where ``torch.save`` puts a member's data: after its local header and a padding extra
    field that aligns the data to ``alignment`` bytes (PyTorch's ``inline_container.cc``).

    Knowing this from the central directory alone saves one request per tensor; the loader
    fetches the local header together with the data and checks the prediction.
    """
    start = header_offset + LOCAL_HEADER_SIZE + len(name.encode()) + 4  # + the extra field's own header
    if size >= 0xFFFFFFFF or header_offset >= 0xFFFFFFFF:  # zip64 extra fields come first
        start += 4 + (16 if size >= 0xFFFFFFFF else 0) + (8 if header_offset >= 0xFFFFFFFF else 0)
    return -(-start // alignment) * alignment


def data_start(local_header: bytes, header_offset: int, where: str) -> int:
    """The absolute offset of a member's data, from the first bytes of its local header."""
    if len(local_header) < LOCAL_HEADER_SIZE:
        raise CorruptCheckpointError(f"{where}: truncated zip local header at {header_offset}")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(local_header[:LOCAL_HEADER_SIZE])
    if signature != b"PK\x03\x04":
        raise CorruptCheckpointError(f"{where}: bad zip local header at {header_offset}")
    return header_offset + LOCAL_HEADER_SIZE + name_len + extra_len


def collect(obj: Any, is_leaf: Callable[[Any], bool], key: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """The leaves of a nested object, keyed by their path joined by ``/`` (read_plan's keys).

    Example:
        >>> collect({"a": [1, {"b": 2}]}, lambda v: isinstance(v, int))
        {'a/0': 1, 'a/1/b': 2}
    """
    out = {} if out is None else out
    if is_leaf(obj):
        out[key] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            collect(v, is_leaf, f"{key}/{k}" if key else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            collect(v, is_leaf, f"{key}/{i}" if key else str(i), out)
    return out


class _TypedStorage:
    """Stand-in for a legacy typed storage class such as ``torch.FloatStorage``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _PlanUnpickler(pickle.Unpickler):
    def __init__(self, f: IO[bytes], prefix: str, infos: dict[str, zipfile.ZipInfo], where: str, trusted: bool) -> None:
        super().__init__(f)
        self.prefix, self.infos, self.where, self.trusted = prefix, infos, where, trusted

    def load_checked(self) -> Any:
        try:
            return self.load()
        except (UnsafeCheckpointError, CorruptCheckpointError, UnsupportedValueError):
            raise
        except Exception as err:
            raise CorruptCheckpointError(f"{self.where}: data.pkl cannot be planned: {err!r}") from err

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch._utils", "_rebuild_sparse_tensor"): _rebuild_sparse_tensor,
            ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
            ("torch.storage", "UntypedStorage"): _TypedStorage(torch.uint8),
            ("torch", "Size"): torch.Size,
            ("torch", "device"): torch.device,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage"):
            try:
                return _TypedStorage(torch.storage._get_dtype_from_pickle_storage_type(name))
            except KeyError:
                pass
        if (module, name) in _compat_pickle.NAME_MAPPING:  # torch.save pickles with protocol 2: Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed_by_torch = _torch_allows(module, name, self.where)
        if allowed_by_torch is not None:
            return allowed_by_torch
        if self.trusted:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.where}: data.pkl references {module}.{name}, which torch.load(weights_only=True) refuses too "
            "(unpickling it can run code); if you trust the file, pass weights_only=False"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptCheckpointError(f"{self.where}: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        member = f"{self.prefix}data/{key}"
        info = self.infos.get(member)
        if info is None or not isinstance(storage_type, _TypedStorage) or not isinstance(numel, int):
            raise CorruptCheckpointError(f"{self.where}: data.pkl names storage {key!r}, which the archive lacks")
        nbytes = numel * storage_type.dtype.itemsize
        if info.file_size != nbytes or info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(f"{self.where}: storage {key!r} holds {info.file_size} bytes, data.pkl says {nbytes}")
        return PickledStorage(StorageRef(member, nbytes, str(location)), storage_type.dtype)


def _torch_allows(module: str, name: str, where: str) -> Any:
    """The global ``module.name`` if ``torch.load(weights_only=True)`` allows it (its own list, and what the
    user registered with ``torch.serialization.add_safe_globals``/``safe_globals``), else None.

    Tensor constructors beyond those planned here (dense, sparse, quantized) — nested tensors,
    subclasses — raise UnsupportedValueError, pointing at ``ckptstore.load``.
    """
    full = f"{module}.{name}"
    found = _weights_only_unpickler._get_allowed_globals().get(full, _weights_only_unpickler._get_user_allowed_globals().get(full))
    if found is None:
        return None
    if "_rebuild" in name or name.endswith("Tensor") or (isinstance(found, type) and issubclass(found, torch.Tensor)):
        raise UnsupportedValueError(f"{where}: data.pkl builds a tensor with {full} (a nested tensor or a subclass), which cannot "
                                    "be read by byte range; ckptstore.load reads the file whole")
    return found


def _rebuild_tensor_v2(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> TensorRef:
    return _tensor(_storage(storage), storage.dtype, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, offset: int, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: torch.dtype, *_: Any
) -> TensorRef:
    return _tensor(_storage(storage), dtype, offset, size, stride)


def _rebuild_parameter(data: TensorRef | RebuiltRef, *_: Any) -> TensorRef | RebuiltRef:
    return data


def _rebuild_sparse_tensor(layout: Any, data: Any) -> RebuiltRef:
    """torch's ``_rebuild_sparse_tensor``, deferred: COO parts are (indices, values, size[, coalesced]),
    compressed ones (compressed indices, plain indices, values, size)."""
    if not isinstance(layout, torch.layout) or not isinstance(data, tuple) or len(data) not in (3, 4):
        raise CorruptCheckpointError(f"invalid sparse tensor record: layout={layout!r:.40} parts={data!r:.80}")
    values, size = (data[1], data[2]) if layout == torch.sparse_coo else (data[2], data[3])
    parts = data[:2] if layout == torch.sparse_coo else data[:3]
    if not all(isinstance(p, TensorRef) for p in parts) or not all(type(n) is int and n >= 0 for n in size):
        raise CorruptCheckpointError(f"invalid sparse tensor record: parts={data!r:.80}")
    return RebuiltRef(torch._utils._rebuild_sparse_tensor, (layout, data), values.dtype, tuple(size),
                      str(layout).removeprefix("torch."))


def _rebuild_qtensor(storage: Any, offset: Any, size: Any, stride: Any, qparams: Any, *rest: Any) -> RebuiltRef:
    """torch's ``_rebuild_qtensor``, deferred: a strided view of one storage of a quantized dtype."""
    view = _tensor(_storage(storage), storage.dtype, offset, size, stride)  # checks it fits its storage
    return RebuiltRef(torch._utils._rebuild_qtensor, (storage, offset, size, stride, qparams, *rest), view.dtype,
                      view.shape, "quantized")


def _storage(value: Any) -> StorageRef:
    if not isinstance(value, PickledStorage):
        raise CorruptCheckpointError(f"a tensor record names {value!r:.80} where a storage belongs")
    return value.ref


def _tensor(ref: StorageRef, dtype: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    if not isinstance(dtype, torch.dtype) or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise CorruptCheckpointError(f"invalid tensor record: offset={offset!r} size={size!r} stride={stride!r}")
    tensor = TensorRef(ref, dtype, offset, tuple(size), tuple(stride))
    if len(tensor.shape) != len(tensor.stride) or tensor.span()[1] > ref.nbytes:
        raise CorruptCheckpointError(f"tensor of shape {tensor.shape} reaches past its {ref.nbytes}-byte storage")
    return tensor


def data_pickles(names: Iterable[str]) -> list[str]:
    """The ``<archive>/data.pkl`` records among a zip's ``names``: exactly one in a torch file.

    Example:
        >>> data_pickles(["model/data.pkl", "model/data/0", "model/version"])
        ['model/data.pkl']
    """
    return [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
