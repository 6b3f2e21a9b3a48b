# Courier: `make run` starts everything on this machine; `make test` proves it works.
# Both set themselves up first (uv, the locked environment, RabbitMQ and Redis).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

UV ?= uv
PYTEST_ARGS ?=
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: help setup run test test-fast test-images images faults lint fmt manifests asyncapi dashboards clean bench

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## Install uv if missing, sync the locked environment, start RabbitMQ and Redis
	@bash scripts/bootstrap.sh

run: setup ## Start every Courier service and the local sinks in the foreground (Ctrl-C stops all)
	@$(UV) run --locked python scripts/devrun.py

test: setup lint ## Lint, then run every test against the real RabbitMQ and Redis
	@$(UV) run --locked pytest $(PYTEST_ARGS)

test-fast: ## Tests without set-up or lint (services must already be up)
	@$(UV) run --locked pytest -m "not fault" $(PYTEST_ARGS)

images: setup ## Build every image on a real engine (installs/starts Docker; base stand-ins offline)
	@$(UV) run --locked python scripts/images.py $(IMAGES_ARGS)

test-images: images ## Run each image as the chart runs its pod, against RabbitMQ and Redis (not in make test)
	@$(UV) run --locked pytest tests/images $(PYTEST_ARGS)
	@sed -n '1,/^### /p' var/images/layers.md | sed '$$d'

faults: setup ## The full fault and bad-input matrix (private RabbitMQ/Redis, a 3-node cluster, RabbitMQ 4); writes docs/faults-report.md
	@$(UV) run --locked pytest tests/faults --fault-matrix --fault-report docs/faults-report.md $(PYTEST_ARGS)
	@$(UV) run --locked pytest libs/common/tests --fault-matrix -m v4 $(PYTEST_ARGS)

bench: setup ## Courier vs the bare stack, as ratios (installs wrk); writes bench/results/ (BENCH_ARGS=--quick)
	@$(UV) run --locked python bench/run.py $(BENCH_ARGS)

lint: ## ruff (lint + format check) and mypy (strict for libs/common and libs/testing)
	@$(UV) run --locked ruff check .
	@$(UV) run --locked ruff format --check .
	@$(UV) run --locked mypy libs/common/src libs/testing/src tools/sinks/src
	@$(UV) run --locked mypy services/*/src tests libs/common/tests conftest.py scripts bench
	@for d in services/*/tests tools/*/tests; do $(UV) run --locked mypy --config-file pyproject.toml $$d || exit 1; done

fmt: ## Format and auto-fix what ruff can
	@$(UV) run --locked ruff check --fix .
	@$(UV) run --locked ruff format .

manifests: ## Render charts/courier into k8s/base (committed; never edit by hand)
	@$(UV) run --locked python scripts/render_manifests.py

asyncapi: ## Generate the event contract (AsyncAPI 3.0) into docs/asyncapi.yaml (committed)
	@$(UV) run --locked python scripts/asyncapi.py

dashboards: ## Generate Grafana dashboards into charts/courier/dashboards (committed)
	@$(UV) run --locked python scripts/dashboards.py

clean: ## Remove caches and local run state
	rm -rf .pytest_cache .mypy_cache .ruff_cache var
