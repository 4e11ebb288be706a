# One environment for everything: a venv with the package, its notebook extra and its test extra.
# Another Python gets its own venv, e.g. `make test PYTHON=python3.12 VENV=.venv312` (pip resolves
# jax 0.10 on Python 3.11 and jax 0.12 on 3.12+: see pyproject.toml; CI runs both, .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup tour test test-browser notebooks lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 || { echo "make setup: PYTHON=$(PYTHON) is not a working Python 3.11 or newer (under pyenv, give the interpreter's path, e.g. PYTHON=\$$(pyenv root)/versions/3.12.1/bin/python3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

tour: setup  ## the short tour: default model, 8 simulated CPU devices, prefill -> insert -> generate
	$(PY) -m workbench tour

# The browser test (tests/test_browser.py) drives a system Chromium: Debian's `chromium` package,
# or the binary named by WORKBENCH_CHROMIUM. Without one it skips, and says so here and in
# pytest's summary.
HAVE_CHROMIUM = $(or $(WORKBENCH_CHROMIUM),$(shell command -v chromium || command -v chromium-browser))

test: setup  ## ruff (lint, format check), then the whole suite: unit and parity tests, notebooks under strict nbval and in a browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@$(if $(HAVE_CHROMIUM),,echo "make test: no Chromium, so the browser test will SKIP (Debian: apt-get install chromium)")
	$(PY) -m pytest

test-browser: setup  ## the notebooks run in JupyterLab and checked in Chromium (fails without a Chromium)
	WORKBENCH_REQUIRE_BROWSER=1 $(PY) -m pytest tests/test_browser.py

notebooks: setup  ## re-execute every notebook in place and store its outputs (what nbval compares), in the tests' environment
	WORKBENCH_COMPILE_CACHE=off WORKBENCH_AUTOTUNE=off $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 notebooks/*.ipynb

lab: setup  ## JupyterLab on notebooks/, in the project environment
	$(PY) -m jupyter lab --notebook-dir=notebooks

bench: setup  ## decode speed of the default model (see python -m workbench bench --help)
	$(PY) -m workbench bench

clean:
	rm -rf $(VENV) .pytest_cache
