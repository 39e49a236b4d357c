"""The console script, run for real in a subprocess, and main() in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ckptstore import CheckpointManager
from ckptstore.cli import main

SCRIPT = shutil.which("ckptstore", path=os.path.dirname(sys.executable))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert SCRIPT, "the ckptstore console script is not installed next to this Python"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300, check=False)


def test_ls_table_and_json(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor="val_loss")
    for step, loss in [(0, 0.5), (1, 0.2), (2, 0.9)]:
        mgr.save({"w": torch.ones(3)}, step=step, metrics={"val_loss": loss})
    out = run("ls", str(tmp_path), "--monitor", "val_loss")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "step_00000001" in lines[2] and lines[2].endswith("best") and lines[3].endswith("latest")
    rows = json.loads(run("ls", str(tmp_path), "--monitor", "val_loss", "--json").stdout)
    assert [(r["step"], r["latest"], r["best"]) for r in rows] == [(0, False, False), (1, False, True), (2, True, False)]


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["ls", str(tmp_path), "--mode", "min"]) == 0
    capsys.readouterr()
    assert main(["demo", "--root", str(blocker / "sub"), "--epochs", "1", "--preempt-after", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ckptstore: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_usage_error_exits_2():
    assert run("ls").returncode == 2
    assert run("--help").returncode == 0 and "demo" in run("--help").stdout


def test_demo_is_preempted_by_sigkill_and_resumes_exactly(tmp_path):
    root = tmp_path / "demo"
    out = run("demo", "--root", str(root), "--epochs", "5", "--preempt-after", "2")
    assert out.returncode == 0, out.stderr
    assert "killed pid" in out.stdout and "exit code -9" in out.stdout
    assert "resumed after epoch" in out.stdout and "pruned" in out.stdout
    assert "bit for bit: True" in out.stdout
    assert [c.step for c in CheckpointManager(root).checkpoints()] == [3, 4]
    assert (Path(root) / "model_best.safetensors").exists()
