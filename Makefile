# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then prune a timm resnet18 to 90% sparsity on the embedded digits data
#   make test   set up .venv, then lint and run the test suite with the docstring examples (what CI runs)
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install --quiet --constraint constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt plugins/lightning-prune-baselines/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --editable ".[test,export]"
	$(PIP) --no-deps --editable plugins/lightning-prune-baselines
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lightning-prune fit --config recipes/digits/magnitude.yaml

# The core's tests and, beside them, those of the plugin distributions installed by `setup`.
TESTS := tests plugins/lightning-prune-baselines/tests

# Each test runs at one torch thread, so the suite runs on every core (pytest-xdist: one worker per logical
# CPU, at most 4); PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= logical
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --maxprocesses 4

# Lint first (ruff, configured in pyproject.toml), then the tests and the package's docstring examples.
test: setup
	$(VENV)/bin/ruff check lightning_prune plugins tests benchmarks
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(VENV)/bin/python -m pytest -q $(PYTEST_PARALLEL) --doctest-modules lightning_prune $(TESTS)

test-all: setup
	$(VENV)/bin/ruff check lightning_prune plugins tests benchmarks
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(VENV)/bin/python -m pytest -q $(PYTEST_PARALLEL) -m "" --doctest-modules lightning_prune $(TESTS)

bench: setup
	$(VENV)/bin/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) lightning_logs wandb .pytest_cache
