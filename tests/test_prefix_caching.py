"""Prefix reuse on the embedded model: the same tokens with it on and off (float32, greedy),
on both step policies, for a conversation's next turn and for prompts sharing instructions
while others run; and what the metrics count."""

import pytest

from engine.core import Engine, EngineConfig
from engine.output import RequestOutput
from scheduler import SamplingParams, Scheduler

pytestmark = pytest.mark.slow

SYSTEM = ("You answer questions about the passages below and cite them by number. "
          "[1] The Loire is the longest river in France. [2] Lyon lies where the Rhone "
          "meets the Saone. [3] The Seine flows through Paris to the English Channel.")
QUESTIONS = ["Which river flows through Paris?", "Where is Lyon?",
             "What is the longest river in France?", "Name a river."]
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=0)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_config(EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=3,
                                           warmup=False))


def use(engine: Engine, prefix_caching: bool, mixed: bool = True) -> None:
    old = engine.scheduler
    engine.scheduler = Scheduler(old.buckets, old.eos_token_ids, mixed=mixed,
                                 prefix_caching=prefix_caching)


def chat(engine: Engine, *turns: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return engine.encode_prompt(messages, chat=True)


def staggered(engine: Engine) -> dict[str, RequestOutput]:
    """Four prompts sharing the instructions, each arriving two steps after the one before:
    later ones find the prefix in running slots (copied) or in finished ones."""
    prompts = {f"q{i}": chat(engine, q) for i, q in enumerate(QUESTIONS)}
    pending, done = list(prompts.items()), {}
    while pending or engine.has_unfinished():
        if pending:
            rid, ids = pending.pop(0)
            engine.add_request(ids, GREEDY, request_id=rid)
        for _ in range(2):
            if engine.has_unfinished():
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = o
    return done


def held_while_others_decode(engine: Engine) -> tuple[RequestOutput, ...]:
    """a finishes first and its slot (0) stays free while b decodes on in slot 1 (decode steps
    then run a padding row for slot 0); then c starts with a's prompt."""
    short = SamplingParams(max_tokens=2, temperature=0, logprobs=0)
    engine.add_request(chat(engine, QUESTIONS[1]), short, request_id="a")
    engine.add_request(chat(engine, QUESTIONS[2]), GREEDY, request_id="b")
    done = {}
    for _ in range(6):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    engine.add_request(chat(engine, QUESTIONS[1]), GREEDY, request_id="c")
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done["a"], done["b"], done["c"]


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-steps", "separate-prefill"])
def test_outputs_are_token_identical_with_reuse_on_and_off(engine: Engine, mixed: bool):
    results = {}
    for on in (False, True):
        use(engine, on, mixed)
        first = engine.generate([chat(engine, QUESTIONS[0])], GREEDY)[0]
        answer = engine.tokenizer.decode(first.token_ids, skip_special_tokens=True)
        follow = chat(engine, QUESTIONS[0], answer, "And which river flows through Lyon?")
        second = engine.generate([follow], GREEDY)[0]
        results[on] = [first, second, *staggered(engine).values(),
                       *held_while_others_decode(engine)]
        hits = engine.scheduler.prefix_hits
        assert (hits > len(follow) // 2) if on else hits == 0
        # each output says how much of its own prompt was reused (usage's cached_tokens)
        assert (second.num_cached_tokens > len(follow) // 2) if on else (
            second.num_cached_tokens == 0)
        assert sum(o.num_cached_tokens for o in results[on]) == (hits if on else 0)
    # the same tokens, and log-probabilities as close as the matmuls' shapes allow (a
    # corrupted key anywhere in a reused prefix moves them far more)
    for on, off in zip(results[True], results[False]):
        assert on.token_ids == off.token_ids
        assert [lp.logprob for lp in on.logprobs] == pytest.approx(
            [lp.logprob for lp in off.logprobs], abs=1e-3)


def test_metrics_count_queries_and_hits(engine: Engine):
    from engine.stats import StepStats
    from server.metrics import EngineMetrics

    use(engine, True)
    metrics = EngineMetrics("m")
    for rid in ("a", "b"):
        engine.add_request(chat(engine, QUESTIONS[1]), GREEDY, request_id=rid)
        while engine.has_unfinished():
            engine.step()
            it = engine.scheduler.last_iteration
            metrics.on_step(StepStats(it.phase, "", 1, 0.0, it.num_prompt_tokens,
                                      it.num_generation_tokens, 0, (), it.num_cached_tokens,
                                      it.num_queried_tokens))
    text = metrics.render().decode()
    n = len(chat(engine, QUESTIONS[1]))

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value("vllm:prefix_cache_queries_total") == 2 * n
    assert value("vllm:prefix_cache_hits_total") == n - 1  # b reuses all but its last token
    assert value("vllm:prompt_tokens_total") == 2 * n
