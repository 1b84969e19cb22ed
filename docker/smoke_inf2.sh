#!/usr/bin/env bash
# End-to-end check of a ragserve deployment on a Neuron instance, for each Neuron image:
#
#   neuron            Dockerfile.neuron on inf2/trn1: ragserve's engine on transformers-neuronx
#                     (the default)
#   neuron-vllm       Dockerfile.neuron-vllm on inf2/trn1: vLLM's engine, the vllm-neuron plugin on
#                     NxD Inference (maintenance mode)
#   neuron-vllm-trn2  Dockerfile.neuron-vllm built on AWS's Trn2/Trn3 base, on trn2/trn3: vLLM's
#                     engine, the vLLM Neuron plugin (generally available from Neuron SDK 2.34)
#
# It builds a small RAG index of the image's own docs/ (indexes volume), starts the container
# with it, waits for /ready (graphs compile or load from the cache volume), checks the engine in
# /v1/models, sends a chat, a streamed chat, a completion and a RAG chat (sources must come
# back), checks /metrics for the series of that engine, then sends SIGTERM during a streamed
# request: the request must finish and the container exit 0. Prints PASS or FAIL.
#
#   docker build -f docker/Dockerfile.neuron -t ragserve:neuron .
#   MODEL_DIR=/opt/models MODEL=Meta-Llama-3-8B-Instruct docker/smoke_inf2.sh neuron
#   docker build -f docker/Dockerfile.neuron-vllm -t ragserve:neuron-vllm .
#   MODEL_DIR=/opt/models MODEL=Meta-Llama-3-8B-Instruct docker/smoke_inf2.sh neuron-vllm
#   docker build -f docker/Dockerfile.neuron-vllm -t ragserve:neuron-vllm-trn2 \
#     --build-arg NEURON_BASE_IMAGE=<the Trn2/Trn3 tag in docs/deployment.md> .
#   MODEL_DIR=/opt/models MODEL=Meta-Llama-3-8B-Instruct docker/smoke_inf2.sh neuron-vllm-trn2
#
# Against a server that is already running (nothing is started or stopped, no SIGTERM check;
# the RAG check runs when /v1/models shows a retriever):
#   URL=http://10.0.0.5:8000 docker/smoke_inf2.sh neuron-vllm
#
# Settings (environment variables, with their defaults):
#   IMAGE=ragserve:<mode>          the image to run
#   NAME=ragserve-smoke            the container's name
#   MODEL_DIR=/opt/models          host directory mounted read-only at /models
#   MODEL=Meta-Llama-3-8B-Instruct model directory under MODEL_DIR (RAGSERVE_MODEL=/models/$MODEL)
#   TP=2 (neuron-vllm-trn2: 4)     RAGSERVE_TENSOR_PARALLEL_SIZE: NeuronCores to shard over, 2 per
#                                  inf2/trn1 device; on trn2 4 logical ones per device (LNC=2, the
#                                  default: two physical NeuronCores each)
#   DEVICES=/dev/neuron0           space-separated Neuron devices passed with --device
#   MAX_MODEL_LEN=4096             RAGSERVE_MAX_MODEL_LEN
#   MAX_NUM_SEQS=8                 RAGSERVE_MAX_NUM_SEQS
#   CACHE_VOLUME=ragserve-cache    docker volume (or host path) for the compiled-graph cache
#   INDEX_VOLUME=ragserve-indexes  docker volume (or host path) for the smoke test's RAG index
#   RAG=1                          0: no index, no RAG check
#   PORT=8000                      host port
#   READY_TIMEOUT=3600             seconds to wait for /ready (a first compile takes minutes)
#   API_KEY=                       sent as a bearer token, and set as RAGSERVE_API_KEY when started
#   KEEP=0                         1: leave the container running afterwards (no SIGTERM check)
#   EXTRA_DOCKER_ARGS=             more `docker run` arguments, e.g. "--group-add 994"
#   DRY_RUN=0                      1: print the docker commands and the expected series, run nothing
# neuron-vllm compiles into a directory per configuration in the cache volume, which the server
# chooses (see Dockerfile.neuron-vllm, NEURON_COMPILED_ARTIFACTS).
set -euo pipefail

MODE="${1:-neuron}"
case $MODE in
  neuron) ENGINE=ragserve ;;
  neuron-vllm) ENGINE=vllm ;;
  neuron-vllm-trn2) ENGINE=vllm ;;
  *) echo "usage: $0 [neuron|neuron-vllm|neuron-vllm-trn2]   (settings: environment variables," \
          "see the script)" >&2
     exit 2 ;;
esac
IMAGE="${IMAGE:-ragserve:$MODE}"
NAME="${NAME:-ragserve-smoke}"
MODEL_DIR="${MODEL_DIR:-/opt/models}"
MODEL="${MODEL:-Meta-Llama-3-8B-Instruct}"
if [[ $MODE == neuron-vllm-trn2 ]]; then
  TP="${TP:-4}"  # one Trainium2 device: /dev/neuron0
else
  TP="${TP:-2}"  # one Inferentia2 / Trainium1 device
fi
DEVICES="${DEVICES:-/dev/neuron0}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-4096}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-8}"
CACHE_VOLUME="${CACHE_VOLUME:-ragserve-cache}"
INDEX_VOLUME="${INDEX_VOLUME:-ragserve-indexes}"
RAG="${RAG:-1}"
PORT="${PORT:-8000}"
READY_TIMEOUT="${READY_TIMEOUT:-3600}"
API_KEY="${API_KEY:-}"
KEEP="${KEEP:-0}"
EXTRA_DOCKER_ARGS="${EXTRA_DOCKER_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"
INDEX=/indexes/smoke-docs
STARTED=0
TMP=$(mktemp -d)

# Series /metrics must show: the API's and the vllm:* names both engines export, then the ones
# only this engine exports (ragserve's bucket series; vLLM's preemption and prefix-cache counters).
METRICS=(vllm:num_requests_running vllm:num_requests_waiting vllm:kv_cache_usage_perc
  vllm:prompt_tokens_total vllm:generation_tokens_total vllm:request_success_total
  vllm:time_to_first_token_seconds_bucket vllm:inter_token_latency_seconds_bucket
  vllm:e2e_request_latency_seconds_bucket ragserve_http_requests_total
  ragserve_token_delivery_seconds_bucket)
if [[ $ENGINE == ragserve ]]; then
  METRICS+=(ragserve_bucket_selected_total ragserve_padding_tokens_total
    ragserve_engine_step_seconds_bucket)
else
  METRICS+=(vllm:num_preemptions_total vllm:prefix_cache_queries_total)
fi

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() {
  log "FAIL: $*"
  if [[ $STARTED == 1 ]]; then
    log "last container log lines:"
    docker logs --tail 40 "$NAME" >&2 || true
  fi
  echo "FAIL"
  exit 1
}

cleanup() {
  rm -rf "$TMP"
  if [[ $STARTED == 1 && $KEEP != 1 ]]; then
    log "stopping $NAME"
    docker stop --time 40 "$NAME" >/dev/null 2>&1 || true
    docker rm "$NAME" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

auth=()
if [[ -n $API_KEY ]]; then
  auth=(-H "Authorization: Bearer $API_KEY")
fi

# POST a JSON body to a route; the response body on stdout.
post() {
  curl -sf "${auth[@]}" -H 'content-type: application/json' -d "$2" "$URL$1"
}

# -- start (unless URL points at a running server) ------------------------------------------

if [[ -z ${URL:-} ]]; then
  device_args=()
  for dev in $DEVICES; do
    device_args+=(--device "$dev")
  done
  env_args=(
    -e "RAGSERVE_MODEL=/models/$MODEL"
    -e "RAGSERVE_TENSOR_PARALLEL_SIZE=$TP"
    -e "RAGSERVE_MAX_MODEL_LEN=$MAX_MODEL_LEN"
    -e "RAGSERVE_MAX_NUM_SEQS=$MAX_NUM_SEQS"
  )
  if [[ -n $API_KEY ]]; then
    env_args+=(-e "RAGSERVE_API_KEY=$API_KEY")
  fi
  index_cmd=()
  if [[ $RAG == 1 ]]; then
    env_args+=(-v "$INDEX_VOLUME:/indexes" -e "RAGSERVE_INDEX=$INDEX")
    index_cmd=(docker run --rm -v "$INDEX_VOLUME:/indexes" -v "$CACHE_VOLUME:/var/cache/ragserve"
               "$IMAGE" ragserve index build /opt/ragserve/docs --out "$INDEX")
  fi
  # shellcheck disable=SC2206  # EXTRA_DOCKER_ARGS is split on purpose
  extra=($EXTRA_DOCKER_ARGS)
  cmd=(docker run -d --name "$NAME" "${device_args[@]}" -p "$PORT:8000"
       -v "$CACHE_VOLUME:/var/cache/ragserve" -v "$MODEL_DIR:/models:ro"
       "${env_args[@]}" "${extra[@]}" "$IMAGE")
  if [[ $DRY_RUN == 1 ]]; then
    echo "mode: $MODE (engine $ENGINE)"
    if [[ ${#index_cmd[@]} -gt 0 ]]; then
      echo "index: ${index_cmd[*]}"
    fi
    echo "start: ${cmd[*]}"
    echo "metrics: ${METRICS[*]}"
    exit 0
  fi
  command -v docker >/dev/null || fail "docker is not installed"
  for dev in $DEVICES; do
    [[ -e $dev ]] || fail "$dev does not exist: is this a Neuron instance with the Neuron driver?"
  done
  [[ -d $MODEL_DIR/$MODEL ]] || fail "$MODEL_DIR/$MODEL is not a directory (set MODEL_DIR, MODEL)"
  if [[ ${#index_cmd[@]} -gt 0 ]]; then
    log "building the RAG index: ${index_cmd[*]}"
    "${index_cmd[@]}" >&2 || fail "ragserve index build failed"
  fi
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  log "starting: ${cmd[*]}"
  "${cmd[@]}" >/dev/null || fail "docker run failed"
  STARTED=1
  URL="http://127.0.0.1:$PORT"
elif [[ $DRY_RUN == 1 ]]; then
  echo "mode: $MODE (engine $ENGINE)"
  echo "server: $URL"
  echo "metrics: ${METRICS[*]}"
  exit 0
fi
URL="${URL%/}"
log "server: $URL ($MODE: the $ENGINE engine)"

# -- wait for /ready ------------------------------------------------------------------------

start=$SECONDS
last=""
while :; do
  code=$(curl -s -o "$TMP/ready" -w '%{http_code}' "${auth[@]}" "$URL/ready" || true)
  if [[ $code == 200 ]]; then
    log "ready after $((SECONDS - start)) s: $(cat "$TMP/ready")"
    break
  fi
  body=$(head -c 300 "$TMP/ready" 2>/dev/null || true)
  if [[ $body == *'"failed"'* ]]; then
    fail "the server reports a failed load: $body"
  fi
  if [[ $STARTED == 1 && $(docker inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null) != true ]]; then
    fail "the container exited"
  fi
  if [[ "$code $body" != "$last" ]]; then
    log "waiting for /ready ($((SECONDS - start)) s): HTTP $code ${body:-no answer yet}"
    last="$code $body"
  fi
  if (( SECONDS - start > READY_TIMEOUT )); then
    fail "not ready after $READY_TIMEOUT s (raise READY_TIMEOUT for a first compile)"
  fi
  sleep 5
done

# -- the model, the engine, the retriever ---------------------------------------------------

models=$(curl -sf "${auth[@]}" "$URL/v1/models") || fail "GET /v1/models"
read -r model engine retriever < <(python3 -c '
import json, sys
card = json.loads(sys.argv[1])["data"][0]
print(card["id"], card.get("engine") or "-", (card.get("retriever") or {}).get("status") or "-")
' "$models") || fail "bad /v1/models: $models"
log "model: $model, engine: $engine, retriever: $retriever"
if [[ $engine != - && $engine != "$ENGINE" ]]; then
  fail "the server runs the $engine engine, not $ENGINE (image $IMAGE, mode $MODE)"
fi
if [[ $RAG == 1 && $STARTED == 1 && $retriever != ready ]]; then
  fail "the RAG index $INDEX is not loaded (retriever: $retriever)"
fi

# -- one chat request -----------------------------------------------------------------------

t0=$SECONDS
answer=$(post /v1/chat/completions "$(printf '{"model": "%s", "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": "Name three primary colors."}]}' "$model")") \
  || fail "POST /v1/chat/completions"
text=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
c = r["choices"][0]
assert c["message"]["content"], "empty answer"
assert r["usage"]["completion_tokens"] > 0, "no completion tokens"
print(c["finish_reason"], "|", c["message"]["content"].replace("\n", " ")[:200])
' "$answer") || fail "bad chat response: $answer"
log "chat ($((SECONDS - t0)) s): $text"

# -- one streamed request -------------------------------------------------------------------

t0=$SECONDS
stream=$(curl -sfN "${auth[@]}" -H 'content-type: application/json' -d "$(printf '{"model": "%s", "max_tokens": 32, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Count from one to five."}]}' "$model")" \
  "$URL/v1/chat/completions") || fail "POST /v1/chat/completions (stream)"
events=$(grep -c '^data: ' <<<"$stream" || true)
grep -q '^data: \[DONE\]' <<<"$stream" || fail "the stream did not end with data: [DONE]"
(( events >= 3 )) || fail "only $events SSE events"
log "stream ($((SECONDS - t0)) s): $events SSE events, ended with [DONE]"

# -- one completion -------------------------------------------------------------------------

t0=$SECONDS
completion=$(post /v1/completions "$(printf '{"model": "%s", "max_tokens": 16, "temperature": 0, "prompt": "The capital of France is"}' "$model")") \
  || fail "POST /v1/completions"
text=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
c = r["choices"][0]
assert isinstance(c["text"], str), "no text"
assert r["usage"]["completion_tokens"] > 0, "no completion tokens"
print(c["finish_reason"], "|", c["text"].replace("\n", " ")[:200])
' "$completion") || fail "bad completion response: $completion"
log "completion ($((SECONDS - t0)) s): $text"

# -- one RAG request ------------------------------------------------------------------------

if [[ $RAG == 1 && $retriever == ready ]]; then
  t0=$SECONDS
  rag=$(post /v1/chat/completions "$(printf '{"model": "%s", "max_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": "How does ragserve choose a prefill bucket for a prompt?"}], "rag": {"top_k": 3}}' "$model")") \
    || fail "POST /v1/chat/completions (rag)"
  text=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
sources = r["sources"]
assert sources, "no sources"
assert all(s["number"] and s["doc_id"] for s in sources), "a source without number or doc_id"
assert "grounding" in r, "no grounding report"
print(len(sources), "sources:", ", ".join(s["doc_id"] for s in sources), "|",
      r["choices"][0]["message"]["content"].replace("\n", " ")[:160])
' "$rag") || fail "bad RAG response: $rag"
  log "rag ($((SECONDS - t0)) s): $text"
  METRICS+=(ragserve_retrieval_seconds_bucket ragserve_retrieved_passages_bucket)
elif [[ $RAG == 1 ]]; then
  log "rag: skipped (the server has no retriever)"
fi

# -- metrics --------------------------------------------------------------------------------

metrics=$(curl -sf "${auth[@]}" "$URL/metrics") || fail "GET /metrics"
for name in "${METRICS[@]}"; do
  grep -q "^$name{" <<<"$metrics" || fail "/metrics lacks $name (expected with the $ENGINE engine)"
done
generated=$(grep '^vllm:generation_tokens_total{' <<<"$metrics" | awk '{s += $2} END {print s + 0}')
log "metrics: all ${#METRICS[@]} expected series present; vllm:generation_tokens_total = $generated"
if [[ $ENGINE == ragserve ]]; then
  awk '$2 > 0' <<<"$(grep '^ragserve_bucket_selected_total{' <<<"$metrics")" | sed 's/^/  /' >&2 || true
fi

# -- SIGTERM drains in-flight requests and exits 0 ------------------------------------------

if [[ $STARTED == 1 && $KEEP != 1 ]]; then
  curl -sfN "${auth[@]}" -H 'content-type: application/json' -d "$(printf '{"model": "%s", "max_tokens": 256, "temperature": 0, "stream": true, "messages": [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}]}' "$model")" \
    "$URL/v1/chat/completions" >"$TMP/drain" 2>/dev/null &
  drain=$!
  for _ in $(seq 100); do  # until the first token is out, at most 10 s
    grep -q '^data: ' "$TMP/drain" 2>/dev/null && break
    sleep 0.1
  done
  log "SIGTERM with a request in flight"
  docker kill --signal TERM "$NAME" >/dev/null || fail "docker kill --signal TERM"
  wait "$drain" || fail "the in-flight request failed after SIGTERM"
  grep -q '^data: \[DONE\]' "$TMP/drain" || fail "the in-flight request did not finish after SIGTERM"
  status=$(timeout 60 docker wait "$NAME") || fail "the container did not stop within 60 s of SIGTERM"
  [[ $status == 0 ]] || fail "the container exited $status after SIGTERM (expected 0)"
  log "SIGTERM: the in-flight request finished, the container exited 0"
fi

echo "PASS"
