#!/usr/bin/env bash
# End-to-end check of a ragserve deployment on an inf2 instance: start the Neuron container,
# wait for /ready (graphs compile or load from the cache volume), send one chat request and one
# streamed request, scrape /metrics, print PASS or FAIL, stop the container.
#
#   docker build -f docker/Dockerfile.neuron -t ragserve:neuron .
#   MODEL_DIR=/opt/models MODEL=Meta-Llama-3-8B-Instruct docker/smoke_inf2.sh
#
# Against a server that is already running (nothing is started or stopped):
#   URL=http://10.0.0.5:8000 docker/smoke_inf2.sh
#
# Settings (environment variables, with their defaults):
#   IMAGE=ragserve:neuron          the image to run
#   NAME=ragserve-smoke            the container's name
#   MODEL_DIR=/opt/models          host directory mounted read-only at /models
#   MODEL=Meta-Llama-3-8B-Instruct model directory under MODEL_DIR (RAGSERVE_MODEL=/models/$MODEL)
#   TP=2                           RAGSERVE_TENSOR_PARALLEL_SIZE (2 NeuronCores per device on inf2)
#   DEVICES=/dev/neuron0           space-separated Neuron devices passed with --device
#   MAX_MODEL_LEN=4096             RAGSERVE_MAX_MODEL_LEN
#   MAX_NUM_SEQS=8                 RAGSERVE_MAX_NUM_SEQS
#   CACHE_VOLUME=ragserve-cache    docker volume (or host path) for the compiled-graph cache
#   PORT=8000                      host port
#   READY_TIMEOUT=3600             seconds to wait for /ready (a first compile takes minutes)
#   API_KEY=                       sent as a bearer token, and set as RAGSERVE_API_KEY when started
#   KEEP=0                         1: leave the container running afterwards
#   EXTRA_DOCKER_ARGS=             more `docker run` arguments, e.g. "--group-add 994"
set -euo pipefail

IMAGE="${IMAGE:-ragserve:neuron}"
NAME="${NAME:-ragserve-smoke}"
MODEL_DIR="${MODEL_DIR:-/opt/models}"
MODEL="${MODEL:-Meta-Llama-3-8B-Instruct}"
TP="${TP:-2}"
DEVICES="${DEVICES:-/dev/neuron0}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-4096}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-8}"
CACHE_VOLUME="${CACHE_VOLUME:-ragserve-cache}"
PORT="${PORT:-8000}"
READY_TIMEOUT="${READY_TIMEOUT:-3600}"
API_KEY="${API_KEY:-}"
KEEP="${KEEP:-0}"
EXTRA_DOCKER_ARGS="${EXTRA_DOCKER_ARGS:-}"
STARTED=0
READY_BODY=$(mktemp)

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
  rm -f "$READY_BODY"
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

# -- start (unless URL points at a running server) ------------------------------------------

if [[ -z ${URL:-} ]]; then
  command -v docker >/dev/null || fail "docker is not installed"
  device_args=()
  for dev in $DEVICES; do
    [[ -e $dev ]] || fail "$dev does not exist: is this an inf2 instance with the Neuron driver?"
    device_args+=(--device "$dev")
  done
  [[ -d $MODEL_DIR/$MODEL ]] || fail "$MODEL_DIR/$MODEL is not a directory (set MODEL_DIR, MODEL)"
  env_args=(
    -e "RAGSERVE_MODEL=/models/$MODEL"
    -e "RAGSERVE_TENSOR_PARALLEL_SIZE=$TP"
    -e "RAGSERVE_MAX_MODEL_LEN=$MAX_MODEL_LEN"
    -e "RAGSERVE_MAX_NUM_SEQS=$MAX_NUM_SEQS"
  )
  if [[ -n $API_KEY ]]; then
    env_args+=(-e "RAGSERVE_API_KEY=$API_KEY")
  fi
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  # shellcheck disable=SC2206  # EXTRA_DOCKER_ARGS is split on purpose
  extra=($EXTRA_DOCKER_ARGS)
  cmd=(docker run -d --name "$NAME" "${device_args[@]}" -p "$PORT:8000"
       -v "$CACHE_VOLUME:/var/cache/ragserve" -v "$MODEL_DIR:/models:ro"
       "${env_args[@]}" "${extra[@]}" "$IMAGE")
  log "starting: ${cmd[*]}"
  "${cmd[@]}" >/dev/null || fail "docker run failed"
  STARTED=1
  URL="http://127.0.0.1:$PORT"
fi
URL="${URL%/}"
log "server: $URL"

# -- wait for /ready ------------------------------------------------------------------------

start=$SECONDS
last=""
while :; do
  code=$(curl -s -o "$READY_BODY" -w '%{http_code}' "${auth[@]}" \
    "$URL/ready" || true)
  if [[ $code == 200 ]]; then
    log "ready after $((SECONDS - start)) s: $(cat "$READY_BODY")"
    break
  fi
  body=$(head -c 300 "$READY_BODY" 2>/dev/null || true)
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

model=$(curl -sf "${auth[@]}" "$URL/v1/models" | python3 -c \
  'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])') \
  || fail "GET /v1/models"
log "model: $model"

# -- one chat request -----------------------------------------------------------------------

chat_body=$(printf '{"model": "%s", "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": "Name three primary colors."}]}' "$model")
t0=$SECONDS
answer=$(curl -sf "${auth[@]}" -H 'content-type: application/json' -d "$chat_body" \
  "$URL/v1/chat/completions") || fail "POST /v1/chat/completions"
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

stream_body=$(printf '{"model": "%s", "max_tokens": 32, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Count from one to five."}]}' "$model")
t0=$SECONDS
stream=$(curl -sfN "${auth[@]}" -H 'content-type: application/json' -d "$stream_body" \
  "$URL/v1/chat/completions") || fail "POST /v1/chat/completions (stream)"
events=$(grep -c '^data: ' <<<"$stream" || true)
grep -q '^data: \[DONE\]' <<<"$stream" || fail "the stream did not end with data: [DONE]"
(( events >= 3 )) || fail "only $events SSE events"
log "stream ($((SECONDS - t0)) s): $events SSE events, ended with [DONE]"

# -- metrics --------------------------------------------------------------------------------

metrics=$(curl -sf "${auth[@]}" "$URL/metrics") || fail "GET /metrics"
for name in vllm:num_requests_running vllm:kv_cache_usage_perc vllm:prompt_tokens_total \
    vllm:generation_tokens_total vllm:time_to_first_token_seconds_bucket \
    vllm:inter_token_latency_seconds_bucket vllm:request_success_total \
    ragserve_bucket_selected_total ragserve_padding_tokens_total; do
  grep -q "^$name{" <<<"$metrics" || fail "/metrics lacks $name"
done
generated=$(grep '^vllm:generation_tokens_total{' <<<"$metrics" | awk '{s += $2} END {print s + 0}')
log "metrics: all expected series present; vllm:generation_tokens_total = $generated"
awk '$2 > 0' <<<"$(grep '^ragserve_bucket_selected_total{' <<<"$metrics")" | sed 's/^/  /' >&2 || true

echo "PASS"
