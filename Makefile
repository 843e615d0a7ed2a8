# Emporium: the README's two commands are `make up` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
ARGS ?=

.PHONY: help tools deps lint format test bench up down status kind-up

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

up: ## Run the whole platform locally (control plane, operator, services, ingress on :8080)
	@echo "make up: not yet available (see the open issue for the local platform)"; exit 1

down: ## Stop everything `make up` started
	@echo "make down: not yet available"; exit 1

status: ## Show each local component
	@echo "make status: not yet available"; exit 1
