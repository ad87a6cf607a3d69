# Two commands: `make demo` (set up + run the main job) and `make test` (set up + the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first and pinned: the CPU build lies on disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.*
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m streamer.roundtrip

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m streamer.bench antialias
	$(PY) -m streamer.bench codec

clean:
	rm -rf $(VENV) out .pytest_cache
