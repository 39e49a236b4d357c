"""The benchmark suite still runs: `ckptstore bench suite` at 1 MiB on local disk and memory://, one round.

A smoke test of the code path, not a measurement (the figures live in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = shutil.which("ckptstore", path=os.path.dirname(sys.executable))


@pytest.mark.slow
def test_bench_suite_runs_every_operation_and_checks_its_results(tmp_path):
    out = tmp_path / "suite.json"
    done = subprocess.run(
        [SCRIPT, "bench", "suite", "--stores", "local", "memory", "--sizes-mib", "1", "--quick",
         "--no-results-md", "--no-charts", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert {r["op"] for r in runs} == {"save", "load", "partial", "convert-to-st", "convert-to-pt"}
    assert {r["store"] for r in runs} == {"local", "memory"}
    bad = [r for r in runs if r["status"] != "ok" or not r["ok"]]
    assert not bad, bad[:3]  # every cell ran and its result checked out (values read back, sizes)
