"""Files from the real writers, read by ckptstore and by the stock loaders: the same tensors (issue 11, point 9).

Writers (tests/real_writers.py, once per module, no hub access, random init): a Lightning
``.ckpt`` from ``Trainer.fit`` with ``ModelCheckpoint``; Hugging Face ``save_pretrained`` of a tiny
GPT-2 as one safetensors file and sharded with an index (plus ``pytorch_model*.bin``); stock
``torch.save`` files, zip and legacy (torch < 1.6). Stock loaders: ``torch.load(weights_only=True)``,
``safetensors.torch.load_file``, ``from_pretrained(..., ignore_mismatched_sizes=True)`` and
``load_from_checkpoint``. Every comparison is tensor for tensor: same dtype, shape and values.

Lightning and transformers are the ``frameworks`` extra; a test whose library is absent skips.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors.torch
import torch

import ckptstore
import real_writers
from ckptstore import ConfigError, load_partial
from ckptstore.cli import main as cli_main
from ckptstore.convert import convert
from ckptstore.partial import describe
from ckptstore.storage import open_storage

NOTES = {"tags": {"warmup", "ema"}, "salt": b"\x00\xffsalt", "phase": 1 + 2j}  # hyperparameters torch.load accepts

# -- fixtures: the files, written once ----------------------------------------------------------
@pytest.fixture(scope="module")
def lit(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A Lightning ``.ckpt`` (``ckpt``), the trained module (``model``) and its class (``cls``)."""
    pytest.importorskip("lightning")
    folder = tmp_path_factory.mktemp("lightning")
    ckpt, model = real_writers.lightning_ckpt(folder / "plain")
    odd, _ = real_writers.lightning_ckpt(folder / "odd", notes=NOTES)
    return SimpleNamespace(ckpt=ckpt, odd=odd, model=model, cls=type(model), folder=folder)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``save_pretrained`` folders by layout (``layouts``), the model (``model``), its config and class."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    layouts, model = real_writers.hf_pretrained(folder)
    return SimpleNamespace(layouts=layouts, model=model, config=real_writers.hf_config(), cls=transformers.GPT2LMHeadModel,
                           folder=folder)


def from_pretrained(hf: SimpleNamespace, folder: Path, config: Any = None) -> tuple[Any, dict[str, Any]]:
    """The stock loader, quietly: (model, loading info with missing/unexpected/mismatched keys)."""
    with real_writers.quiet():
        return hf.cls.from_pretrained(folder, config=config or hf.config, ignore_mismatched_sizes=True,
                                      output_loading_info=True)


# -- helpers -------------------------------------------------------------------------------
def assert_same(got: Any, want: Any, where: str = "", *, any_mapping: bool = False) -> None:
    """Equal trees: tensors with the same dtype, shape and values; containers of the same type; plain values equal.

    ``any_mapping``: a plain dict may stand for an OrderedDict (keys still in the same order), as
    after a trip through safetensors, whose state tree keeps no mapping types.
    """
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, not a tensor"
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), where
        assert torch.equal(got, want), where
    elif isinstance(want, Mapping):
        assert (isinstance(got, Mapping) if any_mapping else type(got) is type(want)), f"{where}: {type(got).__name__}"
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}", any_mapping=any_mapping)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}", any_mapping=any_mapping)
    else:
        assert type(got) is type(want) and got == want, where


def assert_same_state(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Two state dicts with the same keys (in any order) and the same tensors."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert_same(got[k], want[k], k)


def flat_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested tree by "/"-joined path, as ckptstore names them."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, child in items for k, v in flat_tensors(child, f"{prefix}/{key}" if prefix else str(key)).items()}


def described(desc: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    return {t["name"]: (t["dtype"], t["shape"]) for t in desc["tensors"]}


def expected_description(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, list[int]]]:
    return {k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in tensors.items()}


def upload(store: Any, local: Path, name: str) -> str:
    """Copy a file, or a folder's files, to ``name`` under the store's root; return its URL."""
    storage = open_storage(store.url, store.storage_options)
    for path in [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file()):
        rel = name if path == local else f"{name}/{path.relative_to(local).as_posix()}"
        with storage.open_write(rel) as f:
            f.write(path.read_bytes())
    return storage.url(name)


def shards_merged(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded ``save_pretrained`` folder, read shard by shard with the stock loaders."""
    index = next(folder.glob("*.index.json"))
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        if shard.endswith(".safetensors"):
            merged.update(safetensors.torch.load_file(folder / shard))
        else:
            merged.update(torch.load(folder / shard, weights_only=True))
    return merged


def index_file(hf: SimpleNamespace, layout: str) -> Path:
    return next(hf.layouts[layout].glob("*.index.json"))


# -- the set-up -----------------------------------------------------------------------------
def test_frameworks_do_not_pull_in_torchvision(lit, hf):
    """The only torchvision on the index is a CUDA build that breaks imports against the CPU torch."""
    assert "torchvision" not in sys.modules


# -- Lightning -------------------------------------------------------------------------------
def test_lightning_trainer_wrote_a_real_checkpoint(lit):
    stock = torch.load(lit.ckpt, weights_only=True)
    assert lit.ckpt.suffix == ".ckpt" and stock["global_step"] == 4 and "pytorch-lightning_version" in stock
    assert stock["optimizer_states"] and stock["lr_schedulers"] and stock["hyper_parameters"] == {"width": 8, "classes": 3, "notes": None}
    assert any(k.startswith("ModelCheckpoint") for k in stock["callbacks"])


def test_lightning_load_equals_torch_load(store, lit):
    url = upload(store, lit.ckpt, lit.ckpt.name)  # "tiny-epoch=0.ckpt": Lightning's "=" in a URL
    got = ckptstore.load(url, storage_options=store.storage_options)
    assert_same(got, torch.load(lit.ckpt, weights_only=True))


def test_lightning_load_partial_equals_load_from_checkpoint(store, lit):
    url = upload(store, lit.ckpt, lit.ckpt.name)
    target = lit.cls(width=8, classes=3)
    report = load_partial(url, target, key="state_dict", strict=True, storage_options=store.storage_options)
    assert report.loaded == sorted(lit.model.state_dict())
    assert (report.missing, report.unexpected, report.skipped_shape, report.cast) == ([], [], {}, {})
    with real_writers.quiet():
        stock = lit.cls.load_from_checkpoint(lit.ckpt, map_location="cpu")
    assert_same_state(target.state_dict(), stock.state_dict())
    assert_same_state(target.state_dict(), lit.model.state_dict())


def test_lightning_nested_keys_and_key_map(lit):
    stock = torch.load(lit.ckpt, weights_only=True)
    exp_avg = {k: torch.zeros_like(v["exp_avg"]) for k, v in stock["optimizer_states"][0]["state"].items()}
    report = load_partial(lit.ckpt, {f"{k}/exp_avg": v for k, v in exp_avg.items()}, key="optimizer_states/0/state")
    assert report.loaded == sorted(f"{k}/exp_avg" for k in exp_avg) and report.missing == []
    for k, v in exp_avg.items():
        assert_same(v, stock["optimizer_states"][0]["state"][k]["exp_avg"], str(k))
    target = lit.cls(width=8, classes=3)  # the same load, by renaming instead of key=
    report = load_partial(lit.ckpt, target, key_map=lambda k: k.removeprefix("state_dict/") if k.startswith("state_dict/") else None)
    assert report.loaded == sorted(stock["state_dict"]) and report.unexpected == []
    assert_same_state(target.state_dict(), stock["state_dict"])


def test_lightning_describe_and_inspect_show_every_tensor(lit, capsys):
    stock = torch.load(lit.ckpt, weights_only=True)
    desc = describe(lit.ckpt)
    assert described(desc) == expected_description(flat_tensors(stock))
    assert desc["values"]["hyper_parameters"] == stock["hyper_parameters"] and desc["values"]["global_step"] == 4
    assert not desc["read_whole"]  # planned from the zip directory and data.pkl
    assert cli_main(["inspect", str(lit.ckpt)]) == 0
    out = capsys.readouterr().out
    assert "state_dict/net.0.weight" in out and f"{len(desc['tensors'])} tensors" in out


def test_lightning_convert_round_trip_loads_from_checkpoint(lit, tmp_path):
    stock = torch.load(lit.ckpt, weights_only=True)
    convert(lit.ckpt, tmp_path / "lit.safetensors")
    flat = safetensors.torch.load_file(tmp_path / "lit.safetensors")
    assert_same_state(flat, flat_tensors(stock))
    assert_same(ckptstore.load(tmp_path / "lit.safetensors"), stock, any_mapping=True)
    convert(tmp_path / "lit.safetensors", tmp_path / "back.ckpt")
    assert_same(torch.load(tmp_path / "back.ckpt", weights_only=True), stock, any_mapping=True)
    with real_writers.quiet():
        model = lit.cls.load_from_checkpoint(tmp_path / "back.ckpt", map_location="cpu")
    assert_same_state(model.state_dict(), lit.model.state_dict())


def test_lightning_legacy_torch_file(lit, tmp_path):
    """The same checkpoint as torch < 1.6 wrote it: read whole, once, and still equal to the stock loaders."""
    stock = torch.load(lit.ckpt, weights_only=True)
    legacy = real_writers.legacy_torch(tmp_path / "legacy.ckpt", stock)
    assert_same(ckptstore.load(legacy), torch.load(legacy, weights_only=True))
    target = lit.cls(width=8, classes=3)
    report = load_partial(legacy, target, key="state_dict", strict=True)
    assert report.read_whole and report.loaded == sorted(stock["state_dict"])
    with real_writers.quiet():
        model = lit.cls.load_from_checkpoint(legacy, map_location="cpu")
    assert_same_state(target.state_dict(), model.state_dict())
    assert described(describe(legacy)) == expected_description(flat_tensors(stock))
    convert(legacy, tmp_path / "modern.ckpt")
    assert_same(torch.load(tmp_path / "modern.ckpt", weights_only=True), stock)


def test_lightning_hyperparameters_bytes_set_complex_load(lit):
    stock = torch.load(lit.odd, weights_only=True)
    assert stock["hyper_parameters"]["notes"] == NOTES
    assert_same(ckptstore.load(lit.odd), stock)


def test_lightning_hyperparameters_bytes_set_complex_load_partial(lit):
    target = lit.cls(width=8, classes=3)
    report = load_partial(lit.odd, target, key="state_dict", strict=True)
    assert report.loaded == sorted(target.state_dict())
    assert_same_state(target.state_dict(), torch.load(lit.odd, weights_only=True)["state_dict"])


def test_lightning_hyperparameters_bytes_set_complex_describe(lit):
    stock = torch.load(lit.odd, weights_only=True)
    desc = describe(lit.odd)
    assert described(desc) == expected_description(flat_tensors(stock))
    assert desc["values"]["hyper_parameters"]["width"] == 8 and "notes" in desc["values"]["hyper_parameters"]


def test_lightning_hyperparameters_bytes_set_complex_convert(lit, tmp_path):
    convert(lit.odd, tmp_path / "odd.ckpt")
    assert_same(torch.load(tmp_path / "odd.ckpt", weights_only=True), torch.load(lit.odd, weights_only=True))


# -- Hugging Face: one file ------------------------------------------------------------------
def test_save_pretrained_wrote_every_layout(hf):
    names = {layout: real_writers.file_names(path) for layout, path in hf.layouts.items()}
    assert "model.safetensors" in names["single"] and "pytorch_model.bin" in names["bin"]
    for layout, index in (("sharded", "model.safetensors.index.json"), ("bin-sharded", "pytorch_model.bin.index.json")):
        assert index in names[layout] and len(names[layout]) >= 3 + 3, names[layout]  # config files, index, shards


def test_hf_single_file_load_equals_load_file(store, hf):
    url = upload(store, hf.layouts["single"], "gpt2")
    got = ckptstore.load(f"{url}/model.safetensors", storage_options=store.storage_options)
    assert_same_state(got, safetensors.torch.load_file(hf.layouts["single"] / "model.safetensors"))


def test_hf_single_file_load_partial_equals_from_pretrained(store, hf):
    url = upload(store, hf.layouts["single"], "gpt2")
    target = hf.cls(hf.config)
    report = load_partial(f"{url}/model.safetensors", target, storage_options=store.storage_options)
    stock, info = from_pretrained(hf, hf.layouts["single"])
    assert report.unexpected == sorted(info["unexpected_keys"]) and report.skipped_shape == {}
    assert target.lm_head.weight is target.transformer.wte.weight  # still tied, so lm_head has the file's values
    assert_same_state(target.state_dict(), stock.state_dict())
    assert_same_state(target.state_dict(), hf.model.state_dict())


def test_hf_tied_weight_stored_once_counts_as_loaded(hf):
    target = hf.cls(hf.config)
    report = load_partial(hf.layouts["single"] / "model.safetensors", target)
    _, info = from_pretrained(hf, hf.layouts["single"])
    assert report.missing == sorted(info["missing_keys"]) == []
    assert report.loaded == sorted(target.state_dict())


def test_hf_mismatched_sizes_like_ignore_mismatched_sizes(hf):
    config = real_writers.hf_config()
    config.n_positions = 64  # the fine-tuned model has a longer position table
    target = hf.cls(config)
    report = load_partial(hf.layouts["single"] / "model.safetensors", target)
    stock, info = from_pretrained(hf, hf.layouts["single"], config)
    assert {k: (tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]} == report.skipped_shape == {
        "transformer.wpe.weight": ((32, 32), (64, 32))}
    for k in report.loaded:
        assert_same(target.state_dict()[k], stock.state_dict()[k], k)
    assert not torch.equal(target.transformer.wpe.weight[:32], hf.model.transformer.wpe.weight)  # left alone


def test_hf_bin_file_equals_torch_load_and_from_pretrained(hf):
    path = hf.layouts["bin"] / "pytorch_model.bin"
    assert_same(ckptstore.load(path), torch.load(path, weights_only=True))
    target = hf.cls(hf.config)
    report = load_partial(path, target, strict=True)  # a .bin keeps both names of the tied weight
    assert report.loaded == sorted(target.state_dict())
    stock, _ = from_pretrained(hf, hf.layouts["bin"])
    assert_same_state(target.state_dict(), stock.state_dict())


def test_hf_describe_and_convert_single_file(hf, tmp_path):
    path = hf.layouts["single"] / "model.safetensors"
    stock = safetensors.torch.load_file(path)
    assert described(describe(path)) == expected_description(stock)
    convert(path, tmp_path / "pytorch_model.bin")
    assert_same_state(torch.load(tmp_path / "pytorch_model.bin", weights_only=True), stock)
    convert(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    assert_same_state(safetensors.torch.load_file(tmp_path / "model.safetensors"), stock)


# -- Hugging Face: sharded, with an index ----------------------------------------------------------
@pytest.mark.parametrize("layout", ["sharded", "bin-sharded"])
@pytest.mark.parametrize("entry", ["index", "folder"])
def test_hf_sharded_load_partial_equals_from_pretrained(hf, layout, entry):
    source = index_file(hf, layout) if entry == "index" else hf.layouts[layout]
    target = hf.cls(hf.config)
    report = load_partial(source, target)
    stock, info = from_pretrained(hf, hf.layouts[layout])
    assert (report.missing, report.unexpected, report.skipped_shape) == (sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), {})
    assert report.loaded == sorted(target.state_dict())  # lm_head.weight, tied, is stored in no shard of the safetensors layout
    assert_same_state(target.state_dict(), stock.state_dict())


@pytest.mark.parametrize("layout", ["sharded", "bin-sharded"])
def test_hf_sharded_load_equals_stock_shards(hf, layout):
    assert_same_state(ckptstore.load(index_file(hf, layout)), shards_merged(hf.layouts[layout]))


@pytest.mark.parametrize("layout", ["sharded", "bin-sharded"])
def test_hf_sharded_describe_lists_every_shard(hf, layout):
    assert described(describe(index_file(hf, layout))) == expected_description(shards_merged(hf.layouts[layout]))


@pytest.mark.parametrize("layout", ["sharded", "bin-sharded"])
def test_hf_sharded_convert_is_refused_and_load_then_save_merges(hf, layout, tmp_path):
    """``convert`` takes one file; the message's way to merge shards gives the stock loaders' tensors."""
    with pytest.raises(ConfigError, match="sharded checkpoint; convert its shards one by one"):
        convert(index_file(hf, layout), tmp_path / "model.safetensors")
    ckptstore.save(ckptstore.load(index_file(hf, layout)), tmp_path / "model.safetensors")
    assert_same_state(ckptstore.load(tmp_path / "model.safetensors"), shards_merged(hf.layouts[layout]))


def test_hf_sharded_load_partial_on_every_store(store, hf):
    url = upload(store, hf.layouts["sharded"], "gpt2")
    target = hf.cls(hf.config)
    report = load_partial(f"{url}/model.safetensors.index.json", target, storage_options=store.storage_options)
    assert report.loaded == sorted(target.state_dict()) and report.missing == []
    assert_same_state(target.state_dict(), hf.model.state_dict())


# -- stock torch.save of each model's state dict ------------------------------------------------
@pytest.mark.parametrize("writer", ["zip", "legacy"])
@pytest.mark.parametrize("source", ["lightning", "hf"])
def test_stock_torch_save_of_each_model(request, source, writer, tmp_path):
    model = request.getfixturevalue("lit" if source == "lightning" else "hf").model
    path = getattr(real_writers, f"{writer}_torch")(tmp_path / "model.pt", model.state_dict())
    stock = torch.load(path, weights_only=True)
    assert_same(ckptstore.load(path), stock)
    target = type(model)(model.config) if source == "hf" else type(model)(width=8, classes=3)
    report = load_partial(path, target, strict=True)
    assert report.loaded == sorted(stock) and report.read_whole == (writer == "legacy")
    assert_same_state(target.state_dict(), stock)
    assert described(describe(path)) == expected_description(stock)
    convert(path, tmp_path / "model.safetensors")
    converted = ckptstore.load(tmp_path / "model.safetensors")
    assert_same_state(converted, stock)
