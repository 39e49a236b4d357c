"""A save racing a cleanup, a damaged manifest in the way, leftover temp files, durable folders.

Interleavings are forced, not hoped for: a real manager on a real store gets one of its storage
calls wrapped so that another actor's real operations run at exactly that point.
"""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
import torch

from ckptstore import commit, scan
from ckptstore import CheckpointExists, CheckpointManager, CheckpointNotFound, CorruptCheckpointError, StorageError, cleanup
from ckptstore.cli import main
from ckptstore.manifest import tombstone
from ckptstore.storage import open_storage


def manager(store, **kwargs):
    return CheckpointManager(store.url, storage_options=store.storage_options, **kwargs)


def before_manifest_write(mgr, action):
    """Run ``action()`` once, right before ``mgr`` writes a manifest (its data file is already there)."""
    real = mgr.storage.write_new
    done = []

    def write_new(path, data):
        if path.endswith("/manifest.json") and not done:
            done.append(path)
            action()
        return real(path, data)

    mgr.storage.write_new = write_new
    return done


def assert_all_verify(store):
    mgr = manager(store)
    assert all(problem is None for problem in mgr.verify().values()), mgr.verify()
    return [c.step for c in mgr.checkpoints()]


def test_a_cleaner_that_listed_before_the_commit_deletes_nothing_after_it(store):
    """The issue's race: B lists while A's save has data but no manifest, and acts after A committed."""
    a = manager(store, keep_last=1)
    a.save({"w": torch.zeros(64)}, step=1)
    stale: list[scan.Scan] = []
    before_manifest_write(a, lambda: stale.append(scan.scan(a.storage)))
    a.save({"w": torch.ones(64)}, step=2)
    [listed] = stale
    assert "step_00000002" in listed.abandoned  # B saw A's data file without a manifest
    removed = cleanup.clean(open_storage(store.url, store.storage_options), listed, 0, cleanup.IdleClock())
    assert removed == []  # the tombstone claim is refused: A's manifest is there
    assert assert_all_verify(store) == [2]
    assert torch.equal(manager(store).restore()["w"], torch.ones(64))


@pytest.mark.parametrize("cleaner_progress", ["claimed", "finished"])
def test_a_cleaner_that_claims_first_makes_the_save_fail_loudly(store, request, cleaner_progress):
    """B claims A's folder before A commits: A's save raises and its retention deletes nothing.

    ``claimed``: B has written its tombstone and not yet deleted anything, so A's create-only
    manifest write is refused. ``finished``: B removed everything, A's manifest write succeeds
    and A's check of its data file un-commits it.
    """
    if store.kind == "gcs" and cleaner_progress == "claimed":
        request.applymarker(pytest.mark.xfail(strict=True, reason="gcp-storage-emulator ignores ifGenerationMatch=0"))
    a = manager(store, keep_last=1)
    a.save({"w": torch.zeros(64)}, step=1)
    b = manager(store, abandoned_after=0)
    if cleaner_progress == "claimed":
        before_manifest_write(a, lambda: b.storage.write_new("step_00000002/manifest.json", tombstone()))
    else:
        before_manifest_write(a, b.prune)
    expected = a.storage.url("step_00000002") + (
        ": another process judged this save abandoned and is removing it, so it was not committed (two jobs on one "
        "root, or abandoned_after shorter than a save takes); save again" if cleaner_progress == "claimed" else
        ": the data file vanished while committing (another process cleaned the folder); the checkpoint was "
        "un-committed. Do not let two jobs write the same root")
    with pytest.raises(StorageError) as err:
        a.save({"w": torch.ones(64)}, step=2)
    assert str(err.value) == expected
    assert assert_all_verify(store) == [1]  # the previous checkpoint survives: no retention ran
    b.prune()  # B finishes its removal
    assert scan.scan(a.storage).abandoned == {}


def test_a_step_committed_and_removed_by_another_process_while_saved_fails_the_save(store, request):
    """A's manifest write is refused (B committed the step), and B deleted it again before A read
    what was there: A's save raises, deletes only its own data file, and B's work is untouched."""
    if store.kind == "gcs":
        request.applymarker(pytest.mark.xfail(strict=True, reason="the GCS emulator ignores create-only preconditions"))
    a, b = manager(store), manager(store)
    a.save({"w": torch.zeros(4)}, step=1)
    real = a.storage.write_new

    def write_new(path, data):
        try:
            return real(path, data)
        except FileExistsError:
            b.delete(2)  # gone again before A reads it
            raise

    a.storage.write_new = write_new
    before_manifest_write(a, lambda: b.save({"w": torch.ones(4)}, step=2))
    with pytest.raises(StorageError) as err:
        a.save({"w": torch.full((4,), 2.0)}, step=2)
    assert str(err.value) == (f"{a.storage.url('step_00000002')}: another process committed and removed this step "
                              "while it was saved; save again")
    assert scan.scan(a.storage).abandoned == {} and assert_all_verify(store) == [1]


def test_a_late_deleter_leaves_a_checkpoint_committed_again_under_the_same_name(store):
    """A read step 2's manifest, then B deleted step 2 and committed a new step 2: A's delete of
    what it read must not remove B's checkpoint (its manifest names another data file)."""
    a, b = manager(store), manager(store)
    old = a.save({"x": 1}, step=2)
    b.delete(2)
    new = b.save({"x": 2}, step=2)
    commit.delete_checkpoint(a.storage, old)
    assert [i.files for i in manager(store).checkpoints()] == [new.files]
    assert manager(store).restore() == {"x": 2}


def test_a_pruned_checkpoint_leaves_no_folder_behind(store):
    mgr = manager(store, keep_last=1)
    mgr.save({"x": 0}, step=0)
    mgr.save({"x": 1}, step=1)
    fs = store.filesystem()
    fs.invalidate_cache()
    assert not fs.exists(store.path("step_00000000")) and fs.exists(store.path("step_00000001"))


def test_a_lost_race_to_an_unreadable_manifest_says_how_to_clear_it(store, request):
    if store.kind == "gcs":
        request.applymarker(pytest.mark.xfail(strict=True, reason="the GCS emulator ignores create-only preconditions"))
    a = manager(store)
    storage = open_storage(store.url, store.storage_options)
    before_manifest_write(a, lambda: storage.write_new("step_00000002/manifest.json", b"{not json"))
    with pytest.raises(CheckpointExists) as err:
        a.save({"x": 2}, step=2)
    assert str(err.value) == commit.unreadable_manifest_message(storage, "step_00000002")
    assert "step_00000002 holds an unreadable manifest" in str(err.value)
    assert storage.list_files().keys() == {"step_00000002/manifest.json"}  # its own data file went


def test_the_data_file_missing_under_a_reader_is_named(store):
    mgr = manager(store)
    info = mgr.save({"x": torch.ones(4)}, step=1)
    mgr.storage.delete(f"{info.name}/{info.files[0].path}")  # after the listing that found it
    with pytest.raises(CorruptCheckpointError) as err:
        commit.read_checkpoint(mgr.storage, info)
    assert str(err.value) == f"{mgr.storage.url(info.name)}/{info.files[0].path} is listed in the manifest but missing"


def test_a_save_tells_the_store_how_many_bytes_are_coming(store):
    """S3 picks its part size from this hint (10,000 parts at most): a wrong one fails huge uploads."""
    mgr = manager(store)
    real, hints = mgr.storage.open_write, []

    def open_write(path, size_hint=0, **kwargs):
        hints.append(size_hint)
        return real(path, size_hint, **kwargs)

    mgr.storage.open_write = open_write
    mgr.save({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.float16), "n": 1}, step=1)
    assert hints == [3 * 5 * 4 + 7 * 2]


def lose_the_reply(mgr, error: Exception, *, stored: bool) -> None:
    """``mgr``'s manifest write stores the manifest (if ``stored``) and then raises ``error``:
    a reply lost on the way back, and the client's retry refused or failed."""
    real = mgr.storage.write_new

    def write_new(path, data):
        if path.endswith("/manifest.json"):
            if stored:
                real(path, data)
            raise error
        return real(path, data)

    mgr.storage.write_new = write_new


@pytest.mark.parametrize("error, said", [
    (FileExistsError("the retry was refused: it exists"),
     "the manifest write's reply was lost; the manifest there is ours, so the commit stands"),
    (StorageError("the connection was reset"), "the manifest write failed after it was stored; the manifest there is ours"),
])
def test_a_commit_whose_reply_was_lost_stands(store, caplog, error, said):
    """On every store, what ``test_lost_replies.py`` proves through a real proxy on S3 and GCS."""
    mgr = manager(store)
    lose_the_reply(mgr, error, stored=True)
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        info = mgr.save({"x": torch.ones(4)}, step=1)
    assert f"{info.url}: {said}" in caplog.messages
    assert [i.files for i in manager(store).checkpoints()] == [info.files] and assert_all_verify(store) == [1]


def test_a_commit_that_failed_before_it_was_stored_raises_and_commits_nothing(store):
    mgr = manager(store)
    lose_the_reply(mgr, StorageError("the connection was refused"), stored=False)
    with pytest.raises(StorageError, match="the connection was refused"):
        mgr.save({"x": torch.ones(4)}, step=1)
    assert manager(store).checkpoints() == [] and list(scan.scan(mgr.storage).abandoned) == ["step_00000001"]


def test_a_step_is_committed_once_whatever_name_it_is_saved_under(store):
    mgr = manager(store)
    first = mgr.save({"x": 1}, step=3)
    with pytest.raises(CheckpointExists) as err:
        mgr.save({"x": 2}, step=3, name="other")
    assert str(err.value) == f"step 3 is already committed as {first.url}; save a new step or delete that one first"
    with pytest.raises(CheckpointExists, match=f"the name 'step_00000003' \\(step 3\\) is already committed as {re.escape(first.url)};"):
        mgr.save({"x": 2}, step=4, name="step_00000003")  # the name is taken too
    assert [(i.step, i.name) for i in mgr.checkpoints()] == [(3, "step_00000003")]


def test_a_save_into_a_folder_whose_data_is_missing_says_how_to_clear_it(store):
    mgr = manager(store)
    info = mgr.save({"x": 1}, step=2)
    mgr.storage.delete(f"{info.name}/{info.files[0].path}")
    with pytest.raises(CheckpointExists) as err:
        mgr.save({"x": 2}, step=2)
    assert str(err.value) == (
        f"{mgr.storage.url(info.name)} holds a manifest whose data file is missing (a save that failed while it "
        f"committed, or damage); it is removed once idle for abandoned_after, or now with delete('{info.name}')")


def test_a_killed_cleaner_is_finished_by_the_next_one(store):
    storage = open_storage(store.url, store.storage_options)
    manager(store).save({"w": torch.zeros(4)}, step=1)
    with storage.open_write("step_00000002/state-0123abcd.safetensors") as f:
        f.write(b"data of a killed save")
    storage.write_new("step_00000002/manifest.json", tombstone())  # the cleaner died after its claim
    mgr = manager(store)
    assert mgr.uncommitted() == {"step_00000002": "being removed as an abandoned save"}
    mgr.prune()  # the idle rule holds for a claimed folder too: its cleaner may still be at work
    assert "step_00000002" in scan.scan(storage).abandoned
    manager(store, abandoned_after=0).prune()
    assert scan.scan(storage).abandoned == {} and assert_all_verify(store) == [1]


def test_a_late_cleaner_never_deletes_a_manifest_committed_after_the_tombstone_went(store):
    """Found by the random trials (seed 317): two cleaners finish one claimed folder; the first
    removes the tombstone, a new save commits that step, and the second deleted its manifest by path."""
    storage = open_storage(store.url, store.storage_options)
    with storage.open_write("step_00000002/state-0123abcd.safetensors") as f:
        f.write(b"data of a killed save")
    storage.write_new("step_00000002/manifest.json", tombstone())
    stale = scan.scan(storage)  # the second cleaner's listing: the claimed folder
    cleanup.clean(storage, scan.scan(storage), 0, cleanup.IdleClock())  # the first finishes it
    manager(store).save({"w": torch.ones(4)}, step=2)  # a new save of that step
    cleanup.clean(storage, stale, 0, cleanup.IdleClock())  # the second acts on its stale listing
    assert assert_all_verify(store) == [2]
    assert torch.equal(manager(store).restore()["w"], torch.ones(4))


def test_idle_is_judged_by_our_clock_too_not_only_the_store_mtime(tmp_path):
    """A leftover whose mtime says two hours (clock skew, S3 multipart Last-Modified) is not removed on sight."""
    root = tmp_path / "run"
    mgr = CheckpointManager(root, abandoned_after=600)
    mgr.save({"x": 0}, step=0)
    leftover = root / "step_00000001" / "state-0123abcd.pt"
    leftover.parent.mkdir()
    leftover.write_bytes(b"an upload that just completed")
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    mgr.save({"x": 2}, step=2)
    CheckpointManager(root, abandoned_after=600).prune()
    assert leftover.exists()
    CheckpointManager(root, abandoned_after=0).prune()
    assert not leftover.exists()


def test_a_damaged_manifest_names_the_way_out_and_delete_takes_it(store):
    storage = open_storage(store.url, store.storage_options)
    mgr = manager(store)
    mgr.save({"x": 4}, step=4)
    with storage.open_write("step_00000005/state-0123abcd.safetensors") as f:
        f.write(b"data")
    storage.write_new("step_00000005/manifest.json", b"{not json")
    with pytest.raises(CheckpointExists) as err:
        mgr.save({"x": 5}, step=5)
    assert str(err.value) == (
        f"{storage.url('step_00000005')} holds an unreadable manifest, so it is not a checkpoint but its name is taken; "
        f"look at it (ckptstore ls --all {storage.url()}), then remove it with CheckpointManager.delete('step_00000005') "
        f"or: ckptstore delete {storage.url()} step_00000005")
    assert mgr.prune() == [] and "step_00000005" in mgr.uncommitted()  # never removed automatically
    assert mgr.delete(5) is None
    assert mgr.uncommitted() == {} and not storage.exists("step_00000005/state-0123abcd.safetensors")
    mgr.save({"x": 5}, step=5)
    assert mgr.restore() == {"x": 5}
    with pytest.raises(CheckpointNotFound):
        mgr.delete(6)


def test_cli_delete_removes_a_damaged_checkpoint(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path)
    mgr.save({"x": 1}, step=1)
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000002" / "manifest.json").write_text("{}")
    assert main(["delete", str(tmp_path), "step_00000002"]) == 0
    assert "unreadable manifest" in capsys.readouterr().out and not (tmp_path / "step_00000002").exists()
    assert main(["delete", str(tmp_path), "1"]) == 0 and mgr.checkpoints() == []


def test_leftover_temp_files_are_cleaned_like_abandoned_saves(store):
    """A kill during a local atomic write leaves ``.<name>.<hex>.tmp``, at the root (the export) or in a folder."""
    storage = open_storage(store.url, store.storage_options)
    mgr = manager(store)
    mgr.save({"x": 1}, step=1)
    temps = [".model_best.safetensors.0123456789ab.tmp", ".model_best.safetensors.json.0123456789ab.tmp",
             "step_00000001/.state-0123abcd.pt.ba9876543210.tmp"]
    for path in temps:
        with storage.open_write(path) as f:
            f.write(b"x" * 100)
    with storage.open_write("notes.tmp") as f:  # not ours: never touched
        f.write(b"mine")
    assert set(scan.scan(storage).stray) == set(temps)
    mgr.save({"x": 2}, step=2)  # just seen: might be a write in progress elsewhere
    assert all(storage.exists(p) for p in temps)
    manager(store, abandoned_after=0).prune()
    assert not any(storage.exists(p) for p in temps) and storage.read("notes.tmp") == b"mine"


def test_a_new_checkpoint_folder_is_made_durable_by_an_fsync_of_its_parent(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "new" / "run"
    CheckpointManager(root).save({"x": 1}, step=1)
    assert str(tmp_path) in synced and str(tmp_path / "new") in synced  # the root's new folders
    assert str(root) in synced  # the entry of the new checkpoint folder


def test_verify_racing_a_prune_reports_no_false_damage(store):
    """A checkpoint pruned while ``verify`` reads it is gone, not damaged: it is left out."""
    mgr = manager(store)
    for step in (1, 2):
        mgr.save({"w": torch.full((64,), float(step))}, step=step)
    pruner = manager(store)
    real = mgr.storage.size
    done = []

    def size(path):
        if not done:
            done.append(path)
            pruner.delete(1)  # between verify's listing and its first read
        return real(path)

    mgr.storage.size = size
    assert mgr.verify() == {"step_00000002": None} and done


def test_a_manifest_without_its_data_is_not_a_checkpoint(store):
    """What a save leaves when a cleaner removed its data and a failure stopped its un-commit
    (found by the random trials, seeds 117 and 244): never counted, so never the reason to prune."""
    storage = open_storage(store.url, store.storage_options)
    mgr = manager(store, keep_last=2)
    for step in (1, 2):
        mgr.save({"w": torch.full((4,), float(step))}, step=step)
    real = mgr.save({"w": torch.zeros(4)}, step=3)
    storage.delete(f"{real.name}/{real.files[0].path}")  # step 3: a manifest whose data is gone
    assert [c.step for c in mgr.checkpoints()] == [2]
    assert mgr.uncommitted() == {"step_00000003": "manifest whose data file is missing; removed once idle"}
    with pytest.raises(CorruptCheckpointError, match="data file is missing"):
        mgr.restore(which=3)
    with pytest.raises(CheckpointExists, match=r"data file is missing.*delete\('step_00000003'\)"):
        mgr.save({"w": torch.zeros(4)}, step=3)
    mgr.save({"w": torch.full((4,), 4.0)}, step=4)
    assert [c.step for c in mgr.checkpoints()] == [2, 4]  # the phantom did not push step 2 out
    assert torch.equal(mgr.restore()["w"], torch.full((4,), 4.0))
    manager(store, abandoned_after=0).prune()
    assert mgr.uncommitted() == {}


def test_a_listing_whose_manifests_vanish_is_taken_again(store):
    """Found by the random trials (seed 148): every manifest listed was pruned before it was read,
    and restore() returned None, a fresh start, though newer checkpoints existed."""
    mgr = manager(store)
    mgr.save({"x": 1}, step=1)
    trainer = manager(store, keep_last=1)
    real = mgr.storage.read_many
    done = []

    def read_many(paths):
        if not done:
            done.append(paths)
            trainer.save({"x": 2}, step=2)  # prunes step 1 between the listing and the read
        return real(paths)

    mgr.storage.read_many = read_many
    assert mgr.restore() == {"x": 2} and done


def test_a_checkpoint_committed_elsewhere_in_a_folder_this_process_listed_is_seen(store):
    """Found by the crash trials on S3: a process listed a folder holding only a killed saver's data
    file; another process then committed that step there. s3fs cached the folder's listing, its
    ``cat_file`` asked that cache for the manifest's size, and the scan dropped the checkpoint:
    ``latest()`` named an older step and retention counted one checkpoint too few."""
    orphan = open_storage(store.url, {**store.storage_options, "skip_instance_cache": True})
    orphan.makedirs()
    orphan.write_new("step_00000002/state-0123abcd.safetensors", b"a killed saver's upload")
    watcher = manager(store)
    watcher.save({"x": 1}, step=1)
    assert [i.step for i in watcher.checkpoints()] == [1]  # lists step_00000002 as an unfinished save
    elsewhere = CheckpointManager(store.url, storage_options={**store.storage_options, "skip_instance_cache": True})
    elsewhere.save({"x": 2}, step=2)  # another process: its writes cannot touch this one's caches
    assert [i.step for i in watcher.checkpoints()] == [1, 2]
    assert watcher.latest().step == 2 and watcher.restore() == {"x": 2}


def test_a_manifest_listed_but_never_readable_stops_the_scan_loudly(store):
    """Counting the other checkpoints without it would resume from an older one, or prune for a phantom."""
    mgr = manager(store)
    mgr.save({"x": 1}, step=1)
    mgr.save({"x": 2}, step=2)
    real = mgr.storage.read_many
    mgr.storage.read_many = lambda paths: {p: d for p, d in real(paths).items() if not p.startswith("step_00000002/")}
    with pytest.raises(StorageError, match=r"step_00000002/manifest.json listed 3 times but not found when read"):
        mgr.latest()
    with pytest.raises(StorageError, match="listed 3 times"):
        mgr.save({"x": 3}, step=3)
    mgr.storage.read_many = real
    assert [i.step for i in mgr.checkpoints()] == [1, 2]


def test_a_prune_deleting_one_manifest_per_listing_is_not_taken_for_a_broken_store(store):
    """Three listings, each catching a different manifest as another process prunes it: the scan
    counts what is left, and raises only for a manifest that no listing could read."""
    mgr = manager(store)
    for step in range(1, 6):
        mgr.save({"x": step}, step=step)
    reader = manager(store)  # a new process: it reads every manifest it lists
    real = reader.storage.read_many
    doomed = [1, 2, 3]

    def read_many(paths):
        if doomed:
            mgr.delete(doomed.pop(0))  # between this listing and its reads
        return real(paths)

    reader.storage.read_many = read_many
    assert [i.step for i in reader.checkpoints()] == [4, 5] and doomed == []


def test_the_loser_of_a_commit_race_deletes_its_own_data_file_and_nothing_else(store, request):
    """Both writers passed the free-step check and wrote their data; the create-only manifest
    settles it: exactly one commits, and the other removes its own data file (issue 12)."""
    if store.kind == "gcs":
        request.applymarker(pytest.mark.xfail(strict=True, reason="the GCS emulator ignores create-only preconditions"))
    winner, loser = manager(store), manager(store)
    won: list = []
    before_manifest_write(loser, lambda: won.append(winner.save({"who": "winner", "w": torch.ones(64)}, step=3)))
    with pytest.raises(CheckpointExists, match=r"checkpoint step_00000003 is already committed"):
        loser.save({"who": "loser", "w": torch.zeros(64)}, step=3)
    storage = open_storage(store.url, store.storage_options)
    files = sorted(p for p in storage.list_files() if p.startswith("step_00000003/"))
    assert files == sorted(["step_00000003/manifest.json", f"step_00000003/{won[0].files[0].path}"])
    assert manager(store).restore(which=3)["who"] == "winner"


def test_a_data_file_that_vanishes_while_committing_un_commits_the_checkpoint(store):
    """The second guard: a cleaner removed the data file between the write and the manifest; the
    writer sees it gone after committing, takes its manifest back and says so (issue 12)."""
    mgr = manager(store)
    storage = open_storage(store.url, store.storage_options)
    real = mgr.storage.write_new

    def write_new(path, data):
        real(path, data)
        storage.delete(next(p for p in storage.list_files() if p.startswith("step_00000001/state-")))

    mgr.storage.write_new = write_new
    with pytest.raises(StorageError, match=r"the data file vanished while committing.*un-committed"):
        mgr.save({"w": torch.ones(8)}, step=1)
    assert not [p for p in storage.list_files() if p.startswith("step_00000001/")]  # no manifest left behind
    assert manager(store).checkpoints() == [] and manager(store).restore() is None


def test_retention_un_commits_before_it_deletes_data(store):
    """Manifest first, then the data it listed: a crash between the two leaves an unfinished save
    (cleaned once idle), never a manifest naming a missing file. Seen through the order of the
    deletes, not a timed kill (issue 12)."""
    mgr = manager(store, keep_last=1)
    deleted: list[str] = []
    real = mgr.storage.delete

    def delete(path):
        deleted.append(path)
        return real(path)

    mgr.storage.delete = delete
    first = mgr.save({"w": torch.ones(8)}, step=1)
    mgr.save({"w": torch.ones(8)}, step=2)  # retention drops step 1
    assert deleted == [f"{first.name}/manifest.json", f"{first.name}/{first.files[0].path}"]


def unfinished_save(store) -> tuple:
    """A folder with a data file and no manifest, as a save that is still uploading leaves it."""
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    storage.write_new("step_00000005/state-0123abcd.pt", b"x" * 10)
    return storage, scan.scan(storage)


def test_a_save_whose_files_are_fresh_is_kept_however_long_it_was_watched(store):
    """The idle rule takes the smaller of the files' age (their store's modification time) and
    how long this process has watched them: a folder watched for 1000 s but written a moment
    ago is still someone's save in progress."""
    storage, found = unfinished_save(store)
    clock = cleanup.IdleClock()
    assert cleanup.clean(storage, found, 60, clock, now=time.time(), monotonic=0.0) == []  # the watch starts
    assert cleanup.clean(storage, found, 60, clock, now=time.time(), monotonic=1000.0) == []
    assert list(scan.scan(storage).abandoned) == ["step_00000005"]
    assert cleanup.clean(storage, found, 60, clock, now=time.time() + 61, monotonic=1061.0) == ["step_00000005"]


def test_an_old_modification_time_on_local_disk_counts_not_the_inode_change_time(store):
    """On local disk a file's age is its mtime (what a copy with ``cp -p`` or ``rsync -t``
    keeps), not its ctime, which any rename or chmod resets."""
    if store.kind not in ("local", "file"):
        pytest.skip("only a local file has an mtime apart from its ctime")
    storage, _ = unfinished_save(store)
    data = storage.local_path("step_00000005/state-0123abcd.pt")
    os.utime(data, (time.time() - 3600, time.time() - 3600))
    found, clock = scan.scan(storage), cleanup.IdleClock()
    assert cleanup.clean(storage, found, 60, clock, monotonic=0.0) == []  # the watch starts
    assert cleanup.clean(storage, found, 60, clock, monotonic=61.0) == ["step_00000005"]
