"""A Hugging Face Trainer job for tests/test_hf_trainer.py, run as a fresh process.

usage: python hf_worker.py '{"root": ..., "storage_options": ..., "output_dir": ..., "out": ..., "resume": bool,
                             "hang_at": step or null, "saves": path}'

Trains a tiny GPT-2 built from a config (random weights, no hub) for ``MAX_STEPS`` steps with a
checkpoint every 2, evaluating before each, committed to ``root`` by :class:`CkptStoreCallback`.
``resume``: start from the callback's ``resume_path`` (a fresh machine: ``output_dir`` is empty).
``hang_at``: after that step, write ``<out>.hanging`` and wait to be killed. Each committed
save is appended to ``saves`` as ``{"step", "eval_loss"}``; the final weights go to ``out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from ckptstore.hf import CkptStoreCallback

MAX_STEPS = 8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, seed: int) -> None:
        self.ids = torch.randint(0, 64, (rows, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Record(TrainerCallback):
    """After the ckptstore callback: note each committed save; hang when told to."""

    def __init__(self, saves: str, hang_at: int | None, out: str) -> None:
        self.saves, self.hang_at, self.out = saves, hang_at, out

    def on_save(self, args, state, control, **kwargs):
        loss = next((e["eval_loss"] for e in reversed(state.log_history) if "eval_loss" in e and e["step"] == state.global_step), None)
        with open(self.saves, "a") as f:
            f.write(json.dumps({"step": state.global_step, "eval_loss": loss}) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.hang_at:
            Path(self.out + ".hanging").touch()
            time.sleep(600)  # killed here, mid-training


def main(root: str, storage_options: dict, output_dir: str, out: str, resume: bool, hang_at: int | None, saves: str) -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    set_seed(42)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    args = TrainingArguments(
        output_dir=output_dir, max_steps=MAX_STEPS, save_steps=2, eval_strategy="steps", eval_steps=2,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, use_cpu=True, report_to=[],
        dataloader_num_workers=0, seed=42, learning_rate=1e-3, save_total_limit=1, disable_tqdm=True,
    )
    store = CkptStoreCallback(root, keep_last=2, keep_best=1, monitor="eval_loss", storage_options=storage_options)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(24, 0), eval_dataset=Tokens(8, 1),
                      callbacks=[store, Record(saves, hang_at, out)])
    start = store.resume_path(Path(output_dir) / "resumed") if resume else None
    trainer.train(resume_from_checkpoint=start)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main(**json.loads(sys.argv[1]))
