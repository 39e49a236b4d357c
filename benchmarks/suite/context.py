"""``Ctx``: what one measured call sees. Implementations are plain functions of a ``Ctx``.

The child fills it in three steps: the store (``url``, ``fs``, ``storage_options``), the
operation's build (``state`` for a save; a zero-filled ``model`` and its ``keys`` for a load),
and the implementation's untimed ``pre`` step (``data``, ``extra``). Then it times ``fn(ctx)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass
class Ctx:
    """One cell's inputs. ``url`` is this cell's folder: its input for reads, its output for saves."""

    store: str
    url: str
    storage_options: dict[str, Any]
    local: bool  # url is a path on this machine
    fs: Any
    state: dict[str, Any] | None = None
    model: Any = None  # load: the pre-built model; partial: the 10% target
    keys: list[str] = dataclasses.field(default_factory=list)  # the target's keys
    data: Any = None  # limits: prepared bytes / tensors
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.url, name) if self.local else f"{self.url.rstrip('/')}/{name}"

    @property
    def so(self) -> dict[str, Any] | None:
        """``storage_options`` as ckptstore takes them (None for none)."""
        return self.storage_options or None
