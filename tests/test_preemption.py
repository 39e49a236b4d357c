"""Preemption notices (issue 13, point 3): signals and the clouds' metadata servers, real HTTP on
127.0.0.1, real processes sent real signals, on every store another process can reach."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager, ConfigError
from ckptstore.preemption import PreemptionWatcher
from fake_metadata import FakeMetadata

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "spot_training.py"
DEADLINE_S = 60


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("cloud, expected", [("aws", "AWS spot terminate at 2026-12-01T15:00:00Z"),
                                             ("gcp", "GCP preemption"),
                                             ("azure", "Azure Preempt event at Tue, 01 Dec 2026 15:00:30 GMT")])
def test_each_cloud_s_notice_is_seen_within_a_poll(cloud, expected):
    with FakeMetadata() as meta:
        watcher = PreemptionWatcher(signals=(), clouds=(cloud,), poll_seconds=0.05, endpoints={cloud: meta.url}).start()
        try:
            assert wait_for(lambda: len(meta.requests) >= 3)  # polled, "no notice" ...
            assert watcher.notice is None and watcher.active_clouds == (cloud,)
            meta.post_notice()
            assert wait_for(lambda: watcher.notice is not None, 5)  # ... then the notice, within a poll or two
            assert watcher.notice == expected
        finally:
            watcher.stop()
    if cloud == "aws":  # IMDSv2: a token first, then the notice with it (the fake refuses it without)
        assert meta.requests[:2] == ["PUT /latest/api/token", "GET /latest/meta-data/spot/instance-action"]


def test_a_cloud_that_does_not_answer_is_asked_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed
    with FakeMetadata() as meta:
        watcher = PreemptionWatcher(signals=(), clouds=("aws", "gcp"), poll_seconds=0.05,
                                    endpoints={"aws": closed, "gcp": meta.url}).start()
        try:
            assert wait_for(lambda: len(meta.requests) >= 4)
            assert watcher.active_clouds == ("gcp",)  # AWS was dropped after its first probe; GCP is still asked
        finally:
            watcher.stop()


def test_a_signal_only_sets_the_flag_and_stop_puts_the_old_handler_back():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *_: seen.append("old"))
    try:
        mgr = CheckpointManager("memory://preempt/signal", save_interval_steps=100)
        watcher = mgr.watch_preemption(signals=(signal.SIGUSR1,), clouds=())
        assert not mgr.reached_preemption(7) and not mgr.should_save(7)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_for(lambda: mgr.preemption_notice == "SIGUSR1", 5)
        assert mgr.reached_preemption(7) and mgr.should_save(7)  # save now, whatever the interval
        watcher.stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_for(lambda: seen == ["old"], 5)
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_signal_handlers_need_the_main_thread():
    errors = []

    def watch():
        try:
            CheckpointManager("memory://preempt/thread").watch_preemption(clouds=())
        except ConfigError as err:
            errors.append(str(err))

    thread = threading.Thread(target=watch)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def test_unknown_clouds_are_refused():
    with pytest.raises(ConfigError, match=r"unknown cloud\(s\) \['aws2'\]"):
        PreemptionWatcher(clouds=("aws2",))


# -- a training process, preempted ----------------------------------------------------------------


def start_training(store, *extra: str) -> subprocess.Popen:
    args = [sys.executable, str(EXAMPLE), store.url, "--steps", "400", "--save-every", "4", "--step-seconds", "0.03",
            "--storage-options", json.dumps(store.storage_options), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_until_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith(f"step {step} "):
            return lines
    raise AssertionError(f"the run ended before step {step}: {lines[-5:]} {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err
    return out.splitlines()


def check_final_save_and_resume(store, lines: list[str], notice: str) -> None:
    final = [line for line in lines if line.startswith("preempted")]
    assert len(final) == 1 and final[0].startswith(f"preempted ({notice}"), lines[-5:]
    saved = int(final[0].rsplit(" ", 1)[1])
    assert lines[-2].startswith(f"step {saved} ")  # it stopped at the step it saved
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    assert mgr.latest().step == saved and mgr.verify() == {c.name: None for c in mgr.checkpoints()}
    resumed = start_training(store, "--clouds", "")
    first = run_until_step(resumed, saved + 1)
    resumed.send_signal(signal.SIGTERM)
    finish(resumed)
    assert first[0] == f"resuming at step {saved + 1}"


# make test: local disk and S3; file:// and GCS (the same code paths, 8 s each) in make test-long
STORES = [
    pytest.param("local", id="local"),
    pytest.param("s3", id="s3", marks=pytest.mark.remote),
    pytest.param("file", id="file", marks=pytest.mark.long),
    pytest.param("gcs", id="gcs", marks=[pytest.mark.remote, pytest.mark.long]),
]


@pytest.mark.parametrize("process_store", STORES, indirect=True)
def test_sigterm_saves_the_step_it_stopped_at_and_the_run_resumes_from_it(process_store):
    proc = start_training(process_store, "--clouds", "")
    before = run_until_step(proc, 6)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    lines = before + finish(proc)
    assert time.monotonic() - sent < DEADLINE_S
    check_final_save_and_resume(process_store, lines, "SIGTERM")


@pytest.mark.parametrize("process_store", STORES, indirect=True)
def test_an_aws_spot_notice_saves_and_the_run_resumes_from_it(process_store):
    with FakeMetadata() as meta:
        proc = start_training(process_store, "--clouds", "aws", "--metadata-endpoints", json.dumps({"aws": meta.url}))
        before = run_until_step(proc, 6)
        meta.post_notice()
        lines = before + finish(proc)
    check_final_save_and_resume(process_store, lines, "AWS spot terminate")


def test_should_save_after_a_notice_even_off_the_interval():
    mgr = CheckpointManager("memory://preempt/interval", save_interval_steps=1000)
    with FakeMetadata() as meta:
        watcher = mgr.watch_preemption(signals=(), clouds=("gcp",), endpoints={"gcp": meta.url}, poll_seconds=0.05)
        try:
            assert not mgr.should_save(3)
            meta.post_notice()
            assert wait_for(lambda: mgr.should_save(3), 5) and mgr.reached_preemption(3)
            mgr.save({"w": torch.ones(1)}, step=3)
            assert not mgr.should_save(3)  # saved: not again
        finally:
            watcher.stop()
