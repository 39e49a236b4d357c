"""What a result records about how it was made: command line, date, machine, versions, ckptstore revision.

Results are compared across days and machines, and ckptstore is edited while benchmarks run, so
each result names the exact code it measured (``ckptstore_revision`` at the start, and
``ckptstore_source_hash`` in every child, which tells whether the code changed mid-run).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def command_line() -> str:
    """This process's command line, the script relative to the repository: ``python benchmarks/bench_x.py ...``."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def module_version(name: str) -> str | None:
    """The installed version of module ``name`` (from its distribution's metadata, without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        try:
            return str(__import__(name).__version__)
        except (ImportError, AttributeError):
            return None


def machine_info(modules: Sequence[str] = ()) -> dict[str, str]:
    """CPU, cores, RAM, kernel, and the versions of Python, torch, safetensors, fsspec and ``modules`` (if installed)."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu
    ram = 0
    with contextlib.suppress(OSError, AttributeError), open("/proc/meminfo") as f:
        ram = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) * 1024  # type: ignore[union-attr]
    import fsspec
    import safetensors
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "safetensors": safetensors.__version__, "fsspec": fsspec.__version__}
    for mod in modules:
        v = module_version(mod)
        if v is not None:
            versions[mod] = v
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram_gib": f"{ram / 2**30:.1f}", "kernel": platform.release(),
            **versions}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def ckptstore_diff() -> str:
    """The uncommitted diff of ckptstore/ against HEAD ("" if none or not a git checkout)."""
    try:
        return _git("diff", "HEAD", "--", "ckptstore")
    except (OSError, subprocess.CalledProcessError):
        return ""


def ckptstore_revision() -> str:
    """HEAD, flagged (with a hash of the diff) when ckptstore/ has uncommitted changes: the code a run measures."""
    try:
        head = _git("rev-parse", "--short", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--", "ckptstore").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not dirty:
        return head
    diff = ckptstore_diff()
    return head + " + uncommitted changes in ckptstore/" + (
        f" (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})" if diff else "")


def ckptstore_source_hash() -> str:
    """sha256 (12 hex) of ckptstore/*.py as imported: tells whether the code changed during a run."""
    import ckptstore

    h = hashlib.sha256()
    for f in sorted(Path(ckptstore.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]
