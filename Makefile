# The two set-up commands of the README: `make run` (the daemon on the embedded
# default) and `make test`. Both create the virtual environment on first use,
# and compile again the modules edited since (`make build`, README "Compiled modules").
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test bench build

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	OMS_PURE_PYTHON=1 $(PY) -m pip install --quiet -e '.[test,build]'  # compiled once, by `build`
	touch $@

# Cython and the compiler redo only the modules whose source changed.
build: $(VENV)/.installed
	$(PY) setup.py --quiet build_ext --inplace

run: build
	$(PY) run_pipeline.py

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) bench/runtime_noop.py
