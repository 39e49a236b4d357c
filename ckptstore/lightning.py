"""PyTorch Lightning on any bucket, through ckptstore.

Lightning writes a remote checkpoint by pickling all of it into memory and uploading it in one
piece, with no checksum and no commit. Two ways to use ckptstore instead:

* :class:`CkptStoreCheckpoint`, a ``ModelCheckpoint`` whose saves are
  :class:`~ckptstore.CheckpointManager` checkpoints: committed by a manifest written last, every
  byte checksummed (CRC32C), ``keep_last`` and ``keep_best`` applied in the bucket, a save at
  the next batch on SIGTERM or a cloud's spot notice, the RNG states saved and restored (so a
  resumed run with dropout continues exactly), and ``fit(ckpt_path="last")`` resuming from the
  newest good checkpoint in the bucket (a damaged one is skipped, loudly)::

      checkpoint = CkptStoreCheckpoint("s3://bucket/runs/exp1", keep_last=2, keep_best=1, monitor="val_loss",
                                       every_n_train_steps=500)
      trainer = Trainer(callbacks=[checkpoint])
      trainer.fit(model, ckpt_path="last")  # a fresh start (with a warning) when the bucket has none

* :class:`CkptStoreIO`, a ``CheckpointIO`` for Lightning's own ``ModelCheckpoint``: each
  ``.ckpt`` is streamed to its URL (bounded memory), appears whole or not at all, and its zip
  records' CRC32 are checked before it loads (``torch.load`` checks none). Wrap it in
  ``AsyncCheckpointIO`` to write in the background.

Needs ``lightning`` (``pip install ckptstore[lightning]``).
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from collections.abc import Sequence
from typing import Any
from weakref import proxy

import torch

from . import files
from .errors import CkptStoreError, ConfigError, MissingDependency
from .manager import CheckpointManager
from .preemption import PreemptionWatcher
from .rng import RNGState
from .serializers import MapLocation, Source, read_checked
from .storage import open_parent

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
    from lightning.pytorch.plugins.io.torch_plugin import TorchCheckpointIO
    from lightning.pytorch.strategies import Strategy
except ImportError as err:  # pragma: no cover - the extra is installed wherever this is tested
    raise MissingDependency("ckptstore.lightning needs lightning: pip install 'ckptstore[lightning]'") from err

log = logging.getLogger("ckptstore")
_POINTER_SUFFIX = ".ckptstore-latest"  # a local file standing for "the newest good checkpoint" (see _find_last_checkpoints)


class CkptStoreIO(CheckpointIO):
    """Lightning's ``CheckpointIO`` through ckptstore: atomic, streamed, verified ``.ckpt`` files at any URL.

    Args:
        storage_options: fsspec options for every path (credentials, endpoint). Lightning's
            own per-call ``storage_options`` (``trainer.save_checkpoint(..., storage_options=)``)
            are merged over them.

    ``load_checkpoint`` maps Lightning's ``weights_only=None`` to True, as torch does.
    (``manager`` and ``background`` are set by :class:`CkptStoreCheckpoint`, whose saves go
    through its manager.)
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *, manager: CheckpointManager | None = None,
                 background: bool = False) -> None:
        self.storage_options = dict(storage_options or {})
        self._manager = manager
        self._background = background
        self._announced: tuple[str, str, int, dict[str, float]] | None = None  # (url, name, step, metrics): see expect

    def expect(self, name: str, step: int, metrics: dict[str, float]) -> str:
        """Announce a save of manager checkpoint ``name``; return the URL that Lightning will pass to :meth:`save_checkpoint`."""
        assert self._manager is not None
        url = self._manager.storage.url(name)
        self._announced = (url, name, step, metrics)  # replaced by the next: a rank that does not write keeps one
        return url

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        announced, self._announced = self._announced, None
        if announced is not None and self._manager is not None:  # the save CkptStoreCheckpoint just asked the trainer for
            url, name, step, metrics = announced
            if posixpath.basename(os.fspath(path).rstrip("/")) != name:
                raise ConfigError(f"the trainer's strategy saved {os.fspath(path)!r} where CkptStoreCheckpoint asked for {url}; "
                                  "nothing was committed")
            # background: the manager copies the tensors to host memory, then writes and commits in its thread
            if self._background:
                self._manager.save(checkpoint, step, metrics, name=name, blocking=False)
            else:
                self._manager.save(checkpoint, step, metrics, name=name)
            return
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}")
        files.save(checkpoint, path, format="torch", storage_options={**self.storage_options, **(storage_options or {})})

    def load_checkpoint(self, path: Any, map_location: MapLocation = None, weights_only: bool | None = None) -> dict[str, Any]:
        which = self._managed(os.fspath(path))
        if which is not None:
            assert self._manager is not None
            restored = self._manager.restore(None, which, map_location=map_location, weights_only=weights_only is not False)
            if restored is None:
                raise ConfigError(f"no checkpoint under {self._manager.root} to resume from")
            return dict(restored)
        storage, name = open_parent(path, self.storage_options)
        local = storage.local_path(name)
        if local is not None:
            return _checked_load(local, storage.url(name), map_location, weights_only)
        with tempfile.NamedTemporaryFile(prefix="ckptstore-", suffix=".ckpt") as copy:
            read_checked(Source(storage, name, storage.size(name)), None, copy_to=copy)  # one streamed GET
            copy.flush()
            return _checked_load(copy.name, storage.url(name), map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        files.delete(path, storage_options=self.storage_options)

    def _managed(self, path: str) -> str | None:
        """The checkpoint of this IO's manager that ``path`` names ("latest" for the pointer), or None."""
        if self._manager is None:
            return None
        if path.endswith(_POINTER_SUFFIX):
            return "latest"
        parent, name = posixpath.split(path.rstrip("/"))
        return name if parent == self._manager.root.rstrip("/") else None


def _checked_load(local: str, where: str, map_location: MapLocation, weights_only: bool | None) -> dict[str, Any]:
    """Check every zip record's CRC32 of the local file (torch.load checks none, and loads a flipped byte), then
    load it; errors name ``where``, the file's URL, not a temporary copy."""
    try:
        files.verify(local)
        loaded: dict[str, Any] = files.load(local, map_location=map_location, weights_only=weights_only is not False)
    except CkptStoreError as err:
        raise type(err)(str(err).replace(local, where)) from None
    return loaded


class CkptStoreCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that saves through a :class:`~ckptstore.CheckpointManager` at ``root``.

    When to save is Lightning's (``every_n_train_steps``, ``every_n_epochs``,
    ``train_time_interval``, after validation); what to keep is the manager's: ``keep_last``
    newest and ``keep_best`` by ``monitor`` (``mode``). Each checkpoint is named
    ``step_<global step>``. On SIGTERM (Lightning's flag) or a spot notice from one of
    ``preemption_clouds``' metadata servers, it saves at the end of the batch and stops training.
    ``background=True``: a save copies the checkpoint's tensors to host memory and returns;
    the manager writes and commits it in a thread while training goes on (one save in flight;
    a failure raises at the next save or when training ends). ``manager_options`` go to the
    manager (``format``, ``storage_options``, ``transfers``, ...).

    ``fit(ckpt_path="last")`` resumes from the newest good checkpoint under ``root``; an explicit
    ``ckpt_path`` of a checkpoint's URL (``f"{root}/step_00000500"``) restores that one, and
    ``ckpt_path="best"`` the best by ``monitor``. The callback installs its :attr:`io` into the
    trainer; a trainer given another ``CheckpointIO`` (or an ``AsyncCheckpointIO``) is refused at
    setup, by name.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, keep_last: int | None = 1, keep_best: int = 0, monitor: str | None = None,
        mode: str = "min", every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
        train_time_interval: Any = None, save_on_train_epoch_end: bool | None = None,
        preemption_clouds: Sequence[str] = (), background: bool = False, **manager_options: Any,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         train_time_interval=train_time_interval, save_on_train_epoch_end=save_on_train_epoch_end,
                         save_top_k=-1, enable_version_counter=False)
        self.manager = CheckpointManager(root, keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode,
                                         distributed=False, **manager_options)
        self.io = CkptStoreIO(manager_options.get("storage_options"), manager=self.manager, background=background)
        self.preemption_clouds = tuple(preemption_clouds)
        self._rng_to_restore: dict[str, Any] | None = None
        self._watcher: PreemptionWatcher | None = None
        self._pointers: tempfile.TemporaryDirectory[str] | None = None  # made when "last" is asked for; removed at teardown

    # -- where and how ---------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Point Lightning at the manager's root and make sure the trainer writes through :attr:`io`."""
        self.dirpath = self.manager.root
        if type(trainer.strategy).save_checkpoint is not Strategy.save_checkpoint:  # DeepSpeed, sharded FSDP, XLA, ...
            raise ConfigError(f"{type(trainer.strategy).__name__} writes checkpoints itself, not through a CheckpointIO: "
                              "CkptStoreCheckpoint cannot commit them; use it with a strategy that does (single device, DDP)")
        io = trainer.strategy.checkpoint_io
        if io is self.io:
            return
        if isinstance(io, _WrappingCheckpointIO):  # AsyncCheckpointIO: its thread would race the manager's own reads
            raise ConfigError(f"the trainer wraps its CheckpointIO in {type(io).__name__}; for saves in the background "
                              "pass CkptStoreCheckpoint(..., background=True) and no AsyncCheckpointIO")
        if type(io) is not TorchCheckpointIO:
            raise ConfigError(f"the trainer writes checkpoints through {type(io).__name__}; CkptStoreCheckpoint needs "
                              "its own: Trainer(plugins=[checkpoint.io]), or no CheckpointIO plugin")
        trainer.strategy.checkpoint_io = self.io

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.preemption_clouds:
            self._watcher = self.manager.watch_preemption(signals=(), clouds=self.preemption_clouds)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # here, not at load: the resumed dataloader has drawn its seed by now
            RNGState().load_state_dict(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        notice = "SIGTERM" if trainer.received_sigterm else self.manager.preemption_notice
        if trainer.world_size > 1:  # a notice on one node stops every rank at the same batch (the save is collective)
            noticed = trainer.strategy.reduce_boolean_decision(notice is not None, all=False)
            notice = (notice or "a preemption notice on another rank") if noticed else None
        if notice is not None and not trainer.sanity_checking:
            log.warning("%s: saving step %d to %s and stopping", notice, trainer.global_step, self.manager.root)
            self._save_checkpoint(trainer, "")
            self.manager.wait()  # committed before the job exits, even with background=True
            trainer.should_stop = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wait for a background save (its failure raises here), stop watching for spot notices, remove the pointer."""
        if self._pointers is not None:
            self._pointers.cleanup()
            self._pointers = None
        try:
            self.manager.wait()
        finally:
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None

    # -- saving: Lightning decides when, the manager what is kept ---------------------------
    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        self._save_checkpoint(trainer, "")

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        """The manager keeps the newest: there is no separate "last" file."""

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        step = trainer.global_step
        if self._last_global_step_saved == step:
            return
        metrics = {k: float(v) for k, v in self._monitor_candidates(trainer).items()
                   if k not in ("epoch", "step") and isinstance(v, (torch.Tensor, float, int)) and torch.as_tensor(v).numel() == 1}
        url = self.io.expect(f"step_{step:08d}", step, metrics)
        trainer.save_checkpoint(url, self.save_weights_only)
        self._last_global_step_saved = step
        self._last_checkpoint_saved = self.last_model_path = url
        if trainer.is_global_zero:  # as ModelCheckpoint does: loggers that upload models (W&B, MLflow) hear of it
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @property
    def best_model_path(self) -> str:
        """The URL of the best checkpoint by ``monitor`` in the root (asked when needed: a background save may be in flight)."""
        best = self.manager.best() if self.monitor else None
        return best.url if best is not None else ""

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        """Lightning sets it; the root knows better (see the getter)."""

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """For ``ckpt_path="last"``: a local pointer (Lightning checks it exists with its own fsspec, which lacks
        the bucket's options); :attr:`io` loads the newest good checkpoint for it. Nothing when the root has none."""
        latest = self.manager.latest()
        if latest is None:
            return set()
        if self._pointers is None:
            self._pointers = tempfile.TemporaryDirectory(prefix="ckptstore-lightning-")
        pointer = os.path.join(self._pointers.name, latest.name + _POINTER_SUFFIX)
        with open(pointer, "w") as f:
            f.write(latest.url)
        return {pointer}

    # -- the callback's own state, inside each checkpoint ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        return {"root": self.manager.root, "rng": RNGState().state_dict(), "world_size": world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The RNG states come back in a one-process run only: rank 0 writes the checkpoint, so in a
        job of several ranks they are rank 0's, and every rank taking them would draw the same
        dropout masks (each rank keeps its own seeded RNG instead, as Lightning does)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        if world == 1 and state_dict.get("world_size", 1) == 1:
            self._rng_to_restore = state_dict.get("rng")
        else:
            log.warning("%s: RNG states are restored in one-process runs only; each of the %d ranks keeps its own",
                        self.manager.root, world)
