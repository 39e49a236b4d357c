"""Concurrent S3 multipart upload: several parts in flight, memory bounded by their count.

s3fs's own file object uploads one part after another (each waits for the last one's reply):
on a link with tens of milliseconds of latency and a per-connection cap, most of a save is
spent waiting. :class:`ConcurrentUpload` is a write-only file object that cuts the stream
into ``part_bytes`` parts and keeps up to ``in_flight`` of them uploading at once, on s3fs's
own event loop and through its ``_call_s3`` (so botocore's retries re-send a failed part, and
the caller's ``s3_additional_kwargs``, such as server-side encryption, apply to every call).

Memory: the part being filled plus the parts in flight, ``(in_flight + 1) × part_bytes``; a
write blocks while that many are held. A part whose body moves slower than ``stalled_below``
bytes/s (a server that stopped reading) is cut and re-sent, so no part can hang a save.
Nothing is visible until :meth:`commit` (one PUT for a file smaller than a part; else the
remaining parts, then CompleteMultipartUpload); :meth:`discard` aborts the upload, so no
parts are left billed.

Example (it needs a live S3 endpoint: tests/test_transfers.py runs it against moto)::

    upload = ConcurrentUpload(fs, "bucket/key", part_bytes=8 << 20, in_flight=4, stalled_below=256 << 10)
    upload.write(data)
    upload.commit()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from typing import Any

log = logging.getLogger(__name__)
STALLED_TRIES = 3  # tries of a part whose body stalls before the upload fails


class ConcurrentUpload:
    """A write-only file object for one S3 object; parts upload concurrently (see the module)."""

    def __init__(self, fs: Any, path: str, *, part_bytes: int, in_flight: int, stalled_below: int) -> None:
        self.fs = fs
        self.stalled_below = stalled_below
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes, self.in_flight = part_bytes, in_flight
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._pending: collections.deque[concurrent.futures.Future[dict[str, Any]]] = collections.deque()
        self._parts: list[dict[str, Any]] = []

    # -- the file-object side -------------------------------------------------------------
    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            take = min(len(view), self.part_bytes - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self.part_bytes:
                self._send_part()
        return written

    def flush(self) -> None:
        """Nothing to do: parts go out as they fill (the stream protocol asks for it)."""

    def close(self) -> None:
        """Nothing to do: :meth:`commit` or :meth:`discard` ends the upload (as with fsspec's
        ``autocommit=False`` files, which are closed, then committed)."""

    # -- commit and abort -----------------------------------------------------------------
    def commit(self) -> None:
        """Upload what is left and make the object visible, whole."""
        if self._upload_id is None:
            body = bytes(self._buffer)
            future = asyncio.run_coroutine_threadsafe(self._bounded("put_object", "the upload", Body=body), self.fs.loop)
            future.result()
        else:
            if self._buffer:
                self._send_part()
            self._drain(0)
            parts = sorted(self._parts, key=lambda p: p["PartNumber"])
            self._call("complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        self._buffer = bytearray()

    def discard(self) -> None:
        """Abandon the upload: wait for the parts in flight, then abort it (its parts are freed)."""
        self._buffer = bytearray()
        for future in self._pending:
            future.cancel()
        concurrent.futures.wait(self._pending)
        self._pending.clear()
        if self._upload_id is not None:
            try:
                self._call("abort_multipart_upload", UploadId=self._upload_id)
            except Exception as err:  # the save's own error matters more; the manager aborts it later
                log.warning("could not abort the upload of s3://%s/%s (%s); the next save's cleanup will", self.bucket, self.key, err)

    # -- parts ----------------------------------------------------------------------------
    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        self._drain(self.in_flight - 1)
        number = len(self._parts) + len(self._pending) + 1
        body, self._buffer = bytes(self._buffer), bytearray()
        coroutine = self._part(number, body)
        self._pending.append(asyncio.run_coroutine_threadsafe(coroutine, self.fs.loop))

    async def _part(self, number: int, body: bytes) -> dict[str, Any]:
        reply = await self._bounded("upload_part", f"part {number}", UploadId=self._upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": reply["ETag"]}

    async def _bounded(self, method: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """One upload call whose body must move at ``stalled_below`` bytes/s or better.

        A server that stops reading mid-body stalls the sender with no timeout at all (the
        client's read timeout starts once the body is sent), so each try gets ``read_timeout +
        len(body) / stalled_below`` seconds; a try past it is cut and the body re-sent, up to
        ``STALLED_TRIES`` times, then the upload fails with TimeoutError.
        """
        body = kwargs["Body"]
        deadline = float(self.fs.config_kwargs["read_timeout"]) + len(body) / self.stalled_below  # set by network.with_defaults
        for attempt in range(1, STALLED_TRIES + 1):
            try:
                call = self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
                return dict(await asyncio.wait_for(call, deadline))
            except asyncio.TimeoutError:
                log.warning("%s of s3://%s/%s moved slower than %d bytes/s for %.0f s (try %d of %d)", what, self.bucket,
                            self.key, self.stalled_below, deadline, attempt, STALLED_TRIES)
        raise TimeoutError(f"{what} stalled: {STALLED_TRIES} tries of {deadline:.0f} s each sent {len(body)} bytes "
                           f"slower than {self.stalled_below} bytes/s")

    def _drain(self, keep: int) -> None:
        """Wait until at most ``keep`` parts are in flight (the oldest first); a failed part raises."""
        while len(self._pending) > keep:
            self._parts.append(self._pending.popleft().result())

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return dict(self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs))
