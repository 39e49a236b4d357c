"""Streaming partial loads: header -> byte ranges -> bytes straight into the target tensors.

``load_partial`` is the classic fine-tuning recipe (keep the pretrained tensors whose name
and shape match the model) without downloading or unpickling the whole file:

1. **Plan from the header alone.** Safetensors: the 8-byte length and the JSON header, two
   range reads. Torch zip: the central directory and ``data.pkl``, planned by a restricted
   unpickler (:mod:`ckptstore.torch_zip`) that never imports arbitrary globals.
2. **Match.** Source keys are renamed by ``key_map``; a tensor loads only if the target has
   its key with the same shape. Dtype differences are cast (and reported) unless
   ``strict_dtype``.
3. **Fetch only the needed bytes** with :class:`ckptstore.transfer.Transfer`: each selected
   tensor is a half-open range ``[start, end)`` of the file, fetched in coalesced, concurrent
   batches of at most ``max_buffer`` bytes (``os.preadv`` on local disks).
4. **Land in the target.** Bytes go straight into the target's own memory (through pinned
   staging buffers for other devices). Peak extra host memory is one batch (``max_buffer``)
   plus the staging buffers, whatever the file size; a tensor that needs a cast or is a
   strided view is read into one temporary of its own size.

The planning half (:func:`plan`) also serves :meth:`CheckpointManager.restore`, which
streams a whole checkpoint into the live state the same way (see :mod:`ckptstore.inplace`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from . import legacy, rebuilt, shards
from .keys import ties, too_little_loaded
from .errors import CheckpointNotFound, ConfigError, CorruptCheckpointError, StateMismatchError
from .manifest import FOLDER_FORMAT, MANIFEST_NAME, SHARDED_FORMAT, CheckpointInfo
from .safetensors_header import header_length, parse_header
from .serializers import TREE_METADATA_KEY
from .sniff import file_format
from .rangefile import TAIL_BYTES, RangeFile
from .storage import FsspecStorage, open_parent, open_storage
from .rebuilt import RebuiltSource, storage_region
from .torch_zip import RebuiltRef, TensorRef, read_plan
from .transfer import ReadCounter, SourceTensor, Transfer, byte_view, itemsize, landable, scratch, shaped
from .tree import unflatten

_T = TypeVar("_T")
KeyMap = Mapping[str, str] | Callable[[str], str | None] | None
Loader = Callable[[str, str], Any]
DEFAULT_MAX_BUFFER = 256 * 2**20
HEAD_BYTES = 64 * 2**10  # first read: one request for the length prefix and a typical header


@dataclass
class LoadReport:
    """What :func:`load_partial` did. ``skipped_shape`` maps key -> (source shape, target shape).

    ``bytes_read`` and ``requests`` count the loader's reads of the file (header, directory,
    tensor ranges); metadata calls (the manifest probe, size lookups) are not included.
    A streamed restore reports the same way, ``loaded`` being the keys landed in live memory.
    """

    loaded: list[str] = field(default_factory=list)
    skipped_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    cast: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    bytes_read: int = 0
    requests: int = 0
    read_whole: bool = False  # the source had no index (a torch file from before 1.6): read whole, once
    rebuilt: list[str] = field(default_factory=list)  # sparse or quantized: their storages read whole, built by torch


@dataclass(frozen=True)
class Plan:
    """A file's tensors and structure, planned from its header (or zip directory) alone.

    ``build(load)`` returns the saved object with each tensor replaced by ``load(key, saved
    device)``; tensors that are the same view of the same bytes (tied weights) share a key.
    ``rebuilt`` are the sparse and quantized tensors, which have no single byte range (see
    :mod:`ckptstore.rebuilt`); ``build`` passes their keys to ``load`` too.
    """

    sources: dict[str, SourceTensor]
    values: Any  # the non-tensor content, tensors shown as "<tensor ...>" strings
    build: Callable[[Loader], Any]
    rebuilt: dict[str, RebuiltSource] = field(default_factory=dict)

    def tensors(self) -> dict[str, SourceTensor | RebuiltSource]:
        """Every tensor of the file, by key: the byte-range ones and the rebuilt ones."""
        return {**self.sources, **self.rebuilt}


def load_partial(
    url: str | os.PathLike[str],
    target: torch.nn.Module | dict[str, torch.Tensor],
    *,
    device: str | torch.device | None = None,
    key_map: KeyMap = None,
    key: str | None = None,
    strict: bool = False,
    strict_dtype: bool = False,
    min_loaded: float = 0.0,
    weights_only: bool = True,
    max_buffer: int = DEFAULT_MAX_BUFFER,
    storage_options: dict[str, Any] | None = None,
) -> LoadReport:
    """Load the tensors of ``url`` that ``target`` has, with the same shape, in place.

    ``url`` is a safetensors file, a ``torch.save`` file or a ckptstore checkpoint folder;
    for a checkpoint, ``key`` (default ``"model"``) picks the state entry to load from.
    Nested entries of a file are addressed with ``/``: a Lightning ``.ckpt`` holds its weights
    as ``state_dict/<name>``, so ``key="state_dict"`` (or ``key_map={"state_dict/": ""}``)
    loads them. A target tensor that is the same memory as a loaded one (tied weights) counts
    as loaded. A torch file's ``data.pkl`` is read with what ``torch.load(weights_only=True)``
    allows (sets, bytes, complex, your ``add_safe_globals``); ``weights_only=False`` allows any
    global, for a file you trust. Sparse and quantized tensors have no single byte range: their
    storages are read whole, torch builds them, and they are copied into the target in place
    (``report.rebuilt`` lists them). A load that matches nothing raises ``StateMismatchError`` with the mapping that
    would have matched; ``min_loaded`` (a fraction of the target's tensors) raises the bar.

    Example:
        >>> import ckptstore
        >>> src = torch.nn.Linear(2, 2)
        >>> ckptstore.save(src.state_dict(), "memory://doc/partial/w.safetensors")
        >>> report = load_partial("memory://doc/partial/w.safetensors", torch.nn.Linear(2, 2))
        >>> sorted(report.loaded), report.missing
        (['bias', 'weight'], [])
    """
    report = LoadReport()
    targets = _target_tensors(target)
    resolved, index = locate(url, storage_options)
    if resolved[2] is not None and resolved[2].format == SHARDED_FORMAT:  # saved by every rank of a job through DCP
        return _load_dcp(resolved[0], resolved[2], report, targets, key_map, key, strict, strict_dtype, min_loaded)
    if index is not None:
        return _load_sharded(index, report, targets, target, device, key_map, key, strict, strict_dtype, min_loaded, max_buffer,
                             weights_only)
    with opened(resolved, report) as source:
        prefix = key if key is not None else ("model" if source.info else None)
        sources = _under(source.plan(report, weights_only).tensors(), prefix)
        selected = _select(source.storage.url(source.name), prefix, sources, report, targets, key_map, strict, strict_dtype,
                           min_loaded)
        _transfer(Transfer(source.storage, source.name, max_buffer, report), selected, targets, target, device)
    return report


def _load_sharded(
    index: shards.ShardIndex, report: LoadReport, targets: dict[str, torch.Tensor],
    target: torch.nn.Module | dict[str, torch.Tensor], device: str | torch.device | None, key_map: KeyMap,
    key: str | None, strict: bool, strict_dtype: bool, min_loaded: float, max_buffer: int, weights_only: bool,
) -> LoadReport:
    """Plan only the shards that hold a tensor the target has; the rest are known by name from the index."""
    names = _under({n: n for n in index.weight_map}, key)
    wanted = {index.weight_map[original] for new, original in _rename(names, key_map).items() if new in targets}
    sources: dict[str, SourceTensor | RebuiltSource] = {}
    origin: dict[int, str] = {}  # id of a planned source -> its shard
    for shard in sorted(wanted):
        for k, src in _under(plan(index.storage, shard, report, weights_only=weights_only).tensors(), key).items():
            sources[k], origin[id(src)] = src, shard
    unplanned = {n: SourceTensor(n, torch.uint8, (-1,), 0, 0) for n in names if n not in sources}  # shape unknown: never fits
    selected = _select(index.url, key, {**sources, **unplanned}, report, targets, key_map, strict, strict_dtype, min_loaded)
    for shard in sorted(wanted):
        mine = [(src, k) for src, k in selected if origin.get(id(src)) == shard]
        _transfer(Transfer(index.storage, shard, max_buffer, report), mine, targets, target, device)
    return report


def _load_dcp(
    storage: FsspecStorage, info: CheckpointInfo, report: LoadReport, targets: dict[str, torch.Tensor], key_map: KeyMap,
    key: str | None, strict: bool, strict_dtype: bool, min_loaded: float,
) -> LoadReport:
    """A checkpoint saved by every rank of a job: matched by the saved global shapes in DCP's
    metadata, loaded in place by DCP's reader (one process, whatever world size saved it)."""
    from .dcp_files import SavedShards  # DCP: imported for sharded checkpoints only

    saved = SavedShards(storage, "", [f.path for f in info.files])  # ``storage`` is the checkpoint's folder
    prefix = "model" if key is None else key
    planned = {k: SourceTensor(k, dtype, shape, 0, 0) for k, (shape, dtype) in saved.shapes().items()}
    selected = _select(info.url, prefix, _under(planned, prefix), report, targets, key_map, strict, strict_dtype, min_loaded)
    saved.load({src.key: targets[k] for src, k in selected if isinstance(src, SourceTensor)})
    return report


def _under(sources: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    """The entries under ``prefix/`` with the prefix removed (all of them for None)."""
    if prefix is None:
        return sources
    return {k[len(prefix) + 1 :]: v for k, v in sources.items() if k.startswith(prefix + "/")}


def _select(
    where: str, prefix: str | None, sources: dict[str, SourceTensor | RebuiltSource], report: LoadReport,
    targets: dict[str, torch.Tensor], key_map: KeyMap, strict: bool, strict_dtype: bool, min_loaded: float,
) -> list[tuple[SourceTensor | RebuiltSource, str]]:
    """The (source, target name) pairs to load; fills the report and raises what strict and min_loaded ask."""
    renamed = _rename(sources, key_map)
    selected: list[tuple[SourceTensor | RebuiltSource, str]] = []
    for k, src in renamed.items():
        if k not in targets:
            report.unexpected.append(k)
        elif tuple(targets[k].shape) != src.shape:
            report.skipped_shape[k] = (src.shape, tuple(targets[k].shape))
        else:
            if src.dtype != targets[k].dtype:
                if strict_dtype:
                    raise StateMismatchError(f"{k}: the file holds {src.dtype}, the target {targets[k].dtype} (strict_dtype=True)")
                report.cast[k] = (src.dtype, targets[k].dtype)
            selected.append((src, k))
    tied = ties(targets, {k for _, k in selected})  # stored once, loaded through the one they share memory with
    report.missing = sorted(set(targets) - {k for _, k in selected} - set(report.skipped_shape) - tied)
    if strict and (report.missing or report.unexpected or report.skipped_shape):
        raise StateMismatchError(
            f"strict load from {where}: missing {report.missing}, unexpected {report.unexpected}, "
            f"shape mismatches {report.skipped_shape}"
        )
    if targets and (not selected or len(selected) + len(tied) < min_loaded * len(targets)):  # a load of (almost) nothing
        raise StateMismatchError(too_little_loaded(where, prefix, list(sources), list(renamed), list(targets),
                                                   len(selected) + len(tied)))
    report.loaded = sorted({k for _, k in selected} | tied)
    report.rebuilt = sorted(k for src, k in selected if isinstance(src, RebuiltSource))
    report.unexpected.sort()
    return selected


def describe(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, weights_only: bool = True,
) -> dict[str, Any]:
    """Tensors (name, dtype, shape, bytes) and non-tensor values of a file, from its header only.

    A torch file's values are unpickled with what ``torch.load(weights_only=True)`` allows;
    ``weights_only=False`` allows any global, for a file you trust.

    Example:
        >>> import ckptstore
        >>> ckptstore.save({"w": torch.zeros(2, 3)}, "memory://doc/describe/w.pt")
        >>> describe("memory://doc/describe/w.pt")["tensors"]
        [{'name': 'w', 'dtype': 'float32', 'shape': [2, 3], 'bytes': 24}]
    """
    report = LoadReport()
    resolved, index = locate(url, storage_options)
    if index is not None:  # every shard's header: a sharded file's tensors, and no other values
        sources = {k: v for shard in index.shards
                   for k, v in plan(index.storage, shard, report, weights_only=weights_only).tensors().items()}
        where, values, info = index.url, {"shards": index.shards}, None
    elif resolved[2] is not None and resolved[2].format == SHARDED_FORMAT:  # saved by every rank: DCP's metadata
        from .dcp_files import SavedShards

        info = resolved[2]
        saved = SavedShards(resolved[0], "", [f.path for f in info.files])
        sources = {k: SourceTensor(k, dtype, shape, 0, 0) for k, (shape, dtype) in saved.shapes().items()}
        report.bytes_read = sum(f.size for f in info.files if not f.path.endswith(".distcp"))
        where = info.url
        values = {"shards": [f.path for f in info.files if f.path.endswith(".distcp")],
                  TREE_METADATA_KEY: saved.tree({}, placeholders=True)}
    else:
        with opened(resolved, report) as source:
            planned = source.plan(report, weights_only)
        where = os.fspath(url) if report.read_whole else source.storage.url(source.name)
        sources, values, info = planned.tensors(), planned.values, source.info
    tensors = [_describe_tensor(k, s) for k, s in sources.items()]
    out: dict[str, Any] = {"url": where, "tensors": tensors, "values": values,
                           "header_bytes_read": report.bytes_read, "read_whole": report.read_whole}
    if info is not None:
        out["checkpoint"] = {"name": info.name, "step": info.step, "metrics": info.metrics, "format": info.format,
                             "created": info.created.isoformat(), "size": info.size}
    return out


def _describe_tensor(key: str, src: SourceTensor | RebuiltSource) -> dict[str, Any]:
    out: dict[str, Any] = {"name": key, "dtype": str(src.dtype).removeprefix("torch."), "shape": list(src.shape)}
    if isinstance(src, RebuiltSource):
        return {**out, "bytes": src.nbytes, "layout": src.layout}
    return {**out, "bytes": math.prod(src.shape) * itemsize(src.dtype)}


# -- planning -----------------------------------------------------------------------------
class Opened(NamedTuple):
    """A file to plan, as :func:`opened` found it: its first bytes are read already (the planner's
    head), so sniffing its format costs no request of its own."""

    storage: FsspecStorage
    name: str
    info: CheckpointInfo | None  # the manifest, when the URL was a checkpoint folder
    size: int | None = None
    head: bytes | None = None
    tail: bytes | None = None  # a torch zip's directory, fetched with the head on a remote store

    def plan(self, counter: ReadCounter, weights_only: bool) -> Plan:
        return plan(self.storage, self.name, counter, self.size, head=self.head, tail=self.tail, weights_only=weights_only)


@contextlib.contextmanager
def opened(resolved: Resolved, report: LoadReport) -> Iterator[Opened]:
    """A :func:`resolve`-d file, with the format found from the first bytes: a torch file from
    before 1.6 (no index) is read whole and planned from a temporary zip (see :mod:`ckptstore.legacy`)."""
    storage, name, info = resolved
    size = info.files[0].size if info is not None else storage.size(name)  # the manifest knows it: no request
    head, tail = _read_edges(storage, name, size, report, maybe_torch=_maybe_torch(name, info))
    if file_format(head, storage.url(name)) != "torch-legacy":
        yield Opened(storage, name, info, size, head, tail)
        return
    report.read_whole = True
    report.bytes_read += size
    with legacy.as_zip(storage, name, size) as (folder, zipped):
        yield Opened(folder, zipped, info)


Resolved = tuple[FsspecStorage, str, CheckpointInfo | None]


def resolve(url: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> Resolved:
    """(storage of the file's folder, file name, the checkpoint's manifest if ``url`` is a
    checkpoint folder, else None): a checkpoint folder resolves to its data file. A name with
    a file's suffix (``.pt``, ``.safetensors``, ...) is a file: no manifest is looked for."""
    if posixpath.basename(os.fspath(url).rstrip("/")).endswith(shards.FILE_SUFFIXES):
        return (*open_parent(url, storage_options), None)
    folder = open_storage(url, storage_options)
    try:
        info = CheckpointInfo.from_json(folder.read(MANIFEST_NAME), url=folder.url())
    except CheckpointNotFound:
        return (*open_parent(url, storage_options), None)
    if info.format == FOLDER_FORMAT:
        shown = ", ".join(folder.url(f.path) for f in info.files[:3]) + (", ..." if len(info.files) > 3 else "")
        raise ConfigError(f"{folder.url()} is a folder checkpoint (the files a framework wrote), not one state: "
                          f"name one of its files ({shown}), or bring it back with CheckpointManager.restore_folder")
    return folder, info.files[0].path, info


def locate(url: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[Resolved, shards.ShardIndex | None]:
    """:func:`resolve` ``url``, and the shard index it names when it is no checkpoint folder
    (a folder whose manifest was read is not listed for one)."""
    resolved = resolve(url, storage_options)
    return resolved, shards.find(url, storage_options) if resolved[2] is None else None


def plan(
    storage: FsspecStorage, name: str, counter: ReadCounter, size: int | None = None, *,
    head: bytes | None = None, tail: bytes | None = None, weights_only: bool = True,
) -> Plan:
    """Plan the safetensors or torch file ``name`` from its header alone (see :class:`Plan`).

    ``size``, ``head`` (its first ``HEAD_BYTES``) and ``tail`` (its last ``TAIL_BYTES``, a
    torch zip's directory), when the caller has them, save a request each. ``weights_only=False``
    lets ``data.pkl`` reference any global: for a file the caller trusts.

    Raises:
        CorruptCheckpointError: the header, directory or ``data.pkl`` is damaged or unplannable.
        UnsafeCheckpointError: ``data.pkl`` references globals beyond tensors and containers.
    """
    size = storage.size(name) if size is None else size
    where = storage.url(name)
    if head is None:  # the length prefix and, usually, the header; with a torch zip's directory on a remote store
        head, tail = _read_edges(storage, name, size, counter, maybe_torch=_maybe_torch(name, None))
    kind = file_format(head, where)
    if kind == "torch-legacy":
        raise CorruptCheckpointError(f"{where} is a torch file from before torch 1.6: it has no index to plan from")
    if kind == "torch":
        return _plan_torch(storage, name, size, head, tail, where, counter, trusted=not weights_only)
    length = header_length(head[:8], size, where)
    raw = head[8 : 8 + length] if 8 + length <= len(head) else _read(storage, name, 8, 8 + length, counter)
    header = parse_header(raw, size, where)
    sources = {k: SourceTensor(k, e.dtype, e.shape, e.start, e.end) for k, e in header.entries.items()}
    metadata: dict[str, Any] = dict(header.metadata)
    if TREE_METADATA_KEY not in metadata:  # a plain safetensors file: its tensors are the tree
        return Plan(sources, metadata, lambda load: {k: load(k, "cpu") for k in sources})
    try:
        skeleton = json.loads(metadata[TREE_METADATA_KEY])
        metadata[TREE_METADATA_KEY] = unflatten(skeleton, lambda k, _: f"<tensor {k}>")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CorruptCheckpointError(f"{where}: the state skeleton is not valid: {err!r}") from err
    return Plan(sources, metadata, lambda load: unflatten(skeleton, load))


def _plan_torch(storage: FsspecStorage, name: str, size: int, head: bytes, tail: bytes | None, where: str,
                counter: ReadCounter, trusted: bool) -> Plan:
    """zipfile reads the directory at the end, then data.pkl near the start: served from ``head``
    and, on remote stores, the tail (:class:`~ckptstore.rangefile.RangeFile`), not a request each.
    A caller that has no tail yet costs one more request here."""
    if tail is None and storage.local_path(name) is None:  # a local read costs no round trip: read what zipfile asks
        tail = _read(storage, name, _tail_start(len(head), size), size, counter)
    f = RangeFile(storage, name, size, head=head, tail=tail or b"")
    refs, header_offsets, obj = read_plan(f, where, trusted)  # type: ignore[arg-type]
    counter.bytes_read += f.bytes_read
    counter.requests += f.requests
    sources, composed = {}, {}
    canonical: dict[TensorRef | RebuiltRef, str] = {}  # torch.save keeps tied tensors as one storage: read them once
    for k, r in refs.items():
        canonical.setdefault(r, k)
        if isinstance(r, RebuiltRef):
            composed[k] = RebuiltSource(k, r, tuple(storage_region(s, header_offsets[s.member]) for s in r.storages()))
            continue
        begin, end = r.span()
        contiguous = r.stride == _contiguous_stride(r.shape)
        header_offset, base = header_offsets[r.storage.member]
        sources[k] = SourceTensor(k, r.dtype, r.shape, base + begin, base + end,
                                  None if contiguous else r.stride, 0, (header_offset, base))

    def build(load: Loader) -> Any:
        return _replace_refs(obj, lambda r: load(canonical[r], _location(r)))

    return Plan(sources, _describe_refs(obj), build, composed)


def _location(ref: TensorRef | RebuiltRef) -> str:
    """Where the tensor was saved (its first storage's location: a rebuilt one has at least one, since a
    tensor built from none, a meta tensor, is refused by the planner)."""
    return (ref.storage if isinstance(ref, TensorRef) else ref.storages()[0]).location


def _replace_refs(obj: Any, tensor: Callable[[TensorRef | RebuiltRef], Any]) -> Any:
    if isinstance(obj, (TensorRef, RebuiltRef)):
        return tensor(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _replace_refs(v, tensor)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_replace_refs(v, tensor) for v in obj)
    return obj


def _describe_refs(obj: Any) -> Any:
    if isinstance(obj, TensorRef):
        return f"<tensor {obj.dtype} {list(obj.shape)}>"
    if isinstance(obj, RebuiltRef):
        return f"<{obj.layout} tensor {obj.dtype} {list(obj.shape)}>"
    if isinstance(obj, dict):
        return {k: _describe_refs(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_describe_refs(v) for v in obj]
    return obj


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _rename(sources: dict[str, _T], key_map: KeyMap) -> dict[str, _T]:
    if key_map is None:
        return sources
    out = {}
    for k, v in sources.items():
        new = key_map(k) if callable(key_map) else next((n + k[len(o):] for o, n in key_map.items() if k.startswith(o)), k)
        if new is not None:
            out[new] = v
    return out


def _target_tensors(target: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        return dict(target.state_dict(keep_vars=True))
    return dict(target)


def _read(storage: FsspecStorage, name: str, start: int, end: int, counter: ReadCounter) -> bytes:
    data = storage.read(name, start, end)
    counter.bytes_read += len(data)
    counter.requests += 1
    return data


def _maybe_torch(name: str, info: CheckpointInfo | None) -> bool:
    """Whether ``name`` may be a torch zip, before its first bytes say: the manifest's format,
    else anything not named ``.safetensors`` (a wrong guess costs a 64 KiB read in parallel)."""
    return info.format == "torch" if info is not None else not name.endswith(".safetensors")


def _tail_start(head_end: int, size: int) -> int:
    """Where the last ``TAIL_BYTES`` (a torch zip's end record and directory) begin, past the head."""
    return max(head_end, size - TAIL_BYTES)


def _read_edges(storage: FsspecStorage, name: str, size: int, counter: ReadCounter, *,
                maybe_torch: bool) -> tuple[bytes, bytes | None]:
    """The file's first ``HEAD_BYTES`` and, for what may be a torch zip on a remote store, its last
    ``TAIL_BYTES`` (the zip's directory) too, both in one round trip (None: not fetched)."""
    head_end = min(HEAD_BYTES, size)
    tail_start = _tail_start(head_end, size)
    if not maybe_torch or tail_start >= size or storage.local_path(name) is not None:
        return _read(storage, name, 0, head_end, counter), None
    head, tail = storage.read_ranges(name, [(0, head_end), (tail_start, size)])
    counter.bytes_read += len(head) + len(tail)
    counter.requests += 2
    return head, tail


# -- landing ------------------------------------------------------------------------------
def _transfer(transfer: Transfer, selected: list[tuple[SourceTensor | RebuiltSource, str]],
              targets: dict[str, torch.Tensor], target: Any, device: str | torch.device | None) -> None:
    """Bytes straight into each target tensor where they fit as they are, else via a temporary;
    sparse and quantized tensors built by torch, then copied in (see :mod:`ckptstore.rebuilt`)."""
    jobs: list[tuple[SourceTensor, torch.Tensor]] = []
    finalizers: list[Callable[[], None]] = []
    composed = [(src, k) for src, k in selected if isinstance(src, RebuiltSource)]
    if composed:  # first: one that cannot be copied in place raises before any dense bytes land
        for value, (whole, k) in zip(rebuilt.fetch(transfer, [src for src, _ in composed]), composed):
            live = targets[k]
            rebuilt.land(value, whole, k, live)
    for src, k in selected:
        if isinstance(src, RebuiltSource):
            continue
        live = targets[k]
        where = torch.device(device) if device is not None else live.device
        if where == live.device and landable(src, live):
            jobs.append((src, byte_view(live)))
        else:
            tmp = scratch(src)
            jobs.append((src, tmp.view(torch.uint8)))
            finalizers.append(_finish(src, tmp, k, live, where, target))
    transfer.run(jobs)
    for finish in finalizers:
        finish()


def _finish(src: SourceTensor, tmp: torch.Tensor, key: str, live: torch.Tensor, where: torch.device,
            target: Any) -> Callable[[], None]:
    """After the bytes arrived in ``tmp``: view, cast and move them into the target."""

    def finish() -> None:
        value = shaped(src, tmp).to(device=where, dtype=live.dtype)
        if where == live.device:
            with torch.no_grad():
                live.copy_(value)
        elif isinstance(target, torch.nn.Module):
            target.load_state_dict({key: value}, strict=False, assign=True)
        else:
            target[key] = value

    return finish
