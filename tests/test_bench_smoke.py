"""The benchmarks still run: `ckptstore bench suite` at 1 MiB on local disk and memory://, one round,
`benchmarks/bench_history.py` on roots of 1 and 3 checkpoints, one round, and
`benchmarks/bench_async.py --quick` (16 MiB, local disk and S3, one round).

Smoke tests of the code paths, not measurements (the figures live in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = shutil.which("ckptstore", path=os.path.dirname(sys.executable))
HISTORY = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_history.py"
ASYNC = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_async.py"
INTEGRATIONS = ASYNC.with_name("bench_integrations.py")


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


@pytest.mark.slow
@pytest.mark.long  # make test-long: make test stays under 15 min
def test_bench_history_measures_every_call_at_every_size_and_writes_its_section(tmp_path):
    out, results = tmp_path / "history.json", tmp_path / "RESULTS.md"  # never the real RESULTS.md
    done = subprocess.run(
        [sys.executable, str(HISTORY), "--sizes", "1,3", "--saves", "1", "--out", str(out), "--results-md", str(results)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert sorted(r["n"] for r in runs) == [1, 3]
    for run in runs:
        assert set(run["ops"]) == {"cold-save", "warm-save", "latest", "raw-list"}
        assert run["ops"]["cold-save"]["kinds"]["GET manifest"] == run["n"]  # a new manager reads every manifest
        assert run["ops"]["warm-save"]["kinds"]["GET manifest"] <= 1  # a warm one, only the one it has not seen
        assert run["ops"]["warm-save"]["kinds"]["LIST"] == 1
    assert "## Save cost against history (bench_history.py)" in results.read_text()


@pytest.mark.slow
@pytest.mark.long  # make test-long: make test stays under 15 min
def test_bench_async_measures_every_cell_and_writes_its_section(tmp_path):
    out, results = tmp_path / "async.json", tmp_path / "RESULTS.md"  # never the real RESULTS.md
    done = subprocess.run(
        [sys.executable, str(ASYNC), "--quick", "--loop-baseline-s", "0.2", "--workdir", str(tmp_path / "work"),
         "--out", str(out), "--results-md", str(results)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {r["op"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {f"{store}:{kind}" for store in ("local", "s3") for kind in ("blocking", "async", "loop")} | {
        "copy:clone", "copy:prealloc"}
    for op in ("local:async", "s3:async"):
        first, again = runs[op]["passes"]
        for p in (first, again):
            assert 0 < p["snapshot_s"] <= p["stall_s"] <= p["total_s"]
            assert p["written_bytes"] >= runs[op]["state_bytes"]
        assert first["peak_extra"] >= 0.9 * runs[op]["state_bytes"]  # the snapshot is a whole host copy
    assert runs["local:blocking"]["passes"][0]["peak_extra"] < 0.5 * runs["local:blocking"]["state_bytes"]
    for op in ("local:loop", "s3:loop"):
        assert runs[op]["loop"]["during"] and runs[op]["loop"]["before"] and runs[op]["loop"]["after"]
    assert "## Async save: training-loop stall (bench_async.py)" in results.read_text()


@pytest.mark.slow
@pytest.mark.long  # make test-long: 50 s
def test_bench_integrations_measures_every_path_and_the_damage(tmp_path):
    out = tmp_path / "integrations.json"
    done = subprocess.run(
        [sys.executable, str(INTEGRATIONS), "--mib", "4", "--integrity-mib", "2", "--hf-mib", "2", "--repeats", "1",
         "--no-results-md", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    measured = {(r["op"], r["store"]) for r in result["rows"]}
    for store in ("s3", "local"):
        assert {(op, store) for op in ("lightning", "ckptstore-io", "manager", "raw")} <= measured
    assert {("hf-manager", "s3"), ("hf-put", "s3")} <= measured
    outcomes = [row for check in result["checks"] for row in check["rows"]]
    assert {row["store"] for row in outcomes} == {"s3", "local"}
    for row in outcomes:  # Lightning's loader takes the flipped byte; ckptstore's refuse it
        expected = "loaded, no error; 1 wrong value" if row["reader"].startswith("Lightning") else "raised `CorruptCheckpointError`"
        assert row["outcome"].startswith(expected), row
