"""Byte ranges of one file -> caller-supplied tensor memory, in bounded batches.

The transfer half shared by :func:`ckptstore.load_partial` and
:meth:`CheckpointManager.restore`: both plan where each tensor's bytes are
(:class:`SourceTensor`), choose a destination for them (the live tensor itself, or a new
one), and hand the pairs to :class:`Transfer`, which knows nothing of keys or state trees:

* **Ranges are half-open ``[start, end)``.** Each is split into chunks of at most
  ``max_buffer / 4``; nearly-adjacent chunks are coalesced into one request (wasting at most
  5%), and requests are fetched in concurrent batches of at most ``max_buffer`` bytes
  (fsspec ``cat_ranges``). Local files are read with ``os.preadv`` straight into the
  destination's memory, with no batch buffer at all.
* **Devices.** CPU destinations receive the bytes in their own storage. Others get them
  through two reusable pinned staging buffers with ``non_blocking`` copies, so the next
  chunk is filled while the previous one is in flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy
import torch

from .errors import ConfigError, CorruptCheckpointError
from .storage import FsspecStorage
from .torch_zip import data_start

COALESCE_WASTE = 0.05  # a merged request fetches at most 5% more than the bytes it needs


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


class ReadCounter(Protocol):
    """Where a transfer counts what it read (:class:`ckptstore.LoadReport` is one)."""

    bytes_read: int
    requests: int


def landable(src: SourceTensor, live: torch.Tensor) -> bool:
    """True if ``src``'s file bytes can be written into ``live``'s memory as they are.

    Example:
        >>> landable(SourceTensor("w", torch.float32, (2,), 0, 8), torch.zeros(2))
        True
    """
    return (
        src.stride is None
        and src.dtype == live.dtype
        and tuple(live.shape) == src.shape
        and live.layout == torch.strided
        and live.device.type != "meta"
        and not live.is_quantized
        and not (live.is_conj() or live.is_neg())
        and live.is_contiguous()
    )


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (no copy, no autograd)."""
    return t.detach().reshape(-1).view(torch.uint8)


def scratch(src: SourceTensor) -> torch.Tensor:
    """A new flat CPU tensor of ``src``'s dtype, the size of its byte range."""
    return torch.empty((src.end - src.start) // itemsize(src.dtype), dtype=src.dtype)


def shaped(src: SourceTensor, flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (from :func:`scratch`, filled) viewed with ``src``'s shape and strides."""
    view = flat if src.stride is None else flat.as_strided(src.shape, src.stride, src.offset)
    return view.reshape(src.shape)


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


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


class Transfer:
    """Fetch byte ranges of ``storage``'s file ``name`` into destination tensors.

    Args:
        max_buffer: the most bytes held in flight at once (at least 64 KiB).
        counter: receives the bytes and requests read.
        fd: an open descriptor of the local file ``name``, read instead of opening it by name
            for each batch (the caller closes it): the very file the caller checked, even if
            it is deleted meanwhile.
        where: the URL messages name, when ``name`` is a local copy of a remote file.
    """

    def __init__(self, storage: FsspecStorage, name: str, max_buffer: int, counter: ReadCounter,
                 fd: int | None = None, where: str | None = None) -> None:
        if max_buffer < 2**16:
            raise ConfigError(f"`max_buffer` must be at least 64 KiB, got {max_buffer}")
        self.storage, self.name, self.counter, self.fd = storage, name, counter, fd
        self._where = where
        self.max_buffer, self.chunk = max_buffer, max(2**16, max_buffer // 4)
        self.local = storage.local_path(name)
        self._staging: list[torch.Tensor] = []
        self._events: list[Any] = []
        self._copies = 0

    def run(self, jobs: Sequence[tuple[SourceTensor, torch.Tensor]], check: Sequence[SourceTensor] | None = None) -> None:
        """Land each source's bytes ``[start, end)`` in its destination, a flat uint8 tensor of that size.

        Torch zips: the local header of each member in ``check`` (default: the jobs' sources)
        is read with the data and checked after it, raising CorruptCheckpointError if the
        member's data is not where the plan put it.
        """
        parts: list[_Part] = []
        for src, dest in jobs:
            if dest.numel() != src.end - src.start:
                raise ValueError(f"{src.key}: destination of {dest.numel()} bytes for [{src.start}, {src.end})")
            parts.extend(_Part(s, min(s + self.chunk, src.end), dest[s - src.start : min(s + self.chunk, src.end) - src.start])
                         for s in range(src.start, src.end, self.chunk))
        # torch zips: each member's local header rides along in the same request as its data
        headers = {src.zip_header: torch.empty(src.zip_header[1] - src.zip_header[0], dtype=torch.uint8)
                   for src in ([s for s, _ in jobs] if check is None else check) if src.zip_header is not None}
        parts.extend(_Part(start, data, scratch) for (start, data), scratch in headers.items())
        for batch in self._batches(sorted(parts, key=lambda p: p.start)):
            self._fetch(batch)
        for (start, data), scratch in headers.items():
            if data_start(scratch.numpy().tobytes(), start, self.where) != data:
                raise CorruptCheckpointError(
                    f"{self.where}: the zip member at {start} is not laid out as torch.save writes it; "
                    "load it with ckptstore.load instead"
                )
        if any(e is not None for e in self._events):
            torch.cuda.synchronize()

    @property
    def where(self) -> str:
        """The file's URL in messages: ``where`` if given (a local copy's origin), else its own."""
        return self._where or self.storage.url(self.name)

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
            fd = os.open(self.local, os.O_RDONLY) if self.fd is None else self.fd
            try:
                for request in batch:
                    for part in request.parts:
                        self._pread(fd, part)
            finally:
                if fd != self.fd:
                    os.close(fd)
            return
        chunks = self.storage.read_ranges(self.name, [(r.start, r.end) for r in batch])
        self.counter.requests += len(batch)
        for request, data in zip(batch, chunks):
            self.counter.bytes_read += len(data)
            for part in request.parts:
                self._land(memoryview(data)[part.start - request.start : part.end - request.start], part.dest)

    def _pread(self, fd: int, part: _Part) -> None:
        if part.dest.device.type == "cpu":
            view = part.dest.numpy().data
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], part.start + done)
                if n == 0:
                    raise CorruptCheckpointError(f"{self.where} ended before byte {part.end}")
                done += n
        else:
            data = os.pread(fd, part.end - part.start, part.start)
            self._land(memoryview(data), part.dest)
        self.counter.bytes_read += part.end - part.start
        self.counter.requests += 1

    def _land(self, data: memoryview, dest: torch.Tensor) -> None:
        if len(data) != dest.numel():
            raise CorruptCheckpointError(f"{self.where}: short read ({len(data)} of {dest.numel()} bytes)")
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
