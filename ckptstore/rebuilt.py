"""Sparse and quantized tensors in a planned torch file: read their storages whole, let torch build them.

A dense tensor is one strided view of one storage, so its bytes can land straight in the
target. A sparse tensor is built from parts (indices and values) and a quantized one from a
storage and its quantizer parameters; :mod:`ckptstore.torch_zip` plans them as a
:class:`~ckptstore.torch_zip.RebuiltRef`. Here each becomes a :class:`RebuiltSource`: the
byte ranges of the storages it needs (fetched like any tensor, through
:class:`~ckptstore.transfer.Transfer`), then torch's own rebuild function, then an in-place
``copy_`` into the target. A load that took this path says so in ``LoadReport.rebuilt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import StateMismatchError
from .torch_zip import RebuiltRef, StorageRef
from .transfer import SourceTensor, Transfer


@dataclass(frozen=True, eq=False)
class RebuiltSource:
    """A sparse or quantized tensor of a planned file: ``parts`` are its storages, each a flat
    uint8 region of the file, read whole.

    Example:
        >>> import io, torch
        >>> from ckptstore.torch_zip import read_plan
        >>> buf = io.BytesIO(); torch.save({"s": torch.eye(2).to_sparse()}, buf)
        >>> refs, _, _ = read_plan(buf, "eye.pt")
        >>> refs["s"].layout, refs["s"].shape
        ('sparse_coo', (2, 2))
    """

    key: str
    ref: RebuiltRef
    parts: tuple[SourceTensor, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.ref.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    @property
    def layout(self) -> str:
        return self.ref.layout

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.parts)


def storage_region(ref: StorageRef, zip_header: tuple[int, int]) -> SourceTensor:
    """A whole storage record as a flat uint8 region; ``zip_header`` is (its local header offset,
    where its data starts), as the planner predicts them."""
    start = zip_header[1]
    return SourceTensor(ref.member, torch.uint8, (ref.nbytes,), start, start + ref.nbytes, None, 0, zip_header)


def fetch(transfer: Transfer, sources: list[RebuiltSource]) -> list[torch.Tensor]:
    """Read the storages of ``sources`` (each once, however many tensors share it) and build each tensor.

    Raises:
        CorruptCheckpointError: a storage is not where the plan put it, or the parts make no valid tensor.
    """
    regions = {part.key: part for source in sources for part in source.parts}
    buffers = {member: torch.empty(region.end - region.start, dtype=torch.uint8) for member, region in regions.items()}
    transfer.run([(regions[member], buffer) for member, buffer in buffers.items()])
    return [source.ref.build(buffers, f"{transfer.where} ({source.key})") for source in sources]


def land(value: torch.Tensor, source: RebuiltSource, key: str, live: torch.Tensor) -> None:
    """Copy a rebuilt tensor into ``live`` in place (``copy_`` moves it to ``live``'s device), or
    say loudly why torch cannot.

    Raises:
        StateMismatchError: the target cannot take it in place (a dense target for a sparse
            tensor, a float one for a quantized tensor, a CSR one with another number of elements).
    """
    try:
        with torch.no_grad():
            live.copy_(value)
    except RuntimeError as err:
        raise StateMismatchError(
            f"{key}: the file holds a {source.layout} {source.dtype} tensor, which cannot be copied into the target's "
            f"{_describe(live)} tensor in place ({err}); load the file with ckptstore.load and convert it yourself"
        ) from err


def _describe(t: torch.Tensor) -> str:
    kind = "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
    return f"{kind} {t.dtype}"
