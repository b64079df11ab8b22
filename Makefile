# Tandem: `make help` lists the targets. `make demo` runs the main job, `make test` the full suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
PYTEST  := $(VENV)/bin/pytest
STAMP   := $(VENV)/.installed
export GOTOOLCHAIN := local

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e '.[dev,kv]'
	# NIXL (the KV-transfer library) declares torch only for type hints: install it alone.
	$(PIP) install -q --no-deps 'nixl-cu12==1.5.1'
	touch $@

.PHONY: venv
venv: $(STAMP) ## Create .venv with Tandem and its dev tools

.PHONY: tools
tools: ## Build (or reuse) the control-plane, kwok and helm binaries from Go modules
	bash tools/build.sh >/dev/null

# ---- code checks ---------------------------------------------------------------------------
.PHONY: lint
lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check operator tests e2e
	$(VENV)/bin/ruff format --check operator tests e2e

.PHONY: fmt
fmt: $(STAMP) ## Format the code
	$(VENV)/bin/ruff check --fix operator tests e2e
	$(VENV)/bin/ruff format operator tests e2e

.PHONY: types
types: $(STAMP) ## mypy --strict on the package
	$(VENV)/bin/mypy

.PHONY: contracts
contracts: $(STAMP) ## import-linter layering contracts
	cd operator && ../$(VENV)/bin/lint-imports --config ../pyproject.toml

.PHONY: unit
unit: $(STAMP) ## Fast tests, no cluster
	$(PYTEST) tests -q -m "not prometheus"

.PHONY: crds
crds: $(STAMP) ## Regenerate crds/ from the pydantic models
	$(PY) -m tandem.models.crdgen --out crds --out charts/tandem/crds

.PHONY: verify-crds
verify-crds: $(STAMP) ## Fail if crds/ drifted from the models
	$(PY) -m tandem.models.crdgen --check --out crds --out charts/tandem/crds

.PHONY: chart-lint
chart-lint: $(STAMP) ## helm lint the chart with its default and each CI values file
	helm=$$(bash tools/build.sh)/helm; for f in "" charts/tandem/ci/*-values.yaml; do \
	  $$helm lint charts/tandem --strict $${f:+-f $$f} || exit 1; done

.PHONY: ci
ci: lint types contracts unit verify-crds chart-lint ## lint, types, import contracts, unit tests, CRD drift, chart lint

# ---- the local cluster ---------------------------------------------------------------------
.PHONY: cluster-up
cluster-up: $(STAMP) ## Start (or reuse) the local control plane with the demo fleet
	$(PY) -m e2e.harness.cluster up

.PHONY: cluster-down
cluster-down: $(STAMP) ## Stop the local cluster
	$(PY) -m e2e.harness.cluster down

.PHONY: cluster-env
cluster-env: $(STAMP) ## Print the export line for the local cluster's kubeconfig
	@$(PY) -m e2e.harness.cluster env

.PHONY: cluster-status
cluster-status: $(STAMP) ## Show the local cluster's components and nodes
	$(PY) -m e2e.harness.cluster status

.PHONY: prometheus-up
prometheus-up: $(STAMP) ## Start a local Prometheus (file-based discovery) on loopback
	$(PY) -m e2e.harness.prometheus up

.PHONY: prometheus-down
prometheus-down: $(STAMP) ## Stop the local Prometheus
	$(PY) -m e2e.harness.prometheus down

.PHONY: e2e
e2e: $(STAMP) ## End-to-end tests on the local cluster (or TANDEM_E2E_EXTERNAL=1 + KUBECONFIG)
	$(PYTEST) e2e -v -p no:cacheprovider --timeout=900

.PHONY: e2e-planner
e2e-planner: $(STAMP) ## Only the planner's closed-loop e2e (operator + Prometheus + simulated workers + router + load)
	$(PYTEST) e2e -v -p no:cacheprovider --timeout=900 -m closed_loop

.PHONY: e2e-kind
e2e-kind: $(STAMP) ## Same e2e suite on a kind cluster (needs Docker and kind)
	bash e2e/kind/run.sh

.PHONY: test
test: ci ## Everything: the checks above, unit tests with real Prometheus, and the e2e suite
	$(PYTEST) tests -q -m prometheus
	$(MAKE) e2e

# ---- the main job --------------------------------------------------------------------------
.PHONY: demo
demo: $(STAMP) ## Local cluster + CRDs + sample pools + operator + a heterogeneous InferenceService
	$(PY) -m e2e.demo

.PHONY: bench-controller
bench-controller: $(STAMP) ## Controller latency and throughput vs kubectl apply (bench/out/controller.json)
	$(PY) -m e2e.bench_controller --out bench/out/controller.json

.PHONY: bench
bench: $(STAMP) ## Planner vs baselines in the simulator on the shipped and synthetic traces (bench/out/planner)
	$(PY) -m tandem.bench --trace ../shared/traces/azure-llm-2023-code.csv --synthetic --out bench/out/planner

.PHONY: bench-heldout
bench-heldout: $(STAMP) ## Planner vs oracle at held-out seeds 11-13: synthetic shapes, 5-min block resamples of the shipped trace (bench/out/heldout)
	$(PY) -m tandem.bench --trace ../shared/traces/azure-llm-2023-code.csv --resample-blocks 300 --synthetic --seeds 11,12,13 --policies tandem,oracle --no-png --out bench/out/heldout

.PHONY: bench-dev
bench-dev: $(STAMP) ## Planner vs oracle at development seeds 31-40 (where tuning is judged; ~10 min) (bench/out/dev)
	$(PY) -m tandem.bench --trace ../shared/traces/azure-llm-2023-code.csv --resample-blocks 300 --synthetic --seeds 31,32,33,34,35,36,37,38,39,40 --policies tandem,oracle --no-png --out bench/out/dev

.PHONY: bench-queue
bench-queue: $(STAMP) ## Planner's TTFT queueing model vs the simulator on static prefill fleets (bench/out/queue.json)
	$(PY) -m tandem.bench.queueing --shape mi300x:6000:60:1.5:3,4,5,6,8,12,18 --shape b200:6000:60:1.5:2,3,4,6,7 --shape mi300x:1000:250:3:1,2,3 --out bench/out/queue.json

.PHONY: bench-kv
bench-kv: $(STAMP) ## KV sidecar: NIXL pull vs memcpy, pipelined exposed latency, translation (bench/out/kv.json)
	$(PY) -m tandem.sidecar.bench --out bench/out/kv.json

.PHONY: bench-scale
bench-scale: $(STAMP) ## 500 InferenceServices x 3 pools on a 200-node fleet, steady state (bench/out/scale.json)
	$(PY) -m e2e.bench_scale --out bench/out/scale.json $(if $(STEADY),--steady-seconds $(STEADY))

.PHONY: bench-router
bench-router: $(STAMP) ## Router overhead vs calling a worker directly (bench/out/router.json)
	$(PY) -m tandem.router.bench --out bench/out/router.json

.PHONY: clean
clean: ## Remove local state (cluster, caches in the repo)
	-$(PY) -m e2e.harness.cluster down
	rm -rf .tandem bench/out .pytest_cache .mypy_cache .ruff_cache
