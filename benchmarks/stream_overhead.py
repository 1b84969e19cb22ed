"""Server overhead with many concurrent streams against a tiny model.

Builds a tiny random Llama (SmolLM2's tokenizer, 2 layers of width 64: the model costs almost
nothing, so what remains is the server), starts ``ragserve serve`` with ``--max-num-seqs`` equal
to the number of streams, and runs :mod:`benchmarks.serve_load` with that concurrency.

Two views of what the server adds on top of the engine:

- ``added_latency_per_token_ms`` (the goal's number, <= 1 ms with 256 streams and zero failed
  requests): how much later than the engine produced it a token's SSE event is written to its
  connection (``ragserve_token_delivery_seconds``, mean over the run): the hand-off from the
  engine thread to the event loop, the SSE event, the write.
- ``request_intake_ms``: the client's mean time to first token minus the server's own
  (``vllm:time_to_first_token_seconds``, from the handler's start): a request's way in (HTTP
  and queueing behind other requests' parsing on the event loop) plus its first token's way
  out; paid once per request, not per token.
- ``loop_overhead_per_token_ms``: the client's mean time per output token minus the engine's
  own time per decode iteration (all step time, prefill included, over the decode steps): work
  between engine steps (dispatch, metrics) and thread contention, a throughput cost.

    python -m benchmarks.stream_overhead [--streams 256] [--quick]
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from benchmarks import serve_load
from benchmarks.common import emit, round_floats, wait_server_ready


def tiny_model(out: Path) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer (built once)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runtime.loader import resolve_model

    src = resolve_model(None).path
    tok = AutoTokenizer.from_pretrained(str(src), fix_mistral_regex=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def totals(metrics_text: str) -> tuple[float, ...]:
    """(all engine step seconds, decode steps, server TTFT sum, TTFT count, delivery sum,
    delivery count) from /metrics."""
    total = decode = ttft_sum = ttft_count = deliver_sum = deliver_count = 0.0
    for line in metrics_text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("ragserve_engine_step_seconds_sum"):
            total += float(value)
        elif line.startswith("ragserve_engine_step_seconds_count") and re.search(
                r'phase="decode"', line):
            decode += float(value)
        elif line.startswith("vllm:time_to_first_token_seconds_sum"):
            ttft_sum += float(value)
        elif line.startswith("vllm:time_to_first_token_seconds_count"):
            ttft_count += float(value)
        elif line.startswith("ragserve_token_delivery_seconds_sum"):
            deliver_sum += float(value)
        elif line.startswith("ragserve_token_delivery_seconds_count"):
            deliver_count += float(value)
    return total, decode, ttft_sum, ttft_count, deliver_sum, deliver_count


def main() -> None:
    p = serve_load.build_parser()
    p.description = __doc__
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--port", type=int, default=8411)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `ragserve serve` argument (repeatable), e.g. "
                        "--server-arg=--engine-process=false")
    args = p.parse_args()
    if args.quick:
        args.streams = 64
    args.concurrency = args.streams
    if "--client" not in sys.argv:
        args.client = "raw"  # measure the server, not the load generator
    args.requests = 2 * args.streams
    args.max_tokens = min(args.max_tokens, 64)
    args.prompt_tokens = min(args.prompt_tokens, 32)
    cache = Path(os.environ.get("RAGSERVE_CACHE_DIR", ".cache/ragserve"))
    model = tiny_model(cache / "bench-tiny-llama")
    url = f"http://127.0.0.1:{args.port}"
    args.url = url
    cmd = [sys.executable, "-m", "server", "--model", str(model), "--served-model-name", "tiny",
           "--port", str(args.port), "--max-num-seqs", str(args.streams), "--max-model-len",
           "256", "--dtype", "float32", "--max-queue-len", str(4 * args.streams),
           "--log-level", "warning", *args.server_arg]
    log = open(cache / "stream_overhead_server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_server_ready(proc, url, log.name, 600)
        before = totals(httpx.get(f"{url}/metrics").text)
        load = asyncio.run(serve_load.run(args))
        after = totals(httpx.get(f"{url}/metrics").text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    engine_s = after[0] - before[0]
    decode_steps = after[1] - before[1]
    per_iteration = engine_s / decode_steps if decode_steps else float("nan")
    server_ttft = (after[2] - before[2]) / max(1.0, after[3] - before[3])
    delivered = after[5] - before[5]
    added = (after[4] - before[4]) / delivered if delivered else float("nan")
    result = {
        "streams": args.streams, "requests": args.requests, "server_args": args.server_arg,
        "max_tokens": args.max_tokens,
        "completed": load["completed"], "errors": load["errors"],
        "error_examples": load["error_examples"],
        "output_tok_s": load["output_tok_s"],
        "tpot_mean_ms": load["tpot_mean_s"] * 1e3, "tpot_p50_ms": load["tpot_p50_s"] * 1e3,
        "engine_ms_per_decode_iteration": per_iteration * 1e3,
        "engine_busy_fraction": engine_s / load["wall_s"],
        "client_ttft_mean_ms": load["ttft_mean_s"] * 1e3,
        "server_ttft_mean_ms": server_ttft * 1e3,
        "added_latency_per_token_ms": added * 1e3,
        "tokens_delivered": delivered,
        "request_intake_ms": (load["ttft_mean_s"] - server_ttft) * 1e3,
        "loop_overhead_per_token_ms": (load["tpot_mean_s"] - per_iteration) * 1e3,
    }
    print(f"{args.streams} streams: {load['errors']} errors; token delivery "
          f"{result['added_latency_per_token_ms']:.2f} ms; intake {result['request_intake_ms']:.1f}"
          f" ms/request; TPOT {result['tpot_mean_ms']:.2f} ms vs engine "
          f"{per_iteration * 1e3:.2f} ms/iteration")
    emit("stream_overhead", args, round_floats(result))


if __name__ == "__main__":
    main()
