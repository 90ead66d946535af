# slmfleet: two commands for a fresh machine with Python 3.11+ and make.
#   make run    set up, then run the controller, REST API and an embedded broker
#   make test   set up (with the test and conversion extras), then run the whole test suite

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test setup setup-test bench lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "slmfleet needs Python 3.11 or newer; found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[controller]"
	@touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/.run-deps
	$(PIP) install -e ".[controller,convert,dev]"
	@touch $@

setup: $(VENV)/.run-deps

setup-test: $(VENV)/.test-deps

run: setup
	$(BIN)/slmfleet up $(ARGS)

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/python -m benchmarks $(BENCH)

lint: setup-test
	$(BIN)/ruff check . && $(BIN)/mypy agent controller

clean:
	rm -rf $(VENV) .pytest_cache
