# The two set-up commands of the README: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# CPU torch: `torch==2.13.0` resolves to the wheel on disk; never pull a CUDA build here.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[torch,test,ray]"
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/moesim demo -o moesim-demo --force   # re-running `make demo` refreshes its own folder

test: $(VENV)/.installed-dev
	$(BIN)/ruff check moesim tests benchmarks
	$(BIN)/lint-imports   # dependencies point down (pyproject [tool.importlinter])
	$(BIN)/python -m pytest -n 2 -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check moesim tests benchmarks
	$(BIN)/lint-imports

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_replay.py

clean:
	rm -rf $(VENV) moesim-demo .pytest_cache
