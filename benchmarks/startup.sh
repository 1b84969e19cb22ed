#!/usr/bin/env bash
# Time to ready and to full speed, first and second start, ragserve against vLLM (see
# benchmarks/startup.py): the embedded SmolLM2-135M-Instruct, dequantized once by ragserve, for
# both. The last line is one JSON object.
#
#   bash benchmarks/startup.sh [--quick] [--dtype float32] [startup flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install install-vllm
export RAGSERVE_CACHE_DIR=${RAGSERVE_CACHE_DIR:-$PWD/.cache/ragserve} HF_HUB_OFFLINE=1
MODEL_DIR=$(.venv/bin/python -c "from runtime.loader import resolve_model; print(resolve_model(None).path)")
exec .venv/bin/python -m benchmarks.startup --model-dir "$MODEL_DIR" \
  --name SmolLM2-135M-Instruct "$@"
