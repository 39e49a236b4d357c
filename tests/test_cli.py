"""The console script, run for real in a subprocess, and main() in-process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ckptstore import CheckpointManager
from ckptstore.cli import main
from ckptstore.storage import open_storage

SCRIPT = shutil.which("ckptstore", path=os.path.dirname(sys.executable))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert SCRIPT, "the ckptstore console script is not installed next to this Python"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300, check=False, env=env)


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
    assert main(["ls", str(tmp_path)]) == 0
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


def storage_args(store) -> list[str]:
    return [arg for k, v in store.storage_options.items() for arg in ("--storage-option", f"{k}={json.dumps(v)}")]


def test_inspect_reads_only_the_header(process_store):
    store = process_store
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    info = mgr.save({"model": torch.nn.Linear(1024, 1024), "epoch": 7}, step=3, metrics={"loss": 0.5})  # 4 MiB
    out = run("inspect", info.url, "--json", *storage_args(store))
    assert out.returncode == 0, out.stderr
    desc = json.loads(out.stdout)
    assert desc["checkpoint"]["step"] == 3 and desc["values"]["ckptstore.tree"]["epoch"] == 7
    assert {t["name"]: t["shape"] for t in desc["tensors"]} == {"model/weight": [1024, 1024], "model/bias": [1024]}
    assert desc["header_bytes_read"] < info.size / 50


def test_verify_names_the_damaged_checkpoint_and_exits_1(process_store):
    store = process_store
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    mgr.save({"w": torch.zeros(100)}, step=0)
    bad = mgr.save({"w": torch.ones(100)}, step=1)
    assert run("verify", store.url, *storage_args(store)).returncode == 0
    path = f"{bad.name}/{bad.files[0].path}"
    data = bytearray(mgr.storage.read(path))
    data[-1] ^= 0xFF
    with mgr.storage.open_write(path) as f:
        f.write(bytes(data))
    out = run("verify", store.url, "--json", *storage_args(store))
    assert out.returncode == 1
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["step_00000000"]["ok"] and "fails its checksum" in rows["step_00000001"]["problem"]


def test_prune_is_a_dry_run_unless_yes(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in range(4):
        mgr.save({"x": step}, step=step)
    out = run("prune", str(tmp_path), "--keep-last", "2")
    assert "would delete step_00000000" in out.stdout and len(mgr.checkpoints()) == 4
    plan = json.loads(run("prune", str(tmp_path), "--keep-last", "2", "--json").stdout)
    assert plan == {"deleted": False, "checkpoints": [{"name": "step_00000000", "step": 0, "size": plan["checkpoints"][0]["size"]},
                                                      {"name": "step_00000001", "step": 1, "size": plan["checkpoints"][1]["size"]}],
                    "incomplete_uploads": []}
    out = run("prune", str(tmp_path), "--keep-last", "2", "--yes")
    assert out.returncode == 0 and [c.step for c in mgr.checkpoints()] == [2, 3]
    assert "nothing to delete" in run("prune", str(tmp_path), "--keep-last", "2").stdout
    assert "no --keep-last: all are kept" in run("prune", str(tmp_path)).stdout


def test_every_command_has_help_with_an_example():
    from ckptstore.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {"ls", "inspect", "verify", "convert", "prune", "delete", "bench", "demo"}
    for name in commands:
        out = run(name, "--help")
        assert out.returncode == 0 and "example: ckptstore " + name in out.stdout, name


def test_convert_between_formats_and_stores(remote_store, tmp_path):
    sd = torch.nn.Linear(3, 3).state_dict()
    torch.save(sd, tmp_path / "m.pt")
    dst = f"{remote_store.url}/m.safetensors"
    assert run("convert", str(tmp_path / "m.pt"), dst, *storage_args(remote_store)).returncode == 0
    back = tmp_path / "back.pt"
    assert run("convert", dst, str(back), *storage_args(remote_store)).returncode == 0
    loaded = torch.load(back, weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def run_in_terminal(*args: str, env: dict[str, str]) -> str:
    """Run the console script with a pseudo-terminal as stdout and stderr; return what it showed."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([SCRIPT, *args], stdout=follower, stderr=follower, env={**os.environ, **env})
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the script exited and closed the terminal
            break
        if not data:
            break
        shown += data
    assert proc.wait(timeout=120) == 0, shown
    os.close(leader)
    return shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tmp_path):
    torch.save({"w": torch.randn(2**20)}, tmp_path / "a.pt")  # 4 MiB
    quick = {"CKPTSTORE_PROGRESS_DELAY": "0"}  # the real threshold is one second
    shown = run_in_terminal("convert", str(tmp_path / "a.pt"), str(tmp_path / "a.safetensors"), env=quick)
    assert "convert a.safetensors: " in shown and "MiB/s]" in shown
    assert "0%|" in shown and "/4.0 MiB [00:00<" in shown  # percentage, total and time left, in binary units
    assert "64.0B" not in shown and " MB" not in shown and "kB" not in shown
    piped = run("convert", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors"), env={**os.environ, **quick})
    assert piped.stderr == "" and piped.stdout.count("\n") == 1  # not a terminal: no bar
    slow = run_in_terminal("convert", str(tmp_path / "a.pt"), str(tmp_path / "c.safetensors"), env={})
    assert "B/s" not in slow  # a sub-second transfer shows nothing
    root = tmp_path / "run"
    (root / "step_00000001").mkdir(parents=True)
    (root / "step_00000001" / "state-0123abcd.pt").write_bytes(b"half a save")
    assert "\x1b[2mstep_00000001  (not a checkpoint" in run_in_terminal("ls", str(root), "--all", env={})  # dimmed


@pytest.mark.remote
def test_s3_endpoint_and_credentials_come_from_the_environment(s3_endpoint):
    """No --storage-option at all: s3fs reads AWS_ENDPOINT_URL and the key pair from the environment."""
    import fsspec

    from conftest import S3_KEY, S3_SECRET

    fsspec.filesystem("s3", key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_endpoint}).mkdir("env-bucket")
    mgr = CheckpointManager("s3://env-bucket/run", storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    mgr.save({"w": torch.ones(2)}, step=4)
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    out = run("ls", "s3://env-bucket/run", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert [r["step"] for r in json.loads(out.stdout)] == [4]
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"  # moto accepts any key pair, so prove the endpoint came from the env:
    env.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")  # nothing listens on the discard port
    out = run("ls", "s3://env-bucket/run", env=env)
    assert out.returncode == 1 and out.stderr.startswith("ckptstore: error:") and "127.0.0.1:9" in out.stderr
    assert "check the URL, the endpoint and the network" in out.stderr and "Traceback" not in out.stderr


def test_ls_all_shows_what_is_not_a_checkpoint(process_store):
    store = process_store
    mgr = CheckpointManager(store.url, storage_options=store.storage_options)
    mgr.save({"w": torch.ones(2)}, step=0)
    storage = mgr.storage
    storage.write_new("step_00000001/state-0123abcd.safetensors", b"half a save")  # a writer died here
    storage.write_new("step_00000002/state-89abcdef.pt", b"x")
    storage.write_new("step_00000002/manifest.json", b"{not json")
    plain = run("ls", store.url, *storage_args(store))
    assert plain.returncode == 0 and "step_00000000" in plain.stdout and "step_00000001" not in plain.stdout
    everything = run("ls", store.url, "--all", *storage_args(store))
    assert "step_00000001  (not a checkpoint: unfinished save (no manifest), idle" in everything.stdout
    assert "step_00000002  (not a checkpoint: unreadable manifest" in everything.stdout
    assert "\x1b[" not in everything.stdout  # no dimming when stdout is not a terminal
    rows = json.loads(run("ls", store.url, "--all", "--json", *storage_args(store)).stdout)
    assert [(r["name"], r["committed"]) for r in rows] == [("step_00000000", True), ("step_00000001", False), ("step_00000002", False)]


def test_inspect_text_outlines_the_state(tmp_path):
    mgr = CheckpointManager(tmp_path)
    opt_model = torch.nn.Linear(2, 2)
    info = mgr.save({"model": opt_model, "optimizer": torch.optim.Adam(opt_model.parameters()), "epoch": 7,
                     "loss_history": [float(i) for i in range(20)]}, step=1)
    out = run("inspect", info.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "state:" in lines and "  epoch: 7" in lines and "        betas: [0.9, 0.999]" in lines
    assert "  loss_history: [0.0, 1.0, 2.0, ... 20 values]" in lines
    assert "model/weight" in out.stdout and "2 tensors, 24 B" in out.stdout


def test_cli_edges_are_usage_errors_or_one_line(tmp_path, capsys):
    """Issue 10, point 6 (part): a bad --storage-option is a usage error (exit 2, no traceback),
    ls of a root with nothing under it is one line and exit 1, --version answers."""
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("ckptstore 0.")
    with pytest.raises(SystemExit) as done:
        main(["ls", str(tmp_path), "--storage-option", "foo"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "takes key=value, got 'foo'" in err and "Traceback" not in err
    assert main(["ls", str(tmp_path / "no-such-run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ckptstore: error: nothing under") and err.count("\n") == 1


def test_verify_of_a_zip_that_is_not_a_torch_checkpoint_is_not_ok(store, capsys):
    """Issue 10, point 6: a sound zip of something else passed its CRC32s and printed OK."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    storage = open_storage(store.url, store.storage_options)
    storage.makedirs()
    with storage.open_write("data.zip") as f:
        f.write(buf.getvalue())
    assert main(["verify", store.join("data.zip"), *storage_args(store)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("CORRUPT") and "not a torch checkpoint" in out and "OK" not in out
    torch.save({"w": torch.ones(2)}, buf := io.BytesIO())
    with storage.open_write("real.pt") as f:
        f.write(buf.getvalue())
    assert main(["verify", store.join("real.pt"), *storage_args(store)]) == 0
