"""A process that forks savers for crash trials, so each trial does not pay for importing torch.

It imports torch and ckptstore once and never opens a store itself (a forked child must not
inherit an fsspec event loop). For each JSON line on stdin it forks a saver, waits until the
saver has committed once and is in its save loop, and prints ``{"pid": ...}``; the test then
sends the saver a real signal and writes ``reap``, and this process prints the saver's
``{"status": <waitpid status>}``. If the test goes away, the saver is killed (and a saver
whose zygote died exits by itself), so nothing saves on after a failed or timed-out test.

The saver saves steps back to back, resuming after the newest committed one, blocking or in
the background at random (seeded), with ``keep_last=2, keep_best=1`` by a loss whose best is
step 7. With ``watch`` it watches for SIGTERM and makes one final blocking save on it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import traceback

import torch

from ckptstore import CheckpointManager


def loss(step: int) -> float:
    return float((step - 7) ** 2 + 1)


def saver(cmd: dict, ready_fd: int) -> None:
    mgr = CheckpointManager(cmd["root"], keep_last=2, keep_best=1, monitor="loss", format=cmd["fmt"],
                            storage_options=cmd["storage_options"])
    if cmd["watch"]:
        mgr.watch_preemption(clouds=())
    zygote = os.getppid()
    latest = mgr.latest()
    start = latest.step + 1 if latest else 0
    rng = random.Random(cmd["seed"])
    for step in range(start, start + 100_000):
        if os.getppid() != zygote:  # the test and its zygote are gone: do not save on forever
            os._exit(5)
        state = {"w": torch.full((cmd["numel"],), float(step)), "step": step}
        if mgr.reached_preemption(step):
            mgr.save(state, step=step, metrics={"loss": loss(step)})
            os._exit(0)
        mgr.save(state, step=step, metrics={"loss": loss(step)}, blocking=rng.random() < 0.5)
        if step == start:
            mgr.wait()
            os.write(ready_fd, b"r")  # committed once: in the save loop now


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saver
            os.close(read_fd)
            try:
                saver(cmd, write_fd)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
            os._exit(4)
        os.close(write_fd)
        ready = os.read(read_fd, 1) == b"r"
        os.close(read_fd)
        print(json.dumps({"pid": pid, "ready": ready}), flush=True)
        if not sys.stdin.readline():  # the test is gone without its signal: end the saver
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    main()
