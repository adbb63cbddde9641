# Everything a fresh machine (Python 3.11 + pip) needs: `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: serve test lint dataset browser install-serve install-dev bench lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

## Install the serving dependencies only (no torch) and serve the shipped model.
install-serve: $(PY)
	$(PIP) install --quiet -c constraints.txt -e .

serve: install-serve
	$(PY) -m service --host $(HOST) --port $(PORT)

## Training, test and lint tools; every package pinned by constraints.txt (torch to the CPU build).
install-dev: $(PY)
	$(PIP) install --quiet -c constraints.txt -e '.[train,dev]'

## Fashion-MNIST from Debian's package (needs root or sudo once).
dataset:
	@if [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ] && [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	fi

## Debian's headless Chromium and its driver, for the browser test (nothing is downloaded at
## test time).
browser:
	@if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null; }; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	fi

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## The test command: installs what it needs, lints, runs the suite (not slow, not gpu).
test: install-dev dataset browser lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

## Pin every package anew to what resolves today (an upgrade on purpose); then run make test.
lock: $(PY)
	$(PY) deploy/lock.py

bench: install-dev dataset
	$(PY) bench/serve_bench.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
