"""Several parts of an upload and several ranges of a read in flight at once, as many as
``Transfers`` says and no more, and the bytes whole (issue 14, point 3).

Concurrency is read off the fault proxy (``Stats.max_in_flight``: the most requests it was
handling at once), with 50 ms added each way so that requests overlap when the client lets
them. Speed is measured in benchmarks/bench_link.py, not here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
import torch

from ckptstore import CheckpointManager, ConfigError, StorageError, Transfers, load_partial
from netfault import Action, FaultProxy, RequestHead, Rule
from test_lost_replies import through, upstream_of

PART = 5 * 2**20  # S3's smallest part


def big_state(step: int) -> dict[str, Any]:
    """22 MiB: five 5 MiB parts, the last one short."""
    gen = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(22 * 2**18, generator=gen)}, "step": step}


def data_or_other(head: RequestHead) -> str:
    """Byte reads and writes of a checkpoint's data file, apart from listings, manifests and
    metadata: gcsfs's ``info`` sends its metadata GET and a listing at once, which are not
    ranges in flight."""
    if "state-" not in unquote(head.path) or (head.method == "GET" and "range" not in head.headers):
        return head.method
    return f"{head.method} data"


def byte_reads(log: list[tuple[str, str]]) -> list[str]:
    """The GETs of a data file's bytes in ``log`` ((method, unquoted target) pairs): not gcsfs's
    metadata GETs of the same object."""
    return [t for m, t in log if m == "GET" and "state-" in t and ("alt=media" in t or "/storage/v1/" not in t)]


@pytest.fixture
def slow_link(remote_store: Any) -> Iterator[FaultProxy]:
    with FaultProxy(upstream_of(remote_store), latency=0.05, timeout=30.0, group=data_or_other) as proxy:
        yield proxy


def manager(store: Any, proxy: FaultProxy, in_flight: int) -> CheckpointManager:
    return CheckpointManager(store.url, storage_options=through(store, proxy),
                             transfers=Transfers(part_bytes=PART, in_flight=in_flight))


@pytest.mark.parametrize("in_flight", [1, 3])
def test_an_upload_keeps_as_many_parts_in_flight_as_asked_and_no_more(remote_store, slow_link, in_flight):
    """S3 uploads ``in_flight`` parts at once; GCS's resumable upload is one chunk after another."""
    mgr = manager(remote_store, slow_link, in_flight)
    mgr.save(big_state(1), step=1)
    parts = [t for m, t, _ in slow_link.stats.log if "partNumber=" in t or "upload_id=" in t]
    if remote_store.kind == "s3":
        assert len(parts) == 5, parts
        assert slow_link.stats.max_in_flight["PUT data"] == in_flight
    else:
        assert len(parts) >= 2, parts
        assert slow_link.stats.max_in_flight["POST"] == 1  # gcsfs sends each chunk as a POST (named in the query)
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.verify() == {"step_00000001": None}
    assert torch.equal(dict(direct.restore())["model"]["w"], big_state(1)["model"]["w"])


@pytest.mark.parametrize("in_flight", [1, 3])
def test_a_whole_file_read_keeps_as_many_ranges_in_flight_as_asked(remote_store, slow_link, in_flight):
    """verify() reads each data file from start to end: ``in_flight`` ranged GETs at once, every
    byte checked against the manifest's CRC32C."""
    CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).save(big_state(1), step=1)
    mgr = manager(remote_store, slow_link, in_flight)
    assert mgr.verify() == {"step_00000001": None}
    ranged = [t for m, t, _ in slow_link.stats.log if m == "GET" and "state-" in t]
    assert len(ranged) >= 5, slow_link.stats.log
    assert slow_link.stats.max_in_flight["GET data"] == in_flight, "\n".join(map(str, slow_link.stats.log))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_a_partial_load_plans_in_one_round_trip_after_the_manifest(remote_store, slow_link, fmt):
    """A partial load of a checkpoint folder: the manifest (one GET, no HEAD before it), then
    the file's first 64 KiB, with a torch zip's last 64 KiB (its directory) at the same time,
    then the wanted tensor's range. Three round trips, whatever the format; the data file named
    directly costs its size lookup instead of the manifest."""
    state = {"model": {"w": torch.randn(2**20), "b": torch.arange(10.0)}, "step": 1}
    CheckpointManager(remote_store.url, storage_options=remote_store.storage_options, format=fmt).save(state, step=1)
    url = f"{remote_store.url}/step_00000001"
    target = {"b": torch.zeros(10)}
    report = load_partial(url, target, storage_options=through(remote_store, slow_link))
    assert report.loaded == ["b"] and torch.equal(target["b"], state["model"]["b"])
    log = [(m, unquote(t)) for m, t, _ in slow_link.stats.log]
    assert [m for m, _ in log] == ["GET"] * len(log), log  # no HEAD, no listing's other verbs
    assert sum("manifest.json" in t for _, t in log) == 1, log
    ranged = byte_reads(log)
    assert len(ranged) == (3 if fmt == "torch" else 2), log  # head (+ tail at once), then b's bytes
    assert slow_link.stats.max_in_flight["GET data"] == (2 if fmt == "torch" else 1)
    assert report.requests == len(ranged)
    # the data file by its own name: a file, so no manifest is looked for beside it
    seen = len(slow_link.stats.log)
    name = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).latest().files[0].path
    again = load_partial(f"{url}/{name}", {"b": torch.zeros(10)}, storage_options=through(remote_store, slow_link), key="model")
    later = [(m, unquote(t)) for m, t, _ in slow_link.stats.log[seen:]]
    assert again.loaded == ["b"] and not any("manifest" in t for _, t in later), later
    assert len(byte_reads(later)) == len(ranged), later


def test_a_fresh_manager_restores_with_one_get_per_manifest_and_no_head(remote_store, slow_link):
    """On restart a manager lists the root and reads every manifest: each read is one GET (s3fs
    would otherwise ask for the size first, a HEAD: one more round trip per checkpoint)."""
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options, keep_last=3)
    for step in (1, 2, 3):
        direct.save({"model": {"w": torch.full((4,), float(step))}}, step=step)
    state = CheckpointManager(remote_store.url, storage_options=through(remote_store, slow_link)).restore()
    assert state["model"]["w"].tolist() == [3.0] * 4
    log = [(m, unquote(t)) for m, t, _ in slow_link.stats.log]
    manifests = [m for m, t in log if "manifest.json" in t]
    assert manifests == ["GET"] * 3, log


def test_a_part_that_fails_for_good_aborts_the_upload_and_commits_nothing(remote_store, slow_link):
    if remote_store.kind != "s3":
        pytest.skip("only S3 uploads parts concurrently")
    rule = slow_link.add(Rule(Action.STATUS, method="PUT", target=r"[?&]partNumber=3(&|$)", status=403))
    mgr = manager(remote_store, slow_link, 3)
    with pytest.raises(StorageError, match="access denied"):
        mgr.save(big_state(1), step=1)
    assert rule.fired == 1
    slow_link.clear()
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.checkpoints() == [] and direct.incomplete_uploads() == []


@pytest.mark.parametrize("remote_store", [pytest.param("s3", marks=[pytest.mark.remote, pytest.mark.long]),  # ~36 s: test-long
                                          pytest.param("gcs", marks=pytest.mark.remote)], indirect=True)
def test_parts_ride_out_transient_faults(remote_store, slow_link):
    """Parts of a concurrent upload meet 503s, lost replies and resets mid-upload now and then;
    the client re-sends that part alone and every save commits whole.

    GCS: only the 503s. gcsfs re-sends a resumable chunk whose reply was lost without asking
    the server how much it kept, and the emulator refuses the overlap (400 "Invalid
    Content-Range"), so the save fails loudly there (shown below); real GCS is not tried here.
    """
    s3 = remote_store.kind == "s3"
    where = {"method": "PUT", "target": r"partNumber="} if s3 else {"target": r"upload_id="}
    slow_link.add(Rule(Action.STATUS, status=503, probability=0.2, seed=1, **where))
    if s3:
        slow_link.add(Rule(Action.DROP_REPLY, probability=0.15, seed=2, **where))
        slow_link.add(Rule(Action.CUT_REQUEST, request_bytes=4096, probability=0.15, seed=3, **where))
    mgr = manager(remote_store, slow_link, 3)
    for step in range(2):
        mgr.save(big_state(step), step=step)
    assert all(rule.fired >= 1 for rule in slow_link.rules), [r.fired for r in slow_link.rules]
    slow_link.clear()
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.verify() == {f"step_{s:08d}": None for s in range(2)}
    assert direct.incomplete_uploads() == []


@pytest.mark.long  # gcsfs's fixed backoffs make it ~40 s: make test-long
def test_a_lost_chunk_reply_fails_a_gcs_save_loudly_and_harms_nothing(remote_store, slow_link):
    """The emulator's side of the limit above: the save raises, nothing is committed."""
    if remote_store.kind != "gcs":
        pytest.skip("S3 re-sends a part whose reply was lost (test_parts_ride_out_transient_faults)")
    slow_link.add(Rule(Action.DROP_REPLY, target=r"upload_id=", times=1))
    mgr = manager(remote_store, slow_link, 3)
    with pytest.raises(StorageError, match=r"cannot write .*state-"):
        mgr.save(big_state(1), step=1)
    slow_link.clear()
    assert CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).checkpoints() == []


@pytest.mark.parametrize("bad", [{"part_bytes": 2**20}, {"in_flight": 0}, {"part_bytes": 8.0e6}])
def test_transfers_refuse_what_s3_or_sense_cannot_take(bad):
    with pytest.raises(ConfigError, match="must be an int of at least"):
        Transfers(**bad)


def test_a_server_that_stops_reading_mid_part_gets_the_part_again_not_a_hung_save(remote_store, caplog):
    """The proxy takes 1 MiB of part 1's body, then stops reading: the client's send blocks
    with no timeout of its own (its read timeout starts after the body). ckptstore cuts the try
    after read_timeout + size / stalled_below seconds and sends the part again."""
    if remote_store.kind != "s3":
        pytest.skip("GCS uploads are gcsfs's own (see the README: a mid-upload stall there is not bounded)")
    part = 32 * 2**20  # far more than the socket buffers hold, so the sender really blocks
    stall = Rule(Action.STALL_REQUEST, method="PUT", target=r"[?&]partNumber=1(&|$)", request_bytes=2**20,
                 stall_seconds=120, times=1)
    with FaultProxy(upstream_of(remote_store), [stall], timeout=130.0) as proxy:
        options = {**through(remote_store, proxy), "config_kwargs": {"read_timeout": 1}}
        mgr = CheckpointManager(remote_store.url, storage_options=options,
                                transfers=Transfers(part_bytes=part, in_flight=1, stalled_below=16 * 2**20))
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            mgr.save({"model": {"w": torch.ones(10 * 2**20)}}, step=1)  # 40 MiB: two parts
        took = time.monotonic() - began
    assert stall.fired == 1
    assert 3 <= took < 60, f"{took:.1f} s"  # the try is cut at 1 + 32/16 = 3 s; the proxy would hold it 120 s
    assert any("part 1 of s3://" in r.getMessage() and "slower than 16777216 bytes/s" in r.getMessage() for r in caplog.records)
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.verify() == {"step_00000001": None}


def test_a_part_that_stalls_every_try_fails_the_save_after_three_and_commits_nothing(remote_store, caplog):
    """The same stall on every try: three tries, each cut at its bound and said in a warning,
    then the save fails in one line; the upload is aborted and nothing is committed."""
    if remote_store.kind != "s3":
        pytest.skip("GCS uploads are gcsfs's own (see the README: a mid-upload stall there is not bounded)")
    part = 32 * 2**20
    stall = Rule(Action.STALL_REQUEST, method="PUT", target=r"[?&]partNumber=1(&|$)", request_bytes=2**20, stall_seconds=120)
    with FaultProxy(upstream_of(remote_store), [stall], timeout=130.0) as proxy:
        options = {**through(remote_store, proxy), "config_kwargs": {"read_timeout": 1}}
        mgr = CheckpointManager(remote_store.url, storage_options=options,
                                transfers=Transfers(part_bytes=part, in_flight=1, stalled_below=64 * 2**20))
        with caplog.at_level(logging.WARNING, logger="ckptstore"), pytest.raises(StorageError, match="stalled: 3 tries of 2 s"):
            mgr.save({"model": {"w": torch.ones(10 * 2**20)}}, step=1)
    assert stall.fired == 3
    warned = [r.getMessage() for r in caplog.records if "moved slower" in r.getMessage()]
    assert [w.rsplit("(", 1)[1] for w in warned] == ["try 1 of 3)", "try 2 of 3)", "try 3 of 3)"]
    assert all(w.startswith("part 1 of s3://") and " moved slower than 67108864 bytes/s for 2 s " in w for w in warned), warned
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert direct.checkpoints() == [] and direct.incomplete_uploads() == []


def test_an_abort_that_fails_leaves_the_save_s_own_error_and_a_warning(remote_store, slow_link, caplog):
    """Part 3 is refused for good and the abort is refused too: the save raises the part's error
    (not the abort's), the warning names the upload left behind, and a later save clears it."""
    if remote_store.kind != "s3":
        pytest.skip("only S3 uploads parts concurrently")
    slow_link.add(Rule(Action.STATUS, method="PUT", target=r"[?&]partNumber=3(&|$)", status=403))
    abort = slow_link.add(Rule(Action.STATUS, method="DELETE", target=r"[?&]uploadId=", status=500))
    mgr = manager(remote_store, slow_link, 3)
    with caplog.at_level(logging.WARNING, logger="ckptstore"), pytest.raises(StorageError, match="access denied"):
        mgr.save(big_state(1), step=1)
    assert abort.fired >= 1
    key = f"{remote_store.url.removeprefix('s3://')}/step_00000001/state-"
    assert any(r.getMessage().startswith(f"could not abort the upload of s3://{key}") and
               r.getMessage().endswith("the next save's cleanup will") for r in caplog.records), caplog.text
    slow_link.clear()
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options, abandoned_after=0)
    assert len(direct.incomplete_uploads()) == 1
    direct.save(big_state(2), step=2)
    assert direct.incomplete_uploads() == [] and [c.step for c in direct.checkpoints()] == [2]


@pytest.mark.long  # a 16 s cut, then gcsfs's backoffs on the emulator's 501s: ~50 s, make test-long
def test_a_gcs_server_that_stops_reading_mid_chunk_fails_the_save_within_the_bound(remote_store):
    """gcsfs's chunk upload has no timeout of its own once the body is being sent; ckptstore's
    total per request (15 s + 64 MiB / stalled_below) cuts the blocked try. gcsfs does not retry
    a timed-out chunk (it retries HTTP errors and connection errors only), so the save fails,
    loudly and within the bound, and commits nothing. S3 re-sends the part instead (the test above)."""
    if remote_store.kind != "gcs":
        pytest.skip("S3 parts have their own bound (the test above)")
    part = 32 * 2**20  # far more than the socket buffers hold, so the sender really blocks
    stall = Rule(Action.STALL_REQUEST, target=r"upload_id=", request_bytes=2**20, stall_seconds=120, times=1)
    with FaultProxy(upstream_of(remote_store), [stall], timeout=130.0) as proxy:
        transfers = Transfers(part_bytes=part, in_flight=1, stalled_below=64 * 2**20)  # a 16 s total per request
        mgr = CheckpointManager(remote_store.url, storage_options=through(remote_store, proxy), transfers=transfers)
        began = time.monotonic()
        # the message is the emulator's: after the cut try it answers gcsfs's next call with 501
        with pytest.raises(StorageError, match=r"cannot write .*step_00000001/state-"):
            mgr.save({"model": {"w": torch.ones(10 * 2**20)}}, step=1)  # 40 MiB: two chunks
        took = time.monotonic() - began
    assert stall.fired == 1
    assert 16 <= took < 110, f"{took:.1f} s"  # cut at 16 s (then gcsfs backs off on the 501s); the proxy would hold it 120 s
    assert CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).checkpoints() == []
