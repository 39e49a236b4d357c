"""Ordinary mistakes get a clear error or warning, never a silent wrong result (issue 10, points 1, 2, 5)."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import safetensors.torch
import torch

from ckptstore import CheckpointManager, CheckpointNotFound, ConfigError, InvalidNameError, StateMismatchError, StorageError
from ckptstore.cli import main
from ckptstore.storage import open_storage


def manager(store, url=None, **kwargs):
    return CheckpointManager(url or store.url, storage_options=store.storage_options, **kwargs)


@pytest.mark.parametrize("which", [5, "step_00000005", "best"])
def test_asking_for_a_checkpoint_that_is_not_there_raises_also_on_an_empty_root(store, which):
    mgr = manager(store, monitor="val_loss")
    with pytest.raises(CheckpointNotFound, match=str(store.url)):
        mgr.restore(which=which)
    mgr.save({"x": 1}, step=1)  # no val_loss: "best" has nothing to rank
    with pytest.raises(CheckpointNotFound):
        mgr.restore(which=which)


def test_an_empty_root_starts_fresh_and_says_where_it_looked(store, caplog):
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert manager(store).restore() is None
    [line] = [r.getMessage() for r in caplog.records if r.name == "ckptstore"]
    assert "starting fresh" in line and store.url in line


def test_a_checkpoint_folder_given_as_the_root_is_refused_and_nothing_nests_in_it(store):
    manager(store).save({"x": 1}, step=7)
    inside = manager(store, store.join("step_00000007"))
    for call in (inside.restore, inside.checkpoints, lambda: inside.save({"x": 2}, step=0)):
        with pytest.raises(ConfigError, match=r"is a checkpoint folder.*use its parent") as err:
            call()
        assert store.url in str(err.value)
    assert [c.step for c in manager(store).checkpoints()] == [7]
    assert open_storage(store.url, store.storage_options).list_files().keys() >= {"step_00000007/manifest.json"}
    assert not any(p.startswith("step_00000007/step_") for p in open_storage(store.url, store.storage_options).list_files())


def test_a_file_given_as_the_root_is_refused(store):
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    with storage.open_write("weights.safetensors") as f:
        f.write(b"not a folder")
    folder = (storage.root if storage.is_local else storage.root_url).rstrip("/")
    with pytest.raises(ConfigError, match=r"weights.safetensors is a file \(neither a torch file nor a safetensors file: "
                                          r"it starts with 6e6f74.*\), not a folder of checkpoints; "
                                          rf"did you mean its folder {re.escape(folder)}\?$"):
        manager(store, store.join("weights.safetensors"))


def test_a_root_below_a_file_is_refused_not_a_fresh_start(store):
    """A local root under a file can never hold a checkpoint: refused when the manager starts (before,
    restore() said "starting fresh"). Object stores allow a key and a prefix of one name: nothing to refuse."""
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    with storage.open_write("X") as f:  # a one-letter name: the hint names the file itself, not its parent
        f.write(b"a file")
    root = store.join("X", "run", "exp1")
    if store.kind not in ("local", "file"):
        assert manager(store, root).restore() is None
        return
    file = os.path.join(storage.root, "X")
    with pytest.raises(ConfigError, match=rf"^{re.escape(root)} is below {re.escape(file)}, which is a file, not a "
                                          r"folder: no checkpoint can be there; fix the root$"):
        manager(store, root)
    with pytest.raises(ConfigError, match=rf"^{re.escape(store.join('X'))} is a file \(neither a torch file nor a "
                                          rf"safetensors file: .*\), not a folder of checkpoints; did you mean its folder "
                                          rf"{re.escape(storage.root.rstrip('/'))}\?$"):
        manager(store, store.join("X"))  # a file named X: its folder, not X's grandparent


@pytest.mark.parametrize("name, what", [("last.ckpt", "a torch file"), ("model.bin", "a safetensors file")])
def test_a_checkpoint_file_given_as_the_root_says_what_it_is_and_what_reads_it(store, name, what):
    """A stray file (a Lightning last.ckpt, a safetensors model.bin) is told by its content, not by its name."""
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    payload = {"w": torch.ones(2)}
    with storage.open_write(name) as f:
        if what == "a torch file":
            torch.save(payload, f)
        else:
            f.write(safetensors.torch.save(payload))
    folder = (storage.root if storage.is_local else storage.root_url).rstrip("/")
    with pytest.raises(ConfigError, match=rf"{name} is {what}, not a folder of checkpoints: ckptstore.load reads it whole, "
                                          rf"ckptstore.load_partial\(url, model\) .*\(its folder {re.escape(folder)}\?\)$"):
        manager(store, store.join(name)).restore({"w": torch.zeros(2)})


@pytest.mark.parametrize("url", ["s3:/bucket/run", "gs:/bucket/run", "memory:/run"])
def test_a_scheme_with_one_slash_is_refused_instead_of_becoming_a_local_folder(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidNameError, match=r"one slash .* did you mean \w+://"):
        CheckpointManager(url).save({"x": 1}, step=0)
    assert list(tmp_path.iterdir()) == []


def test_restoring_into_a_smaller_model_names_the_keys_and_changes_nothing(store):
    manager(store).save({"model": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))}, step=0)
    small = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"unexpected keys \['1.weight', '1.bias'\]"):
        manager(store).restore({"model": small})
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())


@pytest.mark.parametrize("bad", [{"val_loss": "low"}, {"val_loss": None}, {"val_loss": torch.ones(2)}])
def test_a_metric_that_is_not_a_number_is_a_config_error_before_any_write(store, bad):
    mgr = manager(store)
    with pytest.raises(ConfigError, match=r"metric 'val_loss' must be a number"):
        mgr.save({"x": 1}, step=0, metrics=bad)
    assert open_storage(store.url, store.storage_options).list_files() == {}


@pytest.mark.parametrize("step", [np.int64(3), torch.tensor(3), 3])
def test_any_integral_step_is_accepted(store, step):
    assert manager(store).save({"x": 1}, step=step, metrics={"loss": np.float32(0.5)}).step == 3


@pytest.mark.parametrize("step", [True, 2.0, -1, torch.tensor(2.0), "3"])
def test_a_step_that_is_not_a_nonnegative_integer_is_refused(store, step):
    with pytest.raises(ConfigError, match="`step` must be an integer >= 0"):
        manager(store).save({"x": 1}, step=step)


def test_an_entry_asked_for_but_never_saved_is_an_error_unless_not_strict(store, caplog):
    """The optimizer would silently start fresh: by default that is an error naming it, before anything changes."""
    torch.manual_seed(0)
    saved = torch.nn.Linear(4, 2)
    manager(store).save({"model": saved, "epoch": 3}, step=3)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r"holds no \['optimizer'\] \(it holds \['epoch', 'model'\]\).*strict=False"):
        manager(store).restore({"model": model, "optimizer": optimizer})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        values = manager(store).restore({"model": model, "optimizer": optimizer}, strict=False)
    assert values == {"epoch": 3} and torch.equal(model.weight, saved.weight)
    assert any("['optimizer']" in r.getMessage() and "strict=False" in r.getMessage() for r in caplog.records)
    assert optimizer.state_dict()["state"] == {}  # left as it was
    assert values.missing == ("optimizer",)  # and the caller can see it, not only the log
    assert manager(store).restore({"model": model}).missing == ()


def test_a_save_without_the_monitored_metric_says_so_and_suggests_the_closest(store, caplog):
    mgr = manager(store, monitor="val_los", keep_best=1)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        mgr.save({"x": 1}, step=1, metrics={"val_loss": 0.5, "acc": 0.9})
    assert any("without the monitored metric 'val_los'" in r.getMessage() and "did you mean 'val_loss'?" in r.getMessage()
               for r in caplog.records)
    assert mgr.best() is None  # as documented: nothing ranks without the metric


# -- issue 10, point 6: the store's client errors name their real cause --------------------------------------------


@pytest.fixture
def s3_store(remote_store):
    if remote_store.kind != "s3":
        pytest.skip("an S3 client's errors")
    return remote_store


def test_a_client_option_at_the_top_level_is_one_line_naming_where_it_goes(s3_store, capsys):
    options = {**s3_store.storage_options, "region_name": "us-east-1"}
    with pytest.raises(ConfigError, match=r"'region_name' is not one s3 takes at the top level; pass it as client_kwargs="):
        CheckpointManager(s3_store.url, storage_options=options)
    args = [a for k, v in options.items() for a in ("--storage-option", f"{k}={json.dumps(v)}")]
    assert main(["ls", s3_store.url, *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "client_kwargs" in err and "Traceback" not in err


def test_missing_credentials_are_named_as_such_not_as_the_network(s3_store, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {k: v for k, v in s3_store.storage_options.items() if k not in ("key", "secret")}
    with pytest.raises(StorageError, match=r"no credentials were found .*AWS_ACCESS_KEY_ID.*AWS_PROFILE.*key= and secret=") as err:
        CheckpointManager(s3_store.url, storage_options={**options, "skip_instance_cache": True})
    assert "network" not in str(err.value)


# -- the same kind: a partial load that would load nothing is an error, not an empty report ---------------------


def test_a_partial_load_that_matches_nothing_says_why_instead_of_loading_nothing(store):
    source = torch.nn.Linear(3, 3)
    manager(store).save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, step=1)
    target = torch.nn.Linear(3, 3)
    before = target.weight.clone()
    with pytest.raises(StateMismatchError, match=r"file's names look like \['module.bias'.*key_map=\{'module.': ''\} would match 2 of 2"):
        manager(store).load_partial(target)
    assert torch.equal(target.weight, before)
    with pytest.raises(StateMismatchError, match=r"holds no tensor under 'net'; pass key="):
        manager(store).load_partial(target, key="net")
    report = manager(store).load_partial(target, key_map={"module.": ""})  # told how: it loads
    assert report.loaded == ["bias", "weight"] and torch.equal(target.weight, source.weight)


def test_an_option_a_strict_filesystem_refuses_is_named_in_one_line():
    """Some fsspec filesystems take only the options they know: a mistyped one is named, with
    where to read about the rest, instead of a bare TypeError from the constructor."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class StrictMemory(MemoryFileSystem):
        protocol = "strictmem"

        def __init__(self, *, block_size: int = 1) -> None:
            super().__init__()

    fsspec.register_implementation("strictmem", StrictMemory, clobber=True)
    with pytest.raises(ConfigError, match=r"^storage option 'blocksize' is not one strictmem takes; see the fsspec "
                                          r"documentation of the strictmem filesystem$"):
        open_storage("strictmem://run", {"blocksize": 4})
    assert open_storage("strictmem://run", {"block_size": 4}).url("a") == "strictmem://run/a"


def test_a_filesystem_that_fails_as_it_is_made_is_one_line_naming_the_url():
    """Some filesystems reach out as they are made (hf://): their failure, whatever its class,
    becomes one StorageError that says what could not be opened and why."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Unreachable(MemoryFileSystem):
        protocol = "unreachablemem"

        def __init__(self, **kwargs) -> None:
            raise ConnectionRefusedError("the registry refused the connection")

    fsspec.register_implementation("unreachablemem", Unreachable, clobber=True)
    with pytest.raises(StorageError, match=r"^cannot open unreachablemem://run: ConnectionRefusedError: the registry refused"):
        open_storage("unreachablemem://run", {"skip_instance_cache": True})


def test_a_bucket_that_does_not_exist_is_named_when_the_manager_starts(remote_store):
    """A mistyped bucket fails at once, in words that say which bucket and what to do."""
    scheme, rest = remote_store.url.split("://", 1)
    url = f"{scheme}://no-such-{rest}"
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    with pytest.raises(StorageError, match=rf"^bucket '{bucket}' of {re.escape(url)} does not exist; create it or fix the URL$"):
        CheckpointManager(url, storage_options=remote_store.storage_options)


def test_a_file_named_like_the_checkpoint_folder_fails_the_save_by_name(tmp_path):
    """A stray file where a checkpoint's folder goes (local disks only: object stores have no folders):
    a StorageError naming it, not FileExistsError (which means "another writer committed first")."""
    mgr = CheckpointManager(str(tmp_path))
    mgr.save({"w": torch.ones(2)}, step=1)
    (tmp_path / "step_00000005").write_text("a stray file")
    with pytest.raises(StorageError, match=rf"^cannot write {re.escape(str(tmp_path))}/step_00000005/state-[0-9a-f]{{8}}"
                                           r"\.safetensors: part of the path is a file, not a folder; fix the path$"):
        mgr.save({"w": torch.ones(2)}, step=5)
    assert [c.step for c in mgr.checkpoints()] == [1] and (tmp_path / "step_00000005").read_text() == "a stray file"
