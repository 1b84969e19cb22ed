"""Continuous batching vs static batching on the same engine, under Poisson arrivals.

Requests arrive as a Poisson process (``--rate`` per second, offered faster than either policy
can serve, so throughput measures capacity); prompts are 16-128 tokens and output lengths are
mixed between 16 and 512 tokens (``--lengths loguniform``: many short answers and a few long
ones, as chat traffic is; or ``uniform``), with ``ignore_eos`` so every request produces exactly
its length. The same engine (model, buckets, runner) runs twice:

- continuous: ragserve's scheduler as the server runs it; a finished request's slot is refilled
  on the next step (with the PyTorch backend, prompts join the running decode step where the
  step costs measured at startup say that saves time, else run in a step apart);
- mixed (continuous, every prompt joins the decode step) and separate (continuous, prefill and
  decode in separate steps, as with static graphs), reported as ``mixed_vs_separate`` and
  ``continuous_vs_best_fixed`` when the engine runs mixed steps;
- static: a batch is admitted together (up to ``max_num_seqs`` waiting requests) and nothing
  joins until every request in it has finished.

``throughput_ratio_continuous_vs_static`` = output tokens/s continuous / static (goal >= 3).
For static batching the ratio is bounded by E[longest output in a batch] / E[output length]
(``ratio_bound_static_idle``), reported from the same drawn lengths.

    python -m benchmarks.batching [--quick] [--lengths loguniform|uniform]
"""

from __future__ import annotations

import math
import random
import time

from benchmarks.common import emit, mean, median, parser, percentile, round_floats
from engine.core import Engine, EngineConfig
from scheduler import SamplingParams, Scheduler, SchedulerOutput

MIN_OUT, MAX_OUT = 16, 512


class StaticBatchScheduler(Scheduler):
    """The baseline: admit a batch together, admit nothing more until all of it has left."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.admitting = False

    def should_prefill(self) -> bool:
        if not self.waiting or not self.slots.can_allocate():
            return False
        if not self.running:
            self.admitting = True  # a new batch starts
        return self.admitting

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        if not out.is_prefill:
            self.admitting = False  # the batch is closed once it starts decoding
        return out


def draw_lengths(rng: random.Random, n: int, kind: str) -> list[int]:
    if kind == "uniform":
        return [rng.randint(MIN_OUT, MAX_OUT) for _ in range(n)]
    return [round(math.exp(rng.uniform(math.log(MIN_OUT), math.log(MAX_OUT)))) for _ in range(n)]


def run(engine: Engine, workload: list[tuple[float, list[int], int]], timeout: float) -> dict:
    """Replay (arrival offset, prompt ids, output length) in real time; bounded by ``timeout``."""
    pending = list(workload)
    start = time.perf_counter()
    arrive, first, done, tokens = {}, {}, {}, {}
    steps = 0
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        if now > timeout:
            raise TimeoutError(f"run exceeded {timeout:.0f}s")
        while pending and pending[0][0] <= now:
            _, ids, n_out = pending.pop(0)
            rid = engine.add_request(ids, SamplingParams(max_tokens=n_out, temperature=0,
                                                         ignore_eos=True))
            arrive[rid] = time.perf_counter()
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
            continue
        for o in engine.step():
            t = time.perf_counter()
            first.setdefault(o.request_id, t)
            if o.finished:
                done[o.request_id] = t
                tokens[o.request_id] = len(o.token_ids)
        steps += 1
    span = max(done.values()) - start
    ttft = [first[r] - arrive[r] for r in done]
    e2e = [done[r] - arrive[r] for r in done]
    return {
        "output_tokens": sum(tokens.values()),
        "seconds": span,
        "tok_s": sum(tokens.values()) / span,
        "steps": steps,
        "ttft_p50_s": median(ttft),
        "e2e_p50_s": median(e2e),
        "e2e_p95_s": percentile(e2e, 95),
    }


def static_idle_bound(lengths: list[int], batch: int) -> float:
    """E[max of a batch] / E[length]: how much longer static batches hold their slots."""
    batches = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    return mean([max(b) for b in batches]) / mean([mean(b) for b in batches])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="arrivals per second")
    p.add_argument("--lengths", choices=["loguniform", "uniform"], default="loguniform")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args()
    n = args.requests or (24 if args.quick else 64)
    seqs = args.max_num_seqs or (8 if args.quick else 16)
    rate = args.rate or (4.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 2)
    rng = random.Random(args.seed)

    t, workload = 0.0, []
    outs = draw_lengths(rng, n, args.lengths)
    for n_out in outs:
        t += rng.expovariate(rate)
        prompt = [rng.randrange(100, 20000) for _ in range(rng.randint(16, 128))]
        workload.append((t, prompt, n_out))

    engine = Engine.from_config(EngineConfig(model=args.model, dtype=args.dtype,
                                             device=args.device, max_model_len=1024,
                                             max_num_seqs=seqs))
    own = engine.scheduler
    buckets, eos = own.buckets, own.eos_token_ids
    policies = {
        "continuous": lambda: Scheduler(buckets, eos, mixed=own.mixed,
                                        max_num_batched_tokens=own.max_num_batched_tokens,
                                        prefix_caching=own.prefix_caching,
                                        step_costs=own.step_costs),
        "static": lambda: StaticBatchScheduler(buckets, eos),
    }
    if own.mixed:
        policies["mixed"] = lambda: Scheduler(buckets, eos, mixed=True,
                                              max_num_batched_tokens=own.max_num_batched_tokens,
                                              prefix_caching=own.prefix_caching)
        policies["separate"] = lambda: Scheduler(buckets, eos,
                                                 prefix_caching=own.prefix_caching)
    results: dict[str, list[dict]] = {name: [] for name in policies}
    for r in range(rounds):
        for name, make in policies.items():
            engine.scheduler = make()
            res = run(engine, workload, args.timeout)
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['tok_s']:.1f} tok/s over {res['seconds']:.1f}s, "
                  f"{res['steps']} steps, e2e p50 {res['e2e_p50_s']:.1f}s", flush=True)

    def med(name: str, key: str) -> float:
        return median([x[key] for x in results[name]])

    ratios = [c["tok_s"] / s["tok_s"] for c, s in zip(results["continuous"], results["static"])]
    result = {
        "model": engine.model_name,
        "requests": n,
        "max_num_seqs": seqs,
        "arrival_rate_per_s": rate,
        "output_lengths": f"{args.lengths} {MIN_OUT}..{MAX_OUT}",
        "mean_output_len": mean(outs),
        "throughput_ratio_continuous_vs_static": median(ratios),
        "ratio_bound_static_idle": static_idle_bound(outs, seqs),
        "fraction_of_bound": median(ratios) / static_idle_bound(outs, seqs),
        "continuous_tok_s": med("continuous", "tok_s"),
        "static_tok_s": med("static", "tok_s"),
        "continuous_e2e_p50_s": med("continuous", "e2e_p50_s"),
        "static_e2e_p50_s": med("static", "e2e_p50_s"),
        "continuous_ttft_p50_s": med("continuous", "ttft_p50_s"),
        "static_ttft_p50_s": med("static", "ttft_p50_s"),
        "continuous_steps": med("continuous", "steps"),
        "static_steps": med("static", "steps"),
        "mixed_steps": own.mixed,
        "rounds": rounds,
        "kernels": str(engine.runner.backend.kernels),
    }
    if own.mixed:
        result["mixed_vs_separate"] = median(
            [c["tok_s"] / s["tok_s"] for c, s in zip(results["mixed"], results["separate"])])
        result["continuous_vs_best_fixed"] = median(
            [c["tok_s"] / max(m["tok_s"], s["tok_s"]) for c, m, s in
             zip(results["continuous"], results["mixed"], results["separate"])])
        result["step_costs"] = own.step_costs.summary() if own.step_costs else None
        result["mixed_tok_s"] = med("mixed", "tok_s")
        result["separate_tok_s"] = med("separate", "tok_s")
        result["separate_ttft_p50_s"] = med("separate", "ttft_p50_s")
        result["separate_e2e_p50_s"] = med("separate", "e2e_p50_s")
    emit("batching", args, round_floats(result))


if __name__ == "__main__":
    main()
