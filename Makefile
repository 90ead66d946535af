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

# The dashboard's browser tests drive Debian's Chromium with Playwright (never a browser Playwright downloads).
# Installed here when missing and we may (root with apt-get); otherwise those tests skip and say why.
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)

# The arm64 test (tests/arm64) runs the agent in an arm64 Debian root under qemu-user emulation: it needs
# qemu-user-static and mmdebstrap, installed the same way (on x86-64 hosts); otherwise that test skips and says why.
setup-test: $(VENV)/.test-deps
	@if [ -n "$(CHROMIUM)" ] || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for the dashboard's browser tests (apt-get install chromium)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
		echo "could not install chromium: the browser tests will be skipped"; \
	else \
		echo "Chromium not found: the dashboard's browser tests will be skipped."; \
		echo "  Install it with: sudo apt-get install chromium  (or set SLMFLEET_CHROMIUM=/path/to/chromium)"; \
	fi
	@if [ "$$(uname -m)" != x86_64 ] || { command -v qemu-aarch64-static && command -v mmdebstrap; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing qemu-user-static and mmdebstrap for the arm64 test (apt-get install)"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static mmdebstrap >/dev/null || \
		echo "could not install qemu-user-static and mmdebstrap: the arm64 test will be skipped"; \
	else \
		echo "qemu-user-static or mmdebstrap not found: the arm64 test will be skipped."; \
		echo "  Install them with: sudo apt-get install qemu-user-static mmdebstrap"; \
	fi

run: setup
	$(BIN)/slmfleet up $(ARGS)

# Two test files at a time (most tests wait on brokers, agents and controllers they start, so two share 2 cores well);
# a file's tests stay together in one worker (module fixtures are built once). TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2

test: setup-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/python -m benchmarks $(BENCH)

lint: setup-test
	$(BIN)/ruff check . && $(BIN)/mypy agent controller wire slmfleet && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
