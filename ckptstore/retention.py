"""Retention: which committed checkpoints to keep. Pure functions, no I/O.

The policy keeps the union of

* the newest ``keep_last`` by step (``None`` keeps all), and
* the best ``keep_best`` by the ``monitor`` metric (``mode`` ``"min"`` or ``"max"``).

NaN and missing metrics are never best; among equal metrics the newer checkpoint wins. The
newest checkpoint is always kept, whatever the numbers say, so a resume always has the
latest good state. Because the policy is a function of what is stored, a new manager on the
same root continues it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .manifest import CheckpointInfo


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest ``keep_last`` and the best ``keep_best`` by ``monitor``.

    Example:
        >>> RetentionPolicy(keep_last=2, keep_best=1, monitor="val_loss").mode
        'min'
    """

    keep_last: int | None = None
    keep_best: int = 0
    monitor: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.keep_last is not None and (type(self.keep_last) is not int or self.keep_last < 1):
            raise ConfigError(f"`keep_last` must be an int >= 1 or None (keep all), got {self.keep_last!r}")
        if type(self.keep_best) is not int or self.keep_best < 0:
            raise ConfigError(f"`keep_best` must be an int >= 0, got {self.keep_best!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"`mode` must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best and not self.monitor:
            raise ConfigError("`keep_best` needs `monitor`, the metric name to rank checkpoints by")

    @property
    def ranks_by(self) -> tuple[str, str] | None:
        """``(monitor, mode)``, or None without a monitor (what a manifest records)."""
        return (self.monitor, self.mode) if self.monitor else None


def newest_first(infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
    """Checkpoints by step, newest first (ties: the later creation time first)."""
    return sorted(infos, key=lambda i: (i.step, i.created), reverse=True)


def ranked_best(infos: Sequence[CheckpointInfo], monitor: str, mode: str) -> list[CheckpointInfo]:
    """Checkpoints with a finite ``monitor`` value, best first; ties go to the newer one."""
    scored = [(i.metric(monitor), i) for i in newest_first(infos)]
    ranked = [(v, i) for v, i in scored if v is not None]
    ranked.sort(key=lambda vi: vi[0] if mode == "min" else -vi[0])  # stable: newer stays ahead
    return [i for _, i in ranked]


def recorded_monitor(infos: Sequence[CheckpointInfo]) -> tuple[str, str] | None:
    """The (metric, mode) the newest checkpoint that records one was saved with, else None.

    Example:
        >>> from ckptstore.manifest import CheckpointInfo as I
        >>> recorded_monitor([I("s1", 1, "torch", monitor=("acc", "max")), I("s2", 2, "torch")])
        ('acc', 'max')
    """
    return next((i.monitor for i in newest_first(infos) if i.monitor is not None), None)


def to_keep(infos: Sequence[CheckpointInfo], policy: RetentionPolicy) -> set[str]:
    """Names of the checkpoints that ``policy`` keeps. Always includes the newest.

    Example:
        >>> from ckptstore.manifest import CheckpointInfo as I
        >>> infos = [I(f"s{s}", s, "torch", {"loss": l}) for s, l in [(1, 0.1), (2, 0.5), (3, 0.4)]]
        >>> sorted(to_keep(infos, RetentionPolicy(keep_last=1, keep_best=1, monitor="loss")))
        ['s1', 's3']
    """
    newest = newest_first(infos)
    keep = {i.name for i in (newest if policy.keep_last is None else newest[: policy.keep_last])}
    if newest:
        keep.add(newest[0].name)
    if policy.keep_best and policy.monitor:
        keep.update(i.name for i in ranked_best(infos, policy.monitor, policy.mode)[: policy.keep_best])
    return keep
