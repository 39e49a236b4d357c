# `make demo` and `make test` work from a fresh clone: they build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

# a literal comma for $(if ...) arguments
, := ,
.PHONY: demo test test-long lint bench clean mutate

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(TORCH) -e '.[s3,gcs,dev,frameworks]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ckptstore demo --root ./runs/demo --fresh

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The long trials (minutes): randomized two-manager/evaluator runs with faults at every call, and the
# crash trials at full count (200 local, 20 file://, 50 S3, 20 GCS kills).
test-long: $(VENV)/.installed
	$(PY) -m pytest -q --long -m long

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ckptstore tests
	$(VENV)/bin/mypy ckptstore

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_save_memory.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_history.py
	$(PY) benchmarks/bench_async.py

# Mutation testing of the modules that guard data (long: not part of `make test` or CI; docs/mutation.md).
# Runs in a copy under build/mutation/ (mutmut's mutants/ folder lands there, out of the work tree) and
# keeps its results between runs: only new or changed mutants are tested again. JOBS=1 worker by
# default (2 cores; JOBS=2 on an idle machine). MODULES="commit files" tests those modules only.
# mutmut itself comes with the dev extra (pinned in pyproject.toml).
# REMOTE=1 runs the S3 (moto) and GCS (emulator) params instead of local and memory://, in
# build/mutation-remote: for the code only a remote store reaches (network, multipart, prefetch),
# with the tests written for it (every remote test reaches it: all of them would take hours).
# SAMPLE='[05]' runs only the mutants whose number ends in 0 or 5 (a fifth of each function's), for
# modules too large for one session; docs/mutation.md says which rows are samples.
REMOTE_TESTS := "tests/test_network_faults.py", "tests/test_transfers.py", "tests/test_uploads.py", "tests/test_lost_replies.py", "tests/test_storage.py",
MODULES    ?=
JOBS       ?= 1
REMOTE     ?=
SAMPLE     ?=
MUTATE_DIR := $(if $(REMOTE),build/mutation-remote,build/mutation)
mutate: $(VENV)/.installed
	mkdir -p $(MUTATE_DIR)
	rm -rf $(MUTATE_DIR)/ckptstore $(MUTATE_DIR)/tests
	cp -R ckptstore tests pyproject.toml $(MUTATE_DIR)/
	$(if $(REMOTE),sed -i 's/"not remote and not long"/"not long"/; s/--timeout=60/--timeout=300/; s|^    "tests"$(,)|$(REMOTE_TESTS)|' $(MUTATE_DIR)/pyproject.toml)
	cd $(MUTATE_DIR) && CKPTSTORE_MUTATION_STORES=$(if $(REMOTE),s3$(,)gcs,local$(,)memory) \
		$(abspath $(VENV))/bin/mutmut run --max-children $(JOBS) $(foreach m,$(MODULES),'ckptstore.$(m).*$(if $(SAMPLE),__mutmut_*$(SAMPLE))')
	cd $(MUTATE_DIR) && $(abspath $(VENV))/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json
	cd $(MUTATE_DIR) && $(abspath $(VENV))/bin/mutmut results

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .hypothesis *.egg-info
