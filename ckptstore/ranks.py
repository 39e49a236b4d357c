"""The processes of one job: who saves, who waits, and how they agree (``torch.distributed``).

When ``torch.distributed`` is initialized, every rank runs the same training code and holds
a :class:`Ranks`: its rank, the world size and a gloo process group of its own, so that
ckptstore's agreement (small Python objects) never interleaves with the job's NCCL or gloo
traffic, and works whatever backend the job uses. Outside a distributed job it is one rank
and every collective is a no-op.

Every collective here is called by every rank in the same order; a rank that fails raises
:class:`RankError` on the others within ``timeout`` seconds instead of letting them hang.

Example:
    >>> ranks = Ranks.current(timeout=60.0)
    >>> ranks.rank, ranks.world, ranks.leader
    (0, 1, True)
    >>> ranks.on_leader(lambda: 42)
    42
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from .errors import CkptStoreError, RankError

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


_GROUPS: dict[int, Any] = {}  # the process groups ckptstore made, by number: the only strong references to them


@atexit.register
def _release_groups() -> None:
    """Destroy ckptstore's process groups while the interpreter still runs.

    A gloo group that outlives the interpreter's shutdown (a manager in a module global, freed
    during finalization) made torch abort the process at exit ("terminate called without an
    active exception") in about one run in five; released here, it never does.
    """
    while _GROUPS:
        _, group = _GROUPS.popitem()
        with contextlib.suppress(Exception):  # already destroyed with the default group: nothing left to do
            dist.destroy_process_group(group)
        del group


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job and the group ckptstore agrees over."""

    rank: int = 0
    world: int = 1
    number: int | None = None  # its gloo group of every rank, in _GROUPS; None in a single process

    @property
    def group(self) -> Any:
        """The gloo ProcessGroup ckptstore agrees over (None in a single process)."""
        return None if self.number is None else _GROUPS[self.number]

    @classmethod
    def current(cls, timeout: float | None = None) -> Ranks:
        """The job this process belongs to (one rank when ``torch.distributed`` is not initialized).

        Creating it is itself collective: every rank must do it, in the same order.
        ``timeout``: seconds a collective waits for the other ranks (None: torch's default).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        number = len(_GROUPS) + 1 + max(_GROUPS, default=0)
        try:
            _GROUPS[number] = dist.new_group(backend="gloo", timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
        except RuntimeError as err:  # a rank that never came: a manager made on some ranks only
            raise RankError(f"rank {dist.get_rank()}: the other ranks did not join ckptstore's process group ({err}); in a "
                            "torch.distributed job every rank creates the CheckpointManager, or pass distributed=False "
                            "to use one from this process alone") from err
        return cls(dist.get_rank(), dist.get_world_size(), number)

    @property
    def leader(self) -> bool:
        """True on rank 0, the rank that commits, prunes and lists for the others."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        with self._collective("all_gather"):
            dist.all_gather_object(out, value, group=self.group)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (one small all-reduce)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        with self._collective("all_reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def on_leader(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only; every rank returns its result or raises its error."""
        if not self.distributed:
            return work()
        outcome: tuple[bool, Any] = (True, None)
        if self.leader:
            try:
                outcome = (True, work())
            except Exception as err:  # every rank raises it, rank 0 with its traceback
                self.broadcast((False, _portable(err)))
                raise
        ok, value = self.broadcast(outcome)
        if not ok:
            box = [value]
            del value
            raise_dropped(box)
        return value

    def check_all(self, failed_here: list[BaseException], doing: str) -> None:
        """Raise on every rank if any rank failed: a rank's own error (the one in ``failed_here``, popped
        from it, see :func:`raise_dropped`) as is, the others a :class:`RankError` naming the ranks
        that failed (so no rank goes on alone)."""
        errors = self.gather(f"{type(failed_here[0]).__name__}: {failed_here[0]}" if failed_here else None)
        failed = [r for r, e in enumerate(errors) if e is not None]
        if failed_here:
            raise_dropped(failed_here)
        if failed:
            raise RankError(f"{doing} failed on rank {', '.join(map(str, failed))}: " + "; ".join(
                f"rank {r}: {errors[r]}" for r in failed))

    def _collective(self, name: str) -> _CollectiveErrors:
        return _CollectiveErrors(name, self.rank, self.world)


class _CollectiveErrors:
    """Turns a failed collective (a rank died, or did not answer within the group's timeout) into RankError."""

    def __init__(self, name: str, rank: int, world: int) -> None:
        self.name, self.rank, self.world = name, rank, world

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        if isinstance(err, RuntimeError) and not isinstance(err, CkptStoreError):  # what a collective raises when a peer fails
            raise RankError(
                f"rank {self.rank}: {others(self.rank, self.world)} died or did not answer "
                f"ckptstore's {self.name} in time: {str(err).splitlines()[0][:300]}"
            ) from err


def others(rank: int, world: int) -> str:
    """The ranks other than ``rank``, in words, for a message: "rank 1", "one of ranks 0, 2, 3"."""
    rest = [str(r) for r in range(world) if r != rank]
    return f"rank {rest[0]}" if len(rest) == 1 else f"one of ranks {', '.join(rest)}"


def raise_dropped(box: list[E]) -> NoReturn:
    """Raise the one error in ``box`` with no local variable left holding it: a frame that holds
    the exception it raised is a reference cycle (exception -> traceback -> frame -> exception),
    freed only by the garbage collector, at an unpredictable time, with whatever the frames hold
    (a manager, its process groups; torch aborts a process that frees a process group after
    ``destroy_process_group``). Callers pass ``[error]`` and drop their own reference first.

    Example:
        >>> raise_dropped([ValueError("x")])
        Traceback (most recent call last):
        ValueError: x
    """
    raise box.pop()


def is_collective_failure(err: BaseException) -> bool:
    """True for the error a collective raises when a peer died (gloo's reset or closed connection) or timed out."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and not isinstance(err, CkptStoreError) and any(
        mark in text for mark in ("gloo", "timed out", "timeout", "connection closed", "connection reset", "pair closure"))


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (it crosses to the other ranks), else a RankError with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RankError(f"{type(err).__name__} on rank 0: {err}")
