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

With ``--replay FILE`` the trace is a recording of real requests instead
(``benchmarks.record_traffic``: chat, follow-up and RAG requests through a server; its
reservoir's lengths): each stream is shuffled (``--seed``) and halved the same way.

    python -m benchmarks.bucket_plan [--requests 20000] [--align 64] [--quick]
    python -m benchmarks.bucket_plan --replay benchmarks/data/traffic/more_itertools.json
"""

from __future__ import annotations

import random
from pathlib import Path

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


def replay_halves(path: Path, seed: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """A recorded sample (a saved ``GET /v1/buckets`` body or lengths JSONL, as ``ragserve
    buckets plan --from FILE`` reads it), each stream shuffled with ``seed`` and cut in two: the
    observed half (planned from) and the replayed half (measured on)."""
    sample = LengthSample.read(path)
    rng = random.Random(seed)
    observed: dict[str, list[int]] = {}
    replayed: dict[str, list[int]] = {}
    for name, lengths in (("prompt", sample.prompt_lengths),
                          ("context", sample.context_lengths)):
        lengths = [n for n in lengths if n <= MAX_LEN]
        rng.shuffle(lengths)
        observed[name], replayed[name] = lengths[:len(lengths) // 2], lengths[len(lengths) // 2:]
    return observed, replayed


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--align", type=int, default=64,
                   help="planned bucket lengths are multiples of this (64: Neuron-friendly)")
    p.add_argument("--replay", type=Path, default=None,
                   help="a recorded trace (benchmarks.record_traffic's output, any saved "
                        "/v1/buckets body, or lengths JSONL) instead of the synthetic one")
    args = p.parse_args()
    if args.replay:
        observed, replayed = replay_halves(args.replay, args.seed)
        seen = {"prompt_lengths": observed["prompt"], "context_lengths": observed["context"]}
        replay = {"prompt": replayed["prompt"], "context": replayed["context"]}
        n = sum(map(len, observed.values())) + sum(map(len, replayed.values()))
        result: dict = {"trace": str(args.replay), "observed": len(observed["prompt"]),
                        "replayed": len(replayed["prompt"])}
    else:
        n = 2_000 if args.quick else args.requests
        trace = mixed_trace(n, args.seed)
        observed_trace, replayed_trace = trace[:n // 2], trace[n // 2:]
        sample = LengthSample()
        for prompt, generated in observed_trace:
            sample.observe(prompt, generated)
        seen = sample.to_json()
        replay = {"prompt": [q for q, _ in replayed_trace],
                  "context": [q + g for q, g in replayed_trace]}
        result = {"trace": "synthetic", "requests": n, "observed": len(observed_trace),
                  "replayed": len(replayed_trace)}
    default = BucketConfig.default(MAX_LEN, 1)
    result.update(align=args.align, sample={k: len(seen[f"{k}_lengths"])
                                            for k in ("prompt", "context")})
    phases = {
        "context_encoding": (list(default.context_encoding_buckets), seen["prompt_lengths"],
                             replay["prompt"]),
        "token_generation": (list(default.token_generation_buckets), seen["context_lengths"],
                             replay["context"]),
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
