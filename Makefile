# Kinshasa developer commands. Every target sets up the virtualenv it needs when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Kafka's jars, fetched once per checkout, shared by the suite, `make run` and kinshasa.testing.
export KINSHASA_CACHE_DIR := $(CURDIR)/.kinshasa/cache

.PHONY: setup run test test-unit test-integration test-e2e test-browser screenshots bench bench-small soak lint infra-up infra-down clean

$(STAMP): pyproject.toml examples/tickets/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Kinshasa needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e examples/tickets
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/kinshasa up

test: setup
	$(BIN)/pytest tests $(PYTEST_ARGS)
	cd examples/tickets && $(CURDIR)/$(BIN)/pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-e2e: setup
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# The console in headless Chromium (Debian's /usr/bin/chromium) against a real stack.
test-browser: setup
	$(BIN)/pytest tests/browser $(PYTEST_ARGS)

# The README's console screenshots (docs/images/console-*.png), taken by the browser tests.
screenshots: setup
	KINSHASA_CONSOLE_SCREENSHOTS=$(CURDIR)/docs/images $(BIN)/pytest tests/browser/test_inbox_and_run.py tests/browser/test_approvals.py $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench

bench-small: setup
	$(BIN)/python -m bench --small

# The whole stack for 10 minutes under load and a random fault about every 30 s (MINUTES=N to change).
MINUTES ?= 10
soak: setup
	$(BIN)/python -m bench.soak --minutes $(MINUTES)

lint: setup
	$(BIN)/ruff check kinshasa tests bench
	$(BIN)/mypy

infra-up: setup
	$(BIN)/kinshasa infra up

infra-down: setup
	$(BIN)/kinshasa infra down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
