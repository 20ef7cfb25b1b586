# Kinshasa developer commands. Every target sets up the virtualenv it needs when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Kafka's jars, fetched once per checkout, shared by the suite, `make run` and kinshasa.testing.
export KINSHASA_CACHE_DIR := $(CURDIR)/.kinshasa/cache

.PHONY: setup lock run test test-unit test-integration test-e2e test-browser screenshots bench bench-small soak lint infra-up infra-down clean

# Installs exactly the versions in requirements/dev.lock (hash-checked), then the two local packages
# without resolving anything again.
$(STAMP): requirements/dev.lock pyproject.toml examples/tickets/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Kinshasa needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e . -e examples/tickets
	@touch $(STAMP)

setup: $(STAMP)

# Regenerates requirements/runtime.lock (what a deployment installs) and requirements/dev.lock (the
# suite's environment) from the ranges in pyproject.toml and examples/tickets/pyproject.toml, keeping
# every pin that still fits (the runtime lock takes the dev lock's versions); `make lock LOCK_ARGS=--upgrade` moves every pin to its newest fit.
UV_COMPILE = UV_CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--no-emit-package kinshasa --no-emit-package kinshasa-example-tickets $(LOCK_ARGS)
LOCK_ARGS ?=
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	$(UV_COMPILE) requirements/dev.in -o requirements/dev.lock
	$(UV_COMPILE) requirements/runtime.in --constraint requirements/dev.lock -o requirements/runtime.lock

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
