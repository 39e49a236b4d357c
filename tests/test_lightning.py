"""PyTorch Lightning through ckptstore.lightning (issue 16, point 1): a real Trainer on CPU,
checkpoints committed to the store by CkptStoreCheckpoint, the job killed (SIGKILL, and
SIGTERM: a spot notice) mid-training, resumed with fit(ckpt_path="last") in a fresh process,
ending bit-identical to an uninterrupted run, with the retention the user configured. And
CkptStoreIO under Lightning's own ModelCheckpoint: atomic, verified files at any URL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from ckptstore import CheckpointManager
from ckptstore.storage import open_storage

WORKER = Path(__file__).with_name("lightning_worker.py")
TOTAL_STEPS = 24  # lightning_worker: 3 epochs of 8 batches, a save every 2 steps from epoch 2 (val_loss exists)
HANG_AT = 12  # batch 4 of epoch 2


def command(root: str, options: dict, out: Path, **kw) -> list[str]:
    args = dict(root=root, storage_options=options, out=str(out), resume=False, hang_at=None)
    return [sys.executable, str(WORKER), json.dumps({**args, **kw})]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning-ref")
    subprocess.run(command(str(tmp / "root"), {}, tmp / "ref.pt"), check=True, timeout=300)
    return torch.load(tmp / "ref.pt", weights_only=True)


def start_and_stop(cmd: list[str], out: Path, step: int, how: signal.Signals = signal.SIGKILL) -> None:
    """Run a lightning_worker job until it reports it hangs after ``step``, then send it ``how`` and wait for it."""
    victim = subprocess.Popen(cmd)
    hanging = Path(f"{out}.hanging")
    deadline = time.monotonic() + 240
    while not hanging.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hanging.exists(), f"the job never reached step {step} (exit code {victim.poll()})"
    victim.send_signal(how)
    victim.wait(timeout=120)


def kept_by_policy(saves: list[dict]) -> list[int]:
    """keep_last=2, keep_best=1 by the highest val_loss (ties: the newer), over every save of both processes."""
    newest = sorted(s["step"] for s in saves)[-2:]
    best = max(saves, key=lambda s: (s["val_loss"], s["step"]))["step"]
    return sorted({*newest, best})


# make test: SIGKILL on S3, SIGTERM on local disk; make test-long: both on every store that another process reaches
KILLS = [
    pytest.param("s3", "SIGKILL", id="s3-SIGKILL", marks=pytest.mark.remote),
    pytest.param("local", "SIGTERM", id="local-SIGTERM"),
    pytest.param("local", "SIGKILL", id="local-SIGKILL", marks=pytest.mark.long),
    pytest.param("s3", "SIGTERM", id="s3-SIGTERM", marks=[pytest.mark.remote, pytest.mark.long]),
    pytest.param("file", "SIGKILL", id="file-SIGKILL", marks=pytest.mark.long),
    pytest.param("file", "SIGTERM", id="file-SIGTERM", marks=pytest.mark.long),
    pytest.param("gcs", "SIGKILL", id="gcs-SIGKILL", marks=[pytest.mark.remote, pytest.mark.long]),
    pytest.param("gcs", "SIGTERM", id="gcs-SIGTERM", marks=[pytest.mark.remote, pytest.mark.long]),
]


@pytest.mark.parametrize(("process_store", "kill"), KILLS, indirect=["process_store"])
def test_a_killed_trainer_resumes_from_last_bit_identical(process_store, kill, uninterrupted, tmp_path):
    opts = process_store.storage_options
    out = tmp_path / "run.pt"
    start_and_stop(command(process_store.url, opts, out, hang_at=HANG_AT), out, HANG_AT, getattr(signal, kill))  # mid-epoch
    mgr = CheckpointManager(process_store.url, storage_options=opts)
    # SIGKILL: the newest is the save before; SIGTERM: the callback saved this step before Lightning stopped
    assert mgr.latest().step == (HANG_AT - 2 if kill == "SIGKILL" else HANG_AT)

    subprocess.run(command(process_store.url, opts, out, resume=True), check=True, timeout=300)
    resumed = torch.load(out, weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), f"{key} differs from the uninterrupted run"
    saves = [json.loads(line) for line in Path(f"{out}.saves").read_text().splitlines()]
    steps = [s["step"] for s in saves]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS  # the resumed job went on, never repeated a step
    assert [c.step for c in mgr.checkpoints()] == kept_by_policy(saves)


@pytest.mark.long  # make test-long (10 s): make test keeps its margin under 15 minutes
def test_background_saves_resume_bit_identical(uninterrupted, tmp_path):
    """background=True: the manager writes while training goes on; a SIGKILLed job resumes exactly all the same."""
    root, out = str(tmp_path / "root"), tmp_path / "run.pt"
    start_and_stop(command(root, {}, out, hang_at=HANG_AT, background=True), out, HANG_AT)
    assert CheckpointManager(root).latest().step == HANG_AT - 2
    subprocess.run(command(root, {}, out, resume=True, background=True), check=True, timeout=300)
    resumed = torch.load(out, weights_only=True)
    assert all(torch.equal(resumed[k], t) for k, t in uninterrupted.items())
    assert [c.step for c in CheckpointManager(root).checkpoints()][-1] == TOTAL_STEPS  # the last save committed at the end


@pytest.mark.long  # make test-long (9 s): the fallback itself is the manager's, shown on every store in make test
def test_last_skips_a_damaged_checkpoint_and_says_so(uninterrupted, tmp_path):
    root = tmp_path / "root"
    start_and_stop(command(str(root), {}, tmp_path / "run.pt", hang_at=HANG_AT + 2), tmp_path / "run.pt", HANG_AT + 2)
    mgr = CheckpointManager(str(root))
    newest = mgr.latest()
    assert newest.step == HANG_AT and len(mgr.checkpoints()) == 2
    storage = open_storage(str(root))
    path = f"{newest.name}/{newest.files[0].path}"
    data = bytearray(storage.read(path))
    data[len(data) // 2] ^= 1  # a flipped bit in the newest: only the CRC32C can tell
    with storage.open_write(path) as f:
        f.write(bytes(data))
    done = subprocess.run(command(str(root), {}, tmp_path / "run.pt", resume=True), check=False, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint {newest.name} is unusable, trying the one before" in done.stderr
    resumed = torch.load(tmp_path / "run.pt", weights_only=True)
    assert all(torch.equal(resumed[k], t) for k, t in uninterrupted.items())  # from the step before, still exact


# -- CkptStoreIO: Lightning's own ModelCheckpoint, files through ckptstore -----------------------------
def lightning_checkpoint() -> dict:
    """What Lightning hands a CheckpointIO: tensors, nested plain values, an OrderedDict, tuples."""
    from collections import OrderedDict

    return {"epoch": 1, "global_step": 8, "state_dict": OrderedDict(w=torch.arange(4096.0)),
            "optimizer_states": [{"param_groups": [{"lr": 0.01, "betas": (0.9, 0.999)}], "state": {}}],
            "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2}}}}, "hyper_parameters": {"width": 8}}


def test_ckptstore_io_saves_loads_and_removes_on_every_store(store):
    from ckptstore.lightning import CkptStoreIO

    io = CkptStoreIO(store.storage_options)
    url = store.join("epoch=1-step=8.ckpt")
    io.save_checkpoint(lightning_checkpoint(), url)
    raw = store.filesystem().cat_file(store.path("epoch=1-step=8.ckpt"))
    assert raw[:2] == b"PK"  # a plain torch zip: stock torch.load reads it
    loaded = io.load_checkpoint(url)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4096.0))
    assert loaded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    io.remove_checkpoint(url)
    assert not store.filesystem().exists(store.path("epoch=1-step=8.ckpt"))


def test_ckptstore_io_refuses_a_flipped_byte_that_torch_load_accepts(store, tmp_path):
    from ckptstore import CorruptCheckpointError
    from ckptstore.lightning import CkptStoreIO

    io = CkptStoreIO(store.storage_options)
    url = store.join("last.ckpt")
    io.save_checkpoint(lightning_checkpoint(), url)
    data = bytearray(store.filesystem().cat_file(store.path("last.ckpt")))
    data[data.find(torch.arange(4096.0).numpy().tobytes()[4000:4016]) + 3] ^= 1  # inside the tensor's bytes
    store.filesystem().pipe_file(store.path("last.ckpt"), bytes(data))
    (tmp_path / "copy.ckpt").write_bytes(bytes(data))
    assert not torch.equal(torch.load(tmp_path / "copy.ckpt", weights_only=True)["state_dict"]["w"], torch.arange(4096.0))
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt: record .* fails its CRC32"):
        io.load_checkpoint(url)


def test_a_failed_save_leaves_the_previous_file_whole(store):
    from ckptstore.lightning import CkptStoreIO

    io = CkptStoreIO(store.storage_options)
    url = store.join("last.ckpt")
    io.save_checkpoint(lightning_checkpoint(), url)
    before = store.filesystem().cat_file(store.path("last.ckpt"))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("the disk filled up")

    with pytest.raises(RuntimeError, match="the disk filled up"):
        io.save_checkpoint({**lightning_checkpoint(), "state_dict": {"w": torch.ones(8)}, "z": Unpicklable()}, url)
    assert store.filesystem().cat_file(store.path("last.ckpt")) == before


def test_lightnings_per_call_storage_options_are_fsspec_options(store):
    from ckptstore.lightning import CkptStoreIO

    url = store.join("w.ckpt")
    CkptStoreIO().save_checkpoint(lightning_checkpoint(), url, storage_options=store.storage_options)  # trainer.save_checkpoint's
    assert torch.equal(CkptStoreIO(store.storage_options).load_checkpoint(url)["state_dict"]["w"], torch.arange(4096.0))
    with pytest.raises(TypeError, match=r"^storage_options must be a dict of fsspec options, got str$"):
        CkptStoreIO().save_checkpoint(lightning_checkpoint(), url, storage_options="s3")


@pytest.mark.parametrize("background", [False, True], ids=["", "async"])
@pytest.mark.parametrize("store", [pytest.param("local", id="local"), pytest.param("memory", id="memory")], indirect=True)
def test_lightning_model_checkpoint_writes_through_ckptstore_io_and_resumes(store, background):
    import lightning
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from ckptstore.lightning import CkptStoreIO

    from lightning_worker import Tiny, loaders

    class BatchCounter(lightning.Callback):
        seen = 0

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.seen += 1

    def trainer(epochs: int, *more: lightning.Callback) -> lightning.Trainer:
        checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=store.url, save_top_k=2, monitor="val_loss", save_last=True)
        io = CkptStoreIO(store.storage_options)
        return lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0,
                                 callbacks=[checkpoint, *more], plugins=[AsyncCheckpointIO(io) if background else io])

    lightning.seed_everything(1, verbose=False)
    first = trainer(2)
    first.fit(Tiny(), *loaders())
    names = sorted(store.filesystem().ls(store.path(), detail=False))
    assert [n.rsplit("/", 1)[1] for n in names if n.endswith("last.ckpt")] == ["last.ckpt"]
    assert len([n for n in names if n.endswith(".ckpt")]) == 3  # top 2 and last: Lightning's own rotation, through remove_checkpoint
    batches = BatchCounter()
    second = trainer(3, batches)
    second.fit(Tiny(), *loaders(), ckpt_path=store.join("last.ckpt"))
    assert second.current_epoch == 3 and second.global_step == 24 and batches.seen == 8  # epoch 3 only: it resumed


@pytest.mark.parametrize("store", [pytest.param("memory", id="memory")], indirect=True)
def test_best_and_an_explicit_url_restore_exactly_those(store):
    import lightning

    from ckptstore.lightning import CkptStoreCheckpoint

    from lightning_worker import Tiny, loaders

    checkpoint = CkptStoreCheckpoint(store.url, keep_last=2, keep_best=1, monitor="val_loss", mode="max",
                                     every_n_epochs=1, storage_options=store.storage_options)
    trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0, callbacks=[checkpoint])
    trainer.fit(Tiny(), *loaders())
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    best = mgr.best()
    assert checkpoint.best_model_path == best.url
    again = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                              enable_model_summary=False, num_sanity_val_steps=0, callbacks=[checkpoint])
    again.fit(Tiny(), *loaders(), ckpt_path="last")  # a fresh trainer: restores step 24, so trains nothing
    assert again.global_step == 24 and checkpoint._pointers is None  # the "last" pointer's folder is gone
    other = next(c for c in mgr.checkpoints() if c.name != best.name)  # each restore below must pick its own
    for ckpt_path, which in [("best", best), (other.url, other)]:
        fresh = Tiny()
        trainer.validate(fresh, loaders()[1], ckpt_path=ckpt_path, verbose=False)
        saved = mgr.restore(None, which=which.name)["state_dict"]
        assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)


@pytest.mark.parametrize("plugin", ["async", "torch-io-subclass", "strategy-that-saves-itself"])
def test_a_trainer_with_another_checkpoint_io_is_refused_by_name(plugin, tmp_path):
    import lightning
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from ckptstore import ConfigError
    from ckptstore.lightning import CkptStoreCheckpoint

    from lightning_worker import Tiny, loaders

    class MyIO(TorchCheckpointIO):
        pass

    class SavesItself(SingleDeviceStrategy):  # as DeepSpeed and sharded FSDP do: no CheckpointIO involved
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            raise AssertionError("never reached")

    checkpoint = CkptStoreCheckpoint(str(tmp_path / "root"), every_n_epochs=1)
    extra = {"plugins": [AsyncCheckpointIO(checkpoint.io) if plugin == "async" else MyIO()]} if plugin != "strategy-that-saves-itself" \
        else {"strategy": SavesItself(device="cpu")}
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[checkpoint], **extra)
    expected = {"async": "pass CkptStoreCheckpoint\\(..., background=True\\)", "torch-io-subclass": "checkpoints through MyIO",
                "strategy-that-saves-itself": "SavesItself writes checkpoints itself, not through a CheckpointIO"}[plugin]
    with pytest.raises(ConfigError, match=expected):
        trainer.fit(Tiny(), *loaders())
    assert not (tmp_path / "root").exists() or CheckpointManager(str(tmp_path / "root")).checkpoints() == []
