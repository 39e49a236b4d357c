"""Streaming partial loads: header -> byte ranges -> bytes straight into the target tensors.

``load_partial`` is the classic fine-tuning recipe (keep the pretrained tensors whose name
and shape match the model) without downloading or unpickling the whole file:

1. **Plan from the header alone.** Safetensors: the 8-byte length and the JSON header, two
   range reads. Torch zip: the central directory and ``data.pkl``, planned by a restricted
   unpickler (:mod:`ckptstore.torch_zip`) that never imports arbitrary globals.
2. **Match.** Source keys are renamed by ``key_map``; a tensor loads only if the target has
   its key with the same shape. Dtype differences are cast (and reported) unless
   ``strict_dtype``.
3. **Fetch only the needed bytes.** Each selected tensor is a half-open range ``[start,
   end)`` of the file. Ranges are split into chunks of at most ``max_buffer / 4``,
   nearly-adjacent ones are coalesced, and batches of at most ``max_buffer`` bytes are fetched
   concurrently (fsspec ``cat_ranges``). Local files are read with ``os.preadv`` straight into
   the target's memory.
4. **Land in the target.** CPU targets receive the bytes in their own storage. Other devices
   get them through two reusable pinned staging buffers with ``non_blocking`` copies, so the
   next chunk is filled while the previous one is in flight. Peak extra host memory is one
   batch (``max_buffer``) plus the staging buffers, whatever the file size; a tensor that
   needs a cast or is a strided view is read into one temporary of its own size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch

from .errors import CheckpointNotFound, ConfigError, CorruptCheckpointError, StateMismatchError
from .manifest import MANIFEST_NAME, CheckpointInfo
from .safetensors_header import header_length, parse_header
from .storage import FsspecStorage, open_parent, open_storage
from .serializers import TREE_METADATA_KEY
from .torch_zip import TensorRef, data_start, read_plan
from .tree import unflatten

KeyMap = Mapping[str, str] | Callable[[str], str | None] | None
DEFAULT_MAX_BUFFER = 256 * 2**20
HEAD_BYTES = 64 * 2**10  # first read: one request for the length prefix and a typical header
COALESCE_WASTE = 0.05  # a merged request fetches at most 5% more than the bytes it needs


@dataclass
class LoadReport:
    """What :func:`load_partial` did. ``skipped_shape`` maps key -> (source shape, target shape).

    ``bytes_read`` and ``requests`` count the loader's reads of the file (header, directory,
    tensor ranges); metadata calls (the manifest probe, size lookups) are not included.
    """

    loaded: list[str] = field(default_factory=list)
    skipped_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    cast: dict[str, tuple[torch.dtype, torch.dtype]] = field(default_factory=dict)
    bytes_read: int = 0
    requests: int = 0


@dataclass(frozen=True)
class SourceTensor:
    """Where a tensor's bytes are in the file, and how to view them."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte the view touches
    end: int
    stride: tuple[int, ...] | None = None  # None: contiguous
    offset: int = 0  # element offset of the view inside [start, end)
    zip_header: tuple[int, int] | None = None  # torch zips: (local header offset, predicted data start)


def load_partial(
    url: str | os.PathLike[str],
    target: torch.nn.Module | dict[str, torch.Tensor],
    *,
    device: str | torch.device | None = None,
    key_map: KeyMap = None,
    key: str | None = None,
    strict: bool = False,
    strict_dtype: bool = False,
    max_buffer: int = DEFAULT_MAX_BUFFER,
    storage_options: dict[str, Any] | None = None,
) -> LoadReport:
    """Load the tensors of ``url`` that ``target`` has, with the same shape, in place.

    ``url`` is a safetensors file, a ``torch.save`` file or a ckptstore checkpoint folder;
    for a checkpoint, ``key`` (default ``"model"``) picks the state entry to load from.

    Example:
        >>> import ckptstore
        >>> src = torch.nn.Linear(2, 2)
        >>> ckptstore.save(src.state_dict(), "memory://doc/partial/w.safetensors")
        >>> report = load_partial("memory://doc/partial/w.safetensors", torch.nn.Linear(2, 2))
        >>> sorted(report.loaded), report.missing
        (['bias', 'weight'], [])
    """
    storage, name, is_checkpoint = _resolve(os.fspath(url), storage_options)
    report = LoadReport()
    sources, _ = _plan(storage, name, report)
    prefix = key if key is not None else ("model" if is_checkpoint else None)
    if prefix is not None:
        sources = {k[len(prefix) + 1 :]: v for k, v in sources.items() if k.startswith(prefix + "/")}
    renamed = _rename(sources, key_map)
    targets = _target_tensors(target)
    selected: list[tuple[SourceTensor, str]] = []
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
    report.missing = sorted(set(targets) - {k for _, k in selected} - set(report.skipped_shape))
    if strict and (report.missing or report.unexpected or report.skipped_shape):
        raise StateMismatchError(
            f"strict load from {storage.url(name)}: missing {report.missing}, unexpected {report.unexpected}, "
            f"shape mismatches {report.skipped_shape}"
        )
    _Transfer(storage, name, max_buffer, report).run(selected, targets, target, device)
    report.loaded = sorted(k for _, k in selected)
    report.unexpected.sort()
    return report


def describe(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tensors (name, dtype, shape, bytes) and non-tensor values of a file, from its header only.

    Example:
        >>> import ckptstore
        >>> ckptstore.save({"w": torch.zeros(2, 3)}, "memory://doc/describe/w.pt")
        >>> describe("memory://doc/describe/w.pt")["tensors"]
        [{'name': 'w', 'dtype': 'float32', 'shape': [2, 3], 'bytes': 24}]
    """
    storage, name, is_checkpoint = _resolve(os.fspath(url), storage_options)
    report = LoadReport()
    sources, values = _plan(storage, name, report)
    tensors = [{"name": k, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                "bytes": math.prod(s.shape) * _itemsize(s.dtype)} for k, s in sources.items()]
    out: dict[str, Any] = {"url": storage.url(name), "tensors": tensors, "values": values,
                           "header_bytes_read": report.bytes_read}
    if is_checkpoint:
        info = CheckpointInfo.from_json(storage.read(MANIFEST_NAME), url=storage.url())
        out["checkpoint"] = {"name": info.name, "step": info.step, "metrics": info.metrics, "format": info.format,
                             "created": info.created.isoformat(), "size": info.size}
    return out


# -- planning -----------------------------------------------------------------------------
def _resolve(url: str, storage_options: dict[str, Any] | None) -> tuple[FsspecStorage, str, bool]:
    """(storage of the file's folder, file name, is a checkpoint folder); follows manifests."""
    folder = open_storage(url, storage_options)
    try:
        info = CheckpointInfo.from_json(folder.read(MANIFEST_NAME), url=folder.url())
    except CheckpointNotFound:
        return (*open_parent(url, storage_options), False)
    return folder, info.files[0].path, True


def _plan(storage: FsspecStorage, name: str, report: LoadReport) -> tuple[dict[str, SourceTensor], Any]:
    """The file's tensors, and its non-tensor content (tensors shown as ``"<tensor key>"``)."""
    size = storage.size(name)
    where = storage.url(name)
    head = _read(storage, name, 0, min(HEAD_BYTES, size), report)  # length prefix and, usually, the header
    if head[:4] == b"PK\x03\x04":
        return _plan_torch(storage, name, where, report)
    length = header_length(head[:8], size, where)
    raw = head[8 : 8 + length] if 8 + length <= len(head) else _read(storage, name, 8, 8 + length, report)
    header = parse_header(raw, size, where)
    sources = {k: SourceTensor(k, e.dtype, e.shape, e.start, e.end) for k, e in header.entries.items()}
    metadata: dict[str, Any] = dict(header.metadata)
    if TREE_METADATA_KEY in metadata:
        try:
            metadata[TREE_METADATA_KEY] = unflatten(json.loads(metadata[TREE_METADATA_KEY]), lambda k, _: f"<tensor {k}>")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CorruptCheckpointError(f"{where}: the state skeleton is not valid: {err!r}") from err
    return sources, metadata


def _plan_torch(storage: FsspecStorage, name: str, where: str, report: LoadReport) -> tuple[dict[str, SourceTensor], Any]:
    with storage.open_read(name, exact=True) as f:
        counted = _CountingFile(f)
        refs, header_offsets, obj = read_plan(counted, where)  # type: ignore[arg-type]
    report.bytes_read += counted.bytes_read
    report.requests += counted.reads
    sources = {}
    for k, r in refs.items():
        begin, end = r.span()
        contiguous = r.stride == _contiguous_stride(r.shape)
        header_offset, base = header_offsets[r.storage.member]
        sources[k] = SourceTensor(k, r.dtype, r.shape, base + begin, base + end,
                                  None if contiguous else r.stride, 0, (header_offset, base))
    return sources, _describe_refs(obj)


def _describe_refs(obj: Any) -> Any:
    if isinstance(obj, TensorRef):
        return f"<tensor {obj.dtype} {list(obj.shape)}>"
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


def _rename(sources: dict[str, SourceTensor], key_map: KeyMap) -> dict[str, SourceTensor]:
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


def _read(storage: FsspecStorage, name: str, start: int, end: int, report: LoadReport) -> bytes:
    data = storage.read(name, start, end)
    report.bytes_read += len(data)
    report.requests += 1
    return data


class _CountingFile:
    """Wraps a file object to count the bytes and reads that zipfile makes."""

    def __init__(self, f: Any) -> None:
        self.f, self.bytes_read, self.reads = f, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bytes_read += len(data)
        self.reads += 1
        return bytes(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


# -- transfer -----------------------------------------------------------------------------
@dataclass
class _Part:
    """``[start, end)`` of the file lands at ``dest`` (a flat uint8 tensor)."""

    start: int
    end: int
    dest: torch.Tensor


@dataclass
class _Request:
    """One ranged read ``[start, end)`` serving several parts."""

    start: int
    end: int
    parts: list[_Part]
    needed: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.needed = self.end - self.start

    def add(self, part: _Part) -> None:
        self.skipped += max(part.start - self.end, 0)
        self.needed += max(part.end - max(part.start, self.end), 0)
        self.end = max(self.end, part.end)
        self.parts.append(part)


class _Transfer:
    def __init__(self, storage: FsspecStorage, name: str, max_buffer: int, report: LoadReport) -> None:
        if max_buffer < 2**16:
            raise ConfigError(f"`max_buffer` must be at least 64 KiB, got {max_buffer}")
        self.storage, self.name, self.report = storage, name, report
        self.max_buffer, self.chunk = max_buffer, max(2**16, max_buffer // 4)
        self.local = storage.local_path(name)
        self._staging: list[torch.Tensor] = []
        self._events: list[Any] = []
        self._copies = 0

    def run(self, selected: list[tuple[SourceTensor, str]], targets: dict[str, torch.Tensor],
            target: Any, device: str | torch.device | None) -> None:
        finalizers: list[Callable[[], None]] = []
        parts: list[_Part] = []
        for src, k in selected:
            live = targets[k]
            where = torch.device(device) if device is not None else live.device
            direct = src.stride is None and src.dtype == live.dtype and where == live.device and live.is_contiguous()
            if direct:
                dest = live.detach().reshape(-1).view(torch.uint8)
            else:
                tmp = torch.empty((src.end - src.start) // _itemsize(src.dtype), dtype=src.dtype)
                dest = tmp.view(torch.uint8)
                finalizers.append(_finish(src, tmp, k, live, where, target))
            parts.extend(_Part(s, min(s + self.chunk, src.end), dest[s - src.start : min(s + self.chunk, src.end) - src.start])
                         for s in range(src.start, src.end, self.chunk))
        # torch zips: each member's local header rides along in the same request as its data
        headers = {src.zip_header: torch.empty(src.zip_header[1] - src.zip_header[0], dtype=torch.uint8)
                   for src, _ in selected if src.zip_header is not None}
        parts.extend(_Part(start, data, scratch) for (start, data), scratch in headers.items())
        for batch in self._batches(sorted(parts, key=lambda p: p.start)):
            self._fetch(batch)
        for (start, data), scratch in headers.items():
            if data_start(scratch.numpy().tobytes(), start, self.storage.url(self.name)) != data:
                raise CorruptCheckpointError(
                    f"{self.storage.url(self.name)}: the zip member at {start} is not laid out as torch.save writes it; "
                    "load it with ckptstore.load instead"
                )
        if self._events:
            torch.cuda.synchronize()
        for finish in finalizers:
            finish()

    def _batches(self, parts: list[_Part]) -> Iterator[list[_Request]]:
        """Coalesce sorted parts into requests, and requests into batches of <= max_buffer bytes.

        A gap joins two parts only while the request's skipped bytes stay within
        ``COALESCE_WASTE`` of its needed bytes, so the whole load moves at most 5% extra.
        """
        batch: list[_Request] = []
        size = 0
        for part in parts:
            request = batch[-1] if batch else None
            gap = part.start - request.end if request else 0
            if (request and part.end - request.start <= self.chunk
                    and request.skipped + max(gap, 0) <= COALESCE_WASTE * (request.needed + part.end - part.start)):
                size += max(part.end - request.end, 0)
                request.add(part)
            else:
                if batch and size + (part.end - part.start) > self.max_buffer:
                    yield batch
                    batch, size = [], 0
                batch.append(_Request(part.start, part.end, [part]))
                size += part.end - part.start
        if batch:
            yield batch

    def _fetch(self, batch: list[_Request]) -> None:
        if self.local is not None:
            fd = os.open(self.local, os.O_RDONLY)
            try:
                for request in batch:
                    for part in request.parts:
                        self._pread(fd, part)
            finally:
                os.close(fd)
            return
        chunks = self.storage.read_ranges(self.name, [(r.start, r.end) for r in batch])
        self.report.requests += len(batch)
        for request, data in zip(batch, chunks):
            self.report.bytes_read += len(data)
            for part in request.parts:
                self._land(memoryview(data)[part.start - request.start : part.end - request.start], part.dest)

    def _pread(self, fd: int, part: _Part) -> None:
        if part.dest.device.type == "cpu":
            view = part.dest.numpy().data
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], part.start + done)
                if n == 0:
                    raise CorruptCheckpointError(f"{self.storage.url(self.name)} ended before byte {part.end}")
                done += n
        else:
            data = os.pread(fd, part.end - part.start, part.start)
            self._land(memoryview(data), part.dest)
        self.report.bytes_read += part.end - part.start
        self.report.requests += 1

    def _land(self, data: memoryview, dest: torch.Tensor) -> None:
        if len(data) != dest.numel():
            raise CorruptCheckpointError(f"{self.storage.url(self.name)}: short read ({len(data)} of {dest.numel()} bytes)")
        source = numpy.frombuffer(data, dtype=numpy.uint8)
        if dest.device.type == "cpu":
            dest.numpy()[:] = source
        else:
            self._stage(source, dest)

    def _stage(self, source: Any, dest: torch.Tensor) -> None:
        """Copy host bytes to a device through two alternating pinned buffers."""
        if not self._staging:
            pinned = torch.cuda.is_available()
            self._staging = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
            self._events = [None, None]
        slot = self._copies % 2
        self._copies += 1
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last used this buffer is done
        buffer = self._staging[slot][: len(source)]
        buffer.numpy()[:] = source
        dest.copy_(buffer, non_blocking=True)
        if torch.cuda.is_available() and dest.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._events[slot] = event


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _finish(src: SourceTensor, tmp: torch.Tensor, key: str, live: torch.Tensor, where: torch.device,
            target: Any) -> Callable[[], None]:
    """After the bytes arrived in ``tmp``: view, cast and move them into the target."""

    def finish() -> None:
        value = tmp if src.stride is None else tmp.as_strided(src.shape, src.stride, src.offset)
        value = value.reshape(src.shape).to(device=where, dtype=live.dtype)
        if where == live.device:
            with torch.no_grad():
                live.copy_(value)
        elif isinstance(target, torch.nn.Module):
            target.load_state_dict({key: value}, strict=False, assign=True)
        else:
            target[key] = value

    return finish

