#!/usr/bin/env bash
# Structured outputs (response_format json_schema) on ragserve and on vLLM 0.32's own server, one
# after the other, same model, client, schemas and prompts: TPOT constrained/free at 1 and 16
# streams, grammar compile time, validity of 200 outputs (see benchmarks/structured.py).
#
#   bash benchmarks/structured.sh [--quick] [--skip-vllm] [structured.py flags...]
#
# Builds .venv and (unless --skip-vllm) .venv-vllm with the Makefile, as compare_vllm.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --skip-vllm "* ]]; then make -s install; else make -s install install-vllm; fi
export RAGSERVE_CACHE_DIR=${RAGSERVE_CACHE_DIR:-$PWD/.cache/ragserve} HF_HUB_OFFLINE=1
exec .venv/bin/python -m benchmarks.structured "$@"
