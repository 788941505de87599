# The README's two commands: `make demo` and `make test`. Each sets up its own virtual environment.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# First Python 3.12/3.11/3.10 on PATH (Spark 4 and torch 2.13 support these).
PYTHON ?= $(shell for p in python3.12 python3.11 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3,10) <= sys.version_info[:2] <= (3,12))' 2>/dev/null \
	&& echo $$p && break; done)
WORK ?= work

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.10-3.12 is required (python3.11 recommended)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: $(VENV)/.installed
	$(PY) -m pipelines.demo --work $(WORK)

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(WORK) .pytest_cache
