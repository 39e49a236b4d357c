"""The integrations are optional: `import ckptstore` needs neither framework, and importing an
integration without its framework says which extra to install (issue 16)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_ckptstore_imports_no_framework():
    code = "import sys, ckptstore; print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("ckptstore.lightning", "lightning", "lightning"),
    ("ckptstore.hf", "transformers", "hf"),
])
def test_an_integration_without_its_framework_names_the_extra(module, framework, extra):
    code = f"import sys; sys.modules[{framework!r}] = None\nimport {module}"  # as if it were not installed
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode != 0
    assert f"ckptstore.errors.MissingDependency: {module} needs {framework}: pip install 'ckptstore[{extra}]'" in done.stderr
