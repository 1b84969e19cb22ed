"""Load generator for any OpenAI-compatible server (ragserve, vLLM, ...).

``--concurrency`` workers send ``--requests`` streamed chat completions in total (a bounded
loop), with the openai client, or with ``--client raw`` (httpx reading the SSE lines: much
lighter, for measuring the server rather than the client). Each has a prompt of about
``--prompt-tokens`` tokens and exactly ``--max-tokens`` output tokens (``ignore_eos``, a vLLM
extension ragserve also takes). Reports requests/s, output tokens/s, TTFT and TPOT
percentiles, errors, and the cost of a million output tokens at ``--price-per-hour`` (default:
inf2.xlarge on-demand, us-east-1).

TTFT and TPOT are timed as ``vllm bench serve`` times them: TTFT to the first event carrying
``choices`` (a RAG ``sources`` event has none), TPOT = (last such event - TTFT) / (tokens - 1).

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --concurrency 16 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx
import openai

from benchmarks.common import emit, mean, percentile, round_floats

WORDS = ("system", "model", "token", "batch", "cache", "request", "server", "answer", "graph",
         "bucket", "prompt", "stream", "latency", "memory", "vector", "kernel", "device",
         "engine", "result", "value")


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    e2e: float
    output_tokens: int


def prompt_text(rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of plain words (one word is ~1.3 tokens in BPE vocabularies)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, int(n_tokens / 1.3))))


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    first = last = None
    n_out = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:  # as vllm bench serve: any chunk with choices (the role one too)
            first = first or now
            last = now
        if chunk.usage is not None:
            n_out = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("no choices streamed")
    tpot = (last - first) / (n_out - 1) if n_out > 1 else None
    return Sample(first - t0, tpot, last - t0, n_out)


async def one_raw(client: httpx.AsyncClient, model: str, prompt: str,
                  max_tokens: int) -> Sample:
    t0 = time.perf_counter()
    first = last = None
    n_out = 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"].get("message"))
            choices = event.get("choices") or []
            if choices:
                first = first or now
                last = now
            if event.get("usage"):
                n_out = event["usage"]["completion_tokens"]
    if first is None:
        raise RuntimeError("no choices streamed")
    tpot = (last - first) / (n_out - 1) if n_out > 1 else None
    return Sample(first - t0, tpot, last - t0, n_out)


async def run(args: argparse.Namespace) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key=args.api_key,
                                max_retries=0, timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    raw = httpx.AsyncClient(base_url=args.url.rstrip("/"), timeout=args.timeout,
                            headers={"Authorization": f"Bearer {args.api_key}"},
                            limits=httpx.Limits(max_connections=args.concurrency))
    rng = random.Random(args.seed)
    prompts = [prompt_text(rng, args.prompt_tokens) for _ in range(args.requests)]
    samples: list[Sample] = []
    errors: list[str] = []
    next_index = iter(range(args.requests))

    async def worker() -> None:
        for i in next_index:  # shared iterator: a bounded loop over all requests
            try:
                if args.client == "raw":
                    samples.append(await one_raw(raw, model, prompts[i], args.max_tokens))
                else:
                    samples.append(await one(client, model, prompts[i], args.max_tokens))
            except Exception as e:  # counted and reported, the run goes on
                errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(args.concurrency)])
    wall = time.perf_counter() - t0
    await client.close()
    await raw.aclose()
    out_tokens = sum(s.output_tokens for s in samples)
    tok_s = out_tokens / wall
    ttft = [s.ttft for s in samples]
    tpot = [s.tpot for s in samples if s.tpot is not None]
    return {
        "url": args.url,
        "model": model,
        "client": args.client,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "completed": len(samples),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": wall,
        "rps": len(samples) / wall,
        "output_tok_s": tok_s,
        "ttft_mean_s": mean(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p95_s": percentile(tpot, 95),
        "tpot_mean_s": mean(tpot),
        "price_per_hour": args.price_per_hour,
        "usd_per_1m_output_tokens": (args.price_per_hour / 3600 / tok_s * 1e6
                                     if tok_s else float("nan")),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--price-per-hour", type=float, default=0.76,
                   help="USD per hour of the machine (default: inf2.xlarge on-demand)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client", choices=["openai", "raw"], default="openai",
                   help="openai: the official client; raw: httpx on the SSE lines (lighter)")
    p.add_argument("--quick", action="store_true", help="8 requests at concurrency 4")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.requests, args.concurrency = 8, 4
    if args.concurrency < 1 or args.requests < 1:
        raise SystemExit("--concurrency and --requests must be >= 1")
    result = asyncio.run(run(args))
    print(f"{result['completed']}/{args.requests} ok, {result['errors']} errors, "
          f"{result['rps']:.2f} req/s, {result['output_tok_s']:.1f} tok/s, TTFT p50 "
          f"{result['ttft_p50_s'] * 1e3:.0f} ms, TPOT p50 {result['tpot_p50_s'] * 1e3:.1f} ms, "
          f"${result['usd_per_1m_output_tokens']:.2f} per 1M output tokens")
    emit("serve_load", args, round_floats(result, 5))


if __name__ == "__main__":
    main()
