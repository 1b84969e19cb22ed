"""Prefill buckets vs one max-length graph, on a mixed-length prompt trace.

Prompt lengths are spread evenly between 50 and 2,000 tokens (a stratified sample of the
uniform distribution, in shuffled order, so a small run has the distribution's mean instead of
a random draw's). Each prompt runs alone
(``max_tokens=1``, so its time to first token is its prefill) on three engines built from the
same model, prompt by prompt in turn so all three see the same machine noise:

- ``buckets``: the default prefill list (three per octave, 128 ... 2048);
- ``pow2``: powers of two (128, 256, 512, 1024, 2048);
- ``single``: one 2048-token prefill graph.

Fields: ``ttft_ratio_buckets_vs_single`` (mean TTFT, default buckets / single graph; goal
<= 0.5) and ``padding_ratio_*`` (padded prefill tokens / real prompt tokens, measured from the
scheduler's stats; goal <= 1.25 for the default), the same for powers of two, and the padding of
the three lists over a 10,000-prompt trace of the same distribution (no model needed).

Prefill cost is fitted as ``c + a*L + b*L^2`` (fixed, weights linear, attention quadratic) to
the measured (bucket length, TTFT) pairs (:mod:`bucketing.cost`, which ``ragserve buckets plan``
uses too). With it, ``model_ttft_ratio`` gives each list's TTFT ratio over the whole
distribution (10,000 lengths), and ``ttft_ratio_no_padding_bound`` what a perfect list (every
prompt in a graph of its exact length) would reach.

    python -m benchmarks.bucketing [--quick]
"""

from __future__ import annotations

import random
import time

from benchmarks.common import emit, mean, median, parser, round_floats
from bucketing import generate_buckets, generate_dense_buckets, padding_ratio, plan_buckets
from bucketing.cost import PrefillCost, fit_cost, relative_cost
from engine.core import Engine, EngineConfig
from scheduler import SamplingParams

MAX_LEN = 2048
MIN_PROMPT, MAX_PROMPT = 50, 2000

CONFIGS = {
    "buckets": None,  # the default list
    "pow2": tuple(generate_buckets(128, MAX_LEN)),
    "single": (MAX_LEN,),
}


def random_prompt(n: int, rng: random.Random) -> list[int]:
    """``n`` token ids drawn from the first 20k of the vocabulary."""
    return [rng.randrange(100, 20000) for _ in range(n)]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=None)
    args = p.parse_args()
    n_prompts = args.prompts or (8 if args.quick else 40)
    rng = random.Random(args.seed)
    step = (MAX_PROMPT - MIN_PROMPT) / n_prompts
    lengths = [round(MIN_PROMPT + (i + 0.5) * step) for i in range(n_prompts)]
    rng.shuffle(lengths)

    engines = {}
    for name, ce in CONFIGS.items():
        t = time.perf_counter()
        engines[name] = Engine.from_config(EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_model_len=MAX_LEN,
            max_num_seqs=1, context_encoding_buckets=ce))
        print(f"{name}: {engines[name].scheduler.buckets.context_encoding_buckets} "
              f"(built and warmed in {time.perf_counter() - t:.1f}s)", flush=True)

    ttft = {name: [] for name in engines}
    points: list[tuple[int, float]] = []  # (bucket length, ttft) over every engine
    padded = dict.fromkeys(engines, 0)
    real = dict.fromkeys(engines, 0)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for i, n in enumerate(lengths):
        ids = random_prompt(n, rng)
        for name, engine in engines.items():
            t = time.perf_counter()
            engine.generate([ids], params)
            ttft[name].append(time.perf_counter() - t)
            it = engine.scheduler.last_iteration
            points.append((it.num_prompt_tokens + it.num_padding_tokens, ttft[name][-1]))
            padded[name] += it.num_prompt_tokens + it.num_padding_tokens
            real[name] += it.num_prompt_tokens
        print(f"prompt {i + 1}/{n_prompts}: {n} tokens, ttft " + ", ".join(
            f"{k} {v[-1] * 1e3:.0f}ms" for k, v in ttft.items()), flush=True)

    trace = [rng.randint(MIN_PROMPT, MAX_PROMPT) for _ in range(10_000)]
    dense = generate_dense_buckets(128, MAX_LEN)
    planned = plan_buckets(trace, len(dense), MAX_LEN)
    cost = PrefillCost(*fit_cost(points), source="this run's (bucket length, TTFT) pairs")
    c, a, b = cost.c, cost.a, cost.b
    lists = {f"{k}_per_octave": generate_dense_buckets(128, MAX_LEN, k) for k in (1, 2, 3, 4)}
    bound = mean([cost(n) for n in trace]) / cost(MAX_LEN)
    result = {
        "model": engines["buckets"].model_name,
        "prompts": n_prompts,
        "default_buckets": list(engines["buckets"].scheduler.buckets.context_encoding_buckets),
        "ttft_ratio_buckets_vs_single": mean(ttft["buckets"]) / mean(ttft["single"]),
        "ttft_ratio_pow2_vs_single": mean(ttft["pow2"]) / mean(ttft["single"]),
        "ttft_mean_ms_buckets": mean(ttft["buckets"]) * 1e3,
        "ttft_mean_ms_pow2": mean(ttft["pow2"]) * 1e3,
        "ttft_mean_ms_single": mean(ttft["single"]) * 1e3,
        "ttft_ratio_no_padding_bound": bound,
        "prefill_cost_fit_ms": {"c": c * 1e3, "a_per_token": a * 1e3, "b_per_token2": b * 1e3},
        "prefill_cost_quadratic_share_at_max": b * MAX_LEN**2 / cost(MAX_LEN),
        "model_ttft_ratio": {k: round(relative_cost(cost, trace, v, [MAX_LEN]), 4)
                             for k, v in lists.items()},
        "trace10k_padding_ratio_per_octave": {k: round(padding_ratio(trace, v), 4)
                                              for k, v in lists.items()},
        "graphs_per_octave_list": {k: len(v) for k, v in lists.items()},
        "ttft_median_ratio_buckets_vs_single": median(
            [b / s for b, s in zip(ttft["buckets"], ttft["single"])]),
        "padding_ratio_buckets": padded["buckets"] / real["buckets"],
        "padding_ratio_pow2": padded["pow2"] / real["pow2"],
        "padding_ratio_single": padded["single"] / real["single"],
        "trace10k_padding_ratio_buckets": padding_ratio(trace, dense),
        "trace10k_padding_ratio_pow2": padding_ratio(trace, generate_buckets(128, MAX_LEN)),
        "trace10k_padding_ratio_single": padding_ratio(trace, [MAX_LEN]),
        "planned_buckets_same_count": planned,
        "trace10k_padding_ratio_planned": padding_ratio(trace, planned),
        "prefill_graphs": {k: len(e.scheduler.buckets.context_encoding_buckets)
                           for k, e in engines.items()},
    }
    emit("bucketing", args, round_floats(result))


if __name__ == "__main__":
    main()
