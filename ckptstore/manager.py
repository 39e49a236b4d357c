"""CheckpointManager: save, list, restore and prune checkpoints under one root URL.

Orchestration only: the commit protocol lives in :mod:`ckptstore.commit`, the policy in
:mod:`ckptstore.retention`, formats in :mod:`ckptstore.serializers`. The manager keeps no
memory of past saves: every decision is made from what the root holds, so a restarted job
(a new process, a new machine) continues exactly where the old one stopped.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import torch

from . import arguments, cleanup, commit, folders, retention
from .background import BackgroundSaver, SaveHandle
from .errors import (
    CheckpointNotFound,
    CkptStoreError,
    ConfigError,
    CorruptCheckpointError,
    RankError,
    StorageError,
)
from .export import BestExport, weights_to_export
from .inplace import restore_checkpoint
from .manifest import FOLDER_FORMAT, MANIFEST_NAME, SHARDED_FORMAT, CheckpointInfo, FileEntry
from .network import Transfers
from .partial import LoadReport, load_partial
from .preemption import PreemptionWatcher
from .ranks import Ranks, raise_dropped
from .results import Restored, RootListing
from .serializers import MapLocation, get_format
from .scan import KnownManifests, Scan, scan
from .snapshot import snapshot
from .storage import Upload, check_relative_path, open_storage
from .tree import canonicalize, holds_dtensors

log = logging.getLogger("ckptstore")

Which = str | int
T = TypeVar("T")


class CheckpointManager:
    """Keep the last N and best K checkpoints of a training run under any fsspec URL.

    Args:
        root: folder or URL (``/runs/exp1``, ``file://``, ``memory://``, ``s3://b/p``, ``gs://b/p``).
        keep_last: keep the newest N by step; ``None`` keeps all.
        keep_best: keep the best K by ``monitor`` as well.
        monitor: metric name that ranks checkpoints (``metrics`` passed to :meth:`save`).
        mode: ``"min"`` or ``"max"``: which end of ``monitor`` is best.
        format: ``"safetensors"`` (default) or ``"torch"``.
        storage_options: passed to fsspec as-is (credentials, endpoint, ...).
        export_best: optional file name (``model_best.safetensors`` or ``.pt``) under the root
            that holds the weights of ``state[export_key]`` of the best checkpoint ever
            committed by ``monitor`` (needs ``monitor``); see :mod:`ckptstore.export`.
        export_key: the state entry ``export_best`` exports.
        abandoned_after: seconds a folder without manifest must be idle, by the store's clock
            and by this process's, before a save or prune deletes it as an abandoned save (a
            save in progress elsewhere is not idle); see :mod:`ckptstore.cleanup`.
        save_interval_steps, save_interval_seconds: when :meth:`should_save` says yes (see there).
        transfers: parts and ranges of one file in flight at once on S3/GCS, and their size
            (:class:`ckptstore.Transfers`; default 4 of 8 MiB).
        rank_timeout: in a ``torch.distributed`` job, seconds a rank waits for the others at each
            step of a save or restore before it raises :class:`RankError` (see below).
        distributed: ``None`` (default): join the ``torch.distributed`` job if one is initialized,
            so creating the manager is itself collective; ``False``: this process alone, as
            outside a job (a manager made on rank 0 only, under ``if rank == 0:``).

    **In a torch.distributed job** (initialized before the manager is made) every rank runs
    the same code and makes the same calls: ``save``, ``restore``, ``prune``, ``delete`` and,
    with a time interval or a preemption watcher, ``should_save`` and ``reached_preemption`` are
    collective. Rank 0 lists, commits, prunes and exports; every rank returns the same result
    or raises. Replicated state (DDP) is written once, by rank 0; state that holds DTensors
    (FSDP2, ``distribute_tensor``) is written by every rank at once through
    ``torch.distributed.checkpoint`` and restores on any world size (:mod:`ckptstore.sharded`).
    ``listing``, ``checkpoints``, ``latest``, ``best`` and ``verify`` read the store from the
    calling rank alone.

    A manager is a context manager: leaving the ``with`` block waits for a background save
    (``save(..., blocking=False)``) and raises its failure.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> mgr = CheckpointManager("memory://doc/manager", keep_last=2)
        >>> mgr.save({"model": model, "epoch": 1}, step=1).name
        'step_00000001'
        >>> mgr.restore({"model": model})
        {'epoch': 1}
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        format: str = "safetensors",
        storage_options: dict[str, Any] | None = None,
        export_best: str | None = None,
        export_key: str = "model",
        abandoned_after: float = 600.0,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        transfers: Transfers | None = None,
        rank_timeout: float = 600.0,
        distributed: bool | None = None,
    ) -> None:
        self.policy = retention.RetentionPolicy(keep_last, keep_best, monitor, mode)
        self.format = get_format(format)
        if export_best is not None:
            check_relative_path(export_best)
            if "/" in export_best or not export_best.endswith((".safetensors", ".pt", ".pth")):
                raise ConfigError(f"`export_best` must be a file name ending in .safetensors, .pt or .pth, got {export_best!r}")
            if not monitor:
                raise ConfigError("`export_best` needs `monitor`, the metric that decides which checkpoint is best")
        self.export_best, self.export_key = export_best, export_key
        if abandoned_after < 0:
            raise ConfigError(f"`abandoned_after` must be >= 0 seconds, got {abandoned_after!r}")
        self.abandoned_after = abandoned_after
        self.storage_options = storage_options
        self.storage = open_storage(root, storage_options, transfers)
        timeout = arguments.optional_positive("rank_timeout", rank_timeout, float)
        alone = distributed is False
        self._ranks = Ranks() if alone else Ranks.current(timeout)
        self._agreement = Ranks() if alone else Ranks.current(timeout)  # should_save's own group: beside a background save's
        self._ranks.on_leader(self._check_root)
        self._known = KnownManifests()
        self._export = BestExport(self.storage, export_best, export_key, monitor, mode, self._known) if export_best and monitor else None
        self._idle = cleanup.IdleClock()
        self._upload_clock = cleanup.IdleClock()
        self._uploads_checked: float | None = None  # monotonic time of the last look for incomplete uploads
        self.save_interval_steps = arguments.optional_positive("save_interval_steps", save_interval_steps, int)
        self.save_interval_seconds = arguments.optional_positive("save_interval_seconds", save_interval_seconds, float)
        self._background = BackgroundSaver()
        self._created = time.monotonic()
        self._preemption: PreemptionWatcher | None = None
        self._last_save: tuple[int, float] | None = None  # (step, monotonic time) of this manager's last save
        # checkpoints a restore("latest") found unusable and went back past: a save that comes back to their step replaces them
        self._set_aside: dict[str, str] = {}

    def _check_root(self) -> None:
        self.storage.check_bucket()
        self.storage.check_not_a_file()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.wait()
        else:  # the block's own error goes on; a save's failure is logged (background.py)
            self._background.settle()

    @property
    def root(self) -> str:
        """The root URL."""
        return self.storage.url()

    # -- listing --------------------------------------------------------------------------
    def listing(self) -> RootListing:
        """Everything under the root, from one listing: checkpoints, latest, best, what is not a checkpoint.

        Each manifest is read once per manager (committed manifests never change), so the
        cost of a listing grows with the root's file count only as the store's LIST does.

        Example:
            >>> mgr = CheckpointManager("memory://doc/listing", monitor="loss")
            >>> _ = mgr.save({"x": 1}, step=1, metrics={"loss": 0.5})
            >>> found = mgr.listing()
            >>> found.latest.step, found.best.step, found.uncommitted, found.empty
            (1, 1, {}, False)
        """
        found = self._scan()
        return RootListing(
            checkpoints=found.committed,
            latest=found.committed[-1] if found.committed else None,
            best=next(iter(self._ranked(found.committed)), None),
            uncommitted=found.reasons(),
            empty=found.files == 0,
        )

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self._scan().committed

    def latest(self) -> CheckpointInfo | None:
        """The committed checkpoint with the highest step, or None."""
        return self.listing().latest

    def best(self) -> CheckpointInfo | None:
        """The best committed checkpoint by ``monitor`` or, without one, by the metric and mode the
        newest checkpoint recorded; None when neither exists or no checkpoint has a finite value."""
        return self.listing().best

    def _scan(self) -> Scan:
        """One listing of the root, after the background save (if any) has finished."""
        self._background.settle()
        return scan(self.storage, self._known)

    # -- saving ---------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether the loop should save at ``step``: ``if mgr.should_save(step): mgr.save(...)``.

        True when ``step`` is a multiple of ``save_interval_steps``, or ``save_interval_seconds``
        have passed since this manager's last save (or its creation), or a preemption notice
        has arrived (:meth:`watch_preemption`); with no interval set, every step. Never for a
        step at or below the last one this manager saved. No I/O: cheap on every step. In a
        distributed job the ranks agree (one small all-reduce, only when a time interval or a
        preemption watcher is set): if any rank says yes, every rank does.

        Example:
            >>> mgr = CheckpointManager("memory://doc/should_save", save_interval_steps=100)
            >>> [s for s in range(0, 301, 50) if mgr.should_save(s)]
            [0, 100, 200, 300]
        """
        step = arguments.step(step)
        last_step, last_time = self._last_save if self._last_save is not None else (-1, self._created)
        if step <= last_step:
            return False
        by_clock = self.preemption_notice is not None or (
            self.save_interval_seconds is not None and time.monotonic() - last_time >= self.save_interval_seconds)
        if self._preemption is not None or self.save_interval_seconds is not None:  # clocks and signals differ by rank
            by_clock = self._agreement.any(by_clock)
        if self.save_interval_steps is None and self.save_interval_seconds is None:
            return True
        return by_clock or (self.save_interval_steps is not None and step % self.save_interval_steps == 0)

    def watch_preemption(
        self, signals: Sequence[signal.Signals] = (signal.SIGTERM,), clouds: Sequence[str] = ("aws", "gcp", "azure"),
        poll_seconds: float = 5.0, endpoints: Mapping[str, str] | None = None,
    ) -> PreemptionWatcher:
        """Watch for a preemption notice: ``signals`` (their handlers only set a flag) and the
        clouds' metadata servers, polled in a background thread (see :mod:`ckptstore.preemption`).

        The loop then asks :meth:`reached_preemption` between steps, saves (blocking) and exits.
        Call it from the main thread; ``stop()`` on the returned watcher puts the old handlers back.

        Example:
            >>> mgr = CheckpointManager("memory://doc/preempt")
            >>> watcher = mgr.watch_preemption(clouds=())
            >>> mgr.reached_preemption(step=10)
            False
            >>> watcher.stop()
        """
        if self._preemption is not None:
            self._preemption.stop()
        self._preemption = PreemptionWatcher(signals, clouds, poll_seconds, endpoints).start()
        return self._preemption

    @property
    def preemption_notice(self) -> str | None:
        """What announced the preemption (``"SIGTERM"``, ``"AWS spot terminate at ..."``), or None."""
        return self._preemption.notice if self._preemption is not None else None

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption notice has arrived: save ``step`` now (blocking) and exit.

        In a distributed job it is collective: a notice on any rank (a spot notice reaches one
        node) is a notice on every rank.

        Example: ``if mgr.reached_preemption(step): mgr.save(state, step); sys.exit(0)``.
        """
        arguments.step(step)
        return self._agreement.any(self.preemption_notice is not None)

    def wait(self) -> None:
        """Wait for the background save in flight, if any; raise its failure if ``result()`` did not."""
        self._background.wait()

    @overload
    def save(self, state: Mapping[str, Any], step: int, metrics: Mapping[str, Any] | None = None, *,
             name: str | None = None, allow_older: bool = False, blocking: Literal[True] = True) -> CheckpointInfo: ...

    @overload
    def save(self, state: Mapping[str, Any], step: int, metrics: Mapping[str, Any] | None = None, *,
             name: str | None = None, allow_older: bool = False, blocking: Literal[False]) -> SaveHandle: ...

    def save(
        self, state: Mapping[str, Any], step: int, metrics: Mapping[str, Any] | None = None, *,
        name: str | None = None, allow_older: bool = False, blocking: bool = True,
    ) -> CheckpointInfo | SaveHandle:
        """Save ``state`` as the checkpoint of ``step``, commit it, then apply retention.

        ``blocking=False`` returns a :class:`~ckptstore.background.SaveHandle` as soon as the
        state's tensors are copied to host memory (:mod:`ckptstore.snapshot`); the write, the
        commit and retention run in a background thread, and what the caller changes after
        ``save`` returns does not reach the checkpoint. One save is in flight at a time: the
        next ``save`` (and any call that reads the root) waits for it first. Its failure raises
        from ``handle.result()``, else from :meth:`wait` or the next ``save``; errors in the
        arguments and unsupported values raise at once either way.

        A step below the newest committed one is refused unless ``allow_older=True``: it is
        a new run in an old root, or a rollback, and ``restore()`` would still resume from
        the newer step. With ``allow_older=True`` the checkpoint is kept by this call's
        retention; later saves apply the policy to it as to any other.

        Raises:
            CheckpointExists: ``step`` (or ``name``) is already committed, or its folder is
                damaged: an unreadable manifest, or one without its data (the message says how
                to remove it).
            ConfigError: ``step`` is older than the newest committed step (see above), or
                ``state[export_key]`` is not exportable.
            UnsupportedValueError: a value in ``state`` cannot be stored without pickle.
            StorageError: the store refused the write; earlier checkpoints are intact. (If the
                commit's reply and the read that checks it both failed, the checkpoint may yet be
                committed, whole: ``latest()`` tells.)
        """
        self._background.wait()  # one save in flight; an unseen failure of the last one raises here
        step = arguments.step(step)
        name = arguments.checkpoint_name(name or f"step_{step:08d}")
        values = arguments.metrics(metrics or {}, self.policy.monitor, step)
        tree = canonicalize(dict(state))  # fails on unsupported values before any I/O
        is_sharded = holds_dtensors(tree)
        if is_sharded:
            from . import sharded  # DCP: imported by jobs that shard only

            tree = canonicalize(sharded.model_and_optimizers(state)[0])
        self._agree_on_save(step, name, is_sharded)
        if self._export is not None:
            if is_sharded:
                raise ConfigError("`export_best` needs the whole model on one rank; it does not export sharded (DTensor) state")
            weights_to_export(tree, self.export_key)
        self._last_save = (step, time.monotonic())
        write = self._write_sharded if is_sharded else self._write_replicated
        if blocking:
            return write(tree, step, name, values, allow_older)
        # a host copy of what this rank writes (nothing on the ranks that wait for rank 0), taken by the save:
        # nothing it leaves behind (a traceback) keeps the copy alive
        frozen = [snapshot(tree) if is_sharded or self._ranks.leader else None]
        return self._background.submit(step, lambda: write(frozen.pop(), step, name, values, allow_older))

    def _agree_on_save(self, step: int, name: str, is_sharded: bool) -> None:
        """Every rank saves the same step under the same name, all sharded or none (one all-gather)."""
        plans = self._ranks.gather((step, name, is_sharded))
        if len(set(plans)) > 1:
            raise ConfigError("the ranks disagree on what to save (step, name, sharded): " + ", ".join(
                f"rank {r}: {p}" for r, p in enumerate(plans)) + "; every rank must call save() with the same step")

    def _write_replicated(self, tree: Any, step: int, name: str, values: dict[str, float], allow_older: bool) -> CheckpointInfo:
        """Rank 0 writes and commits; every rank returns what it committed (or raises why not)."""
        # a partial, not a lambda: a failure's traceback keeps a lambda's frame, and with it the closure holding the tree
        return self._ranks.on_leader(functools.partial(self._write, tree, step, name, values, allow_older))

    def _write(self, tree: Any, step: int, name: str, values: dict[str, float], allow_older: bool) -> CheckpointInfo:
        """Commit ``tree`` as ``name`` and apply retention (in the caller's thread or the background one)."""
        found = self._prepare(step, name, allow_older)
        info = commit.write_checkpoint(self.storage, name, step, self.format, tree, values, self.policy.ranks_by)
        return self._after_commit(found, info, tree)

    def _write_sharded(self, tree: Any, step: int, name: str, values: dict[str, float], allow_older: bool) -> CheckpointInfo:
        """Every rank writes its shards at once; rank 0 gathers their sizes and CRC32C and commits them all."""
        from . import dcp_files, sharded

        prepared: list[Scan] = []  # the root as rank 0 listed it, for retention after the commit

        def prepare() -> str:
            prepared.append(self._prepare(step, name, allow_older))
            return commit.new_token()

        token = self._ranks.on_leader(prepare)
        failed: list[BaseException] = []  # a box, not a local: see ranks.raise_dropped
        written: dict[str, tuple[int, int]] = {}
        try:
            written = dcp_files.write_shards(self.storage, name, token, tree, self._ranks)
        except sharded.FAILURES as err:  # every rank must reach the check below, or the others wait for it
            failed.append(sharded.own_error(err, self._ranks.rank, self._ranks.world))
        self._ranks.check_all(failed, f"writing the shards of {self.storage.url(name)}")
        every_rank = self._ranks.gather(written)

        def commit_all() -> CheckpointInfo:
            files = tuple(sorted((FileEntry(p.split("/", 1)[1], size, crc) for w in every_rank for p, (size, crc) in w.items()),
                                key=lambda e: e.path))
            info = CheckpointInfo(name=name, step=step, format=SHARDED_FORMAT, metrics=dict(values), files=files,
                                  url=self.storage.url(name), monitor=self.policy.ranks_by)
            return self._after_commit(prepared[0], commit.commit_manifest(self.storage, info), None)

        return self._ranks.on_leader(commit_all)

    def _prepare(self, step: int, name: str, allow_older: bool) -> Scan:
        """Before a save writes: is ``name`` free, and are leftovers removed? The root as it was listed."""
        self.storage.makedirs()
        found = scan(self.storage, self._known)  # not _scan: this may be the background save itself
        if self._remove_set_aside(found, step, name):
            found = scan(self.storage, self._known)
        commit.check_free(self.storage, found, step, name, allow_older)
        try:
            cleanup.clean(self.storage, found, self.abandoned_after, self._idle)
            if self._uploads_due():
                cleanup.abort_idle_uploads(self.storage, self.abandoned_after, self._upload_clock)
        except StorageError as err:  # leftovers wait for the next save; this one goes on
            log.warning("could not remove leftovers under %s: %s", self.root, err)
        return found

    def _remove_set_aside(self, found: Scan, step: int, name: str) -> bool:
        """Delete the unusable checkpoints this run resumed from before (see :meth:`restore`) that
        are in the way of saving ``step`` as ``name``: the run has come back to them. True if any."""
        in_the_way = [i for i in found.committed if i.name in self._set_aside and (i.step >= step or i.name == name)]
        for info in in_the_way:
            log.warning("removing %s: it was unusable when this run went back to an older checkpoint (%s), and the run "
                        "has come back to step %d", info.url, self._set_aside.pop(info.name), step)
            commit.delete_checkpoint(self.storage, info)
        return bool(in_the_way)

    def _after_commit(self, found: Scan, info: CheckpointInfo, tree: Any) -> CheckpointInfo:
        """Log, export the best and apply retention after ``info`` committed on the root ``found`` describes."""
        log.info("saved %s (%d bytes)", info.url, info.size)
        committed = [*found.committed, info]
        if self._reconcile_export(committed, (info, tree)):
            self._delete(self._doomed(committed, protect=info.name))
        return info

    def _reconcile_export(self, committed: list[CheckpointInfo], fresh: tuple[CheckpointInfo, dict[str, Any]]) -> bool:
        """Bring the best-model export up to date; False (retention waits) if that failed."""
        if self._export is None:
            return True
        try:
            self._export.reconcile(committed, fresh)
        except CkptStoreError as err:
            log.warning("could not update the best-model export %s (%s); no checkpoint is pruned until it is",
                        self.storage.url(self._export.file), err)
            return False
        return True

    def prune(self, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Apply the retention policy to what is stored now; return what was (or would be) deleted.

        The best-model export is brought up to date first, so no checkpoint it needs is lost.
        Leftovers (unfinished saves, temp files, incomplete multipart uploads) idle for
        ``abandoned_after`` are removed too. In a distributed job rank 0 prunes for every rank.
        """
        self._background.settle()
        return self._ranks.on_leader(functools.partial(self._prune, dry_run))

    def _prune(self, dry_run: bool) -> list[CheckpointInfo]:
        found = self._scan()
        doomed = self._doomed(found.committed)
        if not dry_run:
            if self._export is not None:
                self._export.reconcile(found.committed)
            cleanup.clean(self.storage, found, self.abandoned_after, self._idle)
            cleanup.abort_idle_uploads(self.storage, self.abandoned_after, self._upload_clock)
            self._uploads_checked = time.monotonic()
            self._delete(doomed)
        return doomed

    def incomplete_uploads(self) -> list[Upload]:
        """The root's incomplete multipart uploads (S3; ``[]`` elsewhere): a writer killed mid-upload
        leaves one, billed until aborted. Saves and :meth:`prune` abort them once idle for
        ``abandoned_after``; an S3 lifecycle rule (``AbortIncompleteMultipartUpload``) is the second guard.
        """
        self._background.settle()
        return self.storage.incomplete_uploads(older_than=0.0)

    def _uploads_due(self) -> bool:
        """Look for incomplete uploads on a manager's first save, then at most every ``abandoned_after / 2`` seconds
        (one LIST on S3; a restarted job finds its predecessor's at once)."""
        now = time.monotonic()
        if self._uploads_checked is not None and now - self._uploads_checked < self.abandoned_after / 2:
            return False
        self._uploads_checked = now
        return True

    def verify(
        self, progress: Callable[[int], None] | None = None, checkpoints: Sequence[CheckpointInfo] | None = None,
    ) -> dict[str, str | None]:
        """Check committed checkpoints' sizes and CRC32C: ``{name: None or the problem}``.

        ``checkpoints``: the ones to check (default: every committed one, from a new listing).
        A checkpoint deleted while it is checked (a concurrent prune) is left out, not reported.
        ``progress(n)`` is called as bytes are read (the CLI's progress bar).
        """
        results: dict[str, str | None] = {}
        for info in self.checkpoints() if checkpoints is None else checkpoints:
            try:
                commit.verify_checkpoint(self.storage, info, progress)
                results[info.name] = None
            except CorruptCheckpointError as err:
                if self.storage.exists(f"{info.name}/{MANIFEST_NAME}"):  # else pruned meanwhile, not damaged
                    results[info.name] = str(err)
        return results

    def uncommitted(self) -> dict[str, str]:
        """Folders under the root that are not checkpoints, and why: ``{name: reason}``.

        Unfinished saves (data, no manifest) are removed by a later save or prune once idle
        for ``abandoned_after`` seconds; folders with an unreadable manifest are never removed
        automatically.

        Example:
            >>> CheckpointManager("memory://doc/uncommitted").uncommitted()
            {}
        """
        return self.listing().uncommitted

    def _doomed(self, committed: list[CheckpointInfo], protect: str | None = None) -> list[CheckpointInfo]:
        keep = retention.to_keep(committed, self.policy) | {protect}
        return [i for i in committed if i.name not in keep]

    def _delete(self, doomed: list[CheckpointInfo]) -> None:
        for info in doomed:
            commit.delete_checkpoint(self.storage, info)
            log.info("pruned %s", info.url)

    def delete(self, which: Which) -> CheckpointInfo | None:
        """Delete one checkpoint (by step or name); return what it was.

        Also removes a damaged folder (named, or by its step's default name): an unreadable
        manifest, or one whose data file is missing; that returns None.

        Example:
            >>> mgr = CheckpointManager("memory://doc/delete")
            >>> mgr.delete(mgr.save({"x": 1}, step=1).step).step
            1
        """
        self._background.settle()
        return self._ranks.on_leader(functools.partial(self._delete_one, which))  # rank 0 deletes for every rank

    def _delete_one(self, which: Which) -> CheckpointInfo | None:
        found = self._scan()
        folder = self._folder_of(which)
        files = found.damaged(folder) if folder else None
        if files is not None and not any(i.name == folder or i.step == which for i in found.committed):
            commit.delete_damaged(self.storage, folder, files)
            log.info("deleted %s (a damaged checkpoint)", self.storage.url(folder))
            return None
        info = self._find(which, found.committed)
        commit.delete_checkpoint(self.storage, info)
        return info

    @staticmethod
    def _folder_of(which: Which) -> str:
        """The folder a step or name refers to (a step's default name); '' for 'latest'/'best'."""
        if isinstance(which, bool):
            return ""
        if isinstance(which, int):
            return f"step_{which:08d}"
        return which if which not in ("latest", "best") else ""

    # -- restoring ------------------------------------------------------------------------
    def restore(
        self,
        state: dict[str, Any] | None = None,
        which: Which = "latest",
        *,
        map_location: MapLocation = None,
        weights_only: bool = True,
        verify: bool = True,
        strict: bool = True,
    ) -> Restored | None:
        """Restore a checkpoint into ``state`` in place; return the other saved values.

        Stateful entries (modules, optimizers, schedulers, :class:`RNGState`) get
        ``load_state_dict``; tensors are filled with ``copy_``. The returned dict holds
        everything else that was saved; it is a :class:`~ckptstore.results.Restored`, whose ``checkpoint`` says
        which checkpoint was restored and ``missing`` which entries of ``state`` it lacked.
        Returns None when the root has no checkpoint.

        Tensor bytes stream straight into the live parameters, buffers, optimizer state
        and tensors of ``state`` where shape and dtype match, so a restore needs no second
        copy of the state in memory (see :mod:`ckptstore.inplace`). Live tensors keep their
        device; ``map_location`` places the saved tensors that have no live counterpart.

        ``which`` is ``"latest"`` (falls back to the next newest if one is corrupt, with a
        warning, and this manager's save of that step or an earlier one later replaces the
        corrupt one, with a warning, instead of refusing the step as taken; None, with a warning
        naming the root, when there is none), ``"best"``, a
        step number or a checkpoint name (CheckpointNotFound when absent, also on an empty root). ``verify`` checks the
        CRC32C before any live byte changes (remote checkpoints are first downloaded to a
        local temporary file, checked on the way). ``strict``: an entry of ``state`` that the
        checkpoint lacks (an optimizer the run did not save) is an error, before anything
        changes; ``strict=False`` leaves such entries as they are, logs their names and
        returns them in ``missing``.

        Raises:
            CorruptCheckpointError: the checkpoint asked for (or, for "latest", every one) is damaged.
            StateMismatchError: a module's or tensor's shape differs from the saved one
                (before any tensor byte is read).
        """
        return self._first_usable(which, lambda info: self._restore_one(info, state, map_location, weights_only, verify, strict))

    def _first_usable(self, which: Which, attempt: Callable[[CheckpointInfo], T]) -> T | None:
        """``attempt`` the checkpoint ``which`` names on every rank; for "latest", the one before
        while it is corrupt (on any rank). None when the root has none (only for "latest")."""
        if isinstance(which, str) and which not in ("latest", "best"):
            arguments.checkpoint_name(which)
        self._background.settle()
        tried: dict[str, str] = {}  # checkpoint name -> why it was unusable
        while (info := self._ranks.on_leader(lambda: self._to_restore(which, tried))) is not None:
            failed: list[Exception] = []  # a box, not a local: see ranks.raise_dropped
            try:
                done = attempt(info)
            except Exception as err:  # every rank reaches the agreement below, or the others wait for it
                failed.append(err)
            unusable = self._agree_on_restore(failed)
            if unusable is None:
                return done
            if which != "latest":
                raise_dropped(failed) if failed else raise_dropped([CorruptCheckpointError(unusable)])
            log.warning("checkpoint %s is unusable, trying the one before: %s", info.name, unusable)
            tried[info.name] = self._set_aside[info.name] = unusable
        return None

    def save_folder(
        self, folder: str | os.PathLike[str], step: int, metrics: Mapping[str, Any] | None = None, *,
        name: str | None = None, allow_older: bool = False,
    ) -> CheckpointInfo:
        """Save every file of the local ``folder`` (one a framework wrote) as the checkpoint of ``step``.

        The same commit, checksums and retention as :meth:`save`: each file's CRC32C is taken
        as it uploads, and one manifest, written last, commits them all (see
        :mod:`ckptstore.folders`). In a ``torch.distributed`` job rank 0 uploads its ``folder``.
        Bring one back with :meth:`restore_folder`.

        Example:
            >>> import tempfile, pathlib
            >>> folder = pathlib.Path(tempfile.mkdtemp())
            >>> _ = (folder / "config.json").write_text("{}")
            >>> mgr = CheckpointManager("memory://doc/folder-save")
            >>> mgr.save_folder(folder, step=5).format
            'folder'
            >>> mgr.restore_folder(folder / "back").name, (folder / "back" / "config.json").read_text()
            ('step_00000005', '{}')

        Raises:
            ConfigError: ``folder`` is missing or empty, ``export_best`` is set (a folder has
                no state to export), or ``step`` is older than the newest (see :meth:`save`).
            CheckpointExists: ``step`` (or ``name``) is already committed.
        """
        self._background.wait()
        step = arguments.step(step)
        name = arguments.checkpoint_name(name or f"step_{step:08d}")
        values = arguments.metrics(metrics or {}, self.policy.monitor, step)
        if self._export is not None:
            raise ConfigError("`export_best` exports a state's weights; a folder checkpoint has none it can read")
        self._agree_on_save(step, name, False)
        self._last_save = (step, time.monotonic())

        def write() -> CheckpointInfo:
            folders.files_in(folder)  # a missing or empty folder fails before any I/O (on every rank: on_leader raises it there)
            found = self._prepare(step, name, allow_older)
            info = folders.write_folder(self.storage, name, step, folder, values, self.policy.ranks_by)
            return self._after_commit(found, info, None)

        return self._ranks.on_leader(write)

    def restore_folder(self, dest: str | os.PathLike[str], which: Which = "latest") -> CheckpointInfo | None:
        """Download a folder checkpoint into the new local folder ``dest``; return which one it was.

        ``which`` as for :meth:`restore`: "latest" falls back to the one before while a file
        fails its check, and is None when the root has no checkpoint. ``dest`` appears whole,
        every file checked against its size and CRC32C, or not at all (each rank downloads
        its own copy: in a job, give each rank its own ``dest``).

        Raises:
            ConfigError: ``dest`` exists and is not an empty folder, or the checkpoint is not a folder.
            CorruptCheckpointError: the checkpoint asked for (or, for "latest", every one) is damaged.
        """

        def download(info: CheckpointInfo) -> CheckpointInfo:
            folders.download_folder(self.storage, info, dest)
            log.info("restored %s into %s", info.url, dest)
            return info

        return self._first_usable(which, download)

    def _to_restore(self, which: Which, tried: Mapping[str, str]) -> CheckpointInfo | None:
        """Rank 0's choice of the checkpoint to restore next (``tried`` were unusable), from a new listing."""
        found = self._scan()
        infos = found.committed
        if which != "latest":
            try:
                return self._find(which, infos)
            except CheckpointNotFound:
                folder = self._folder_of(which)
                if folder in found.broken:
                    raise CorruptCheckpointError(
                        f"{self.storage.url(folder)} is unusable: its manifest's data file is missing"
                    ) from None
                raise
        if not infos and not tried:
            log.warning("no checkpoint under %s: starting fresh (if you meant to resume, check the root)", self.root)
            return None
        todo = [i for i in retention.newest_first(infos) if i.name not in tried]
        if not todo:  # the root may have changed meanwhile (a prune, a newer save): each try lists it anew
            raise CorruptCheckpointError(f"every checkpoint under {self.root} is unusable: " + "; ".join(tried.values()))
        return todo[0]

    def _agree_on_restore(self, failed_here: list[Exception]) -> str | None:
        """None if every rank restored; why the checkpoint is unusable if a rank found it corrupt (every
        rank then tries the one before, together); any other error raises on every rank (this rank's
        own, ``failed_here``, popped from it)."""
        kinds = self._ranks.gather((isinstance(failed_here[0], CorruptCheckpointError), str(failed_here[0])) if failed_here else None)
        failed = [(r, k) for r, k in enumerate(kinds) if k is not None]
        if failed_here and not isinstance(failed_here[0], CorruptCheckpointError):
            raise_dropped(failed_here)
        if any(not corrupt for _, (corrupt, _) in failed):
            raise RankError("restoring failed on " + "; ".join(f"rank {r}: {why}" for r, (_, why) in failed))
        return "; ".join(why for _, (_, why) in failed) if failed else None

    def _restore_one(
        self, info: CheckpointInfo, state: dict[str, Any] | None, map_location: MapLocation, weights_only: bool, verify: bool,
        strict: bool,
    ) -> Restored:
        if info.format == FOLDER_FORMAT:
            raise ConfigError(f"{info.url} is a folder checkpoint (the files a framework wrote), not a state: bring it "
                              "back with restore_folder(dest)")
        if info.format == SHARDED_FORMAT:
            from . import sharded

            values, missing = sharded.restore_shards(self.storage, info, state or {}, self._ranks, verify=verify, strict=strict)
            log.info("restored %s (sharded, %d files) on rank %d of %d", info.url, len(info.files), self._ranks.rank, self._ranks.world)
            return Restored(values, info, missing)
        values, report = restore_checkpoint(
            self.storage, info, state, map_location=map_location, weights_only=weights_only, verify=verify, strict=strict
        )
        log.info("restored %s: %d bytes read in %d requests, %d tensors straight into live memory",
                 info.url, report.bytes_read, report.requests, len(report.loaded))
        return Restored(values, info, report.missing)

    def load_partial(
        self,
        target: torch.nn.Module | dict[str, torch.Tensor],
        which: Which = "latest",
        *,
        key: str = "model",
        **options: Any,
    ) -> LoadReport:
        """Load the matching tensors of ``state[key]`` of a checkpoint into ``target``.

        The same as :func:`ckptstore.load_partial` on the checkpoint's folder; ``options``
        are its keyword arguments (``device``, ``key_map``, ``strict``, ...).
        """
        infos = self.checkpoints()
        if not infos:
            raise CheckpointNotFound(f"no committed checkpoint under {self.root}")
        info = retention.newest_first(infos)[0] if which == "latest" else self._find(which, infos)
        return load_partial(info.url, target, key=key, storage_options=self.storage_options, **options)

    # -- helpers --------------------------------------------------------------------------
    def _find(self, which: Which, infos: list[CheckpointInfo]) -> CheckpointInfo:
        if which == "best":
            ranked = self._ranked(infos)
            if not ranked:
                raise CheckpointNotFound(
                    f"no checkpoint under {self.root} has a finite `{self.policy.monitor}`; "
                    "pass monitor= and save metrics, or restore 'latest'"
                )
            return ranked[0]
        if isinstance(which, int) and not isinstance(which, bool):
            match = [i for i in infos if i.step == which]
        elif isinstance(which, str):
            match = [i for i in infos if i.name == arguments.checkpoint_name(which)]
        else:
            raise ConfigError(f"`which` must be 'latest', 'best', a step or a name, got {which!r}")
        if not match:
            known = ", ".join(str(i.step) for i in infos) or "none"
            raise CheckpointNotFound(f"no committed checkpoint {which!r} under {self.root} (steps: {known})")
        return match[-1]

    def _ranked(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Checkpoints with a finite value of the monitored metric, best first (see :meth:`best`)."""
        monitor = self.policy.ranks_by or retention.recorded_monitor(infos)
        return retention.ranked_best(infos, *monitor) if monitor else []
