"""A pytest plugin for ``make mutate`` (docs/mutation.md): run the store-parametrized tests on local and memory:// only.

Loaded with ``-p tests.mutation_subset`` (mutmut runs pytest from its ``mutants/`` copy, where ``tests``
is importable); normal runs never load it. The s3/gcs params are also deselected here, so the
servers never start, and the file:// param is dropped: it runs the same code as the local one.
``CKPTSTORE_MUTATION_STORES=s3,gcs`` (``make mutate REMOTE=1``) keeps the remote params instead,
for the code only they reach.
The slowest tests that start Python child processes (about 80 of the subset's 130 seconds) are
dropped too: each re-imports torch per mutant, and the code they reach in the child is the code
the in-process tests reach.
"""

from __future__ import annotations

import os

import pytest

KEPT_KINDS = frozenset(os.environ.get("CKPTSTORE_MUTATION_STORES", "local,memory").split(","))  # make mutate REMOTE=1: s3,gcs
STORE_FIXTURES = ("store", "process_store", "remote_store")
CHILD_PROCESS_TESTS = (
    "tests/test_cli.py::test_demo_is_preempted_by_sigkill_and_resumes_exactly",
    "tests/test_cli.py::test_every_command_has_help_with_an_example",
    "tests/test_cli.py::test_prune_is_a_dry_run_unless_yes",
    "tests/test_cli.py::test_progress_bar_on_a_terminal_only",
    "tests/test_cli.py::test_usage_error_exits_2",
    "tests/test_cli.py::test_ls_all_shows_what_is_not_a_checkpoint",
    "tests/test_cli.py::test_ls_table_and_json",
    "tests/test_cli.py::test_verify_names_the_damaged_checkpoint_and_exits_1",
    "tests/test_faults.py::test_sigkill_mid_save_never_exposes_a_partial_checkpoint",
    "tests/test_faults.py::test_file_size_limit_fails_the_save_and_keeps_earlier_checkpoints",
    "tests/test_exact_resume.py::test_resumed_run_is_bit_identical",
    "tests/test_async_save.py::test_the_interpreter_waits_for_a_background_save_before_it_exits",
    "tests/test_foreign_files.py::test_touching_loaded_tensors_after_the_file_is_truncated_does_not_kill_the_process",
    # real Lightning and HF Trainer jobs in child processes (seconds each; the code they reach through the manager
    # is what the in-process folder, file and manager tests reach)
    "tests/test_lightning.py::test_a_killed_trainer_resumes_from_last_bit_identical",
    "tests/test_lightning.py::test_background_saves_resume_bit_identical",
    "tests/test_lightning.py::test_last_skips_a_damaged_checkpoint_and_says_so",
    "tests/test_hf_trainer.py::test_a_killed_trainer_resumes_from_the_store_bit_identical",
    "tests/test_optional_extras.py",
)


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
        other_store = kind is not None and kind not in KEPT_KINDS
        (dropped if other_store or item.nodeid.startswith(CHILD_PROCESS_TESTS) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
