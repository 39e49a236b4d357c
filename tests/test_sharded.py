"""Sharded (DCP) checkpoints in one process, on every store: a one-rank job whose model is FSDP2-sharded
on a one-rank mesh is saved the way every rank of a large job saves (ckptstore.sharded), so its
format, restore paths, damage handling and hostile files are checked here in process (memory://
included); test_distributed.py runs the same code on two real ranks.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ckptstore
from ckptstore import CheckpointManager, CorruptCheckpointError, StateMismatchError, UnsafeCheckpointError
from ckptstore.convert import convert
from ckptstore.storage import FsspecStorage, open_storage


@pytest.fixture(scope="module", autouse=True)
def one_rank_job():
    """A one-rank gloo group in this process, for the device mesh FSDP2 needs."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def sharded_model(seed: int = 0) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fully_shard(m, mesh=init_device_mesh("cpu", (1,)))
    return m


def plain_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def trained(m: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.ones(3, 4)).sum().backward()
    opt.step()
    return opt


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(plain(x), plain(y)) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def saved(store, keep_last: int | None = None) -> tuple[CheckpointManager, nn.Module, torch.optim.Optimizer]:
    mgr = CheckpointManager(store.url, storage_options=store.storage_options, keep_last=keep_last)
    m = sharded_model()
    opt = trained(m)
    mgr.save({"model": m, "optim": opt, "epoch": 3, "note": "x"}, step=3)
    return mgr, m, opt


def test_state_with_dtensors_is_saved_sharded_and_restores_into_sharded_and_plain_models(store):
    mgr, m, opt = saved(store)
    info = mgr.latest()
    assert info.format == "dcp"
    names = sorted(f.path.split(".", 1)[1] for f in info.files)
    assert names == ["dcp-metadata", "rank0-0.distcp", "tree.json"]
    assert mgr.verify() == {info.name: None}

    fresh = sharded_model(seed=5)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    values = mgr.restore({"model": fresh, "optim": fresh_opt})
    assert values == {"epoch": 3, "note": "x"} and values.checkpoint.name == info.name
    assert same_weights(fresh, m)
    assert all(torch.equal(plain(opt.state_dict()["state"][i][k]), plain(v))
               for i, s in fresh_opt.state_dict()["state"].items() for k, v in s.items())

    one = plain_model()
    one_opt = torch.optim.Adam(one.parameters(), lr=0.1)
    mgr.restore({"model": one, "optim": one_opt})
    assert same_weights(one, m) and set(one_opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_sharded_checkpoint_loads_partially_and_converts_to_stock_files(store, tmp_path):
    mgr, m, _ = saved(store)
    url = store.join(mgr.latest().name)
    target = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    report = ckptstore.load_partial(url, target, storage_options=store.storage_options)
    assert report.loaded == ["0.bias", "0.weight"] and report.skipped_shape == {"2.bias": ((2,), (3,)), "2.weight": ((2, 8), (3, 8))}
    assert torch.equal(target[0].weight, plain(m[0].weight))
    with pytest.raises(StateMismatchError, match="strict"):
        ckptstore.load_partial(url, target, strict=True, storage_options=store.storage_options)
    convert(url, str(tmp_path / "whole.pt"), storage_options=store.storage_options)
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert torch.equal(whole["model"]["2.weight"], plain(m[2].weight)) and whole["epoch"] == 3


def test_a_damaged_shard_is_found_before_any_live_byte_changes_and_latest_falls_back(store):
    mgr, m, _ = saved(store)
    m2 = sharded_model(seed=7)
    mgr.save({"model": m2, "optim": trained(m2), "epoch": 4}, step=4)
    newest = mgr.latest()
    shard = next(f.path for f in newest.files if f.path.endswith(".distcp"))
    storage = open_storage(store.url, store.storage_options)
    data = bytearray(storage.read(f"{newest.name}/{shard}"))
    data[len(data) // 2] ^= 1
    storage.delete(f"{newest.name}/{shard}")
    with storage.open_write(f"{newest.name}/{shard}") as f:
        f.write(bytes(data))
    assert "fails its checksum" in (mgr.verify()[newest.name] or "")
    live = sharded_model(seed=9)
    before = {k: plain(v).clone() for k, v in live.state_dict().items()}
    with pytest.raises(CorruptCheckpointError):
        mgr.restore({"model": live}, which=4, strict=False)
    assert all(torch.equal(before[k], plain(v)) for k, v in live.state_dict().items())  # nothing landed
    assert mgr.restore({"model": live}, strict=False).checkpoint.step == 3 and same_weights(live, m)


def test_a_shape_or_entry_the_checkpoint_lacks_is_refused_before_any_byte_moves(store):
    mgr, _, _ = saved(store)
    torch.manual_seed(3)
    wider = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    before = [p.detach().clone() for p in wider.parameters()]
    with pytest.raises(StateMismatchError, match=r"model/2.weight \(2, 8\) vs \(5, 8\)"):
        mgr.restore({"model": wider})
    assert all(torch.equal(a, b) for a, b in zip(before, wider.parameters()))
    with pytest.raises(StateMismatchError, match="holds no 'scheduler'"):
        mgr.restore({"model": plain_model(), "scheduler": torch.zeros(1)})
    restored = mgr.restore({"model": plain_model(), "scheduler": torch.zeros(1)}, strict=False)
    assert list(restored.missing) == ["scheduler"]


class _Boom:
    def __reduce__(self):
        return (print, ("the metadata ran code",))


def test_hostile_metadata_is_refused_unread_and_damaged_metadata_or_tree_is_corrupt(store, capsys):
    mgr, _, _ = saved(store)
    info = mgr.latest()
    storage = open_storage(store.url, store.storage_options)

    def replace(suffix: str, data: bytes) -> None:
        path = f"{info.name}/" + next(f.path for f in info.files if f.path.endswith(suffix))
        storage.delete(path)
        with storage.open_write(path) as f:
            f.write(data)

    original = storage.read(f"{info.name}/" + next(f.path for f in info.files if f.path.endswith(".dcp-metadata")))
    replace(".dcp-metadata", pickle.dumps(_Boom()))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.print"):
        mgr.restore({"model": plain_model()}, verify=False)
    assert "ran code" not in capsys.readouterr().out
    replace(".dcp-metadata", b"not a pickle")
    with pytest.raises(CorruptCheckpointError, match="not DCP metadata"):
        mgr.restore({"model": plain_model()}, verify=False)
    buffer = io.BytesIO()
    pickle.dump({"a": 1}, buffer)
    replace(".dcp-metadata", buffer.getvalue())
    with pytest.raises(CorruptCheckpointError, match="holds a dict"):
        mgr.restore({"model": plain_model()}, verify=False)
    replace(".dcp-metadata", original)
    replace(".tree.json", b"{")
    with pytest.raises(CorruptCheckpointError, match="not a ckptstore tree file"):
        mgr.restore({"model": plain_model()}, verify=False)


def test_retention_deletes_every_file_of_a_sharded_checkpoint_and_leftovers_go(store):
    mgr = CheckpointManager(store.url, storage_options=store.storage_options, keep_last=1, abandoned_after=0)
    m = sharded_model()
    opt = trained(m)
    for step in (1, 2):
        mgr.save({"model": m, "optim": opt}, step=step)
    storage = open_storage(store.url, store.storage_options)
    assert sorted({p.split("/")[0] for p in storage.list_files()}) == ["step_00000002"]
    with storage.open_write("step_00000003/state-0123abcd.rank0-0.distcp") as f:  # a killed rank's shard
        f.write(b"partial")
    mgr.prune()
    assert not any(p.startswith("step_00000003/") for p in storage.list_files())


def test_a_partial_load_of_a_sharded_checkpoint_fetches_only_the_items_it_loads(store, monkeypatch):
    mgr, m, _ = saved(store)
    info = mgr.latest()
    shard = next(f for f in info.files if f.path.endswith(".distcp"))
    fetched: list[int] = []
    real = FsspecStorage.read_ranges

    def spy(self, path, ranges):
        fetched.extend(end - start for start, end in ranges)
        return real(self, path, ranges)

    monkeypatch.setattr(FsspecStorage, "read_ranges", spy)
    target = {"2.bias": torch.zeros(2)}
    report = ckptstore.load_partial(store.join(info.name), target, storage_options=store.storage_options)
    assert report.loaded == ["2.bias"] and torch.equal(target["2.bias"], plain(m[2].bias))
    assert len(fetched) == 1 and fetched[0] < shard.size / 10  # one item's bytes, not the shard file


def test_a_checked_restore_downloads_each_shard_once(store, monkeypatch):
    """The CRC32C pass keeps each checked file locally (remote stores), so the load does not fetch it again."""
    mgr, m, _ = saved(store)
    from_store: list[str] = []
    real = FsspecStorage.read_ranges

    def spy(self, path, ranges):
        if self.url(path).startswith(store.url):
            from_store.append(path)
        return real(self, path, ranges)

    monkeypatch.setattr(FsspecStorage, "read_ranges", spy)
    fresh = plain_model()
    mgr.restore({"model": fresh})
    assert same_weights(fresh, m)
    if store.kind in ("local", "file"):  # a local disk is read in place: the second read is the page cache's
        assert from_store and all(".distcp" in p for p in from_store)
    else:
        assert from_store == []


def test_describe_of_a_sharded_checkpoint_reads_only_its_metadata_and_tree(store):
    from ckptstore.partial import describe
    from ckptstore.serializers import TREE_METADATA_KEY

    mgr, _, _ = saved(store)
    info = mgr.latest()
    desc = describe(store.join(info.name), storage_options=store.storage_options)
    tensors = {t["name"]: t for t in desc["tensors"]}
    assert tensors["model/2.weight"] == {"name": "model/2.weight", "dtype": "float32", "shape": [2, 8], "bytes": 64}
    assert tensors["optim/state/2.weight/exp_avg"]["shape"] == [2, 8]  # global shapes, from DCP's metadata
    assert desc["values"]["shards"] == [f.path for f in info.files if f.path.endswith(".distcp")]
    tree = desc["values"][TREE_METADATA_KEY]
    assert tree["epoch"] == 3 and tree["note"] == "x" and tree["model"]["2.weight"] == "<tensor model/2.weight>"
    assert desc["header_bytes_read"] == sum(f.size for f in info.files if not f.path.endswith(".distcp"))
    assert desc["checkpoint"]["format"] == "dcp" and desc["checkpoint"]["step"] == 3 and desc["url"] == info.url


def test_a_partial_load_of_a_sharded_checkpoint_casts_or_refuses_another_dtype(store):
    mgr, m, _ = saved(store)
    url = store.join(mgr.latest().name)
    target = {"2.bias": torch.zeros(2, dtype=torch.float64)}
    report = ckptstore.load_partial(url, target, storage_options=store.storage_options)
    assert report.cast == {"2.bias": (torch.float32, torch.float64)}
    assert torch.equal(target["2.bias"], plain(m[2].bias).double())
    with pytest.raises(StateMismatchError, match=r"^2\.bias: the file holds torch\.float32, the target torch\.float64 "
                                                 r"\(strict_dtype=True\)$"):
        ckptstore.load_partial(url, {"2.bias": torch.zeros(2, dtype=torch.float64)}, strict_dtype=True,
                               storage_options=store.storage_options)
