# The two set-up commands of the README: `make demo` and `make test`. Both work from a fresh clone.
# `make reports` rebuilds every study's report from its committed raw data (studies/README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev lint bench reports mutants clean

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
	$(BIN)/ruff check moesim tests benchmarks studies tools
	$(BIN)/lint-imports   # dependencies point down (pyproject [tool.importlinter])
	$(BIN)/python -m pytest -n 2 -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check moesim tests benchmarks studies tools
	$(BIN)/lint-imports

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_replay.py

reports: $(VENV)/.installed-dev
	$(BIN)/python studies/make_reports.py

# hand-written mutations of the replay kernels, the timing kernel and the stream cache, each run against its
# tests on a temporary copy of the repository; prints which survive (minutes: runs outside CI)
mutants: $(VENV)/.installed-dev
	$(BIN)/python tests/mutants/run_mutants.py

clean:
	rm -rf $(VENV) moesim-demo .pytest_cache
