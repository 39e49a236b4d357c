"""The Hugging Face ``Trainer`` on any bucket: its checkpoint folders committed through ckptstore.

The Trainer writes ``checkpoint-N/`` to a local ``output_dir`` and cannot write to a bucket;
its ``get_last_checkpoint`` takes the newest folder by name, even one a killed job left half
written. :class:`CkptStoreCallback` commits each folder the Trainer finished to a root URL as
a folder checkpoint (:meth:`CheckpointManager.save_folder`: every file with its CRC32C, one
manifest written last), with ckptstore's retention there. On a fresh machine,
the callback's :meth:`~CkptStoreCallback.resume_path` (or :func:`resume_path`) brings the newest good one
down and returns its local path.

    from ckptstore.hf import CkptStoreCallback

    callback = CkptStoreCallback("s3://bucket/runs/gpt", keep_last=2, keep_best=1, monitor="eval_loss")
    trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume_path())  # None: a fresh start, with a warning

Needs ``transformers`` (``pip install ckptstore[hf]``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ConfigError, MissingDependency
from .manager import CheckpointManager

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - the extra is installed wherever this is tested
    raise MissingDependency("ckptstore.hf needs transformers: pip install 'ckptstore[hf]'") from err


class CkptStoreCallback(TrainerCallback):
    """Commit every checkpoint folder the Trainer saves to ``root``, then apply retention there.

    Args:
        root: the root URL of the run's checkpoints (``s3://bucket/run``, ``gs://...``, a path).
        monitor: a metric the Trainer logs when it evaluates (``"eval_loss"``); a checkpoint
            saved at a step that evaluated carries it, and ``keep_best`` ranks by it.
        manager_options: the other :class:`CheckpointManager` options (``keep_last``,
            ``keep_best``, ``mode``, ``storage_options``, ``transfers``, ...).

    The world's process zero uploads, after every rank wrote its files (a barrier in a
    distributed job: ``output_dir`` must be one folder every rank writes to); the Trainer's own
    ``save_total_limit`` still decides how many folders stay on the local disk.
    """

    def __init__(self, root: str | os.PathLike[str], *, monitor: str | None = None, **manager_options: Any) -> None:
        self.manager = CheckpointManager(root, monitor=monitor, distributed=False, **manager_options)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Commit ``output_dir/checkpoint-<step>``, which the Trainer has just written whole."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its own files (its RNG state) before rank 0 reads the folder
        if not state.is_world_process_zero:
            return
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder = os.path.join(str(args.output_dir), name)
        self.manager.save_folder(folder, step=state.global_step, metrics=_metrics_at(state, self.manager.policy.monitor), name=name)

    def resume_path(self, local_dir: str | os.PathLike[str] | None = None) -> str | None:
        """:func:`resume_path` through this callback's manager, which then remembers a damaged checkpoint it
        skipped: the Trainer's save of that step replaces it (instead of refusing the step as taken)."""
        return _download_newest(self.manager, local_dir)


def _metrics_at(state: TrainerState, monitor: str | None) -> Mapping[str, float]:
    """The monitored metric if the Trainer evaluated at this very step (an older value would rank a stale model)."""
    for entry in reversed(state.log_history):
        if monitor is not None and monitor in entry and entry.get("step") == state.global_step:
            return {monitor: entry[monitor]}
    return {}


def resume_path(
    root: str | os.PathLike[str], local_dir: str | os.PathLike[str] | None = None, *,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Download the newest good checkpoint under ``root`` and return its local folder, for
    ``trainer.train(resume_from_checkpoint=...)``; None (and a warning) when there is none.

    It lands in ``local_dir/<its name>`` (a new temporary folder by default, yours to remove once
    the run is over), every file checked; a damaged newest checkpoint is skipped for the one
    before, with a warning. When the run has a :class:`CkptStoreCallback`, use its
    :meth:`~CkptStoreCallback.resume_path`: the skipped checkpoint is then replaced when the
    Trainer saves that step again.

    Raises:
        ConfigError: ``local_dir/<name>`` exists and is not empty.
    """
    return _download_newest(CheckpointManager(root, storage_options=storage_options, distributed=False), local_dir)


def _download_newest(manager: CheckpointManager, local_dir: str | os.PathLike[str] | None) -> str | None:
    base = tempfile.mkdtemp(prefix="ckptstore-hf-") if local_dir is None else os.fspath(local_dir)
    os.makedirs(base, exist_ok=True)
    incoming = tempfile.mkdtemp(prefix=".incoming-", dir=base)  # the name is known once a good one is found
    try:
        info = manager.restore_folder(incoming)
        if info is None:
            if local_dir is None:
                shutil.rmtree(base, ignore_errors=True)
            return None
        final = os.path.join(base, info.name)
        if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
            raise ConfigError(f"{final} exists and is not empty; pass resume_path a new local_dir")
        os.replace(incoming, final)
        return final
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
