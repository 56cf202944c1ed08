# Two commands do everything: `make run` and `make test`. Both create the environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?=
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: run test bench env params ui serve clean

# The environment: the CPU torch wheel first (a plain `torch` would pull the CUDA build), then the
# project with the known-good lock as constraints.
$(STAMP): pyproject.toml infra/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c infra/constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c infra/constraints.txt -e '.[dev]'
	touch $@

env: $(STAMP)

# The lifecycle end to end with params.yaml as it is; PRESET=tiny rewrites params.yaml from a preset first.
run: $(STAMP)
	$(BIN)/python -m flows.lifecycle $(if $(PRESET),--preset $(PRESET))

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c infra/constraints.txt -e '.[bench]'
	$(BIN)/python -m bench

# Rewrite params.yaml from a preset without running anything.
params: $(STAMP)
	$(BIN)/python -m tasks.preset $(or $(PRESET),default)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

serve: $(STAMP)
	$(BIN)/python -m flows.lifecycle serve $(if $(PRESET),--preset $(PRESET))

clean:
	rm -rf out mlflow.db mlartifacts
