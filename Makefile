# The two set-up commands (see README): `make run` and `make test`. Both start with
# `make install`, which is idempotent: it creates .venv if missing and installs into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOME_DIR ?= $(CURDIR)/.lookalike
IMAGES ?=
PYTEST_ARGS ?=

.PHONY: install browser run test lint demo clean

# What a run needs; the browser is the tests' alone (`make test`).
install: $(VENV)/.installed

# Headless Chromium for tests/test_report.py; installed only where missing and apt-get exists.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  { echo "installing chromium (headless checks of the HTML report)"; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	    { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; }

$(VENV)/.installed: pyproject.toml constraints.txt
	@bash scripts/check_prereqs.sh $(PYTHON)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

run: install
	@if [ -z "$(IMAGES)" ]; then \
	  $(BIN)/python -m lookalike.demo $(CURDIR)/demo && \
	  $(BIN)/lookalike run $(CURDIR)/demo --home $(HOME_DIR); \
	else \
	  $(BIN)/lookalike run $(IMAGES) --home $(HOME_DIR); \
	fi
	@$(BIN)/lookalike status --home $(HOME_DIR)

test: install browser
	$(BIN)/ruff check lib jobs tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check lib jobs tests bench

clean:
	rm -rf $(VENV) .lookalike demo .pytest_cache
