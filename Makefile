# One environment for everything: a venv with the package, its notebook extra and its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup tour test notebooks lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

tour: setup  ## the short tour: default model, 8 simulated CPU devices, prefill -> insert -> generate
	$(PY) -m workbench tour

test: setup  ## ruff (lint, then format check), then the whole suite: unit and parity tests, notebooks under strict nbval
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

notebooks: setup  ## re-execute every notebook in place and store its outputs (what nbval compares)
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 notebooks/*.ipynb

lab: setup  ## JupyterLab on notebooks/, in the project environment
	$(PY) -m jupyter lab --notebook-dir=notebooks

bench: setup  ## decode speed of the default model (see python -m workbench bench --help)
	$(PY) -m workbench bench

clean:
	rm -rf $(VENV) .pytest_cache
