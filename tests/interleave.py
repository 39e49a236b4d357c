"""Deterministic interleaving of threads at storage-call granularity, with seeded faults.

Used by ``tests/test_random_trials.py`` (issue 9, point 11). Two pieces:

* :class:`Scheduler` runs each actor in its own thread but lets **one thread run at a time**,
  like a baton. A thread gives the baton back at every *yield point* (the start of every call
  into the store) and when it finishes; a ``random.Random(seed)`` then picks the next holder
  among the threads waiting at a yield point. Everything an actor does between two store
  calls (serializing, deciding, the invariant checks) runs with every other actor paused, so
  a seed reproduces the whole run, store calls and their order included. Nothing can
  deadlock silently: every wait for the baton fails the trial (with the seed and the trace)
  once no thread has handed it on for ``stall_s`` seconds, and a holder that blocks on
  something outside the scheduler trips the same watchdog in :meth:`Scheduler.run`.
* :func:`instrument` replaces the public methods of one ``FsspecStorage`` *instance* (the
  manager's ``storage``, which its ``BestExport`` shares) with wrappers that first yield, then
  maybe inject a fault, then call the real method. Faults are drawn per actor from their own
  seeded stream, so they depend only on the seed and on that actor's own sequence of calls.

Faults (each recorded in the trace):

``refuse``   raise before doing anything (a refused request: the store never saw it).
``lost``     do the real operation, then raise (the reply was lost: it happened, the caller
             sees an error).
``lost412``  ``write_new`` only: do the real create-only write, then raise ``FileExistsError``,
             which is what s3fs reports when aiohttp retries a PUT whose reply was lost and the
             retry meets the object the first attempt wrote (see tests/test_lost_replies.py).
``abort``    ``open_write`` only: fail inside the ``with`` block, after a few bytes: nothing
             may be published.
``midread``  ``open_read`` only: the stream fails on its first read.

The raised errors are :class:`InjectedFault` (a ``StorageError``, what ``FsspecStorage``
itself raises for a reset connection) and :class:`InjectedFileExists`. ``remove_folder`` is a
yield point but never faulted: by contract it swallows every ``OSError`` (a folder that is not
empty, or gone), so a fault there could only test a path that cannot happen.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptstore.errors import StorageError

# Methods of FsspecStorage that reach the store. local_path and url are pure; check_bucket
# runs in the manager's constructor, before instrumenting, but is wrapped for a restarted one.
STORE_METHODS = (
    "read", "read_ranges", "open_read", "size", "exists", "list_files", "read_many",
    "open_write", "write_new", "delete", "remove_folder", "check_bucket", "makedirs",
)
_KINDS: dict[str, tuple[str, ...]] = {
    "open_write": ("refuse", "abort", "abort", "lost"),
    "open_read": ("refuse", "midread"),
    "write_new": ("refuse", "lost", "lost412"),
    "remove_folder": (),
}
_DEFAULT_KINDS = ("refuse", "lost")


class InjectedFault(StorageError):
    """A fault this module injected (a refused request or a lost reply)."""


class InjectedFileExists(FileExistsError):
    """A lost reply to a create-only write whose retry was refused (what s3fs raises)."""


class Aborted(BaseException):
    """Raised in an actor thread when the trial already failed elsewhere (not an Exception,
    so no actor's ``except`` swallows it)."""


class TrialFailure(AssertionError):
    """The trial failed: an invariant broke, an actor raised something unexpected, or it stalled."""


@dataclass
class Event:
    """One store call as an actor made it."""

    seq: int
    actor: str
    method: str
    path: str
    fault: str | None = None  # the injected fault, if any
    outcome: str = "…"  # "ok", "published", or the error it raised
    done: bool = False  # the real operation completed (a lost reply may still have followed)
    data: bytes | None = None  # write_new's payload, when the write really happened

    def __str__(self) -> str:
        fault = f" [{self.fault}]" if self.fault else ""
        return f"{self.seq:5d} {self.actor} {self.method}({self.path}){fault} -> {self.outcome}"


@dataclass
class Trace:
    """Store calls and actor steps, in the order they happened (one thread at a time)."""

    lines: list[str | Event] = field(default_factory=list)  # events render as they are now
    events: list[Event] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.lines.append(line)

    def tail(self, n: int = 200) -> str:
        lines = [str(x) for x in self.lines[-n:]]
        skipped = len(self.lines) - len(lines)
        return "\n".join(([f"... {skipped} earlier lines"] if skipped else []) + lines)

    def text(self) -> str:
        return "\n".join(str(x) for x in self.lines)


class Scheduler:
    """Run actors one at a time, switching only at yield points, in a seeded order.

    Args:
        seed: seeds the choice of the next thread.
        stick: probability of letting the current thread go on at a yield point, when it may:
            0 switches as often as possible, higher values give longer uninterrupted runs.
        stall_s: seconds without any hand-over before the trial fails as stalled.
    """

    def __init__(self, seed: int, trace: Trace, *, stick: float = 0.0, stall_s: float = 60.0) -> None:
        self.seed, self.trace, self.stick, self.stall_s = seed, trace, stick, stall_s
        self._rng = random.Random(f"schedule:{seed}")
        self._cond = threading.Condition()
        self._holder: str | None = None
        self._waiting: list[str] = []
        self._finished: set[str] = set()
        self._handoffs = 0
        self.failure: str | None = None

    # -- used by actor threads ---------------------------------------------------------------
    def yield_point(self, actor: str) -> None:
        """Give the baton back and wait until the scheduler hands it to ``actor`` again."""
        with self._cond:
            if self._holder != actor:
                raise TrialFailure(f"{actor} reached a yield point without holding the baton (holder: {self._holder})")
            self._holder = None
            self._waiting.append(actor)
            self._pick(previous=actor)
            self._wait_turn(actor)

    def fail(self, message: str) -> None:
        """Record the first failure; every waiting actor stops at its next wait."""
        with self._cond:
            if self.failure is None:
                self.failure = message
            self._cond.notify_all()

    # -- driving ----------------------------------------------------------------------------
    def run(self, actors: dict[str, Callable[[], None]]) -> None:
        """Run ``actors`` (name -> body) to the end; raise TrialFailure with the trace if any failed."""
        threads = [threading.Thread(target=self._body, args=(name, body), name=f"trial-{name}", daemon=True)
                   for name, body in actors.items()]
        for thread in threads:
            thread.start()
        with self._cond:
            deadline = time.monotonic() + self.stall_s
            while len(self._waiting) < len(actors):  # all registered before the first pick: deterministic
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    self.failure = self.failure or "actors did not start"
                    break
            if self.failure is None:
                self._pick(previous=None)
            seen, since = self._handoffs, time.monotonic()
            while len(self._finished) < len(actors) and self.failure is None:
                self._cond.wait(1.0)
                if self._handoffs != seen:
                    seen, since = self._handoffs, time.monotonic()
                elif time.monotonic() - since > self.stall_s:
                    self.failure = (f"stalled: {self._holder} held the baton for {self.stall_s:.0f}s without reaching a "
                                    "yield point (blocked outside the scheduler?)")
                    self._cond.notify_all()
        for thread in threads:
            thread.join(timeout=0.5 if self.failure else self.stall_s)
        if self.failure is not None:
            raise TrialFailure(f"seed {self.seed}: {self.failure}\n--- trace (last lines) ---\n{self.trace.tail()}")

    def _body(self, actor: str, body: Callable[[], None]) -> None:
        try:
            with self._cond:
                self._waiting.append(actor)
                self._cond.notify_all()
                self._wait_turn(actor)
            body()
        except Aborted:
            pass
        except BaseException as err:  # an invariant, or an exception no actor should see
            self.trace.note(f"!!! {actor}: {type(err).__name__}: {err}")
            self.fail(f"{actor}: {type(err).__name__}: {err}")
        finally:
            with self._cond:
                self._finished.add(actor)
                if self._holder == actor:
                    self._holder = None
                    self._pick(previous=None)
                self._cond.notify_all()

    def _pick(self, previous: str | None) -> None:
        """Hand the baton to a waiting thread (caller holds the lock)."""
        if not self._waiting or self.failure is not None:
            self._cond.notify_all()
            return
        stay = previous in self._waiting and self._rng.random() < self.stick
        choice = previous if stay else self._rng.choice(sorted(self._waiting))
        self._waiting.remove(choice)
        self._holder = choice
        self._handoffs += 1
        self._cond.notify_all()

    def _wait_turn(self, actor: str) -> None:
        seen, since = self._handoffs, time.monotonic()
        while self._holder != actor:
            if self.failure is not None:
                raise Aborted
            if self._handoffs != seen:
                seen, since = self._handoffs, time.monotonic()
            elif time.monotonic() - since > self.stall_s:
                self.failure = f"stalled: {actor} waited {self.stall_s:.0f}s for its turn with no hand-over (holder: {self._holder})"
                self._cond.notify_all()
                raise Aborted
            self._cond.wait(1.0)


class Faults:
    """Seeded fault decisions for one actor: ``rate`` is the chance that a call is faulted."""

    def __init__(self, seed: int, actor: str, rate: float) -> None:
        self._rng = random.Random(f"faults:{seed}:{actor}")
        self.rate = rate
        self.injected = 0  # how many faults fired so far (an actor compares it around a step)

    def draw(self, method: str) -> str | None:
        kinds = _KINDS.get(method, _DEFAULT_KINDS)
        roll, pick = self._rng.random(), self._rng.random()  # always two draws: the stream stays aligned
        if not kinds or roll >= self.rate:
            return None
        return kinds[int(pick * len(kinds))]


def instrument(storage: Any, actor: str, scheduler: Scheduler, faults: Faults, trace: Trace) -> None:
    """Make every store call of ``storage`` (an FsspecStorage instance) a yield point with faults."""
    for method in STORE_METHODS:
        real = getattr(storage, method)
        if method in ("open_write", "open_read"):
            wrapper = _stream_wrapper(method, real, actor, scheduler, faults, trace)
        else:
            wrapper = _call_wrapper(method, real, actor, scheduler, faults, trace)
        setattr(storage, method, wrapper)


def _path_of(method: str, args: tuple[Any, ...]) -> str:
    if not args:
        return ""
    first = args[0]
    if method == "read_many":
        return ",".join(first)
    if method == "read_ranges":
        return f"{first}, {len(args[1])} ranges"
    if method == "read" and len(args) > 1:
        return f"{first}, [{args[1]}, {args[2] if len(args) > 2 else None})"
    return str(first)


def _begin(method: str, args: tuple[Any, ...], actor: str, scheduler: Scheduler, faults: Faults, trace: Trace) -> Event:
    scheduler.yield_point(actor)
    event = Event(len(trace.events), actor, method, _path_of(method, args), faults.draw(method))
    trace.events.append(event)
    trace.lines.append(event)
    return event


def _fire(event: Event, faults: Faults, trace: Trace, exc: BaseException | None = None) -> BaseException:
    faults.injected += 1
    err = exc or InjectedFault(f"injected {event.fault} at call {event.seq} ({event.actor} {event.method} {event.path})")
    if err.__cause__ is None:
        err.__cause__ = ConnectionResetError(104, "Connection reset by peer (injected)")
    done = f"{event.outcome}, then " if event.outcome != "…" else ""
    event.outcome = f"{done}raised {type(err).__name__} (injected)"
    return err


def _settle(event: Event, trace: Trace, outcome: str) -> None:
    event.outcome = outcome


def _call_wrapper(method: str, real: Callable[..., Any], actor: str, scheduler: Scheduler, faults: Faults,
                  trace: Trace) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        event = _begin(method, args, actor, scheduler, faults, trace)
        if event.fault == "refuse":
            raise _fire(event, faults, trace)
        try:
            result = real(*args, **kwargs)
        except BaseException as err:
            _settle(event, trace, f"raised {type(err).__name__}: {err}")
            raise
        event.done = True
        if method == "write_new":
            event.data = bytes(args[1] if len(args) > 1 else kwargs["data"])
        _settle(event, trace, "ok" if method not in ("exists", "size") else f"ok: {result}")
        if event.fault == "lost":
            raise _fire(event, faults, trace)
        if event.fault == "lost412":
            raise _fire(event, faults, trace, InjectedFileExists(f"{event.path}: exists (injected: the retry of a lost reply)"))
        return result

    return call


class _FailingStream:
    """A file object that fails at its first ``write``/``read`` past ``after`` bytes."""

    def __init__(self, inner: Any, after: int, error: Callable[[], BaseException]) -> None:
        self._inner, self._left, self._error = inner, after, error

    def _spend(self, n: int) -> None:
        if n > self._left:
            raise self._error()
        self._left -= n

    def write(self, data: Any) -> int:
        self._spend(len(memoryview(data).cast("B")))
        return self._inner.write(data)

    def read(self, n: int = -1) -> bytes:
        raise self._error()

    def readinto(self, buffer: Any) -> int:
        raise self._error()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _stream_wrapper(method: str, real: Callable[..., Any], actor: str, scheduler: Scheduler, faults: Faults,
                    trace: Trace) -> Callable[..., Any]:
    @contextlib.contextmanager
    def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        event = _begin(method, args, actor, scheduler, faults, trace)
        if event.fault == "refuse":
            raise _fire(event, faults, trace)
        fired: list[BaseException] = []

        def error() -> BaseException:
            fired.append(_fire(event, faults, trace))
            return fired[-1]

        try:
            with real(*args, **kwargs) as f:
                if event.fault in ("abort", "midread"):
                    yield _FailingStream(f, 48 if event.fault == "abort" else 0, error)
                else:
                    yield f
        except BaseException as err:
            if not fired:
                _settle(event, trace, f"raised {type(err).__name__}: {err}")
            raise
        event.done = True
        if event.fault in ("abort", "midread") and not fired:  # the caller never got that far
            event.fault = None
        _settle(event, trace, "published" if method == "open_write" else "ok")
        if event.fault == "lost":
            raise _fire(event, faults, trace)

    return stream
