# pilotfish — common tasks. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PACKAGES := docker.io etcd-server etcd-client haproxy busybox-static iproute2 python3-venv curl openssl chromium docker-registry
# Only the benchmarks need these: bench/e2e.py's loaded churn runs a CPU hog beside it.
BENCH_PACKAGES := stress-ng

.PHONY: help deps bench-deps venv lock test test-deploy unit lint typecheck demo demo-down bench clean

help:
	@echo "make demo       bring up etcd, dockerd (if needed), registrar, discoverer+HAProxy, catalog, 3 whoami"
	@echo "make demo-down  remove everything the demo started"
	@echo "make test       the whole test suite (starts real dockerd, etcd, HAProxy)"
	@echo "make test-deploy  the demo, systemd units, images and compose stack, built and run"
	@echo "make unit       pure-logic tests only (no servers)"
	@echo "make lint       ruff + mypy --strict"
	@echo "make bench      the benchmarks under bench/"
	@echo "make lock       re-pin requirements*.lock (with hashes) after changing dependencies"

# Installs the Debian packages the agents and tests drive (root or sudo needed).
deps:
	@missing=""; for b in dockerd etcd etcdctl haproxy busybox ip curl openssl chromium docker-registry; do command -v $$b >/dev/null || missing=1; done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing=1; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEBIAN_PACKAGES); \
	fi

bench-deps: deps
	@if ! command -v stress-ng >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(BENCH_PACKAGES); \
	fi

# Exactly the pinned, hash-checked dependencies, then the project itself.
$(BIN)/pilotfish: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

venv: $(BIN)/pilotfish

# pip-tools in a throwaway venv (never in the project's): every pinned file's
# hash, so an install gets these exact files or fails. No index URL is written
# into the lock files: each machine's pip settings choose the index.
PIP_COMPILE = --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links
lock:
	@tools=$$(mktemp -d) && trap 'rm -rf "$$tools"' EXIT && \
	$(PYTHON) -m venv "$$tools" && "$$tools/bin/pip" install -q pip-tools && \
	"$$tools/bin/pip-compile" $(PIP_COMPILE) -o requirements.lock pyproject.toml && \
	"$$tools/bin/pip-compile" $(PIP_COMPILE) --extra dev -o requirements-dev.lock pyproject.toml

# The suite of agents and stack (unit + integration against real servers).
# The container images are built and run by `make test-deploy` (CI runs both).
test: deps venv
	$(BIN)/pytest -ra -m "not deploy"

test-deploy: deps venv
	deploy/ci-demo.sh
	deploy/verify-systemd.sh
	deploy/ci-images.sh
	deploy/ci-systemd.sh
	deploy/ci-compose.sh
	deploy/ci-compose-split.sh

unit: venv
	$(BIN)/pytest -ra tests/unit

lint: venv
	$(BIN)/ruff check agents tests bench
	$(BIN)/mypy --strict agents

demo: deps venv
	$(BIN)/python scripts/demo.py up

demo-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python scripts/demo.py down; fi

bench: bench-deps venv
	$(BIN)/python bench/registrar.py
	$(BIN)/python bench/discoverer.py
	$(BIN)/python bench/retry_cases.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/upgrade.py
	$(BIN)/python bench/catalog.py

clean: demo-down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
