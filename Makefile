# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) so development and CI take the CPU build on local disk;
# GPU clusters keep the CUDA build they already have.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format bench load-test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m jobs.caption

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m jobs.benchmark

load-test: install
	$(PY) -m jobs.load_test
