"""Checkpoint files written by the real libraries, not imitations (issue 11, point 9).

Each helper writes into ``folder`` with the stock writer and returns what a test needs to
read it back with the stock loader. Nothing touches the network: models are built from
configs with random weights. Lightning and transformers are optional test dependencies
(the ``frameworks`` extra); they are imported inside the helpers, so importing this module
needs neither (and never pulls in torchvision).

``lightning_ckpt``   a ``.ckpt`` from ``lightning.Trainer.fit`` and its ``ModelCheckpoint``.
``hf_pretrained``    ``save_pretrained`` of a tiny random GPT-2: one safetensors file, sharded
                     safetensors with an index, and the same two as ``pytorch_model*.bin``.
``legacy_torch``     ``torch.save(..., _use_new_zipfile_serialization=False)`` (torch < 1.6).
``zip_torch``        a plain ``torch.save`` file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_SHARD_SIZE = "20KB"  # GPT-2 below is ~50 kB in float32: several shards


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the frameworks' banners, warnings and progress bars (GPU available, num_workers, loading weights)."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers")]
    levels = [lg.level for lg in loggers]
    hf_logging = sys.modules.get("transformers.utils.logging")
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


# -- Lightning ------------------------------------------------------------------------------
def lit_model_class() -> type:
    """A tiny LightningModule class (a function, so this module imports without lightning)."""
    import lightning

    class TinyLit(lightning.LightningModule):
        def __init__(self, width: int = 8, classes: int = 3, notes: Any = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(width, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, classes))
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # a non-parameter entry

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.calls += 1
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)}

    TinyLit.__qualname__ = TinyLit.__name__ = "TinyLit"
    return TinyLit


def lightning_ckpt(folder: Path, *, seed: int = 0, notes: Any = None) -> tuple[Path, Any]:
    """Fit ``TinyLit`` for one epoch of 4 random batches; return (the ``.ckpt``, the trained module).

    ``notes`` is a hyperparameter saved in the checkpoint as it is (``save_hyperparameters``).
    """
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    lightning.seed_everything(seed, verbose=False)
    model = lit_model_class()(width=8, classes=3, notes=notes)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    callback = ModelCheckpoint(dirpath=folder, filename="tiny-{epoch}", save_last=False)
    with quiet():
        trainer = lightning.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[callback], default_root_dir=folder,
        )
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return Path(callback.best_model_path), model


# -- Hugging Face -----------------------------------------------------------------------------
def hf_config() -> Any:
    """A tiny GPT-2 (tied ``lm_head.weight`` and ``transformer.wte.weight``)."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)


def hf_model(*, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 from :func:`hf_config`, no hub access."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(hf_config()).eval()


def hf_pretrained(folder: Path, *, seed: int = 0) -> tuple[dict[str, Path], Any]:
    """One model saved four ways, each in a folder with its ``config.json``; return ({layout: folder}, the model).

    ``single``: ``save_pretrained`` (model.safetensors). ``sharded``: ``save_pretrained`` with
    ``max_shard_size`` :data:`HF_SHARD_SIZE` (model.safetensors.index.json and several shards).
    ``bin`` and ``bin-sharded``: pytorch_model.bin, or pytorch_model.bin.index.json and shards,
    as ``save_pretrained(safe_serialization=False)`` wrote them. transformers 5 ignores that flag
    and has no ``.bin`` writer left, so then they are written the way transformers 4 did:
    ``huggingface_hub.split_torch_state_dict_into_shards`` and a stock ``torch.save`` per shard.
    """
    model = hf_model(seed=seed)
    out = {}
    with quiet():
        for layout, kwargs in {"single": {}, "sharded": {"max_shard_size": HF_SHARD_SIZE}}.items():
            model.save_pretrained(folder / layout, **kwargs)
            out[layout] = folder / layout
        for layout, size in {"bin": "50GB", "bin-sharded": HF_SHARD_SIZE}.items():
            path = out[layout] = folder / layout
            with contextlib.suppress(TypeError):  # should a later transformers refuse the flag outright
                model.save_pretrained(path, safe_serialization=False, max_shard_size=size)
            if not any(path.glob("pytorch_model*.bin")):  # transformers 5: safetensors again, or nothing
                path.mkdir(parents=True, exist_ok=True)
                for name in file_names(path):
                    if name.endswith((".safetensors", ".safetensors.index.json")):
                        (path / name).unlink()
                _save_bin_shards(model.state_dict(), path, size)
    return out, model


def _save_bin_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str) -> None:
    """transformers 4's ``.bin`` writer: split by size, ``torch.save`` each shard, an index if several."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        torch.save({k: state[k].contiguous() for k in names}, folder / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# -- plain torch -----------------------------------------------------------------------------
def legacy_torch(path: Path, obj: Any) -> Path:
    """``obj`` written the torch < 1.6 way: one pickle stream, no zip index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def zip_torch(path: Path, obj: Any) -> Path:
    """``obj`` written by a stock ``torch.save`` (a zip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def file_names(folder: Path) -> list[str]:
    """The files under ``folder``, relative, sorted (what ``save_pretrained`` wrote)."""
    return sorted(os.path.relpath(p, folder) for p in folder.rglob("*") if p.is_file())
