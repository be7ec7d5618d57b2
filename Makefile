# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then prune a timm resnet18 to 90% sparsity on the embedded digits data
#   make test   set up .venv, then run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install --quiet --constraint constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --editable ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lightning-prune fit --config recipes/digits/magnitude.yaml

test: setup
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q

test-all: setup
	WANDB_MODE=offline $(VENV)/bin/python -m pytest -q -m ""

bench: setup
	$(VENV)/bin/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) lightning_logs wandb .pytest_cache
