"""Streaming conversion between torch (``.pt``) and safetensors files, across any stores.

``convert(src, dst)`` never holds the state in memory. It plans the source from its header
with the partial loader's planner (:func:`ckptstore.partial.plan`: the safetensors JSON
header, or a torch zip's directory and ``data.pkl`` through a restricted unpickler that
never imports arbitrary globals), builds the state tree with *placeholder* tensors
(storages that are allocated but never touched, so they cost address space, not memory),
lays out the destination from that tree, and then streams the tensor bytes from
source to destination in ``CHUNK_BYTES`` (16 MiB) ranged reads, in source-file order:

* safetensors destination: the header comes from :func:`ckptstore.tree.flatten` of the
  placeholder tree, exactly as :func:`ckptstore.save` would write it; tensors are written in
  the order they lie in the source, so the source is read front to back.
* torch destination: ``torch.save`` of the placeholder tree inside
  ``torch.serialization.skip_data()`` yields ``data.pkl`` and the records without their
  bytes; the destination zip is then written record by record (stored, data aligned to 64
  bytes as ``torch.save`` aligns it, each record's CRC32 computed on the way), with each
  storage's bytes streamed from the source.
* same format: the file is copied as it is.

Peak memory is two blocks (the one being written and the next one arriving, 32 MiB),
plus the store's upload buffers and one tensor for strided views of a torch storage. When the
source is a ckptstore checkpoint folder, every source byte passes through CRC32C and the
manifest's checksum is checked before the destination is committed: a damaged source
leaves no destination behind.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import crc32c
import torch

from . import tree as treelib
from .errors import ConfigError, CorruptCheckpointError, UnsupportedValueError
from .commit import verify_file
from .manifest import SHARDED_FORMAT, CheckpointInfo
from .partial import LoadReport, Plan, locate, opened, plan
from .safetensors_header import build_header
from .serializers import TREE_METADATA_KEY, ChecksumWriter, SafetensorsFormat, check_crc, format_for_path
from .storage import FsspecStorage, open_parent
from .torch_zip import RebuiltRef, TensorRef, collect, data_start, read_plan
from .transfer import SourceTensor

CHUNK_BYTES = 16 * 2**20
ZIP_ALIGNMENT = 64
Progress = Callable[[int], None]


def convert(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
    storage_options: dict[str, Any] | None = None, progress: Progress | None = None, weights_only: bool = True,
) -> int:
    """Convert ``src`` (a file or a checkpoint folder) to ``dst``; return the bytes written.

    A torch source's ``data.pkl`` is read with what ``torch.load(weights_only=True)`` allows;
    ``weights_only=False`` allows any global, for a file you trust (a torch destination then
    keeps those objects; safetensors can hold none of them).

    The destination format follows its extension: ``.safetensors``, else torch. The result
    is what :func:`ckptstore.save` writes for the same state, readable by stock
    ``safe_open`` / ``torch.load(weights_only=True)``. ``progress(n)`` is called as bytes
    are written.

    Example:
        >>> import ckptstore
        >>> ckptstore.save({"w": torch.ones(2)}, "memory://doc/convert/w.pt")
        >>> _ = convert("memory://doc/convert/w.pt", "memory://doc/convert/w.safetensors")
        >>> ckptstore.load("memory://doc/convert/w.safetensors")["w"]
        tensor([1., 1.])
    """
    resolved, index = locate(src, storage_options)
    if index is not None:
        raise ConfigError(f"{os.fspath(src)} is a sharded checkpoint; convert its shards one by one (each is a file), "
                          "or ckptstore.load it whole and ckptstore.save the result")
    out_storage, out_name = open_parent(dst, storage_options)
    to_safetensors = isinstance(format_for_path(out_name), SafetensorsFormat)
    if resolved[2] is not None and resolved[2].format == SHARDED_FORMAT:
        return _convert_dcp(resolved[0], resolved[2], out_storage, out_name, progress)
    report = LoadReport()
    with opened(resolved, report) as source:
        reader = _source(source.storage, source.name, None if report.read_whole else source.info)  # re-zipped pre-1.6: no CRC
        planned = plan(reader.storage, reader.name, LoadReport(), reader.size, head=source.head, tail=source.tail,
                       weights_only=weights_only)
        same_format = reader.is_zip != to_safetensors  # the plan above is also what proves the source is torch or safetensors
        if not same_format and planned.rebuilt:
            key, whole = next(iter(planned.rebuilt.items()))
            raise UnsupportedValueError(f"{reader.where}: {key!r} is a {whole.layout} tensor, which safetensors cannot hold "
                                        "(it holds dense tensors only); densify it (.to_dense(), .dequantize()) and save again")
        out_storage.makedirs()
        with out_storage.open_write(out_name, size_hint=reader.size) as raw:
            out = ChecksumWriter(cast(IO[bytes], _Reporting(raw, progress)))
            if same_format:  # copy the file as it is
                reader.copy(0, reader.size, out)
            else:
                tree, regions = reader.placeholders(planned)
                (_write_safetensors if to_safetensors else _write_torch)(tree, regions, reader, out)
            reader.finish()  # checks the source checksum before the destination is committed
    return out.size


def _convert_dcp(storage: FsspecStorage, info: CheckpointInfo, out_storage: FsspecStorage, out_name: str,
                 progress: Progress | None) -> int:
    """A checkpoint saved by every rank of a job, gathered whole into one stock file (its shards'
    CRC32C checked first: DCP's reader cannot check them on the way)."""
    from .dcp_files import read_tree  # DCP: imported for sharded checkpoints only

    for entry in info.files:  # ``storage`` is the checkpoint's folder
        verify_file(storage, entry.path, entry)
    tree = read_tree(storage, "", [f.path for f in info.files])
    out_storage.makedirs()
    with out_storage.open_write(out_name, size_hint=info.size) as raw:
        out = ChecksumWriter(cast(IO[bytes], _Reporting(raw, progress)))
        format_for_path(out_name).write(tree, out)
    return out.size


# -- the source ---------------------------------------------------------------------------
class _Source:
    """A source file read front to back in ``CHUNK_BYTES`` blocks (one request each, however
    small the tensors); sums CRC32C over every byte once, in order."""

    def __init__(self, storage: FsspecStorage, name: str, expected_crc: int | None) -> None:
        self.storage, self.name, self.expected_crc = storage, name, expected_crc
        self.where = storage.url(name)
        self.size = storage.size(name)
        self.crc, self.pos = 0, 0
        self.block, self.block_start = memoryview(b""), 0
        self.is_zip = self.size >= 4 and self.read(0, 4) == b"PK\x03\x04"  # the first block, read anyway

    def read(self, start: int, end: int) -> memoryview:
        """The bytes ``[start, end)``, at most a block; bytes skipped since the last read are summed too."""
        if start > self.pos:
            for _ in self.chunks(self.pos, start):
                pass
        if not (self.block_start <= start and end <= self.block_start + len(self.block)):
            block_start = start - start % CHUNK_BYTES  # aligned: each block is fetched once
            block_end = min(max(end, block_start + CHUNK_BYTES), self.size)
            self.block = memoryview(b"")  # let go of the old block before the new one arrives
            self.block = memoryview(self.storage.read(self.name, block_start, block_end) if block_end > block_start else b"")
            self.block_start = block_start
        data = self.block[start - self.block_start : end - self.block_start]
        if len(data) != end - start:
            raise CorruptCheckpointError(f"{self.where}: read {len(data)} bytes for [{start}, {end}); the file is truncated")
        if end > self.pos:
            self.crc = crc32c.crc32c(data[self.pos - start :], self.crc)
            self.pos = end
        return data

    def chunks(self, start: int, end: int) -> Iterator[memoryview]:
        """``[start, end)`` in pieces that end at block boundaries."""
        while start < end:
            stop = min(end, start - start % CHUNK_BYTES + CHUNK_BYTES)
            yield self.read(start, stop)
            start = stop

    def copy(self, start: int, end: int, out: ChecksumWriter) -> None:
        for data in self.chunks(start, end):
            out.write(data)

    def finish(self) -> None:
        if self.expected_crc is not None:
            self.read(self.size, self.size)  # the unread tail, summed
            check_crc(self.crc, self.expected_crc, self.where)

    def placeholders(self, planned: Plan) -> tuple[Any, dict[int, SourceTensor]]:
        """The state tree with placeholder tensors, and where each placeholder's bytes are."""
        placeholders: dict[str, torch.Tensor] = {}
        regions: dict[int, SourceTensor] = {}

        def load(key: str, _device: str) -> torch.Tensor:
            if key not in placeholders:  # tied weights share a key: one placeholder
                src = planned.sources[key]
                placeholders[key] = _placeholder(src.end - src.start, src.dtype, src.offset, src.shape, src.stride)
                regions[_storage_id(placeholders[key])] = src
            return placeholders[key]

        return planned.build(load), regions

    def storage_bytes(self, region: SourceTensor) -> Iterator[memoryview]:
        """The bytes ``[start, end)`` of a planned tensor, in chunks."""
        self.check_member(region)
        return self.chunks(region.start, region.end)

    def check_member(self, region: SourceTensor) -> None:
        """Torch sources: check the zip local header puts the data where the plan predicts."""
        if region.zip_header is not None:
            header_offset, predicted = region.zip_header
            if data_start(bytes(self.read(header_offset, predicted)), header_offset, self.where) != predicted:
                raise CorruptCheckpointError(f"{self.where}: the zip member at {header_offset} is not laid out as torch.save writes it")


def _source(storage: FsspecStorage, name: str, info: CheckpointInfo | None) -> _Source:
    """The source to read; ``info``'s size and CRC32C are checked (None: a plain file, nothing to check)."""
    if info is None:
        return _Source(storage, name, None)
    entry = info.files[0]
    source = _Source(storage, name, entry.crc32c)
    if source.size != entry.size:
        raise CorruptCheckpointError(f"{source.where} is {source.size} bytes, its manifest says {entry.size}")
    return source


def _placeholder(nbytes: int, dtype: torch.dtype, offset: int, shape: tuple[int, ...], stride: tuple[int, ...] | None) -> torch.Tensor:
    """A tensor over a fresh, never-touched storage: address space only, no resident memory."""
    stride = stride if stride is not None else torch.empty(shape, device="meta").stride()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage(nbytes), offset, shape, stride)


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# -- the destinations ---------------------------------------------------------------------
def _write_safetensors(tree: Any, regions: dict[int, SourceTensor], source: _Source, out: ChecksumWriter) -> None:
    tensors, skeleton = treelib.flatten(treelib.canonicalize(tree))
    ordered = dict(sorted(tensors.items(), key=lambda kv: regions[_storage_id(kv[1])].start + _byte_offset(kv[1])))
    meta = {"format": "pt", TREE_METADATA_KEY: json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}
    out.write(build_header(ordered, meta))
    for t in ordered.values():
        region = regions[_storage_id(t)]
        source.check_member(region)
        if t.is_contiguous():  # its own bytes, straight through
            start = region.start + _byte_offset(t)
            source.copy(start, start + t.numel() * t.element_size(), out)
        else:  # a strided view: read its storage, write the view's elements
            whole = torch.empty(region.end - region.start, dtype=torch.uint8)
            done = 0
            for chunk in source.chunks(region.start, region.end):
                whole[done : done + len(chunk)] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
                done += len(chunk)
            out.write_tensor(whole.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset()))


def _byte_offset(t: torch.Tensor) -> int:
    return int(t.storage_offset()) * t.element_size()


def _write_torch(tree: Any, regions: dict[int, SourceTensor], source: _Source, out: ChecksumWriter) -> None:
    canonical = treelib.canonicalize(tree)
    with tempfile.TemporaryDirectory(prefix="ckptstore-convert-") as folder:
        layout = os.path.join(folder, "archive.pt")  # holes instead of data: a few KiB on disk
        with torch.serialization.skip_data():
            torch.save(canonical, layout)
        with open(layout, "rb") as f:
            refs, _, _ = read_plan(f, layout)
            record_region = _records_to_regions(refs, canonical, regions)
            archive = zipfile.ZipFile(f)
            names = [i.filename for i in archive.infolist()]
            storages = sorted((n for n in names if n in record_region), key=lambda n: record_region[n].start)
            first = storages[0] if storages else None
            with zipfile.ZipFile(cast(IO[bytes], _Unseekable(out)), "w", zipfile.ZIP_STORED) as zf:
                for name in names:  # torch.save's order, with the storages in source order
                    if name == first:
                        for storage in storages:
                            region = record_region[storage]
                            with _open_aligned(zf, storage, region.end - region.start) as member:
                                for chunk in source.storage_bytes(region):
                                    member.write(chunk)
                    elif name not in record_region:
                        with _open_aligned(zf, name, archive.getinfo(name).file_size) as member:
                            member.write(archive.read(name))


def _records_to_regions(
    refs: dict[str, TensorRef | RebuiltRef], canonical: Any, regions: dict[int, SourceTensor],
) -> dict[str, SourceTensor]:
    """Which source region feeds each ``data/<key>`` record that torch.save laid out.

    The layout's tensors are paired with the placeholder tree's by their path; their
    dtype and shape must agree, which guards the pairing.
    """
    placeholders = collect(canonical, lambda v: isinstance(v, torch.Tensor))
    out: dict[str, SourceTensor] = {}
    for path, ref in refs.items():
        t = placeholders.get(path)
        if t is None or not isinstance(ref, TensorRef) or tuple(t.shape) != ref.shape or t.dtype != ref.dtype:
            raise CorruptCheckpointError(f"internal error: torch.save laid out {path!r} unlike the source tree")
        region = regions[_storage_id(t)]
        out[ref.storage.member] = region
    return out


def _open_aligned(zf: zipfile.ZipFile, name: str, size: int) -> IO[bytes]:
    """A stored member whose data starts at a multiple of 64 bytes, padded as torch.save pads."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type, info.file_size, info.compress_size, info.CRC = zipfile.ZIP_STORED, size, 0, 0
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    assert zf.fp is not None
    header = len(info.FileHeader(zip64)) + 4
    pad = -(zf.fp.tell() + header) % ZIP_ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB": PyTorch's padding field
    return zf.open(info, "w", force_zip64=zip64)


class _Unseekable:
    """Hides ``tell``/``seek`` so zipfile streams (sizes and CRCs in data descriptors)."""

    def __init__(self, out: ChecksumWriter) -> None:
        self.write, self.flush = out.write, out.flush


class _Reporting:
    """Passes writes to ``raw`` and their sizes to ``progress``."""

    def __init__(self, raw: IO[bytes], progress: Progress | None) -> None:
        self.raw, self.progress = raw, progress

    def write(self, data: Any) -> int:
        n = self.raw.write(data)
        if self.progress is not None:
            self.progress(len(memoryview(data)))
        return n

    def flush(self) -> None:
        self.raw.flush()
