# The two commands: `make up` starts the whole local stack, `make test` runs the suite.
# Both install into .venv first. On a host without an NVIDIA GPU the CPU build of torch is
# pinned before the project, so pip does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH := torch==2.13.0
UP_ARGS ?=

.PHONY: install up down test lint typecheck k8s clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the CUDA build of torch"; \
	else \
		echo "no GPU: pinning the CPU build $(CPU_TORCH)"; \
		$(BIN)/pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/pip install --quiet -e '.[api,worker,dev]'
	@touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/sdq up $(UP_ARGS)

down:
	$(BIN)/sdq down

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy common producer workers

test: lint typecheck
	$(BIN)/pytest

k8s: install
	$(BIN)/python infra/k8s/render.py > infra/k8s/workers.yaml

clean:
	rm -rf $(VENV) .sdq .pytest_cache .mypy_cache .ruff_cache *.egg-info
