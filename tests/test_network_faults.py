"""Saves, restores and partial loads through a network that fails: every kind of transient
fault is retried, a permanent one fails at once, a stall becomes an error within a bound.

Issue 14, point 2. The faults are real (tests/netfault.py, a proxy on 127.0.0.1 in front of
moto or the GCS emulator); the retries are the client libraries' own, with the timeouts and
counts that ckptstore.network sets. Read timeouts are cut to 1 s here (through
storage_options, as a user would) so that a stall costs a second, not fifteen.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import torch

from ckptstore import CheckpointManager, CkptStoreError, StorageError, network
from ckptstore.storage import open_storage
from netfault import Action, FaultProxy, Rule
from test_lost_replies import create_only_rule, through, upstream_of

READ_TIMEOUT_S = 1.0
PROXY_TIMEOUT = 20.0


def fast_timeouts(store: Any, proxy: FaultProxy) -> dict[str, Any]:
    """The store's options through ``proxy``, with a 1 s read timeout set the way a user sets one."""
    options = through(store, proxy)
    if store.kind == "s3":
        options["config_kwargs"] = {"read_timeout": READ_TIMEOUT_S}
    else:
        options["requests_timeout"] = aiohttp.ClientTimeout(sock_connect=5, sock_read=READ_TIMEOUT_S)
    return options


def writes(kind: str) -> str:
    return "PUT" if kind == "s3" else "POST"


def manifest_write(kind: str) -> dict[str, Any]:
    """Rule criteria for the manifest's create-only write (gcsfs names the object in the body, so
    the create-only precondition in the query picks it out)."""
    if kind == "s3":
        return {"method": "PUT", "target": r"/manifest\.json$"}
    return {"method": "POST", "target": r"[?&]ifGenerationMatch=0(&|$)"}


def state_of(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(512, generator=gen), "ids": torch.randint(-(2**40), 2**40, (64,), generator=gen),
                  "half": torch.randn(128, generator=gen).to(torch.bfloat16)},
        "step": step,
    }


def same(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    return bool(got == want)


@pytest.fixture
def proxy(remote_store: Any) -> Iterator[FaultProxy]:
    with FaultProxy(upstream_of(remote_store), timeout=PROXY_TIMEOUT) as p:
        yield p


def test_the_defaults_bound_every_request_and_the_callers_options_win(remote_store):
    """ckptstore's timeouts and retry counts reach the client; one the caller set is kept."""
    mgr = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    fs = mgr.storage.fs
    if remote_store.kind == "s3":
        assert fs.retries == network.S3_S3FS_ROUNDS
        config = fs.config_kwargs  # botocore adds the retry mode it picked ("legacy") to "retries"
        assert (config["connect_timeout"], config["read_timeout"], config["retries"]["total_max_attempts"]) == (5, 15, 4)
        mine = {**remote_store.storage_options, "config_kwargs": {"read_timeout": 60, "retries": {"mode": "standard"}}}
        config = CheckpointManager(remote_store.url, storage_options=mine).storage.fs.config_kwargs
        assert (config["connect_timeout"], config["read_timeout"], config["retries"]) == (5, 60, {"mode": "standard"})
        assert fs.max_concurrency == 1  # no HEAD before each whole read (see test_transfers.py)
        assert CheckpointManager(remote_store.url, storage_options={**mine, "max_concurrency": 8}).storage.fs.max_concurrency == 8
    else:
        assert fs.requests_timeout == aiohttp.ClientTimeout(total=15.0 + 256.0, sock_connect=5.0, sock_read=15.0)
        mine = {**remote_store.storage_options, "requests_timeout": 120}
        assert CheckpointManager(remote_store.url, storage_options=mine).storage.fs.requests_timeout == 120
    assert remote_store.storage_options.get("config_kwargs") is None  # the caller's dict is not changed


@pytest.mark.parametrize("remote_store", [pytest.param("s3", marks=pytest.mark.remote),  # gcs: 6 tries of 6 s, make test-long
                                          pytest.param("gcs", marks=[pytest.mark.remote, pytest.mark.long])], indirect=True)
def test_a_store_that_stalls_every_commit_fails_the_save_within_the_bound(remote_store, proxy):
    """The manifest write never gets a reply: the save raises after the bounded retries (not
    after minutes), commits nothing, and the checkpoint before it is intact."""
    mgr = CheckpointManager(remote_store.url, storage_options=fast_timeouts(remote_store, proxy))
    mgr.save(state_of(1), step=1)
    rule = proxy.add(Rule(Action.STALL, stall_seconds=PROXY_TIMEOUT, **manifest_write(remote_store.kind)))
    began = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot write .*step_00000002/manifest\.json"):
        mgr.save(state_of(2), step=2)
    took = time.monotonic() - began
    bound = network.request_bound_s(remote_store.kind, read_timeout_s=READ_TIMEOUT_S)
    tries = network.S3_S3FS_ROUNDS * network.S3_BOTOCORE_ATTEMPTS if remote_store.kind == "s3" else network.GCSFS_ATTEMPTS
    assert rule.fired == tries, f"{rule.fired} stalled tries"
    assert READ_TIMEOUT_S * tries <= took <= bound + 10, f"failed after {took:.1f} s (bound {bound:.1f} s)"
    proxy.clear()
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    assert [c.step for c in direct.checkpoints()] == [1]
    assert direct.verify() == {"step_00000001": None}
    assert same(dict(direct.restore()), state_of(1))


def test_one_stalled_reply_costs_one_read_timeout_and_the_save_commits(remote_store, proxy):
    rule = proxy.add(Rule(Action.STALL, times=1, stall_seconds=PROXY_TIMEOUT, **manifest_write(remote_store.kind)))
    mgr = CheckpointManager(remote_store.url, storage_options=fast_timeouts(remote_store, proxy))
    began = time.monotonic()
    info = mgr.save(state_of(1), step=1)
    assert rule.fired == 1 and time.monotonic() - began >= READ_TIMEOUT_S
    assert info.step == 1 and same(dict(mgr.restore()), state_of(1))


@pytest.mark.parametrize("status", [403, 404])
def test_a_permanent_failure_is_not_retried_and_says_so_in_one_line(remote_store, proxy, status):
    """403 (access denied) and 404 on the data upload: one try, one clear line, nothing committed."""
    rule = proxy.add(Rule(Action.STATUS, method=writes(remote_store.kind), target=r"state", status=status))
    mgr = CheckpointManager(remote_store.url, storage_options=fast_timeouts(remote_store, proxy))
    began = time.monotonic()
    with pytest.raises(StorageError) as raised:
        mgr.save(state_of(1), step=1)
    assert rule.fired == 1, f"a {status} was tried {rule.fired} times"
    assert time.monotonic() - began < 5
    message = str(raised.value)
    assert "\n" not in message and "cannot write" in message and "step_00000001" in message, message
    if status == 403:
        assert "access denied" in message, message
    proxy.clear()
    assert CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).checkpoints() == []


def test_a_root_that_is_a_file_the_store_refuses_to_show_is_named_at_once(remote_store, proxy):
    """The manager looks at its root when it starts: a file there is sniffed to say what it is
    (see test_user_mistakes.py); a 403 on reading it is one line saying what could not be reached."""
    parent = remote_store.url.rsplit("/", 1)[0]
    open_storage(parent, remote_store.storage_options).write_new("root", b"not a folder")
    rule = proxy.add(Rule(Action.STATUS, method="GET", target=r"alt=media" if remote_store.kind == "gcs" else r"/root$",
                          status=403))
    with pytest.raises(StorageError, match=r"^cannot reach \S+/root: access denied"):
        CheckpointManager(remote_store.url, storage_options=fast_timeouts(remote_store, proxy))
    assert rule.fired == 1


def test_a_delete_the_store_refuses_says_what_it_could_not_delete(remote_store, proxy):
    """Deleting a checkpoint the store will not let us delete (403): one line naming the file."""
    direct = CheckpointManager(remote_store.url, storage_options=remote_store.storage_options)
    info = direct.save(state_of(1), step=1)
    rule = proxy.add(Rule(Action.STATUS, method="DELETE", target=r"state-", status=403))
    mgr = CheckpointManager(remote_store.url, storage_options=fast_timeouts(remote_store, proxy))
    with pytest.raises(StorageError, match=rf"^cannot delete {re.escape(info.url)}/state-[0-9a-f]{{8}}\.\w+: access denied"):
        mgr.delete(1)
    assert rule.fired >= 1


@pytest.mark.parametrize("what", ["write", "read"])
def test_a_manifest_the_store_refuses_to_write_or_read_is_named(remote_store, proxy, what):
    """403 on the manifest: the commit (a write) or a fresh manager's listing (a read) fails in
    one line that names the manifest; nothing is committed by the refused write."""
    if what == "read":
        CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).save(state_of(1), step=1)
    if what == "write":  # the create-only write (see test_lost_replies.py)
        proxy.add(dataclasses.replace(create_only_rule(remote_store.kind), action=Action.STATUS, status=403))
    else:
        proxy.add(Rule(Action.STATUS, method="GET", target=r"manifest\.json", status=403))
    mgr = CheckpointManager(remote_store.url, storage_options=fast_timeouts(remote_store, proxy))
    with pytest.raises(StorageError, match=rf"^cannot {what} \S+/step_00000001/manifest\.json: access denied"):
        mgr.save(state_of(1), step=1) if what == "write" else mgr.checkpoints()
    proxy.clear()
    assert [c.step for c in CheckpointManager(remote_store.url, storage_options=remote_store.storage_options).checkpoints()] == (
        [1] if what == "read" else [])


# ------------------------------------------------------------------------------- the storm

def storm_rules(kind: str, seed: int) -> dict[str, Rule]:
    """One rule per kind of transient fault, each firing on a seeded share of the requests it
    can apply to (the first rule that fires wins). The resets mid-upload and mid-download match
    only writes and reads, so they get larger shares, and every kind fires about as often."""
    write = writes(kind)
    rules = {
        "reset mid-upload": Rule(Action.CUT_REQUEST, method=write, request_bytes=300, probability=0.1),
        "reset mid-download": Rule(Action.CUT_REPLY, method="GET", reply_bytes=600, probability=0.06),
        "refused connection": Rule(Action.REFUSE, probability=0.03),
        "lost reply": Rule(Action.DROP_REPLY, probability=0.03),
        "stall": Rule(Action.STALL, stall_seconds=PROXY_TIMEOUT, probability=0.03),
        "500": Rule(Action.STATUS, status=500, probability=0.03),
        "502": Rule(Action.STATUS, status=502, probability=0.03),
        "503 SlowDown": Rule(Action.STATUS, status=503, probability=0.03),
        "429": Rule(Action.STATUS, status=429, probability=0.03),
    }
    return {name: dataclasses.replace(rule, seed=seed * 100 + n) for n, (name, rule) in enumerate(rules.items())}


def storm(store: Any, proxy: FaultProxy, per_kind: int, max_rounds: int, seed: int) -> tuple[dict[str, int], list[str]]:
    """Rounds of save → restore → partial load through ``proxy`` until every kind of fault has
    fired ``per_kind`` times; after each round a direct client checks that every committed
    checkpoint verifies and holds what was saved under its step. Returns the counts and the
    errors the operations raised (each a ckptstore error; anything else fails the test)."""
    rules = storm_rules(store.kind, seed=seed)
    for rule in rules.values():
        proxy.add(rule)
    faulty = CheckpointManager(store.url, keep_last=3, storage_options=fast_timeouts(store, proxy))
    direct = CheckpointManager(store.url, keep_last=3, storage_options=store.storage_options)
    raised: list[str] = []
    committed: list[int] = []
    for step in range(max_rounds):
        if min(rule.fired for rule in rules.values()) >= per_kind:
            break
        try:
            faulty.save(state_of(step), step=step)
        except CkptStoreError as err:
            raised.append(f"save {step}: {err}")
        try:
            restored = dict(faulty.restore())
            assert restored["step"] in [*committed, step] and same(restored, state_of(restored["step"]))
            target = {"w": torch.zeros(512), "ids": torch.zeros(64, dtype=torch.int64)}
            report = faulty.load_partial(target, which=restored["step"])
            assert sorted(report.loaded) == ["ids", "w"]
            assert same(target, {k: state_of(restored["step"])["model"][k] for k in target})
        except CkptStoreError as err:
            raised.append(f"read after {step}: {err}")
        report = direct.verify()
        assert report == dict.fromkeys(report), report
        steps = [c.step for c in direct.checkpoints()]
        for s in steps:
            assert same(dict(direct.restore(which=s)), state_of(s)), f"step {s} does not hold what was saved"
        if step in steps:
            committed.append(step)
        # the newest three are kept; an older one may outlive its turn when a faulty delete failed (the next save retries)
        assert set(committed[-3:]) <= set(steps) <= set(committed), f"kept {steps}, committed {committed}"
    counts = {name: rule.fired for name, rule in rules.items()}
    return counts, raised


def _report(store: Any, counts: dict[str, int], raised: list[str]) -> None:
    print(f"\n{store.kind}: {sum(counts.values())} faults injected: {counts}; operations that raised: {len(raised)}")
    for line in raised:
        print("  ", line)


@pytest.mark.parametrize("remote_store", [pytest.param("s3", marks=pytest.mark.remote),  # gcs: 28 s more, make test-long
                                          pytest.param("gcs", marks=[pytest.mark.remote, pytest.mark.long])], indirect=True)
def test_saves_restores_and_partial_loads_ride_out_a_storm_of_faults(remote_store, proxy):
    """Every kind of transient fault at least once (make test-long: 100 of each kind)."""
    counts, raised = storm(remote_store, proxy, per_kind=1, max_rounds=60, seed=1)
    _report(remote_store, counts, raised)
    assert min(counts.values()) >= 1, counts
    assert len(raised) <= 3, raised  # 4 to 8 tries a request: a failure needs several faults in a row


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_a_long_storm_of_every_kind_of_fault(remote_store, proxy):
    counts, raised = storm(remote_store, proxy, per_kind=100, max_rounds=3000, seed=2)
    _report(remote_store, counts, raised)
    assert min(counts.values()) >= 100, counts
    assert len(raised) <= sum(counts.values()) // 50, raised
