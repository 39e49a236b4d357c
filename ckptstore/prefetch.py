"""A sequential reader that keeps several ranged GETs in flight ahead of the caller.

fsspec's remote file objects read ahead one block at a time: each block waits for the one
before it, so a whole-file read over a link with latency and a per-connection cap runs at one
connection's speed. :class:`PrefetchReader` asks for the next ``in_flight`` chunks of
``chunk_bytes`` at once (on the filesystem's own event loop, through its ``_cat_file``, so the
client's retries apply to each range) and hands them out in order.

Memory: at most ``in_flight`` chunks, ``in_flight × chunk_bytes``. Reads are sequential
``readinto`` calls (the serializers' checksum streams make nothing else): there is no seek.

Example::

    with PrefetchReader(fs, "bucket/ckpt/state.safetensors", size, chunk_bytes=8 << 20, in_flight=4) as f:
        f.readinto(buffer)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from types import TracebackType
from typing import Any


class PrefetchReader:
    """Read ``path`` (``size`` bytes) from the start, ``in_flight`` chunks ahead (see the module)."""

    def __init__(self, fs: Any, path: str, size: int, *, chunk_bytes: int, in_flight: int) -> None:
        self.fs, self.path, self.size = fs, path, size
        self.chunk_bytes, self.in_flight = chunk_bytes, in_flight
        self._next_start = 0  # of the next chunk to ask for
        self._pending: collections.deque[tuple[int, int, concurrent.futures.Future[bytes]]] = collections.deque()
        self._current = memoryview(b"")

    def __enter__(self) -> PrefetchReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the reads still in flight."""
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._current = memoryview(b"")

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the stream; returns the bytes written (less only at the end)."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._current and not self._advance():
                break
            take = min(len(view) - filled, len(self._current))
            view[filled : filled + take] = self._current[:take]
            self._current = self._current[take:]
            filled += take
        return filled

    def _advance(self) -> bool:
        """Make the next chunk current, keeping ``in_flight`` asked for; False at the end of the file."""
        while len(self._pending) < self.in_flight and self._next_start < self.size:
            start, end = self._next_start, min(self._next_start + self.chunk_bytes, self.size)
            coroutine = self.fs._cat_file(self.path, start=start, end=end)
            self._pending.append((start, end, asyncio.run_coroutine_threadsafe(coroutine, self.fs.loop)))
            self._next_start = end
        if not self._pending:
            return False
        start, end, future = self._pending.popleft()
        data = future.result()
        if len(data) < end - start:  # the file is shorter than it was said to be: its end is here
            self.close()
            self.size = self._next_start = start + len(data)
        self._current = memoryview(data)
        return bool(data)

