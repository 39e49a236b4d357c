# `make demo` and `make test` work from a fresh clone: they build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test test-long lint bench clean

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

# The long randomized trials (minutes): two managers and a pruning evaluator, faults at every call.
test-long: $(VENV)/.installed
	$(PY) -m pytest -q --long -m long

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ckptstore tests
	$(VENV)/bin/mypy ckptstore

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_save_memory.py
	$(PY) benchmarks/bench_load.py
	$(PY) benchmarks/bench_history.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .hypothesis *.egg-info
