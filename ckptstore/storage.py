"""Storage: a handful of operations over one fsspec filesystem and a root.

This is the only module that imports fsspec and the only one that knows one store from
another. Everything above it speaks relative paths (``"step_00000010/manifest.json"``) and
asks questions (``local_path()``: "is this a local file I can mmap?"; ``check_bucket()``)
instead of checking URL schemes. Whether rename is atomic is decided here alone: local
writes rename a temp file into place, object-store writes never rename.

Decisions:

* **Ranges are half-open ``[start, end)``**, as in fsspec's ``cat_file``.
* **Writes are streamed and all-or-nothing.** ``open_write`` hands out a file object; the
  object becomes visible under its final name only when the ``with`` block exits cleanly.
  On a local disk that is a same-folder temp file, ``fsync``, ``os.replace`` and an
  ``fsync`` of the folder. On object stores it is fsspec's ``autocommit=False`` file: the
  single PUT or the multipart-complete happens at commit, and an exception aborts the upload.
  The local half lives in :mod:`ckptstore.localdisk`.
* **Create-only writes** (``write_new``) are the commit primitive. Local disks use
  ``os.link`` of an fsynced temp file (fails if the name exists, atomically). s3fs sends
  ``If-None-Match: *``; other stores fall back to fsspec's check-then-write.
* **Exact keys, never patterns.** fsspec's bulk ``cat`` and ``rm`` expand ``[``, ``]``, ``*``
  and ``?`` as globs, so a root like ``runs/exp[1]`` would read or delete a sibling
  ``runs/exp1``. Only per-key calls are used (``cat_ranges``, ``rm_file``, ``cat_file``), and
  there is no recursive delete: callers delete exactly the files they listed.
* **Errors** from the store become :class:`StorageError` (or :class:`CheckpointNotFound` for
  a missing object) with the URL and a hint, raised ``from`` the original.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import posixpath
import re
import time
from datetime import datetime
from collections.abc import Iterator, Sequence
from typing import IO, Any, NamedTuple

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from . import localdisk, network, sniff, store_errors
from .multipart import ConcurrentUpload
from .prefetch import PrefetchReader
from .errors import CheckpointNotFound, ConfigError, InvalidNameError, MissingDependency, StorageError

# The temp files of local atomic writes: ".<final name>.<12 hex>.tmp", in the final file's folder.
TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
MAX_PARTS = 9_000  # S3 allows 10,000; keep a margin for the hint being low
DELETES_IN_FLIGHT = 16  # delete_many's concurrent requests on a remote store
# fsspec filesystems that cache folder listings forever unless told not to (see open_storage)
_CACHES_LISTINGS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
_ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/([^/].*)$")  # "s3:/bucket": not a drive letter ("C:/")
_EXTRA_FOR_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class Upload(NamedTuple):
    """An incomplete multipart upload under the root (S3): what a writer killed mid-upload leaves,
    billed until it is aborted. ``mtime``: when its newest part arrived (or it began)."""

    path: str
    upload_id: str
    parts: int
    mtime: float


class Listed(NamedTuple):
    """A file as a listing shows it: its modification time (Unix seconds) and a tag that changes
    whenever the file is written again (ETag or generation on object stores, inode and mtime on
    a local disk)."""

    mtime: float
    tag: str


def open_storage(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 transfers: network.Transfers | None = None) -> FsspecStorage:
    """Return the :class:`FsspecStorage` rooted at ``url``.

    ``storage_options`` go to fsspec as given; on S3, GCS and Azure always with
    ``use_listings_cache=False`` (a filesystem instance of ckptstore's own; the caller's
    instances keep theirs): s3fs, gcsfs and adlfs cache a folder's listing forever, so a folder
    this process listed once would hide a manifest another process committed there later (even
    s3fs's ``cat_file`` asks that cache for the size first), and a checkpoint would be silently
    missing from the root. (In a chained URL such as ``simplecache::s3://`` the option would
    reach only the outer layer, so it is not set there.) Timeouts and retry counts that bound
    every request come from :mod:`ckptstore.network` where the caller set none; ``transfers``
    sets how many parts or ranges of one file move at once (:class:`ckptstore.network.Transfers`).

    Example:
        >>> store = open_storage("memory://doc/open_storage")
        >>> store.url("a.bin")
        'memory://doc/open_storage/a.bin'
    """
    url = os.fspath(url)
    one_slash = _ONE_SLASH.match(url)
    if one_slash:  # fsspec would take "s3:/b/x" for a local folder named "s3:"
        scheme, rest = one_slash.groups()
        raise InvalidNameError(f"{url!r} has one slash after {scheme + ':'!r}; did you mean {scheme}://{rest}?")
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    no_cache = {"use_listings_cache": False} if protocol in _CACHES_LISTINGS else {}
    options = network.with_defaults(protocol, {**(storage_options or {}), **no_cache}, transfers)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        extra = _EXTRA_FOR_PROTOCOL.get(protocol, protocol)
        raise MissingDependency(
            f"cannot open {url}: {err}. Install it with: pip install 'ckptstore[{extra}]'"
        ) from err
    except ValueError as err:
        raise StorageError(f"cannot open {url}: {err}") from err
    except TypeError as err:  # an option the filesystem's constructor does not take
        explained = store_errors.explain(err, "open", url, protocol)
        if explained is None:
            raise
        raise explained from err
    except Exception as err:  # a filesystem that reaches out as it is made (hf://) and fails in its own words
        raise StorageError(f"cannot open {url}: {type(err).__name__}: {err}") from err
    network.tune(fs, protocol)
    return FsspecStorage(fs, root.rstrip("/"), url=url.rstrip("/"), transfers=transfers or network.Transfers())


def open_parent(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> tuple[FsspecStorage, str]:
    """The storage of a file URL's folder, and the file's name in it.

    Example:
        >>> store, name = open_parent("memory://doc/parent/w.pt")
        >>> store.url(name)
        'memory://doc/parent/w.pt'
    """
    parent, name = posixpath.split(os.fspath(url).rstrip("/"))
    return open_storage(parent or ".", storage_options), name


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a plain relative path below the root, else raise.

    Rejects ``..`` segments, absolute paths, URL schemes, backslashes and empty segments.

    Example:
        >>> check_relative_path("step_00000010/manifest.json")
        'step_00000010/manifest.json'
    """
    if not isinstance(path, str) or not path:
        raise InvalidNameError(f"path {path!r} must be a non-empty string")
    bad = (
        "://" in path
        or path.startswith(("/", "~"))
        or "\\" in path
        or "\x00" in path
        or (len(path) > 1 and path[1] == ":")
    )
    segments = path.split("/")
    if bad or any(seg in ("", ".", "..") for seg in segments):
        raise InvalidNameError(
            f"path {path!r} must be relative to the checkpoint root, without '..', "
            "a leading '/', a URL scheme or empty segments; use a plain name like 'step_00000010'"
        )
    return path


class FsspecStorage:
    """Relative-path storage over one fsspec filesystem.

    Args:
        fs: any fsspec filesystem.
        root: the root inside ``fs`` (as ``url_to_fs`` returns it).
        url: the root as the user wrote it, for messages.
        transfers: parts and ranges in flight per file on remote stores.

    Example:
        >>> store = open_storage("memory://doc/storage")
        >>> store.write_new("x.txt", b"hello")
        >>> store.read("x.txt", 1, 3)
        b'el'
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, *, url: str,
                 transfers: network.Transfers | None = None) -> None:
        self.fs = fs
        self.transfers = transfers or network.Transfers()
        self.root = root
        self.root_url = url
        self.is_local = isinstance(fs, LocalFileSystem)
        self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]  # "s3", "gs", "file", ...

    # -- capabilities -------------------------------------------------------------------
    def local_path(self, path: str) -> str | None:
        """The OS path of ``path`` on a local disk, else None (for mmap and ``pread``)."""
        return self._full(path) if self.is_local else None

    # -- paths ----------------------------------------------------------------------------
    def _full(self, path: str) -> str:
        return f"{self.root}/{check_relative_path(path)}" if path else self.root

    def url(self, path: str = "") -> str:
        """The URL of ``path`` under the root, for messages and ``CheckpointInfo.url``."""
        return f"{self.root_url}/{check_relative_path(path)}" if path else self.root_url

    # -- reads ----------------------------------------------------------------------------
    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """Read ``path``, or its half-open byte range ``[start, end)``."""
        if start is not None and end is not None and end <= start:
            return b""  # S3 answers an empty range with the whole object
        with self._errors("read", path):
            return bytes(self.fs.cat_file(self._full(path), start=start, end=end))

    def read_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read several half-open ranges of one file, concurrently where the store can."""
        if not ranges:
            return []
        full = self._full(path)
        with self._errors("read", path):
            chunks = self.fs.cat_ranges(
                [full] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges], on_error="raise"
            )
        for (start, end), chunk in zip(ranges, chunks):
            if len(chunk) != end - start:
                raise StorageError(
                    f"read {len(chunk)} bytes for [{start}, {end}) from {self.url(path)}: "
                    "the file is shorter than expected"
                )
        return [bytes(c) for c in chunks]

    @contextlib.contextmanager
    def open_read(self, path: str, *, exact: bool = False) -> Iterator[IO[bytes]]:
        """A seekable binary file object for ``path``.

        ``exact=True`` turns off read-ahead on remote stores, so each ``read(n)`` fetches
        exactly ``n`` bytes (for scattered small reads such as a zip directory).
        """
        options = {"cache_type": "none"} if exact and not self.is_local else {}
        with self._errors("read", path), self.fs.open(self._full(path), "rb", **options) as f:
            yield f

    @contextlib.contextmanager
    def open_stream(self, path: str, size: int) -> Iterator[IO[bytes]]:
        """A file object to read ``path`` (``size`` bytes, as a manifest says) from start to end.

        On S3 and GCS it keeps ``transfers.in_flight`` ranges of ``transfers.part_bytes`` in
        flight ahead of the reader (:class:`~ckptstore.prefetch.PrefetchReader`); elsewhere it
        is the store's own file object. A file shorter than ``size`` ends early.
        """
        if not isinstance(self.fs, AsyncFileSystem):  # local disks and memory:// are not
            with self.open_read(path) as f:
                yield f
            return
        transfers = self.transfers
        with self._errors("read", path), PrefetchReader(self.fs, self._full(path), size, chunk_bytes=transfers.part_bytes,
                                                        in_flight=transfers.in_flight) as reader:
            yield reader  # type: ignore[misc]

    def size(self, path: str) -> int:
        """Size of ``path`` in bytes (asked of the store, not of a cached listing)."""
        full = self._full(path)
        self.fs.invalidate_cache(full)
        with self._errors("read", path):
            return int(self.fs.size(full))

    def version(self, path: str) -> str:
        """A token that changes whenever ``path`` is written again (asked of the store).

        Local disks: inode and mtime (an atomic replace gives a new inode); object stores:
        the object's generation or ETag; memory://: its creation time. Example: the
        best-model export records it to tell its own write from another process's.
        """
        full = self._full(path)
        self.fs.invalidate_cache(full)
        with self._errors("read", path):
            return localdisk.version_token(os.stat(full)) if self.is_local else _version_of(self.fs.info(full))

    def exists(self, path: str) -> bool:
        """True if the file ``path`` exists (asked of the store, not of a cached listing)."""
        full = self._full(path)
        self.fs.invalidate_cache(full)
        with self._errors("read", path):
            return bool(self.fs.exists(full))

    def is_file(self, path: str) -> bool:
        """True if ``path`` is a file: not a folder, not absent (asked of the store, not of a cached listing)."""
        full = self._full(path)
        self.fs.invalidate_cache(full)
        with self._errors("read", path):
            return bool(self.fs.isfile(full))

    def list_files(self, under: str = "") -> dict[str, Listed]:
        """Every file below the root (or below its folder ``under``): path relative to the root -> its :class:`Listed` entry.

        One recursive listing where the store can (a paginated LIST on object stores).
        """
        self.fs.invalidate_cache(self.root)
        try:
            with self._errors("list", under):
                found = self.fs.find(self._full(under), detail=True)
        except CheckpointNotFound:
            return {}
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix):]: Listed(_mtime(info), _version_of(info)) for p, info in sorted(found.items()) if p.startswith(prefix)}

    def incomplete_uploads(self, older_than: float) -> list[Upload]:
        """The root's incomplete multipart uploads begun at least ``older_than`` seconds ago.

        S3 only (two requests, plus one per such upload to see its newest part); other stores
        return ``[]``: GCS resumable sessions cannot be listed and expire after a week.
        """
        if not hasattr(self.fs, "list_multipart_uploads"):
            return []
        bucket, _, prefix = self.root.partition("/")
        found: list[dict[str, Any]] = []
        marker: dict[str, str] = {}
        with self._errors("list", ""):
            while True:
                page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/", **marker)
                found.extend(page.get("Uploads", []))
                if not page.get("IsTruncated"):
                    break
                marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
            now = time.time()
            uploads = []
            for u in found:
                began = u["Initiated"].timestamp()
                if now - began < older_than:
                    continue
                parts = self.fs.call_s3("list_parts", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", [])
                newest = max([began, *(p["LastModified"].timestamp() for p in parts)])
                uploads.append(Upload(u["Key"][len(prefix) + 1 :], u["UploadId"], len(parts), newest))
        return uploads

    def abort_upload(self, upload: Upload) -> None:
        """Abort an incomplete multipart upload (its parts stop being billed)."""
        bucket, _, prefix = self.root.partition("/")
        with self._errors("delete", upload.path):
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=f"{prefix}/{upload.path}", UploadId=upload.upload_id)

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Read several whole small files, concurrently where the store can.

        Each path is an exact key: fsspec's bulk ``cat`` would expand ``[``, ``*`` and ``?``
        in a root such as ``runs/exp[1]`` as glob patterns, so this reads through
        ``cat_ranges``, which never does. Files that are gone by the time they are read
        (deleted since a listing named them, say by another process's prune) are left out.
        """
        if not paths:
            return {}
        found: dict[str, bytes] = {}
        with self._errors("read", paths[0]):
            data = self.fs.cat_ranges([self._full(p) for p in paths], None, None, on_error="return")
            for path, value in zip(paths, data):
                if isinstance(value, FileNotFoundError):
                    continue
                if isinstance(value, Exception):
                    raise value
                found[path] = bytes(value)
        return found

    # -- writes ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, path: str, size_hint: int = 0, *, published: list[str] | None = None) -> Iterator[IO[bytes]]:
        """Stream bytes to ``path``; it appears, whole, only when the block exits cleanly.

        ``published``: gets the :meth:`version` of the file this write published, taken from
        the write itself on local disks and memory:// (so another process's write a moment
        later cannot be mistaken for it), and asked of the store right after it elsewhere.

        On object stores the upload part size is ``transfers.part_bytes``, or larger when
        ``size_hint`` (the expected size) needs it to stay within S3's 10,000 parts. On S3,
        ``transfers.in_flight`` parts upload at once (:class:`~ckptstore.multipart.ConcurrentUpload`):
        the part being filled and those uploading, not the file size, bound the memory a save
        costs. Elsewhere the store's own file object uploads one part after another.
        """
        full = self._full(path)
        with self._errors("write", path):
            if self.is_local:
                with localdisk.atomic_file(full, published) as f:
                    yield f
                return
            if isinstance(self.fs, MemoryFileSystem):  # its open() publishes the file at once
                memory_file = MemoryFile(self.fs, self.fs._strip_protocol(full))
                yield memory_file
                memory_file.commit()  # only a whole file is published
                if published is not None:
                    published.append(_version_of({"size": memory_file.size, "created": memory_file.created}))
                return
            part = max(self.transfers.part_bytes, -(-size_hint // MAX_PARTS))
            upload: Any  # fsspec's AbstractBufferedFile or a ConcurrentUpload: both close, commit and discard
            if hasattr(self.fs, "call_s3"):  # s3fs: parts upload concurrently
                upload = ConcurrentUpload(self.fs, full, part_bytes=part, in_flight=self.transfers.in_flight,
                                          stalled_below=self.transfers.stalled_below)
            else:
                upload = self.fs.open(full, "wb", autocommit=False, block_size=part)
            try:
                yield upload
                upload.close()
                upload.commit()  # a part that failed for good, or the completion, raises here
            except BaseException:
                upload.discard()  # abort: no parts left billed
                upload.closed = True  # stop fsspec's __del__ from committing a partial upload
                raise
        if published is not None:
            published.append(self.version(path))

    def write_new(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data``; raise FileExistsError if it already exists."""
        full = self._full(path)
        with self._errors("write", path):
            if self.is_local:
                localdisk.create_only(full, data)
            else:
                self.fs.pipe_file(full, data, mode="create")

    def delete(self, path: str) -> None:
        """Delete the one file ``path``, an exact key (never a pattern); absent files are fine.

        There is deliberately no recursive delete: a folder may gain files (a manifest, say)
        between the listing that named its files and the delete, so callers delete exactly
        what they listed.
        """
        full = self._full(path)
        with self._errors("delete", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(full)
        self.fs.invalidate_cache(full)

    def delete_many(self, paths: Sequence[str]) -> None:
        """:meth:`delete` each of ``paths``, several at once on remote stores (a sharded checkpoint
        has a file per rank: one after another, a thousand deletes take half a minute)."""
        if self.is_local or isinstance(self.fs, MemoryFileSystem) or len(paths) < 2:
            for path in paths:
                self.delete(path)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(paths), DELETES_IN_FLIGHT)) as pool:
            for done in [pool.submit(self.delete, p) for p in paths]:
                done.result()

    def remove_folder(self, path: str) -> None:
        """Remove the folder ``path`` and the folders in it, those that are empty (object stores
        have no folders to remove). A folder checkpoint's files live in subfolders."""
        if self.is_local or isinstance(self.fs, MemoryFileSystem):
            full = self._full(path)
            inside = self.fs.find(full, withdirs=True, detail=True) if self.fs.isdir(full) else {}
            folders = sorted((p for p, info in inside.items() if info["type"] == "directory" and p != full), key=len, reverse=True)
            for folder in [*folders, full]:  # the deepest first
                with contextlib.suppress(OSError):  # not empty (a writer is using it) or already gone
                    self.fs.rmdir(folder)

    def check_bucket(self) -> None:
        """Raise StorageError now if the root's bucket is missing (stores with buckets only)."""
        split_path = getattr(self.fs, "split_path", None)  # s3fs and gcsfs: bucket/key stores
        if self.is_local or split_path is None:
            return
        bucket = split_path(self.root)[0]
        try:
            with self._errors("reach", ""):
                self.fs.info(bucket)
        except StorageError as err:
            if not isinstance(err.__cause__, FileNotFoundError):
                raise
            raise StorageError(
                f"bucket {bucket!r} of {self.root_url} does not exist; create it or fix the URL"
            ) from err.__cause__

    def check_not_a_file(self) -> None:
        """Raise ConfigError if the root is a file (a root is a folder of checkpoints)."""
        with self._errors("reach", ""):
            is_file = self.fs.isfile(self.root)
            size = self.fs.size(self.root) if is_file else 0  # S3 refuses a range of an empty object
            head = self.fs.cat_file(self.root, start=0, end=min(size, sniff.HEAD_BYTES)) if size else b""
        if not is_file:
            if self.is_local:
                self._check_no_file_above()
            return
        parent = posixpath.dirname(self.root.rstrip("/")) if self.is_local else posixpath.dirname(self.root_url.rstrip("/"))
        what = sniff.what_is(head)
        if what.startswith("neither"):
            raise ConfigError(f"{self.root_url} is a file ({what}), not a folder of checkpoints; did you mean its folder {parent}?")
        raise ConfigError(f"{self.root_url} is {what}, not a folder of checkpoints: ckptstore.load reads it whole, "
                          f"ckptstore.load_partial(url, model) the tensors a model has; a root is the folder that checkpoints "
                          f"go in (its folder {parent}?)")

    def _check_no_file_above(self) -> None:
        """Raise ConfigError if a folder above a local root is a file: such a root can never hold a
        checkpoint, and restoring from it would look like a fresh start (object stores allow a key
        and a prefix of the same name, so only local roots are checked)."""
        above = os.path.dirname(os.path.abspath(self.root))
        while not os.path.exists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.isfile(above):
            raise ConfigError(f"{self.root_url} is below {above}, which is a file, not a folder: no checkpoint can be "
                              "there; fix the root")

    def makedirs(self) -> None:
        """Create the root folder on a local disk (object stores have no folders)."""
        if self.is_local:
            with self._errors("write", ""):
                localdisk.make_folder(self.root)

    # -- errors ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, op: str, path: str) -> Iterator[None]:
        """Turn a store's error into a ckptstore error that says what to do (see :mod:`ckptstore.store_errors`)."""
        try:
            yield
        except (CheckpointNotFound, StorageError, FileExistsError):
            raise
        except Exception as err:
            explained = store_errors.explain(err, op, self.url(path), self.protocol)
            if explained is None:
                raise  # the caller's own error inside an open_write block, say
            raise explained from err


def _version_of(info: dict[str, Any]) -> str:
    """A token that changes when the file is written again, from its fsspec ``info`` (a listing entry or ``info()``)."""
    keys = ("generation", "ETag", "etag", "ino", "created", "mtime", "LastModified", "updated")
    return ":".join(str(info[k]) for k in ("size", *keys) if info.get(k) is not None)


def _mtime(info: dict[str, Any]) -> float:
    """A listing entry's modification time, whatever the store calls it."""
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0  # unknown: treat as old
