"""The safetensors header: build it for streamed writes, parse and validate it before reads.

The layout (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian
header length ``N``, ``N`` bytes of JSON (``{"__metadata__": {str: str}, key: {"dtype",
"shape", "data_offsets": [begin, end)}}``, offsets relative to the data section), then the
tensor bytes. The stock library cannot write tensor by tensor into a stream (it builds the
whole file in memory), so ckptstore writes the header itself and the tests check every file
it writes with stock ``safetensors.safe_open``. Parsing is ours too, because the partial
loader needs the header from two ranged reads, validated *before* anything is allocated.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpointError, UnsupportedValueError

MAX_HEADER_BYTES = 100 * 2**20  # the stock library's own cap
ALIGNMENT = 8

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"),
    ("float4_e2m1fn_x2", "F4"),
):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
# Sub-byte codes: safetensors counts their elements, torch packs them ("F4": two 4-bit values per
# byte of float4_e2m1fn_x2), so the last dimension differs by this factor between the two.
PACKED = {"F4": 2}
# Every code of the safetensors format (0.8): one without a torch dtype here is "unsupported",
# any other string is damage.
SPEC_CODES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "C64",
              "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in the file: absolute half-open byte range ``[start, end)``."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: entries sorted by offset, and the string metadata."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def build_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The header bytes (length prefix included) for ``tensors`` written in the given order.

    Example:
        >>> len(build_header({"w": torch.zeros(2)}, {})) % 8
        0
    """
    doc: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise CorruptCheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        code = DTYPE_CODES[t.dtype]
        shape = [*t.shape[:-1], t.shape[-1] * PACKED[code]] if code in PACKED else list(t.shape)
        doc[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-(8 + len(body)) % ALIGNMENT)  # spaces: the padding the format allows
    return struct.pack("<Q", len(body)) + body


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte prefix and return the JSON header's length."""
    if len(prefix) < 8 or file_size < 8:
        raise CorruptCheckpointError(f"{where} is {file_size} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"{where} claims a {length}-byte header, over the {MAX_HEADER_BYTES}-byte cap")
    if 8 + length > file_size:
        raise CorruptCheckpointError(f"{where} claims a {length}-byte header but the file is {file_size} bytes (truncated?)")
    return int(length)


def parse_header(raw: bytes, file_size: int, where: str) -> Header:
    """Parse and validate the JSON header ``raw`` of a file of ``file_size`` bytes.

    Checks: valid UTF-8 JSON object, known dtypes, non-negative integer shapes, byte sizes that
    match dtype and shape, ranges inside the file that tile the data section without overlap.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{where}: the safetensors header is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: the safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    entries = [_entry(key, spec, data_start, where) for key, spec in doc.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    cursor = data_start
    for e in entries:
        if e.start != cursor and e.nbytes:
            gap = "overlaps the previous tensor" if e.start < cursor else "leaves a gap before it"
            raise CorruptCheckpointError(f"{where}: tensor {e.key!r} at [{e.start - data_start}, {e.end - data_start}) {gap}")
        cursor = max(cursor, e.end)
    if cursor - data_start != data_size:
        raise CorruptCheckpointError(
            f"{where}: the tensors cover {cursor - data_start} bytes but the data section is {data_size} bytes (truncated or padded file)"
        )
    return Header({e.key: e for e in entries}, dict(metadata), data_start)


def _entry(key: str, spec: object, data_start: int, where: str) -> TensorEntry:
    if not isinstance(spec, dict):
        raise CorruptCheckpointError(f"{where}: entry {key!r} is not an object")
    code = spec.get("dtype")
    if not isinstance(code, str):
        raise CorruptCheckpointError(f"{where}: tensor {key!r} has no dtype")
    dtype = DTYPES.get(code)
    if dtype is None and code not in SPEC_CODES:
        raise CorruptCheckpointError(f"{where}: tensor {key!r} has unknown dtype {code!r}")
    if dtype is None:
        raise UnsupportedValueError(f"{where}: tensor {key!r} has dtype {code}, which this torch cannot hold "
                                    "(unsupported dtype)")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CorruptCheckpointError(f"{where}: tensor {key!r} has invalid shape {shape!r}")
    if code in PACKED:
        if not shape or shape[-1] % PACKED[code]:
            raise CorruptCheckpointError(f"{where}: tensor {key!r} of {code} has shape {shape}, whose last dimension "
                                         f"is not a multiple of {PACKED[code]}")
        shape = [*shape[:-1], shape[-1] // PACKED[code]]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise CorruptCheckpointError(f"{where}: tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end < begin or end - begin != math.prod(shape) * itemsize:
        raise CorruptCheckpointError(
            f"{where}: tensor {key!r} of {dtype} {tuple(shape)} needs {math.prod(shape) * itemsize} bytes "
            f"but its range [{begin}, {end}) holds {end - begin}"
        )
    return TensorEntry(key, dtype, tuple(shape), data_start + begin, data_start + end)
