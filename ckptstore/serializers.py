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

import io
import json
import pickle
from collections.abc import Callable
from typing import IO, Any, Protocol, Union

import crc32c
import torch

from . import tree as treelib
from .errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from .safetensors_header import build_header, header_length, parse_header

MapLocation = Union[str, torch.device, dict[str, str], Callable[..., Any], None]
TREE_METADATA_KEY = "ckptstore.tree"


class ChecksumWriter:
    """A write-only stream that counts bytes and CRC32C on their way to ``raw``."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.size, self.crc = raw, 0, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = crc32c.crc32c(view, self.crc)
        self.size += len(view)
        self.raw.write(view)
        return len(view)

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


class Format(Protocol):
    """A file format for a canonical state tree."""

    name: str
    extension: str

    def write(self, tree: Any, out: ChecksumWriter) -> None:
        """Stream ``tree`` into ``out``."""

    def write_plain(self, tensors: dict[str, torch.Tensor], out: ChecksumWriter) -> None:
        """Write a flat ``{name: tensor}`` state_dict that stock loaders read as-is."""

    def read(self, src: ChecksumReader, size: int, map_location: MapLocation, weights_only: bool) -> Any:
        """Read a whole file of ``size`` bytes from ``src`` and return its canonical tree."""


class SafetensorsFormat:
    """Safetensors with the state skeleton in the metadata (see module doc)."""

    name, extension = "safetensors", ".safetensors"

    def write(self, tree: Any, out: ChecksumWriter) -> None:
        tensors, skeleton = treelib.flatten(tree)
        meta = {"format": "pt", TREE_METADATA_KEY: json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}
        out.write(build_header(tensors, meta))
        for t in tensors.values():
            out.write(_host_bytes(t))

    def write_plain(self, tensors: dict[str, torch.Tensor], out: ChecksumWriter) -> None:
        out.write(build_header(tensors, {"format": "pt"}))
        for t in tensors.values():
            out.write(_host_bytes(t))

    def read(self, src: ChecksumReader, size: int, map_location: MapLocation, weights_only: bool) -> Any:
        length = header_length(src.read(8), size, src.where)
        header = parse_header(src.read(length), size, src.where)
        tensors: dict[str, torch.Tensor] = {}
        for key, entry in header.entries.items():  # in file order: the reads are sequential
            t = torch.empty(entry.shape, dtype=entry.dtype)
            if entry.nbytes:
                src.readinto(t.reshape(-1).view(torch.uint8).numpy())
            tensors[key] = t
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

    def read(self, src: ChecksumReader, size: int, map_location: MapLocation, weights_only: bool) -> Any:
        buffer = bytearray(size)
        src.readinto(buffer)
        return torch_load(io.BytesIO(buffer), src.where, map_location, weights_only)


def torch_load(f: IO[bytes] | str, where: str, map_location: MapLocation, weights_only: bool) -> Any:
    """``torch.load`` that turns refusals and damage into ckptstore errors."""
    try:
        return torch.load(f, map_location=map_location, weights_only=weights_only, mmap=isinstance(f, str))
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
        return map_location(t, saved_device)  # type: ignore[no-any-return]
    else:
        target = map_location
    return t if torch.device(target) == t.device else t.to(target)


def _host_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, viewed in place when it is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()  # one tensor at a time, so peak extra memory is one tensor
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
