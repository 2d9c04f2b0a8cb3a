# Two commands a new user needs: `make simulate` and `make test`.
# Each creates (or reuses) a virtual environment in .venv.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; a GPU machine sets TORCH_SPEC to the CUDA build it wants,
# or installs torch into the venv first (an installed torch is kept).
TORCH_SPEC ?= torch==2.13.0
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup simulate test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Each run gets its own folder: an earlier run is never overwritten.
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

simulate: setup
	$(BIN)/medmeta simulate --out $(RUN_DIR)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs
