"""Formats: how a canonical state tree becomes one file, and back.

Two formats behind one protocol, both loadable by the stock libraries without ckptstore:

* ``"safetensors"`` (default): tensors in the tensor section under flattened ``/`` keys,
  the non-tensor skeleton as JSON in ``__metadata__["ckptstore.tree"]``. Written tensor by
  tensor straight from each tensor's memory; read tensor by tensor straight into new tensors.
* ``"torch"``: ``torch.save`` of the canonical tree (nested as the caller built it, so
  ``torch.load(f, weights_only=True)["model"]`` is a state_dict). Read with
  ``weights_only=True`` unless the caller explicitly trusts the file.

Every byte written or read passes through a CRC32C counter (``crc32c``, hardware-accelerated),
so the manifest can record, and a load can verify, each data file without a second pass.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

import crc32c
import torch

from . import tree as treelib
from .errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from .safetensors_header import build_header, header_length, parse_header
from .storage import FsspecStorage

MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None
TREE_METADATA_KEY = "ckptstore.tree"


CHUNK_BYTES = 2 * 2**20  # the largest slice handed to a store at once: bounds its buffers
STAGING_BYTES = 16 * 2**20  # device -> host staging for tensors not on the CPU


class ChecksumWriter:
    """A write-only stream that counts bytes and CRC32C on their way to ``raw``.

    Large writes are passed on in ``CHUNK_BYTES`` slices of the caller's memory: object-store
    files copy what they are given into their part buffer, so one 1 GiB write would
    otherwise cost 1 GiB of extra memory.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.size, self.crc = raw, 0, 0
        self._staging: torch.Tensor | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = view[start : start + CHUNK_BYTES]
            self.crc = crc32c.crc32c(chunk, self.crc)
            self.raw.write(chunk)
        self.size += len(view)
        return len(view)

    def write_tensor(self, t: torch.Tensor) -> None:
        """Write a tensor's bytes: in place from CPU memory, through a bounded buffer otherwise."""
        t = t.detach()
        if t.device.type == "cpu":
            self.write(_byte_view(t.contiguous()))  # a copy only if non-contiguous, one tensor at a time
            return
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        if self._staging is None:  # one reusable pinned buffer per file
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        staging = self._staging
        for start in range(0, flat.numel(), STAGING_BYTES):
            chunk = flat[start : start + STAGING_BYTES]
            staging[: chunk.numel()].copy_(chunk)
            self.write(staging[: chunk.numel()].numpy())

    def flush(self) -> None:
        self.raw.flush()


class ChecksumReader:
    """Reads ``raw`` sequentially, counting CRC32C; ``readinto`` fills caller buffers."""

    def __init__(self, raw: IO[bytes], where: str) -> None:
        self.raw, self.where, self.size, self.crc = raw, where, 0, 0

    def readinto(self, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            n = self.raw.readinto(view[filled:])  # type: ignore[attr-defined]
            if not n:
                raise CorruptCheckpointError(
                    f"{self.where} ended after {self.size + filled} bytes; the file is truncated"
                )
            filled += n
        self.crc = crc32c.crc32c(view, self.crc)
        self.size += filled

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        self.readinto(out)
        return bytes(out)


@dataclass(frozen=True)
class Source:
    """A whole file to read: where it is and how big it must be."""

    storage: FsspecStorage
    path: str
    size: int

    @property
    def where(self) -> str:
        return self.storage.url(self.path)


class Format(Protocol):
    """A file format for a canonical state tree."""

    name: str
    extension: str

    def write(self, tree: Any, out: ChecksumWriter) -> None:
        """Stream ``tree`` into ``out``."""

    def write_plain(self, tensors: dict[str, torch.Tensor], out: ChecksumWriter) -> None:
        """Write a flat ``{name: tensor}`` state_dict that stock loaders read as-is."""

    def read(self, src: Source, map_location: MapLocation, weights_only: bool, expected_crc: int | None) -> Any:
        """Read the whole file and return its canonical tree; check its CRC32C unless None."""


class SafetensorsFormat:
    """Safetensors with the state skeleton in the metadata (see module doc)."""

    name, extension = "safetensors", ".safetensors"

    def write(self, tree: Any, out: ChecksumWriter) -> None:
        tensors, skeleton = treelib.flatten(tree)
        meta = {"format": "pt", TREE_METADATA_KEY: json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}
        out.write(build_header(tensors, meta))
        for t in tensors.values():
            out.write_tensor(t)

    def write_plain(self, tensors: dict[str, torch.Tensor], out: ChecksumWriter) -> None:
        out.write(build_header(tensors, {"format": "pt"}))
        for t in tensors.values():
            out.write_tensor(t)

    def read(self, src: Source, map_location: MapLocation, weights_only: bool, expected_crc: int | None) -> Any:
        with src.storage.open_stream(src.path, src.size) as raw:
            stream = ChecksumReader(raw, src.where)
            length = header_length(stream.read(8) if src.size >= 8 else b"", src.size, src.where)
            header = parse_header(stream.read(length), src.size, src.where)
            tensors: dict[str, torch.Tensor] = {}
            for key, entry in header.entries.items():  # in file order: the reads are sequential
                t = torch.empty(entry.shape, dtype=entry.dtype)
                if entry.nbytes:
                    stream.readinto(_byte_view(t))
                tensors[key] = t
        check_crc(stream.crc, expected_crc, src.where)
        raw_tree = header.metadata.get(TREE_METADATA_KEY)
        if raw_tree is None:  # a plain safetensors file: its tensors are the tree
            return {k: place(t, "cpu", map_location) for k, t in tensors.items()}
        try:
            skeleton = json.loads(raw_tree)
        except json.JSONDecodeError as err:
            raise CorruptCheckpointError(f"{src.where}: the state skeleton is not valid JSON ({err})") from err

        def load(key: str, device: str) -> torch.Tensor:
            if key not in tensors:
                raise CorruptCheckpointError(f"{src.where}: the state refers to tensor {key!r}, which the file lacks")
            return place(tensors[key], device, map_location)

        return treelib.unflatten(skeleton, load)


class TorchFormat:
    """PyTorch's zip format via ``torch.save``/``torch.load``."""

    name, extension = "torch", ".pt"

    def write(self, tree: Any, out: ChecksumWriter) -> None:
        torch.save(tree, out)  # type: ignore[arg-type]

    def write_plain(self, tensors: dict[str, torch.Tensor], out: ChecksumWriter) -> None:
        torch.save(dict(tensors), out)  # type: ignore[arg-type]

    def read(
        self, src: Source, map_location: MapLocation, weights_only: bool, expected_crc: int | None, *, mmap: bool = False,
    ) -> Any:
        """Local files are checksummed in one pass, then loaded; remote ones are downloaded once
        to a temp file (checksummed on the way) and loaded from it. The tensors own their memory
        unless ``mmap`` (see :func:`ckptstore.load`)."""
        local = src.storage.local_path(src.path)
        if local is not None:
            if expected_crc is not None:
                read_checked(src, expected_crc)
            return torch_load(local, src.where, map_location, weights_only, mmap)
        with tempfile.NamedTemporaryFile(prefix="ckptstore-", suffix=".pt") as tmp:
            read_checked(src, expected_crc, copy_to=tmp)
            tmp.flush()
            return torch_load(tmp.name, src.where, map_location, weights_only, mmap)


def read_checked(src: Source, expected_crc: int | None, *, copy_to: IO[bytes] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
    """Read ``src`` once, in ``CHUNK_BYTES`` pieces (copied to ``copy_to``, counted by
    ``progress``), and check its CRC32C against ``expected_crc`` (unless None)."""
    with src.storage.open_stream(src.path, src.size) as raw:
        stream = ChecksumReader(raw, src.where)
        buffer = bytearray(max(1, min(CHUNK_BYTES, src.size)))
        for start in range(0, src.size, len(buffer)):
            view = memoryview(buffer)[: min(len(buffer), src.size - start)]
            stream.readinto(view)
            if copy_to is not None:
                copy_to.write(view)
            if progress is not None:
                progress(len(view))
    check_crc(stream.crc, expected_crc, src.where)


def check_crc(actual: int, expected: int | None, where: str) -> None:
    """Raise CorruptCheckpointError if ``expected`` is given and differs from ``actual``."""
    if expected is not None and actual != expected:
        raise CorruptCheckpointError(
            f"{where} fails its checksum (crc32c {actual:08x}, manifest {expected:08x}): the bytes were altered"
        )


def torch_load(path: str, where: str, map_location: MapLocation, weights_only: bool, mmap: bool) -> Any:
    """``torch.load`` of the local file ``path`` that turns refusals and damage into ckptstore errors.

    Read through a file object unless ``mmap``: given a path, torch decides by its name (a
    ``.safetensors`` name is handed to safetensors), and the content has decided already.
    """
    try:
        if mmap:
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
        with open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only and "weights_only" in str(err):
            raise UnsafeCheckpointError(
                f"{where} holds pickled objects beyond tensors and plain containers; loading them runs "
                "arbitrary code. If you trust this file, pass weights_only=False"
            ) from err
        raise CorruptCheckpointError(f"{where} is not a readable torch file: {err}") from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(f"{where} is not a readable torch file: {err}") from err


FORMATS: dict[str, Format] = {f.name: f for f in (SafetensorsFormat(), TorchFormat())}


def get_format(name: str) -> Format:
    """The format called ``name``; raises ConfigError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}") from None


def format_for_path(path: str) -> Format:
    """Guess the format from a file name: ``.safetensors`` or else torch."""
    return FORMATS["safetensors"] if path.endswith(".safetensors") else FORMATS["torch"]


def place(t: torch.Tensor, saved_device: str, map_location: MapLocation) -> torch.Tensor:
    """Move a freshly read CPU tensor where ``map_location`` says, as ``torch.load`` would."""
    if map_location is None:
        target: Any = saved_device
    elif isinstance(map_location, dict):
        target = map_location.get(saved_device, saved_device)
    elif callable(map_location):
        return map_location(t, saved_device)
    else:
        target = map_location
    return t if torch.device(target) == t.device else t.to(target)


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy().data
