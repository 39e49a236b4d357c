"""A pytest plugin for ``make mutate`` (docs/mutation.md): run the store-parametrized tests on local and memory:// only.

Loaded with ``-p tests.mutation_subset`` (mutmut runs pytest from its ``mutants/`` copy, where ``tests``
is importable); normal runs never load it. The s3/gcs params are also deselected here, so the
servers never start, and the file:// param is dropped: it runs the same code as the local one.
"""

from __future__ import annotations

import pytest

KEPT_KINDS = frozenset({"local", "memory"})
STORE_FIXTURES = ("store", "process_store", "remote_store")


def _kind(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for name in STORE_FIXTURES:
        if name in callspec.params:
            return str(callspec.params[name])
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        kind = _kind(item)
        (dropped if kind is not None and kind not in KEPT_KINDS else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
