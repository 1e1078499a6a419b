# Two commands do all set-up on a fresh machine:
#   make demo   -- install the service and run the demo (embedded Tiled, default bundle, live page, simulated beamline)
#   make test   -- install everything the tests need (training extras, Chromium) and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install install-dev browser redis bench bench-quick bundle lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps re-run the install only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The page tests drive Debian's Chromium through Playwright's client; no browser download.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# The tiled:// source tests run `tiled serve` with Debian's redis-server as its streaming cache (on 127.0.0.1).
redis:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

demo: install
	$(BIN)/latent-stream demo

test: install-dev browser redis
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/latent-stream bench --json benchmarks/results/latest.json

bench-quick: install-dev
	$(BIN)/latent-stream bench --quick --json benchmarks/results/quick.json

bundle: install-dev
	bash scripts/make_default_bundle.sh

lint: install-dev
	$(BIN)/ruff check stream operators frontend_bridge benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
