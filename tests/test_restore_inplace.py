"""CheckpointManager.restore streams into the live state, on every store and in both formats.

What is proved here: the live tensors keep their identity and memory and receive the saved
bytes; optimizer and scheduler state come back exactly; mismatches fail before anything is
read; damage is still caught (and "latest" still falls back); a restore reads the file about
once and needs no second copy of the state in memory.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from torch import nn

from ckptstore import CheckpointManager, CorruptCheckpointError, RNGState, StateMismatchError, UnsafeCheckpointError, commit
from ckptstore.inplace import restore_checkpoint, restore_into
from ckptstore.partial import LoadReport, plan
from ckptstore.storage import open_storage

FORMATS = ["safetensors", "torch"]


def manager(store, fmt, **kwargs):
    return CheckpointManager(store.url, storage_options=store.storage_options, format=fmt, **kwargs)


def training_state(seed: int, steps: int = 2) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched}


def restored_bytes(caplog) -> list[int]:
    return [r.args[1] for r in caplog.records if r.getMessage().startswith("restored ")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_live_tensors_keep_identity_and_get_the_saved_values(store, fmt, caplog):
    saved = training_state(seed=1)
    ema = [torch.arange(6.0), torch.full((2, 3), 7.0)]
    mgr = manager(store, fmt)
    mgr.save({**saved, "ema": ema, "step": 2}, step=2)

    target = training_state(seed=2, steps=0)
    model = target["model"]
    live_ema = [torch.zeros(6), torch.zeros(2, 3)]
    params = dict(model.named_parameters())
    ptrs = {k: t.data_ptr() for k, t in model.state_dict(keep_vars=True).items()}
    row = model[0].weight[3]  # a view someone holds on a parameter
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        values = mgr.restore({**target, "ema": live_ema})

    assert values == {"step": 2, "ema": live_ema} and values["ema"][0] is live_ema[0]
    for k, t in model.state_dict(keep_vars=True).items():
        assert t.data_ptr() == ptrs[k], k  # same memory ...
        assert torch.equal(t, saved["model"].state_dict()[k]), k  # ... now holding the saved values
    assert all(params[k] is p for k, p in model.named_parameters())
    assert target["optimizer"].param_groups[0]["params"][0] is model[0].weight
    assert torch.equal(row, saved["model"][0].weight[3])
    assert all(torch.equal(a, b) for a, b in zip(live_ema, ema))
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restored ")]
    assert "11 tensors straight into live memory" in message  # 6 parameters, 3 BatchNorm buffers, 2 ema tensors


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_and_scheduler_restore_exactly_then_train_identically(store, fmt):
    saved = training_state(seed=1)
    mgr = manager(store, fmt)
    mgr.save(saved, step=2)

    fresh = training_state(seed=2, steps=0)  # a new optimizer: no state to land in yet
    busy = training_state(seed=3, steps=1)  # an optimizer with state: filled in place
    exp_avg = busy["optimizer"].state[busy["model"][0].weight]["exp_avg"]
    for target in (fresh, busy):
        assert mgr.restore(target) == {}
        got, want = target["optimizer"].state_dict(), saved["optimizer"].state_dict()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert isinstance(got["state"][0]["step"], torch.Tensor) and got["state"][0]["step"].dtype == want["state"][0]["step"].dtype
        assert target["scheduler"].state_dict() == saved["scheduler"].state_dict()
        assert target["scheduler"].get_last_lr() == saved["scheduler"].get_last_lr()
    assert busy["optimizer"].state[busy["model"][0].weight]["exp_avg"] is exp_avg

    batch = torch.randn(16, 8)
    for state in (saved, fresh, busy):
        state["optimizer"].zero_grad()
        state["model"](batch).pow(2).mean().backward()
        state["optimizer"].step()
    for a, b, c in zip(saved["model"].parameters(), fresh["model"].parameters(), busy["model"].parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_mismatch_names_the_key_before_reading_anything(store, fmt):
    mgr = manager(store, fmt)
    mgr.save({"model": nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)), "w": torch.ones(3)}, step=0)
    target = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"\['1.weight'\] has shape \(3, 16\), the checkpoint's 'model/1.weight' \(2, 16\)"):
        mgr.restore({"model": target})
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # not even 0.weight changed
    with pytest.raises(StateMismatchError, match=r"\['w'\] has shape \(4,\)"):
        mgr.restore({"w": torch.zeros(4)})


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_latest_falls_back_and_a_named_step_raises(store, fmt, caplog):
    mgr = manager(store, fmt)
    good, bad = training_state(seed=1), training_state(seed=2)
    mgr.save({"model": good["model"], "rng": RNGState(), "step": 0}, step=0)
    info = mgr.save({"model": bad["model"], "rng": RNGState(), "step": 1}, step=1)
    storage = open_storage(store.url, store.storage_options)
    path = f"{info.name}/{info.files[0].path}"
    tensor = plan(storage, path, LoadReport()).sources["model/3.weight"]  # damage tensor bytes, not the header
    data = bytearray(storage.read(path))
    data[tensor.start + 5] ^= 0x10
    with storage.open_write(path) as f:
        f.write(bytes(data))

    target = training_state(seed=3, steps=0)["model"]
    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        mgr.restore({"model": target, "rng": RNGState()}, which=1)
    assert all(torch.equal(v, untouched[k]) for k, v in target.state_dict().items())  # checked before any live byte changes
    weight = target[3].weight
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert mgr.restore({"model": target, "rng": RNGState()}) == {"step": 0}
    assert any(info.name in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)
    assert target[3].weight is weight
    assert all(torch.equal(v, good["model"].state_dict()[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_restore_reads_the_file_about_once(store, fmt, caplog):
    """Counted where the bytes arrive (the transfer's reads); on S3 also by the S3 client itself."""
    state = training_state(seed=1)
    state["model"] = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512))  # ~4 MiB, + 8 MiB Adam state
    state["optimizer"] = torch.optim.Adam(state["model"].parameters())
    state["model"](torch.randn(2, 512)).sum().backward()
    state["optimizer"].step()
    mgr = manager(store, fmt)
    size = mgr.save({"model": state["model"], "optimizer": state["optimizer"]}, step=0).size
    target = {"model": nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512))}
    target["optimizer"] = torch.optim.Adam(target["model"].parameters())
    s3_bytes: list[int] = []
    if store.kind == "s3":
        store.filesystem().s3.meta.events.register(
            "after-call.s3.GetObject", lambda parsed, **_: s3_bytes.append(parsed.get("ContentLength", 0))
        )
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        mgr.restore(target)
    [counted] = restored_bytes(caplog)
    # + the header (or zip directory and data.pkl) for planning. Local files also get a CRC pass
    # before the tensors are read: from the page cache it warmed, not counted here.
    assert (size if store.kind != "local" else size // 2) <= counted <= size + 128 * 1024
    if s3_bytes:
        assert size <= sum(s3_bytes) <= size + 128 * 1024  # the manifest, the plan, the file once
    torch.testing.assert_close(target["optimizer"].state_dict(), state["optimizer"].state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_restore_needs_no_second_copy_of_the_state_in_memory(tmp_path, fmt):
    """Peak RSS (VmHWM, reset through /proc/self/clear_refs) while restoring a 64 MiB model."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs")
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)])  # 64 MiB of float32
    mgr = CheckpointManager(tmp_path, format=fmt)
    mgr.save({"model": model}, step=0)
    target = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)])

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    rss = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    mgr.restore({"model": target})
    assert status("VmHWM") - rss < 16 * 2**20  # reading into new tensors first would add 64 MiB
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), model.parameters()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_that_cannot_land_directly_are_restored_as_before(store, fmt):
    """Tied weights, dtype casts, strided saved views, non-contiguous live tensors, RNG state."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    tied = nn.ModuleDict({"emb": emb, "head": nn.Linear(4, 10, bias=False)})
    tied["head"].weight = emb.weight
    rng = RNGState()
    mgr = manager(store, fmt)
    mgr.save({"tied": tied, "half": nn.Linear(4, 4), "t": torch.arange(12.0).reshape(3, 4).t(), "rng": rng}, step=0)
    expected = (torch.rand(3), tied.state_dict(), torch.arange(12.0).reshape(3, 4).t())

    torch.manual_seed(1)
    live_tied = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    live_tied["head"].weight = live_tied["emb"].weight
    untied = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    half = nn.Linear(4, 4).to(torch.bfloat16)
    live_t = torch.zeros(3, 4).t()  # non-contiguous: filled by copy_
    saved_half = mgr.restore(which=0)["half"]
    for model in (live_tied, untied):
        mgr.restore({"tied": model, "half": half, "t": live_t, "rng": RNGState()})
        assert torch.equal(torch.rand(3), expected[0])
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected[1].items())
        assert torch.equal(live_t, expected[2])
        assert half.weight.dtype == torch.bfloat16 and torch.equal(half.weight, saved_half["weight"].to(torch.bfloat16))
    assert live_tied["head"].weight is live_tied["emb"].weight
    assert untied["head"].weight is not untied["emb"].weight


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_result_as_reading_the_whole_file_first(store, fmt):
    """Against the old path (read everything, then restore_into), where the order of copies matters:
    the live model ties two weights that the checkpoint holds apart, in different dtypes."""
    torch.manual_seed(0)
    saved = nn.ModuleDict({"a": nn.Linear(4, 4).half(), "b": nn.Linear(4, 4)})
    mgr = manager(store, fmt)
    info = mgr.save({"model": saved, "w": torch.arange(4.0), "nested": {"xs": [torch.ones(2)], "n": 1}, "k": "v"}, step=0)

    def live() -> dict:
        torch.manual_seed(1)
        model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
        model["b"].weight = model["a"].weight
        return {"model": model, "w": torch.zeros(4), "nested": {"xs": [torch.zeros(2)]}}

    streamed, whole = live(), live()
    values = mgr.restore(streamed)
    expected = restore_into(whole, commit.read_checkpoint(mgr.storage, info))
    assert torch.equal(streamed["model"]["a"].weight, whole["model"]["a"].weight)  # b's weight: copied last
    assert all(torch.equal(streamed["model"].state_dict()[k], v) for k, v in whole["model"].state_dict().items())
    assert torch.equal(streamed["w"], whole["w"]) and values["k"] == expected["k"] == "v"
    assert values["nested"]["n"] == 1 and values["nested"]["xs"][0] is streamed["nested"]["xs"][0]
    assert torch.equal(values["nested"]["xs"][0], expected["nested"]["xs"][0])


def test_unplannable_torch_checkpoint_is_read_whole(store, caplog):
    """A sparse tensor needs torch's own unpickler: the restore reads the file as before."""
    mgr = manager(store, "torch")
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 3.0], (4,), check_invariants=True)
    mgr.save({"sparse": sparse, "w": torch.ones(3)}, step=0)
    w = torch.zeros(3)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        values = mgr.restore({"w": w})
    assert torch.equal(w, torch.ones(3)) and torch.equal(values["sparse"].to_dense(), sparse.to_dense())
    assert any("reading it whole" in r.getMessage() for r in caplog.records)


class Shifted(nn.Module):
    """v2 of a model inserted a layer in front: a load hook maps old layers.i to layers.i+1."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ParameterList([nn.Parameter(torch.zeros(3)) for _ in range(3)])

        def shift(sd, prefix, *_):
            for i in (1, 0):
                sd[f"{prefix}layers.{i + 1}"] = sd.pop(f"{prefix}layers.{i}")
            sd[f"{prefix}layers.0"] = torch.full((3,), -1.0)

        self._register_load_state_dict_pre_hook(shift)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_hooks_that_route_keys_elsewhere_see_the_saved_values(store, fmt):
    """Found in review: bytes landed by key before a key-shifting hook ran made it read overwritten memory."""
    mgr = manager(store, fmt)
    old = nn.Module()
    old.layers = nn.ParameterList([nn.Parameter(torch.full((3,), 10.0)), nn.Parameter(torch.full((3,), 11.0))])
    mgr.save({"model": old}, step=1)
    new = Shifted()
    mgr.restore({"model": new})
    assert [p[0].item() for p in new.layers] == [-1.0, 10.0, 11.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_fallback_from_a_damaged_latest_leaves_nothing_of_it_behind(store, fmt):
    """Found in review: remote bytes checked while streaming stayed in tensors the older checkpoint lacks."""
    mgr = manager(store, fmt)
    mgr.save({"model": nn.Linear(2, 2)}, step=1)
    info = mgr.save({"model": nn.Linear(2, 2), "ema": torch.full((1024,), 7.0)}, step=2)
    storage = open_storage(store.url, store.storage_options)
    path = f"{info.name}/{info.files[0].path}"
    ema_at = plan(storage, path, LoadReport()).sources["ema"].start
    data = bytearray(storage.read(path))
    data[ema_at + 100] ^= 0xFF
    with storage.open_write(path) as f:
        f.write(bytes(data))
    ema = torch.zeros(1024)
    assert mgr.restore({"model": nn.Linear(2, 2), "ema": ema}, strict=False) == {}  # step 1 holds no ema
    assert torch.equal(ema, torch.zeros(1024))


def test_torch_shape_rules_still_apply(store):
    """Found in review: torch loads a one-element tensor into a 0-d parameter; the early shape check refused it."""

    class Scale(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.scale = nn.Parameter(torch.full(shape, 5.0))

    mgr = manager(store, "safetensors")
    mgr.save({"model": Scale((1,))}, step=1)
    live = Scale(())
    mgr.restore({"model": live})
    assert live.scale.item() == 5.0


SAME_SIZE_DTYPES = [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.int32, torch.float32),
                    (torch.float32, torch.int32), (torch.float64, torch.int64), (torch.int16, torch.float16)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_saved_dtype_is_converted_into_a_live_tensor_of_another_dtype_of_the_same_size(store, fmt):
    """Bytes may land as they are only for the same dtype: fp16's -3 read as bf16 bytes would be -32 (issue 12)."""
    saved = {f"{a}-{b}": torch.tensor([-3.0, 0.5, 2.0, 96.0]).to(a) for a, b in SAME_SIZE_DTYPES}
    mgr = manager(store, fmt)
    mgr.save(saved, step=0)
    live = {f"{a}-{b}": torch.zeros(4, dtype=b) for a, b in SAME_SIZE_DTYPES}
    mgr.restore(live)
    for key, tensor in live.items():
        assert torch.equal(tensor, saved[key].to(tensor.dtype)), (key, tensor)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_transposed_shape_is_a_mismatch_though_the_element_count_agrees(store, fmt):
    mgr = manager(store, fmt)
    mgr.save({"w": torch.arange(24.0).reshape(4, 6)}, step=0)
    live = torch.zeros(6, 4)
    with pytest.raises(StateMismatchError, match=r"\['w'\] has shape \(6, 4\), the checkpoint's 'w' \(4, 6\)"):
        mgr.restore({"w": live})
    assert not live.any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_lazy_conjugate_is_filled_through_its_view_not_under_it(store, fmt):
    """A conjugate view's memory holds the conjugate of what it reads as: the saved bytes cannot
    land there as they are, they are copied through the view."""
    saved = torch.tensor([1 + 2j, 3 - 4j])
    mgr = manager(store, fmt)
    mgr.save({"c": saved}, step=0)
    live = torch.zeros(2, dtype=torch.complex64).conj()
    mgr.restore({"c": live})
    assert live.is_conj() and torch.equal(live.resolve_conj(), saved)


def landed(caplog) -> int:
    """How many tensors the restore logged as landed straight in live memory."""
    [count] = [r.args[3] for r in caplog.records if r.getMessage().startswith("restored ")]
    return count


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_checkpoint_that_cannot_be_planned_says_why_it_is_read_whole(store, caplog):
    """A nested tensor has no byte range: the restore logs (INFO) why it reads the file whole."""
    mgr = manager(store, "torch")
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    info = mgr.save({"nested": nested, "w": torch.ones(3)}, step=0)
    w = torch.zeros(3)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        mgr.restore({"w": w})
    assert torch.equal(w, torch.ones(3))
    [record] = [r for r in caplog.records if "reading it whole" in r.getMessage()]
    assert record.levelno == logging.INFO and record.name == "ckptstore"
    assert record.getMessage().startswith(f"{info.url} cannot be planned from its header (")
    assert "a nested tensor" in record.getMessage() and record.getMessage().endswith("); reading it whole")


def test_a_checkpoint_with_sparse_tensors_says_why_it_is_read_whole(store, caplog):
    """Sparse tensors are built by torch's own loader: the restore logs (INFO) which ones made it read the file whole."""
    mgr = manager(store, "torch")
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 3.0], (4,), check_invariants=True)
    info = mgr.save({"sparse": sparse, "also": sparse * 2, "w": torch.ones(3)}, step=0)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        mgr.restore({"w": torch.zeros(3)})
    [record] = [r for r in caplog.records if "reading it whole" in r.getMessage()]
    assert record.levelno == logging.INFO and record.name == "ckptstore"
    assert record.getMessage() == f"{info.url} holds sparse or quantized tensors (sparse, also); reading it whole"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_checkpoint_read_whole_still_checks_the_state_entries_it_lacks(store):
    """Read whole or streamed, ``strict`` holds: an entry of ``state`` the checkpoint lacks raises before
    anything changes, and with ``strict=False`` it is left alone and named in ``missing``."""
    mgr = manager(store, "torch")
    mgr.save({"nested": torch.nested.nested_tensor([torch.ones(2)]), "w": torch.ones(3)}, step=0)
    w, ema = torch.zeros(3), torch.zeros(2)
    with pytest.raises(StateMismatchError, match=r"holds no \['ema'\]"):
        mgr.restore({"w": w, "ema": ema})
    assert not w.any()
    restored = mgr.restore({"w": w, "ema": ema}, strict=False)
    assert restored.missing == ("ema",) and torch.equal(w, torch.ones(3)) and not ema.any()


def test_a_callable_map_location_gets_torchs_own_storages(store):
    """As with ``torch.load``, a callable ``map_location`` is called with each saved storage and its
    location, for the tensors restored in place too."""
    mgr = manager(store, "torch")
    mgr.save({"w": torch.arange(4.0), "extra": torch.ones(3)}, step=0)
    seen = []

    def keep(storage, location):
        seen.append((type(storage), location))
        return storage

    w = torch.zeros(4)
    values = mgr.restore({"w": w}, map_location=keep)
    assert torch.equal(w, torch.arange(4.0)) and torch.equal(values["extra"], torch.ones(3))
    assert seen == [(torch.UntypedStorage, "cpu")] * 2


def test_a_callable_map_location_places_only_new_tensors_of_a_safetensors_checkpoint(store, caplog):
    """safetensors has no storages: the callable places the saved tensors without a live counterpart,
    while the live ones still get their bytes straight (no second copy in memory)."""
    mgr = manager(store, "safetensors")
    mgr.save({"w": torch.arange(4.0), "extra": torch.ones(3)}, step=0)
    seen = []

    def double(tensor, location):
        seen.append((tuple(tensor.shape), location))
        return tensor * 2

    w = torch.zeros(4)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        values = mgr.restore({"w": w}, map_location=double)
    assert torch.equal(w, torch.arange(4.0)) and torch.equal(values["extra"], torch.full((3,), 2.0))
    assert seen == [((3,), "cpu")] and landed(caplog) == 1


class Drifting(torch.optim.Optimizer):
    """torch's state_dict/load_state_dict, with per-parameter state that changes kind as it trains:
    ``slow`` is a number and ``stats`` None until the second step makes them a tensor and a dict."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    state["slow"], state["stats"] = p.detach().clone(), {"norm": p.detach().norm()}
                else:
                    state["slow"], state["stats"] = 0.0, None


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_state_that_changed_kind_is_restored_as_torch_loads_it(store, fmt):
    """Where the live optimizer holds a number or None and the checkpoint a tensor or a dict of
    tensors, the saved values replace them, as ``optimizer.load_state_dict`` would."""
    weight = nn.Parameter(torch.arange(3.0))
    trained = Drifting([weight])
    trained.step()
    trained.step()
    mgr = manager(store, fmt)
    mgr.save({"optimizer": trained}, step=2)
    live = Drifting([nn.Parameter(torch.zeros(3))])
    live.step()
    mgr.restore({"optimizer": live})
    torch.testing.assert_close(live.state_dict(), trained.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_overlapping_live_tensors_are_written_in_saved_order(store, fmt):
    """Two live views share memory and only one of them can take its bytes as they are: the
    overlap ends up holding the tensor saved last, as copying each saved tensor in would."""
    mgr = manager(store, fmt)
    mgr.save({"b": torch.full((4,), 2.0, dtype=torch.float64), "a": torch.full((4,), 1.0)}, step=0)
    flat = torch.zeros(6)
    mgr.restore({"a": flat[:4], "b": flat[2:]})
    assert flat.tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_adjacent_views_of_one_flat_buffer_each_land_straight_in_it(store, fmt, caplog):
    """Parameters that are consecutive views of one flat buffer share no bytes: each gets its saved
    bytes straight in its memory (none is read into a new tensor first)."""
    mgr = manager(store, fmt)
    mgr.save({"a": torch.arange(4.0), "b": torch.arange(4.0, 8.0)}, step=0)
    flat = torch.zeros(8)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        mgr.restore({"a": flat[:4], "b": flat[4:]})
    assert torch.equal(flat, torch.arange(8.0)) and landed(caplog) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_live_tensors_share_no_bytes_and_conflict_with_nothing(store, fmt, caplog):
    """Empty tensors (a layer without inputs has a (n, 0) weight) share no bytes with anything, each other included."""
    mgr = manager(store, fmt)
    mgr.save({"a": torch.zeros(3, 0), "b": torch.zeros(3, 0), "w": torch.ones(2)}, step=0)
    live = {"a": torch.zeros(3, 0), "b": torch.zeros(3, 0), "w": torch.zeros(2)}
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        mgr.restore(live)
    assert torch.equal(live["w"], torch.ones(2)) and landed(caplog) == 3


class Tagged(torch.Tensor):
    """A tensor subclass: torch.save pickles its class, which only ``weights_only=False`` loads."""


def test_a_pickled_class_is_refused_unless_weights_only_is_false(store):
    """restore_checkpoint is safe by default: a checkpoint whose pickle names a class beyond torch's
    allowlist is refused before anything changes; ``weights_only=False`` restores it."""
    mgr = manager(store, "torch")
    info = mgr.save({"tagged": torch.ones(2).as_subclass(Tagged), "w": torch.ones(2)}, step=0)
    w = torch.zeros(2)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        restore_checkpoint(mgr.storage, info, {"w": w})
    assert not w.any()
    values = mgr.restore({"w": w}, weights_only=False)
    assert type(values["tagged"]) is Tagged and torch.equal(w, torch.ones(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mismatch_inside_nested_containers_names_its_full_path(store, fmt):
    """A shape mismatch deep in nested dicts names the whole path to the live tensor."""
    mgr = manager(store, fmt)
    mgr.save({"ema": {"shadow": {"w": torch.ones(3)}}}, step=0)
    with pytest.raises(StateMismatchError, match=r"^state\['ema'\]\['shadow'\]\['w'\] has shape \(4,\)"):
        mgr.restore({"ema": {"shadow": {"w": torch.zeros(4)}}})


@pytest.mark.parametrize("fmt", FORMATS)
def test_restore_checkpoint_is_strict_by_default(store, fmt):
    """Called without ``strict``, restore_checkpoint refuses a target entry the checkpoint lacks, before anything changes."""
    mgr = manager(store, fmt)
    info = mgr.save({"w": torch.ones(3)}, step=0)
    w, ema = torch.zeros(3), torch.zeros(2)
    with pytest.raises(StateMismatchError, match=r"holds no \['ema'\]"):
        restore_checkpoint(mgr.storage, info, {"w": w, "ema": ema})
    assert not w.any() and not ema.any()


@pytest.mark.parametrize("content", [[torch.ones(2), 3], [torch.sparse_coo_tensor([[0]], [1.0], (2,), check_invariants=True)]],
                         ids=["planned", "read-whole"])
def test_a_checkpoint_whose_state_is_not_a_dict_names_what_it_holds(store, content):
    """A data file whose top-level object is a list (not a state dict) is corrupt, and the error names its type and URL."""
    import crc32c

    mgr = manager(store, "torch")
    info = mgr.save({"w": torch.ones(2)}, step=1)
    buf = io.BytesIO()
    torch.save(content, buf)
    data = buf.getvalue()
    storage = open_storage(info.url, store.storage_options)
    manifest = json.loads(storage.read("manifest.json"))
    manifest["files"][0].update(size=len(data), crc32c=f"{crc32c.crc32c(data):08x}")
    with storage.open_write(info.files[0].path) as f:
        f.write(data)
    storage.fs.pipe_file(storage._full("manifest.json"), json.dumps(manifest).encode())
    w = torch.zeros(2)
    with pytest.raises(CorruptCheckpointError) as err:
        mgr.restore({"w": w}, which=1)
    assert str(err.value) == f"{info.url} holds a list, not a state dict"
    assert not w.any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mismatch_inside_a_list_names_its_full_path(store, fmt):
    """A shape mismatch in a list of tensors names the list index in the path to the live tensor."""
    mgr = manager(store, fmt)
    mgr.save({"ema": {"shadows": [torch.ones(2), torch.ones(3)]}}, step=0)
    first = torch.zeros(2)
    with pytest.raises(StateMismatchError, match=r"^state\['ema'\]\['shadows'\]\[1\] has shape \(4,\), the checkpoint's"):
        mgr.restore({"ema": {"shadows": [first, torch.zeros(4)]}})
    assert not first.any()


class Deferred(torch.optim.Optimizer):
    """torch's state_dict/load_state_dict; each parameter's ``avg`` starts as an uninitialized
    (lazy) buffer, replaced by a tensor on the first step."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["avg"] = torch.nn.parameter.UninitializedBuffer()

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if torch.nn.parameter.is_lazy(self.state[p]["avg"]):
                    self.state[p]["avg"] = torch.zeros_like(p)
                self.state[p]["avg"].mul_(0.5).add_(p.detach())


@pytest.mark.parametrize("fmt", FORMATS)
def test_uninitialized_lazy_optimizer_state_is_replaced_by_the_saved_tensors(store, fmt):
    """Lazy live state has no memory to land bytes in: the saved values replace it, as ``load_state_dict`` would."""
    trained = Deferred([nn.Parameter(torch.arange(3.0))])
    trained.step()
    trained.step()
    mgr = manager(store, fmt)
    mgr.save({"optimizer": trained}, step=2)
    live = Deferred([nn.Parameter(torch.zeros(3))])
    mgr.restore({"optimizer": live})
    torch.testing.assert_close(live.state_dict(), trained.state_dict(), rtol=0, atol=0)
    assert torch.equal(live.state[live.param_groups[0]["params"][0]]["avg"], torch.arange(3.0) * 1.5)
