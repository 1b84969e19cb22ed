"""Record the lengths of real requests through a ragserve server: a trace to plan buckets from.

For each question of a dataset (default: ``benchmarks/data/more_itertools/questions.jsonl``)
four requests, as users of a RAG server send them:

- ``chat``: the question alone;
- ``followup``: a second turn, the question, the model's own answer to it and "Can you show a
  short example?";
- ``rag3`` and ``rag5``: the question with ``"rag": {"top_k": 3}`` and ``5`` (the passages go
  into the prompt).

Every request generates greedily up to ``--max-tokens`` (the model stops earlier at its end of
turn), ``--concurrency`` at a time: every first turn, then the other three of each question.
The server's own length reservoir then holds every request's prompt length and decode context
length (prompt + generated), and its ``GET /v1/buckets`` body is written to ``--out``: lengths
only, no text. That file is what ``ragserve buckets plan
--from FILE`` and ``python -m benchmarks.bucket_plan --replay FILE`` read.

    python -m benchmarks.record_traffic --index IDX --out trace.json
    python -m benchmarks.record_traffic --server http://127.0.0.1:8000 --out trace.json

``benchmarks/data/traffic/more_itertools.json`` was recorded with the first form on an index
of ``benchmarks/data/more_itertools/docs`` and the embedded model (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import emit, parser
from benchmarks.rag_eval import Client, load_dataset, serve

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "benchmarks" / "data" / "more_itertools" / "questions.jsonl"
FOLLOWUP = "Can you show a short example?"


async def record(url: str, questions: list[str], max_tokens: int, concurrency: int,
                 api_key: str | None) -> tuple[dict[str, Any], Counter]:
    """Send the four requests per question; returns the server's ``/v1/buckets`` body and the
    number of requests of each kind."""
    sent: Counter = Counter()
    gate = asyncio.Semaphore(concurrency)
    client = Client(url, api_key, timeout=600, concurrency=concurrency)
    try:
        model = await client.model()

        async def one(kind: str, messages: list[dict], rag: int | None) -> str:
            body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0,
                                    "max_tokens": max_tokens}
            if rag:
                body["rag"] = {"top_k": rag}
            async with gate:
                out = await client.post("/v1/chat/completions", body)
            sent[kind] += 1
            return out["choices"][0]["message"]["content"]

        async def first_turn(q: str) -> tuple[str, str]:
            return q, await one("chat", [{"role": "user", "content": q}], None)

        async def later(q: str, answer: str) -> None:
            user = {"role": "user", "content": q}
            await asyncio.gather(
                one("followup", [user, {"role": "assistant", "content": answer},
                                 {"role": "user", "content": FOLLOWUP}], None),
                one("rag3", [user], 3), one("rag5", [user], 5))

        # all first turns, then everything that needs one: the semaphore, not a batch barrier,
        # bounds what is in flight, so the engine's batch stays full
        answers = await asyncio.gather(*(first_turn(q) for q in questions))
        print(f"# {len(questions)} first turns", file=sys.stderr, flush=True)
        await asyncio.gather(*(later(q, a) for q, a in answers))
        r = await client.http.get("/v1/buckets")
        r.raise_for_status()
        return r.json(), sent
    finally:
        await client.close()


def main() -> None:
    p = parser(__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="a running ragserve with an index")
    where.add_argument("--index", type=Path, help="start `ragserve serve --index IDX` for the run")
    p.add_argument("--dataset", type=Path, default=DATASET)
    p.add_argument("--limit", type=int, default=None, help="the first N questions")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight (the server's default --max-num-seqs is 16)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--serve-args", default="", help="extra `ragserve serve` flags (--index)")
    p.add_argument("--out", type=Path, required=True, help="where the /v1/buckets body goes")
    args = p.parse_args()
    limit = 8 if args.quick and args.limit is None else args.limit
    questions = [ex.question for ex in load_dataset(args.dataset, limit)]
    with contextlib.ExitStack() as stack:
        url = args.server or stack.enter_context(
            serve(args.model, args.index, None, args.serve_args, 900))
        body, sent = asyncio.run(record(url, questions, args.max_tokens, args.concurrency,
                                        args.api_key))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body) + "\n")
    prompts, contexts = body["prompt_lengths"], body["context_lengths"]
    emit("record_traffic", args, {
        "out": str(args.out), "requests": dict(sent), "questions": len(questions),
        "max_tokens": args.max_tokens, "samples": {"prompt": len(prompts),
                                                   "context": len(contexts)},
        "prompt_tokens": {"min": min(prompts), "max": max(prompts),
                          "median": sorted(prompts)[len(prompts) // 2]},
        "context_tokens": {"min": min(contexts), "max": max(contexts),
                           "median": sorted(contexts)[len(contexts) // 2]},
        "max_model_len": body.get("max_model_len")})


if __name__ == "__main__":
    main()
