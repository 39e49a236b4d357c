"""What the manager's calls return, beyond :class:`~ckptstore.manifest.CheckpointInfo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .manifest import CheckpointInfo


class Restored(dict[str, Any]):
    """What :meth:`CheckpointManager.restore <ckptstore.CheckpointManager.restore>` returns: the saved values that were not restored in
    place, as a plain dict, and two attributes: ``checkpoint``, the :class:`CheckpointInfo`
    restored ("latest" may have fallen back to an older one), and ``missing``, the entries of
    ``state`` the checkpoint lacked, left as they were (only possible with ``strict=False``).

    Example:
        >>> from ckptstore import CheckpointManager
        >>> mgr = CheckpointManager("memory://doc/restored")
        >>> _ = mgr.save({"epoch": 3}, step=3)
        >>> got = mgr.restore({"optimizer": {}}, strict=False)
        >>> got, got.checkpoint.step, got.missing
        ({'epoch': 3}, 3, ('optimizer',))
    """

    def __init__(self, values: dict[str, Any], checkpoint: CheckpointInfo, missing: list[str]) -> None:
        super().__init__(values)
        self.checkpoint = checkpoint
        self.missing = tuple(missing)


@dataclass(frozen=True)
class RootListing:
    """What :meth:`CheckpointManager.listing` found under a root at one listing."""

    checkpoints: list[CheckpointInfo]  # committed, oldest first
    latest: CheckpointInfo | None
    best: CheckpointInfo | None  # see CheckpointManager.best
    uncommitted: dict[str, str]  # folder -> why it is not a checkpoint (CheckpointManager.uncommitted)
    empty: bool  # nothing at all under the root: a mistyped or nonexistent root, or an unused one
