"""Saves that run behind the training loop: one at a time, and no failure goes unseen.

:meth:`CheckpointManager.save` with ``blocking=False`` takes a host copy of the state
(:mod:`ckptstore.snapshot`), then hands the write, the commit and retention to a
:class:`BackgroundSaver`, which runs them in a thread and returns a :class:`SaveHandle` at once.

* **One in flight.** The next save, and any call that reads the root, first waits for it.
* **Failures surface.** A failed save raises from ``handle.result()``; if nobody called that,
  from ``mgr.wait()`` or the next ``save`` (the error gets a note naming the step); it is also
  logged when it happens, so a process that exits first still says so.
* **Exit waits.** The thread is not a daemon: the interpreter finishes the save before it exits.
* **One host copy.** Waiting for a save also waits for its thread to end, and a failure's
  traceback drops its frames' locals, so the next save never copies the state while the last
  copy is still referenced.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable

from .manifest import CheckpointInfo

log = logging.getLogger("ckptstore")


class SaveHandle:
    """A save running in the background.

    Example:
        >>> import torch, ckptstore
        >>> mgr = ckptstore.CheckpointManager("memory://doc/handle")
        >>> handle = mgr.save({"w": torch.ones(2)}, step=1, blocking=False)
        >>> handle.result().step, handle.done()
        (1, True)
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._finished = threading.Event()
        self._info: CheckpointInfo | None = None
        self._error: BaseException | None = None
        self._seen = False

    def done(self) -> bool:
        """True once the save has committed (and applied retention) or failed."""
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait for the save; return what it committed, or raise its error.

        Raises:
            TimeoutError: it still runs after ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the save of step {self.step} is still running after {timeout} s")
        if self._error is not None:
            self._seen = True
            raise self._error
        assert self._info is not None
        return self._info

    def _run(self, work: Callable[[], CheckpointInfo]) -> None:
        try:
            self._info = work()
        except BaseException as err:  # handed to whoever waits: result(), wait() or the next save
            err.add_note(f"(raised by the background save of step {self.step})")
            self._error = _without_locals(err)
            log.error("the background save of step %d failed: %s", self.step, err)
        finally:
            self._finished.set()


class BackgroundSaver:
    """Runs one save at a time in a thread (see module doc)."""

    def __init__(self) -> None:
        self._current: SaveHandle | None = None
        self._thread: threading.Thread | None = None

    def submit(self, step: int, work: Callable[[], CheckpointInfo]) -> SaveHandle:
        """Start ``work`` in a thread; the previous save must be settled (see :meth:`wait`)."""
        handle = SaveHandle(step)
        self._current = handle
        self._thread = threading.Thread(target=handle._run, args=(work,), name=f"ckptstore-save-{step}")
        self._thread.start()
        return handle

    def settle(self) -> None:
        """Wait for the save in flight, if any, and its thread (which holds the state's host copy
        until it ends); its failure, if unseen, stays for :meth:`wait`."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def wait(self) -> None:
        """Wait for the save in flight; raise its failure unless ``result()`` already raised it."""
        self.settle()
        handle = self._current
        if handle is not None and handle._error is not None and not handle._seen:
            handle._seen = True
            raise handle._error


def _without_locals(err: BaseException) -> BaseException:
    """``err`` with the locals of its finished frames (and of its causes' frames) cleared: they
    hold the state's host copy, which must not outlive the save."""
    seen: set[int] = set()
    chained: BaseException | None = err
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__
    return err
