#!/usr/bin/env bash
# The container's entrypoint: every way the image is started ends in `ragserve serve`, configured
# by RAGSERVE_* variables, unless another command is given.
#
#   docker run IMAGE                      -> ragserve serve              (port 8000)
#   docker run IMAGE --max-num-seqs 8     -> ragserve serve --max-num-seqs 8
#   docker run IMAGE serve                -> SageMaker: ragserve serve on SAGEMAKER_BIND_TO_PORT,
#                                            else 8080; the model defaults to /opt/ml/model
#   docker run IMAGE ragserve index build /docs --out /indexes/docs   -> run as given
set -euo pipefail

if [[ $# -eq 0 ]]; then
  exec ragserve serve
fi

if [[ $1 == serve ]]; then
  # SageMaker hosting runs `docker run IMAGE serve` and sends traffic to port 8080, or to
  # SAGEMAKER_BIND_TO_PORT when it sets it (the server reads that variable itself).
  shift
  export RAGSERVE_PORT="${RAGSERVE_PORT:-8080}"
  if [[ -z ${RAGSERVE_MODEL:-} && -f /opt/ml/model/config.json ]]; then
    export RAGSERVE_MODEL=/opt/ml/model
  fi
  exec ragserve serve "$@"
fi

if [[ $1 == -* ]]; then
  exec ragserve serve "$@"
fi

exec "$@"
