# Emporium: the README's two commands are `make up` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
# Python caches compiled modules in .venv and the (git-ignored) __pycache__ folders. A shell that sets
# PYTHONDONTWRITEBYTECODE makes every process recompile everything it imports (several CPU-seconds per
# service start and per test process), so make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE
ARGS ?=

.PHONY: help tools deps lint format test fuzz bench kind-up kind-dev kind-down up down status loadgen

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

tools: ## Build (once per machine) the pinned toolchain; prints its bin directory last
	@bash tools/toolchain/build.sh

deps: ## Install uv, the Python environment and the system packages the test bed needs
	@bash tools/bootstrap.sh

lint: deps ## ruff lint and format check
	uv run --locked ruff check .
	uv run --locked ruff format --check .

format: deps ## Apply ruff's fixes and formatting
	uv run ruff check --fix .
	uv run ruff format .

test: ## Install what is missing, then lint and run every test (ARGS="..." goes to pytest)
	@bash tools/test.sh $(ARGS)

fuzz: ## Only the services' schemathesis runs, 200 examples per operation (0 5xx; make test runs them too)
	@bash tools/test.sh services/products/tests/test_openapi_fuzz.py \
		services/orders/tests/test_openapi_fuzz.py services/notifications/tests/test_openapi_fuzz.py \
		services/users/tests/test_schemathesis.py $(ARGS)

bench: ## Print throughput, latency and operator figures (bounded; loopback only)
	@bash tools/bench.sh

kind-up: ## Create (or reuse) the kind cluster "emporium" and deploy Emporium on it (ARGS=--ha: 3 nodes)
	@bash tools/kind/cluster.sh up $(ARGS)

kind-dev: ## kind-up, then skaffold dev (rebuild and redeploy on every change)
	@bash tools/kind/cluster.sh dev $(ARGS)

kind-down: ## Delete the kind cluster and everything kind-up made
	@bash tools/kind/cluster.sh down

up: ## Run the whole platform locally (control plane, operator, services, ingress on 127.0.0.1:8080)
	@bash tools/platform.sh up

down: ## Stop everything `make up` started (data stays in .local/data)
	@bash tools/platform.sh down

status: ## Show each local component
	@bash tools/platform.sh status

loadgen: ## Simulated shoppers against the local platform (USERS=10 DURATION=1m; fails on any error)
	@bash tools/loadgen.sh
