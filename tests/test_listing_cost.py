"""A root's history costs one listing, not a read of every manifest (issue 10, points 4, 6 and 7).

Manifests are read once per manager (they never change in place; a re-used path has a new
listing tag), each command lists the root once, a damaged folder is warned about once, and the
manifest records the monitor so ``ls`` and ``best()`` mark the best without being told.
"""

from __future__ import annotations

import json
import logging

import pytest

from ckptstore import CheckpointManager
from ckptstore.cli import main
from ckptstore.storage import FsspecStorage, open_storage


def manager(store, **kwargs):
    return CheckpointManager(store.url, storage_options=store.storage_options, **kwargs)


@pytest.fixture
def calls(monkeypatch):
    """Every ``list_files`` call and every path ``read_many`` is asked for, on any FsspecStorage."""
    seen: dict[str, list] = {"list": [], "read": []}
    list_files, read_many = FsspecStorage.list_files, FsspecStorage.read_many

    def counted_list(self):
        seen["list"].append(self.url())
        return list_files(self)

    def counted_read(self, paths):
        seen["read"].extend(paths)
        return read_many(self, paths)

    monkeypatch.setattr(FsspecStorage, "list_files", counted_list)
    monkeypatch.setattr(FsspecStorage, "read_many", counted_read)
    return seen


def test_a_manager_reads_each_manifest_once(store, calls):
    mgr = manager(store, keep_last=None)
    for step in range(1, 6):
        mgr.save({"x": step}, step=step)
    # a manager's own commit is read once, by its next listing (the tag it will have is not known before)
    assert sorted(calls["read"]) == [f"step_{s:08d}/manifest.json" for s in range(1, 5)]
    calls["read"].clear()
    reader = manager(store)
    assert [c.step for c in reader.checkpoints()] == [1, 2, 3, 4, 5]
    assert len(calls["read"]) == 5
    calls["read"].clear()
    reader.checkpoints(), reader.latest(), reader.best(), reader.uncommitted()
    mgr.save({"x": 6}, step=6)
    reader.restore({})
    assert calls["read"] == ["step_00000005/manifest.json", "step_00000006/manifest.json"]  # each new one, once


def test_a_manifest_written_again_under_the_same_name_is_read_again(store):
    """Deleted and committed anew (another process): the listing tag changes, so the cache cannot serve the old one."""
    reader = manager(store)
    manager(store).save({"x": 1}, step=1, metrics={"loss": 1.0})
    assert reader.latest().metrics == {"loss": 1.0}
    other = manager(store)
    other.delete(1)
    other.save({"x": 1}, step=1, metrics={"loss": 0.25})
    assert reader.latest().metrics == {"loss": 0.25}
    assert reader.restore({}) == {"x": 1}


def test_a_damaged_folder_is_warned_about_once_per_manager(store, caplog):
    mgr = manager(store)
    mgr.save({"x": 1}, step=1)
    storage = open_storage(store.url, store.storage_options)
    storage.write_new("step_00000002/manifest.json", b"{ not json")
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        for _ in range(3):
            assert [c.step for c in mgr.checkpoints()] == [1]
        mgr.save({"x": 3}, step=3)
    warned = [r.getMessage() for r in caplog.records if "step_00000002" in r.getMessage()]
    assert len(warned) == 1 and "ignoring step_00000002" in warned[0]
    assert "step_00000002" in mgr.uncommitted()  # still reported on every call


def test_ls_lists_the_root_once_and_warns_once(store, calls, capsys, caplog):
    mgr = manager(store, monitor="loss")
    for step in (1, 2):
        mgr.save({"x": step}, step=step, metrics={"loss": 1.0 / step})
    open_storage(store.url, store.storage_options).write_new("step_00000003/manifest.json", b"{ not json")
    calls["list"].clear()
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert main(["ls", "--all", store.url, *_options(store)]) == 0
    assert calls["list"] == [store.url]
    assert sum("step_00000003" in r.getMessage() for r in caplog.records) == 1
    assert "step_00000003" in capsys.readouterr().out


def test_the_manifest_records_the_monitor_so_ls_and_best_mark_the_best_without_being_told(store, capsys):
    mgr = manager(store, monitor="acc", mode="max", keep_last=None)
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        mgr.save({"x": step}, step=step, metrics={"acc": acc})
    doc = json.loads(open_storage(store.url, store.storage_options).read("step_00000001/manifest.json"))
    assert doc["monitor"] == {"metric": "acc", "mode": "max"}
    plain = manager(store)  # an evaluation script that does not know the run's monitor
    assert plain.best().step == 2
    assert plain.restore({}, which="best") == {"x": 2}
    assert manager(store, monitor="acc").best().step == 1  # told otherwise (mode min): told wins
    assert main(["ls", store.url, *_options(store)]) == 0
    marks = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert marks["step_00000002"].endswith("best") and marks["step_00000003"].endswith("latest")
    assert not marks["step_00000001"].endswith(("best", "latest"))


def test_manifests_without_a_monitor_still_read_and_have_no_best(store):
    manager(store).save({"x": 1}, step=1, metrics={"loss": 0.5})
    doc = json.loads(open_storage(store.url, store.storage_options).read("step_00000001/manifest.json"))
    assert doc["monitor"] is None
    assert manager(store).best() is None and manager(store).latest().step == 1


@pytest.mark.parametrize("command", ["ls", "prune"])
def test_an_option_the_command_would_ignore_is_a_usage_error(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path), "--mode", "max"])
    assert exit_.value.code == 2 and "--mode needs --monitor" in capsys.readouterr().err


def test_bench_takes_no_storage_options_it_would_ignore(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--storage-option", "key=x", "suite"])
    assert exit_.value.code == 2 and "usage: ckptstore bench" in capsys.readouterr().err


def _options(store):
    return [arg for k, v in store.storage_options.items() for arg in ("--storage-option", f"{k}={json.dumps(v)}")]
