# Two commands: `make demo` (set up + run the main job) and `make test` (set up + the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean chromium

setup: $(STAMP)

# torch first and pinned: the CPU build lies on disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.*
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m streamer.demo

test: $(STAMP) chromium
	$(PY) -m pytest -q

# The browser tests drive Debian's chromium (never a Playwright download): install it when
# missing, as root or through sudo; elsewhere say so and let those tests skip.
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "chromium is missing and we are not root: the browser tests will be skipped"; exit 0; fi; \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "chromium is missing and there is no apt-get: the browser tests will be skipped"; exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

bench: $(STAMP)
	$(PY) -m streamer.bench antialias
	$(PY) -m streamer.bench codec

clean:
	rm -rf $(VENV) out .pytest_cache
