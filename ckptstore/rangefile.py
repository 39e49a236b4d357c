"""A seekable, read-only file over a stored file's byte ranges, for zipfile's scattered reads.

Planning a torch zip reads its end (the end-of-central-directory record and the directory)
and its start (``data.pkl``, the first member ``torch.save`` writes) in a dozen small reads.
Through an fsspec file each is a request (a round trip on a real link; moto even reads the
whole object for each), and opening it costs a HEAD for the size. :class:`RangeFile` is told
the size, keeps the windows it was given (the first bytes and the last ``TAIL_BYTES``, which
the planner fetches together in one round trip) and asks the store only for reads outside them.

Example:
    >>> from ckptstore.storage import open_storage
    >>> store = open_storage("memory://doc/rangefile")
    >>> store.write_new("f.bin", bytes(range(100)))
    >>> f = RangeFile(store, "f.bin", 100, head=bytes(range(10)), tail=bytes(range(80, 100)))
    >>> _ = f.seek(95)
    >>> f.read(), f.requests
    (b'_`abc', 0)
    >>> _ = f.seek(50)
    >>> f.read(2), f.requests
    (b'23', 1)
"""

from __future__ import annotations

import io

from .storage import FsspecStorage

TAIL_BYTES = 64 * 2**10  # a zip's end record and a directory of ~600 members, in one request


class RangeFile(io.RawIOBase):
    """``size`` bytes of ``name``; ``head`` and ``tail`` hold its first and last bytes, if the
    caller read them already.

    ``requests`` and ``bytes_read`` count what was asked of the store.
    """

    def __init__(self, storage: FsspecStorage, name: str, size: int, *, head: bytes = b"", tail: bytes = b"") -> None:
        super().__init__()
        self.storage, self.name, self.size = storage, name, size
        self.requests, self.bytes_read = 0, 0
        self._windows = [(0, head[:size]), (size - len(tail), tail)]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._position + n)
        start, self._position = self._position, max(self._position, end)
        if start >= end:
            return b""
        for begin, data in self._windows:
            if begin <= start and end <= begin + len(data):
                return data[start - begin : end - begin]
        return self._fetch(start, end)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def _fetch(self, start: int, end: int) -> bytes:
        data = self.storage.read(self.name, start, end)
        self.requests += 1
        self.bytes_read += len(data)
        return data
