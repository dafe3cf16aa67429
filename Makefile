# gpuqueue - run `make help` for the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
SAM_VENV := .venv-sam
# The real Cog server (cog + coglet from PyPI) that the e2e tests and `make up UP_ARGS=--cog-server` run.
COG_VENV := .venv-cog
PY := $(VENV)/bin/python
SAM := $(SAM_VENV)/bin/sam
REGION ?= us-east-1
export AWS_DEFAULT_REGION ?= $(REGION)
export SAM_CLI_TELEMETRY := 0
# Three workers on two cores: the end-to-end tests (one group, one worker) mostly wait on
# their stacks, so a third worker uses that CPU.
PYTEST_ARGS ?= -n 3 --dist loadgroup
# Branch coverage of the layer, the functions and the client, least covered first; the floor
# is [tool.coverage.report] fail_under (make test fails under it). On Python 3.11 the tracer
# adds ~55 % CPU to the integration tests (pytest 8 min 55 s with it here, 2 cores).
# COVERAGE_ARGS= runs without.
COVERAGE_ON := --cov --cov-report=term --cov-report=json:.aws-sam/coverage.json
COVERAGE_ARGS ?= $(COVERAGE_ON)
PORT ?= $(or $(GPUQUEUE_PORT),3000)
UP_ARGS ?=
# The samconfig.toml environment `make deploy` uses: default, dev or prod.
ENV ?= default
# sam looks for samconfig.toml beside the template it deploys (.aws-sam/build/, which
# `make build` wipes), so the repository's file is named, by absolute path.
SAMCONFIG := $(CURDIR)/samconfig.toml
BUILT_TEMPLATE := .aws-sam/build/template.yaml

.PHONY: help venv system-packages test lint fmt unit integration build deploy validate clean up bench chaos load invoke-% openapi layout permissions mutate coverage

help: ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

# The dev venv is rebuilt only when a requirements file changes.
$(VENV)/.installed: requirements-dev.txt layers/common/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -r requirements-dev.txt
	$(PY) -m pip install -qq --no-deps -e .   # the gpuqueue CLI (client/)
	touch $@

# aws-sam-cli pins pydantic to its own range, so it gets a venv of its own.
$(SAM_VENV)/.installed: requirements-sam.txt
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install -qq --upgrade pip
	$(SAM_VENV)/bin/python -m pip install -qq -r requirements-sam.txt
	touch $@

# Cog's server pins its own dependencies and spawns its worker as `python3` from PATH, so it
# gets a venv of its own (the runner puts its bin first on PATH).
$(COG_VENV)/.installed: requirements-cog.txt
	$(PYTHON) -m venv $(COG_VENV)
	$(COG_VENV)/bin/python -m pip install -qq --upgrade pip
	$(COG_VENV)/bin/python -m pip install -qq -r requirements-cog.txt
	touch $@

venv: $(VENV)/.installed $(SAM_VENV)/.installed $(COG_VENV)/.installed ## create the virtualenvs (dev tools, aws-sam-cli, the Cog server)

system-packages: ## Debian packages the tests need (espeak-ng makes test speech); a no-op once there
	bash tools/install_system_packages.sh

lint: venv ## ruff, ruff format --check, mypy, cfn-lint (before and after SAM's transform), sam validate --lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy layers/common/gpuqueue functions local tools
	$(VENV)/bin/mypy client
	$(VENV)/bin/cfn-lint template.yaml
	# What SAM generates (event source mappings, roles) is only checked after its transform.
	$(PY) tools/lint_transformed.py --template template.yaml --output .aws-sam/transformed/template.json
	$(SAM) validate --lint --region $(REGION) --template template.yaml

fmt: venv ## format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every AWS call of the run is authorized per function (IAM enforced by moto) and recorded
# here; docs/permissions.md is rebuilt from the records (grants nothing used, calls refused).
IAM_AUDIT_DIR := .aws-sam/iam-audit

test: lint system-packages $(COG_VENV)/.installed ## everything CI runs: lint, then the whole pytest suite (IAM enforced per function, branch coverage with a floor), then docs/permissions.md
	rm -rf $(IAM_AUDIT_DIR) && mkdir -p $(IAM_AUDIT_DIR)
	GPUQUEUE_IAM_AUDIT_DIR=$(CURDIR)/$(IAM_AUDIT_DIR) $(PY) -m pytest $(PYTEST_ARGS) $(COVERAGE_ARGS)
	$(PY) tools/permissions_report.py --audit-dir $(IAM_AUDIT_DIR) --out docs/permissions.md

coverage: venv ## unit + integration tests with branch coverage; fails under the floor (pyproject)
	$(PY) -m pytest tests/unit tests/integration $(PYTEST_ARGS) $(COVERAGE_ON)

permissions: venv ## docs/permissions.md from the last make test's recorded calls
	$(PY) tools/permissions_report.py --audit-dir $(IAM_AUDIT_DIR) --out docs/permissions.md

unit: venv ## unit tests only (no AWS)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv system-packages ## integration tests on moto
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

validate: venv ## sam validate --lint
	$(SAM) validate --lint --region $(REGION) --template template.yaml

bench: $(VENV)/.installed ## every figure -> docs/benchmarks.md, docs/cost.md (BENCH_TASKS=100 fleet tasks; BENCH_FLEET=0 skips the fleet runs)
	PYTHONPATH=local $(PY) tools/bench_report.py --fleet-tasks $(or $(BENCH_TASKS),100) $(if $(filter 0,$(BENCH_FLEET)),--no-fleet,)

chaos: $(VENV)/.installed ## fault suite: 300 tasks through failing, killed and hanging endpoints and dispatcher crashes (CHAOS_TASKS=N)
	PYTHONPATH=local $(PY) tools/chaos.py --tasks $(or $(CHAOS_TASKS),300) --progress --markdown docs/chaos.md --json docs/chaos.json

load: $(VENV)/.installed ## load test: 50 clients submit and poll for 60 s on loopback -> docs/load.md (LOAD_CLIENTS, LOAD_SECONDS)
	PYTHONPATH=local $(PY) tools/load.py --clients $(or $(LOAD_CLIENTS),50) --seconds $(or $(LOAD_SECONDS),60) --markdown docs/load.md --json docs/load.json

layout: $(VENV)/.installed ## redraw the README's map of the layer from the tree
	$(PY) tools/layer_layout.py --write

openapi: $(VENV)/.installed ## regenerate openapi.json (and DocsFunction's copy) from the handlers' resolvers
	$(PY) tools/openapi_document.py --write

# Mutation testing, on demand only (never part of `make test`); docs/mutation.md. mutmut runs
# in .mutmut/, where src/gpuqueue links to the layer's package, so a mutant's module name is
# the one the tests import; [tool.mutmut] in pyproject.toml says what is mutated and which
# tests run. A run goes on from where the last stopped (mutmut re-tests only the functions
# that changed); MUTATE_FRESH=1 starts afresh. MUTATE_CHILDREN: mutants tested at once.
MUTATE_DIR := .mutmut
MUTATE_CHILDREN ?= 2
mutate: $(VENV)/.installed ## mutation testing (mutmut) of the modules that hold the guarantees; counts, then every survivor
	$(if $(filter 1,$(MUTATE_FRESH)),rm -rf $(MUTATE_DIR)/mutants)
	mkdir -p $(MUTATE_DIR)/src
	ln -sfn ../../layers/common/gpuqueue $(MUTATE_DIR)/src/gpuqueue
	ln -sfn ../../client/gpuqueue_client $(MUTATE_DIR)/src/gpuqueue_client
	for f in tests functions local tools events template.yaml pyproject.toml README.md; do \
	  ln -sfn ../$$f $(MUTATE_DIR)/$$f; done
	cd $(MUTATE_DIR) && time ../$(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN)
	$(PY) tools/mutation_summary.py --mutants $(MUTATE_DIR)/mutants

build: venv ## deployable artifacts in .aws-sam/build without Docker (cross-installed wheels)
	$(PY) tools/build_artifacts.py --template template.yaml --build-dir .aws-sam/build

deploy: build ## sam deploy the built stack with samconfig.toml's settings (ENV=dev|prod; default: default)
	$(SAM) deploy --config-file $(SAMCONFIG) --config-env $(ENV) --template-file $(BUILT_TEMPLATE)

# One suite, two targets: a deployed stack here (HTTP only, a fresh user), the local stack
# inside `make test`. STACK reads the stack's ApiUrl output with your AWS credentials.
.PHONY: smoke
smoke: $(VENV)/.installed ## the smoke suite against a deployed stack: API_URL=https://... or STACK=name [REGION=] [SMOKE_TIMEOUT=300]
	$(PY) tools/smoke_run.py $(if $(API_URL),--api-url '$(API_URL)') $(if $(STACK),--stack '$(STACK)') --region $(REGION) $(if $(SMOKE_TIMEOUT),--task-timeout $(SMOKE_TIMEOUT))

invoke-%: venv ## sam local invoke <Name>Function with events/<name>_*.json against `make up UP_ARGS=--docker-ports` (needs Docker)
	@fn=$*; logical="$$(grep -oiE "^  $${fn}Function:" template.yaml | head -1 | tr -d ' :')"; \
	event="$$(ls events/$${fn}_*.json | head -1)"; \
	echo "sam local invoke $$logical --event $$event --env-vars events/env.local.json"; \
	$(SAM) local invoke "$$logical" --event "$$event" --env-vars events/env.local.json

up: $(VENV)/.installed $(COG_VENV)/.installed ## the whole system locally (PORT=3000, or $$GPUQUEUE_PORT; UP_ARGS="--image-latency 3")
	PYTHONPATH=local $(PY) -m gpuqueue_local --port $(PORT) $(UP_ARGS)

clean: ## remove venvs and build output
	rm -rf $(VENV) $(SAM_VENV) $(COG_VENV) .aws-sam .mypy_cache .ruff_cache
