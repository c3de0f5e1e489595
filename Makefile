# Two commands matter: `make run` (the service on the embedded database) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-timescaledb bench inbox clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11 or newer is needed") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/python main.py

test: $(VENV)/.dev
	$(BIN)/python -m pytest

# The same suite on the TimescaleDB server in TEST_DATABASE_URL, where a TimescaleDB test fails instead of skipping.
test-timescaledb: $(VENV)/.dev
	@test -n "$$TEST_DATABASE_URL" || { echo "set TEST_DATABASE_URL to a TimescaleDB server's DSN" >&2; exit 2; }
	REQUIRE_TIMESCALEDB=1 $(BIN)/python -m pytest

bench: $(VENV)/.dev
	$(BIN)/python -m bench

# A local inbox for trying the service without SMTP or Twilio accounts (prints what it receives).
inbox: $(VENV)/.dev
	$(BIN)/python -m tests.servers

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
