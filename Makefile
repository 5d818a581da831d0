# One entry point for people and CI. Every target does its own set-up, idempotently:
# the virtual environment, the package, Debian packages and the agent CLIs (npm, project-local).

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
NODE_PREFIX := .tools/node
NODE_BIN    := $(abspath $(NODE_PREFIX)/node_modules/.bin)
APT_PKGS    := git tmux openssh-server openssh-client iproute2
# The agent CLIs at the versions ralph-uv is tested with: one list for this Makefile and for
# ralphd's installs (src/ralph_uv/data/agent-packages.txt). Changing it reinstalls them here.
AGENT_LIST  := src/ralph_uv/data/agent-packages.txt
AGENT_PKGS  := $(shell grep -v '^\#' $(AGENT_LIST))
PYTEST_ARGS ?=

export PATH := $(NODE_BIN):$(abspath $(BIN)):$(PATH)

.PHONY: help venv system-deps agents demo test test-fast lint bench clean

help:
	@echo "make demo   - run a sample Ralph loop with the real claude CLI and the offline demo model"
	@echo "make test   - run the whole test suite (sets everything up first)"
	@echo "make lint   - ruff and mypy --strict on src/"
	@echo "make bench  - run the benchmarks in benchmarks/"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# Debian packages the tests and the demo use; installed only when something is missing.
system-deps:
	@missing=""; \
	for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(NODE_PREFIX)/.installed: $(AGENT_LIST)
	@command -v npm >/dev/null 2>&1 || $(MAKE) system-deps
	mkdir -p $(NODE_PREFIX)
	npm install --prefix $(NODE_PREFIX) --no-fund --no-audit --loglevel=error $(AGENT_PKGS)
	touch $@

agents: $(NODE_PREFIX)/.installed

demo: venv agents
	$(BIN)/ralph-uv demo

test: venv system-deps agents
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

bench: venv system-deps agents
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
