"""One measurement in a fresh interpreter: the script re-run with ``--child <spec JSON>``.

A fresh process per measurement makes its peak RSS belong to that measurement alone. The child
writes its result as JSON to ``spec["result"]``, a temporary file this module creates and removes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_script_child(script: str | Path, spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``script --child <spec>`` and return the result it wrote.

    Raises:
        RuntimeError: the child exited non-zero (the message ends with its stderr).
        subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds.
    """
    fd, result_path = tempfile.mkstemp(prefix=f"{Path(script).stem}-result-", suffix=".json")
    os.close(fd)
    spec = {**spec, "result": result_path}
    try:
        proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['op']} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(result_path) as f:
            return json.load(f)
    finally:
        os.unlink(result_path)
