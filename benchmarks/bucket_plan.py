"""Buckets planned from observed traffic vs the default lists, on a replayed mixed trace.

No model: padding is arithmetic on lengths. A trace of requests is generated (``--requests``,
default 20,000; ``--seed``), as chat-like traffic with a RAG share:

- 70% chat: prompt lengths log-normal (median ~200 tokens, capped at 2,000);
- 30% RAG: prompt lengths uniform over 50..2,000 (passages in the prompt);
- each request generates 1..300 tokens; its decode context is prompt + generated.

The first half is what the server **observed**: it goes through the server's own reservoir
(``bucketing.sample.LengthSample``, 10,000 lengths per stream), and the plan is made from that
sample exactly as ``ragserve buckets plan`` makes it (``bucketing.plan_buckets``, the same number
of graphs as the default list, multiples of ``--align``). The second half is **replayed**: the
padding ratio (padded tokens / real tokens) of the default and of the planned lists is measured
on it, so the plan is judged on traffic it did not see.

Goal (issue 13): the planned context-encoding list, with the default's number of graphs, pads
<= 1.05x on the replayed trace (the default three-per-octave list: ~1.13x).

    python -m benchmarks.bucket_plan [--requests 20000] [--align 64] [--quick]
"""

from __future__ import annotations

import random

from benchmarks.common import emit, parser, round_floats
from bucketing import BucketConfig, padding_ratio, plan_buckets
from bucketing.sample import LengthSample

MAX_LEN = 2048


def mixed_trace(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` requests as (prompt tokens, generated tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.3:
            prompt = rng.randint(50, 2000)
        else:
            prompt = min(2000, max(1, int(rng.lognormvariate(5.3, 0.5))))
        out.append((prompt, rng.randint(1, min(300, MAX_LEN - prompt))))
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--align", type=int, default=64,
                   help="planned bucket lengths are multiples of this (64: Neuron-friendly)")
    args = p.parse_args()
    n = 2_000 if args.quick else args.requests
    trace = mixed_trace(n, args.seed)
    observed, replayed = trace[:n // 2], trace[n // 2:]
    sample = LengthSample()
    for prompt, generated in observed:
        sample.observe(prompt, generated)
    seen = sample.to_json()
    default = BucketConfig.default(MAX_LEN, 1)
    result: dict = {"requests": n, "observed": len(observed), "replayed": len(replayed),
                    "align": args.align, "sample": {k: len(seen[f"{k}_lengths"])
                                                    for k in ("prompt", "context")}}
    phases = {
        "context_encoding": (list(default.context_encoding_buckets), seen["prompt_lengths"],
                             [p for p, _ in replayed]),
        "token_generation": (list(default.token_generation_buckets), seen["context_lengths"],
                             [p + g for p, g in replayed]),
    }
    for phase, (current, planning, replay) in phases.items():
        planned = plan_buckets(planning, len(current), MAX_LEN, align=args.align)
        more = plan_buckets(planning, len(current) + 2, MAX_LEN, align=args.align)
        result[phase] = round_floats({
            "default": current, "planned": planned,
            "graphs": len(current),
            "padding_default": padding_ratio(replay, current),
            "padding_planned": padding_ratio(replay, planned),
            "padding_planned_on_observed": padding_ratio(planning, planned),
            "padding_planned_plus_2_graphs": padding_ratio(replay, more),
        })
        r = result[phase]
        print(f"{phase}: {len(current)} graphs, padding on the replayed half: default "
              f"{r['padding_default']:.3f} -> planned {r['padding_planned']:.3f} "
              f"({r['padding_planned_plus_2_graphs']:.3f} with 2 more graphs)\n"
              f"  planned: {','.join(map(str, planned))}", flush=True)
    result["meets_goal"] = result["context_encoding"]["padding_planned"] <= 1.05
    emit("bucket_plan", args, result)


if __name__ == "__main__":
    main()
