"""A Lightning job for tests/test_lightning.py, run as a fresh process.

usage: python lightning_worker.py '{"root": ..., "storage_options": ..., "out": ..., "resume": bool, "hang_at": step or null,
                                    "background": bool}'

Trains a tiny model with dropout for ``EPOCHS`` epochs of ``BATCHES`` batches, validating
each epoch (``val_loss``), through :class:`CkptStoreCheckpoint` (a save every 2 steps;
keep_last=2, keep_best=1 by the highest val_loss). The train loader is resumable (Lightning fast-forwards
only such a loader mid-epoch). ``resume``: ``fit(ckpt_path="last")``. ``hang_at``: after that
step, let a background save finish, write ``<out>.hanging`` and wait for SIGTERM (or SIGKILL). The final weights go to ``out``,
every committed save to ``<out>.saves`` as ``{"step", "val_loss"}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptstore.lightning import CkptStoreCheckpoint

EPOCHS, BATCHES = 3, 8


class ResumableLoader(DataLoader):
    """Counts the batches it handed out this epoch; after ``load_state_dict`` skips as many."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed, self.skip = 0, 0

    def __iter__(self):
        skip, self.skip, self.handed = self.skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            self.handed += 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"handed": self.handed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["handed"]


class Tiny(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)}


class Hang(lightning.Callback):
    def __init__(self, at: int | None, marker: str) -> None:
        self.at, self.marker = at, marker

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            trainer.checkpoint_callback.manager.wait()  # the kill comes after the last save committed, in either mode
            Path(self.marker).touch()
            deadline = time.monotonic() + 600
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.02)


class Record(lightning.Callback):
    def __init__(self, checkpoint: CkptStoreCheckpoint, out: str) -> None:
        self.checkpoint, self.out, self.seen = checkpoint, out, 0

    def on_train_batch_end(self, trainer, *args):  # runs before the checkpoint callback: look at the one before
        self._note()

    def on_train_end(self, trainer, *args):
        self._note()

    def on_exception(self, trainer, *args):  # Lightning stops a SIGTERMed job with an exception
        self._note()

    def _note(self) -> None:
        saved = self.checkpoint._last_global_step_saved
        if saved > self.seen:
            self.seen = saved
            info = next(c for c in self.checkpoint.manager.checkpoints() if c.step == saved)
            with open(self.out + ".saves", "a") as f:
                f.write(json.dumps({"step": saved, "val_loss": info.metrics.get("val_loss")}) + "\n")


def loaders() -> tuple[ResumableLoader, DataLoader]:
    """The training data (resumable) and the validation data: fixed, whatever the seed."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCHES * 4, 4, generator=g), torch.randn(BATCHES * 4, 1, generator=g)
    return ResumableLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)


def main(root: str, storage_options: dict, out: str, resume: bool, hang_at: int | None, background: bool = False) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lightning.seed_everything(1, verbose=False)
    model = Tiny()
    train, val = loaders()
    # mode="max": the best is an early step, so keep_best keeps what keep_last would not
    checkpoint = CkptStoreCheckpoint(root, keep_last=2, keep_best=1, monitor="val_loss", mode="max", every_n_train_steps=2,
                                     storage_options=storage_options, background=background)
    trainer = lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                                callbacks=[Hang(hang_at, out + ".hanging"), Record(checkpoint, out), checkpoint])
    trainer.fit(model, train, val, ckpt_path="last" if resume else None)
    if not trainer.received_sigterm:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main(**json.loads(sys.argv[1]))
