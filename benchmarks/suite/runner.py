"""Starting the measured children: forked from a pre-imported server (default), or a fresh interpreter.

Importing torch, fsspec, s3fs, safetensors, DCP and ckptstore takes seconds per process. The
fork server (``zygote_main``) imports them once and forks one child per measurement; it never
runs a torch op, so no thread pool exists to be broken by ``fork``, and each child resets
``VmHWM`` itself, so its peak is its own. ``--spawn`` starts a fresh interpreter instead (about
2 s more per measurement on 2 cores; in a spot check both gave the same peaks).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from suite.measure import child_main

ENTRY = Path(__file__).resolve().parents[1] / "bench_suite.py"
PRELOAD = ("fsspec", "safetensors.torch", "torch", "numpy", "ckptstore", "torch.distributed.checkpoint")


def zygote_main(preload: Sequence[str]) -> None:
    """Fork server: imports ``PRELOAD`` and ``preload`` once, then forks one process per measurement.

    Protocol on stdin/stdout, one JSON line each: spec in -> {"pid": ...} -> {"rc": ...}.
    """
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for mod in (*PRELOAD, *preload):
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the measured process
            fd = os.open(spec["stderr_path"], os.O_WRONLY | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            rc = 0
            try:
                child_main(spec)
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(rc)
        out.write(json.dumps({"pid": pid}).encode() + b"\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        out.flush()


class Runner:
    """Runs one child per spec and returns its result (``status: error`` with a reason if it failed)."""

    def __init__(self, env: dict[str, str], spawn: bool, preload: Sequence[str] = ()) -> None:
        self.env, self.spawn, self.preload = env, spawn, list(preload)
        self.proc: subprocess.Popen[bytes] | None = None
        self.buf = b""

    def _start(self) -> None:
        self.close()
        self.proc = subprocess.Popen([sys.executable, str(ENTRY), "--zygote", ",".join(self.preload)], env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf = b""
        self._line(300)

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        fd, result_path = tempfile.mkstemp(prefix="suite-result-", suffix=".json")
        os.close(fd)
        fd, err_path = tempfile.mkstemp(prefix="suite-stderr-", suffix=".txt")
        os.close(fd)
        spec = {**spec, "result": result_path, "stderr_path": err_path}
        try:
            rc = self._run_spawn(spec, timeout) if self.spawn else self._run_fork(spec, timeout)
            stderr = Path(err_path).read_text(errors="replace")
            text = Path(result_path).read_text()
            if rc is None:
                return {"status": "error", "reason": f"timed out after {timeout:g} s"}
            if rc != 0 or not text:
                tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
                return {"status": "error", "reason": f"child exited {rc}: " + (tail[-1] if tail else "")[:300]}
            res = json.loads(text)
            if res.get("status") == "error":
                res["stderr_tail"] = stderr[-3000:]
            return res
        finally:
            os.unlink(result_path)
            os.unlink(err_path)

    def _run_spawn(self, spec: dict[str, Any], timeout: float) -> int | None:
        with open(spec["stderr_path"], "w") as err:
            try:
                return subprocess.run([sys.executable, str(ENTRY), "--child", json.dumps(spec)],
                                      env=self.env, stdout=err, stderr=err, timeout=timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                return None

    def _run_fork(self, spec: dict[str, Any], timeout: float) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self._line(60)["pid"]
        try:
            return int(self._line(timeout)["rc"])
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            self._line(60)
            return None
