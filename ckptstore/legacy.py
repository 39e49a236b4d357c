"""Torch files from before torch 1.6 (``_use_new_zipfile_serialization=False``), still found in model zoos.

They are one pickle stream with the tensor bytes after it and no index, so no byte range can
be planned from a header. Partial loads, ``inspect`` and ``convert`` therefore read such a file
whole, once, with ``torch.load(weights_only=True)`` (torch's own weights-only unpickler), and
re-save it as a modern zip in a private temporary folder that the planner then reads like any
other torch file. The report says so (``LoadReport.read_whole``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import torch

from .serializers import Source, TorchFormat
from .storage import FsspecStorage, open_storage


@contextlib.contextmanager
def as_zip(storage: FsspecStorage, name: str, size: int) -> Iterator[tuple[FsspecStorage, str]]:
    """The legacy torch file ``name`` re-saved as a zip: (its temporary folder's storage, its name).

    Example:
        >>> import io
        >>> legacy = io.BytesIO()
        >>> torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
        >>> store = open_storage("memory://doc/legacy")
        >>> store.makedirs()
        >>> with store.open_write("old.pt") as f:
        ...     _ = f.write(legacy.getvalue())
        >>> with as_zip(store, "old.pt", len(legacy.getvalue())) as (folder, zipped):
        ...     folder.read(zipped, 0, 4)
        b'PK\\x03\\x04'
    """
    obj = TorchFormat().read(Source(storage, name, size), None, True, None)  # weights only: no arbitrary code
    with tempfile.TemporaryDirectory(prefix="ckptstore-legacy-") as folder:
        local = open_storage(folder)
        with local.open_write(name) as f:
            torch.save(obj, f)
        yield local, name
