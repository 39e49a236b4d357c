"""Which format a file is in, from its first bytes, never from its name.

A safetensors file named ``.bin`` and a torch file named ``.safetensors`` both exist in the
wild; the name only decides the format of files ckptstore *writes*. Three formats are read:

* ``"torch"``: a zip archive (``torch.save`` since torch 1.6), magic ``PK\\x03\\x04``;
* ``"torch-legacy"``: the pickle stream of torch < 1.6 (``_use_new_zipfile_serialization=False``),
  which opens with protocol 2 and torch's magic number ``0x1950a86a20f9469cfc6c``;
* ``"safetensors"``: an 8-byte little-endian header length, then a JSON object.

Anything else gets one line that says what it is not (and what it looks like, when that is
a common format), except a file *named* ``.safetensors``: it is parsed as one, so that a
damaged one is reported by what is wrong with its header (truncated, not JSON, ...).
"""

from __future__ import annotations

from .errors import CorruptCheckpointError

HEAD_BYTES = 16  # enough to tell the three apart
_ZIP = b"PK\x03\x04"
_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # PROTO 2, LONG1 of 10 bytes: torch's magic number
_LOOKS_LIKE = {  # first bytes of formats people mistake for checkpoints
    b"\x1f\x8b": "a gzip file (decompress it first)",
    b"\x89HDF": "an HDF5 file (Keras .h5?)",
    b"\x93NUMPY": "a numpy .npy file (numpy.load reads it)",
    b"GGUF": "a GGUF file (llama.cpp)",
    b"\x80": "a pickle that is not a torch file",
    b"version https://git-lfs": "a Git LFS pointer, not the file itself (git lfs pull)",
}


def file_format(head: bytes, where: str) -> str:
    """``"torch"``, ``"torch-legacy"`` or ``"safetensors"`` for a file starting with ``head``.

    Example:
        >>> file_format(b"PK\\x03\\x04rest", "w.bin")
        'torch'
        >>> file_format(b"\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}", "w.pt")
        'safetensors'
        >>> file_format(b"hello", "notes.txt")
        Traceback (most recent call last):
        ...
        ckptstore.errors.CorruptCheckpointError: notes.txt is neither a torch file nor a safetensors file (it starts with 68656c6c6f)
    """
    if head.startswith(_ZIP):
        return "torch"
    if head.startswith(_LEGACY):
        return "torch-legacy"
    if (len(head) >= 9 and head[8:9] == b"{") or where.endswith(".safetensors"):
        return "safetensors"
    raise CorruptCheckpointError(f"{where} is neither a torch file nor a safetensors file ({_looks_like(head)})")


def what_is(head: bytes) -> str:
    """A few words on what a file starting with ``head`` holds, from its content alone, for messages.

    Example:
        >>> what_is(b"PK\\x03\\x04rest"), what_is(b"GGUF...")
        ('a torch file', 'neither a torch file nor a safetensors file: it is a GGUF file (llama.cpp)')
    """
    try:
        kind = file_format(head, "")
    except CorruptCheckpointError:
        return f"neither a torch file nor a safetensors file: {_looks_like(head)}"
    return {"torch": "a torch file", "torch-legacy": "a torch file from before torch 1.6", "safetensors": "a safetensors file"}[kind]


def _looks_like(head: bytes) -> str:
    kind = "empty" if not head else next((what for magic, what in _LOOKS_LIKE.items() if head.startswith(magic)), None)
    return f"it is {kind}" if kind else f"it starts with {head[:8].hex()}"
