"""Scheduler tests with no model: build requests, schedule, feed hand-made runner outputs."""

import pytest

from bucketing import DECODE, PREFILL, Bucket, BucketConfig
from scheduler import (
    FinishReason,
    GenerationRequest,
    ModelRunnerOutput,
    RequestTooLongError,
    SamplingParams,
    Scheduler,
    SchedulerOutput,
    SlotPool,
    StepCosts,
)

EOS = 2


def make_scheduler(max_num_seqs=4, max_model_len=256, streak=1, prefill_batch=4, **kw):
    buckets = BucketConfig.default(max_model_len, max_num_seqs, min_bucket=16,
                                   max_prefill_batch=prefill_batch)
    return Scheduler(buckets, eos_token_ids=[EOS], max_prefill_streak=streak, **kw)


def req(rid, n_prompt=10, max_tokens=4, **kw):
    return GenerationRequest(rid, tuple(range(100, 100 + n_prompt)),
                             SamplingParams(max_tokens=max_tokens, **kw))


def run(out: SchedulerOutput, token=7, tokens=None) -> ModelRunnerOutput:
    """A hand-made runner output: every row samples ``token`` (or ``tokens[request_id]``)."""
    ids = [r.request_id for r in out.scheduled_rows]
    toks = [tokens.get(i, token) if tokens else token for i in ids]
    return ModelRunnerOutput(ids, toks)


def step(s: Scheduler, **kw):
    out = s.schedule()
    return out, s.update(out, run(out, **kw))


def test_slot_pool_lowest_first_and_reuse():
    pool = SlotPool(3)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert not pool.can_allocate()
    pool.free(1)
    pool.free(0)
    assert pool.allocate() == 0
    pool.free(0)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(0)
    assert [pool.allocate(), pool.allocate()] == [0, 1]
    with pytest.raises(RuntimeError, match="no free"):
        pool.allocate()


def test_prefill_then_decode_then_finish_on_max_tokens():
    s = make_scheduler()
    s.add_request(req("a", n_prompt=10, max_tokens=3))
    out, steps = step(s)
    assert out.phase == PREFILL
    assert out.bucket == Bucket(PREFILL, 1, 16)
    assert out.rows[0].token_ids == tuple(range(100, 110)) and out.rows[0].start_pos == 0
    assert [n.request_id for n in out.new_requests] == ["a"]
    assert out.padding_tokens == 6
    assert steps[0].new_token_ids == (7,) and steps[0].finish_reason is None

    out, steps = step(s)
    assert out.phase == DECODE
    assert out.rows[0].token_ids == (7,) and out.rows[0].start_pos == 10
    assert out.bucket == Bucket(DECODE, 1, 16)
    out, steps = step(s)
    assert steps[0].finish_reason == FinishReason.LENGTH
    assert steps[0].num_output_tokens == 3
    assert not s.has_unfinished()
    assert s.slots.num_free == 4


def test_eos_and_stop_token_ids_finish_with_stop():
    s = make_scheduler()
    s.add_request(req("eos", max_tokens=10))
    s.add_request(req("stopid", max_tokens=10, stop_token_ids=(42,)))
    s.add_request(req("ignore", max_tokens=2, ignore_eos=True))
    _, steps = step(s, tokens={"eos": EOS, "stopid": 42, "ignore": EOS})
    reasons = {st.request_id: st.finish_reason for st in steps}
    assert reasons == {"eos": FinishReason.STOP, "stopid": FinishReason.STOP, "ignore": None}
    _out, steps = step(s, token=EOS)
    assert steps[0].finish_reason == FinishReason.LENGTH


def test_min_tokens_suppresses_eos_stop():
    s = make_scheduler()
    s.add_request(req("a", max_tokens=5, min_tokens=2))
    _, steps = step(s, token=EOS)
    assert steps[0].finish_reason is None
    _, steps = step(s, token=EOS)
    assert steps[0].finish_reason == FinishReason.STOP


def test_finished_slot_is_reused_on_the_next_step():
    s = make_scheduler(max_num_seqs=2)
    for rid, mt in (("a", 2), ("b", 5), ("c", 5)):
        s.add_request(req(rid, max_tokens=mt))
    out, steps = step(s)  # a and b prefill together (same bucket); c waits for a slot
    assert [r.request_id for r in out.rows] == ["a", "b"]
    assert [r.slot for r in out.rows] == [0, 1]
    out, steps = step(s)  # decode: a reaches max_tokens
    assert out.phase == DECODE
    assert {st.request_id for st in steps if st.finished} == {"a"}
    out, _ = step(s)  # the freed slot is filled on the very next step
    assert out.phase == PREFILL
    assert [(r.request_id, r.slot) for r in out.rows] == [("c", 0)]
    assert out.finished_request_ids == {"a"}  # tells the runner to drop a's state
    out, _ = step(s)
    assert out.phase == DECODE
    assert sorted((r.request_id, r.slot) for r in out.rows) == [("b", 1), ("c", 0)]


def test_decode_cannot_be_starved_by_arrivals():
    s = make_scheduler(max_num_seqs=8, streak=1, prefill_batch=1)
    s.add_request(req("first", max_tokens=50))
    step(s)
    phases = []
    for i in range(6):  # a new arrival before every step
        s.add_request(req(f"new{i}", max_tokens=50))
        out, _ = step(s)
        phases.append(out.phase)
    assert phases == [DECODE, PREFILL, DECODE, PREFILL, DECODE, PREFILL]


def test_prefill_streak_limit_two():
    s = make_scheduler(max_num_seqs=8, streak=2, prefill_batch=1)
    s.add_request(req("first", max_tokens=50))
    step(s)
    for i in range(4):
        s.add_request(req(f"n{i}", max_tokens=50))
    phases = [step(s)[0].phase for _ in range(5)]
    assert phases == [PREFILL, DECODE, PREFILL, PREFILL, DECODE]


def test_prefill_groups_same_bucket_within_token_budget():
    s = make_scheduler(max_num_seqs=8, max_model_len=256, prefill_batch=4)
    assert s.buckets.context_encoding_buckets[:4] == (16, 20, 24, 32)
    s.add_request(req("a", n_prompt=18))  # bucket 20
    s.add_request(req("long", n_prompt=100))  # bucket 100: not grouped with a
    s.add_request(req("b", n_prompt=17))  # bucket 20
    s.add_request(req("c", n_prompt=20))  # bucket 20 (exact fit)
    out = s.schedule()
    assert [r.request_id for r in out.rows] == ["a", "b", "c"]
    assert out.bucket == Bucket(PREFILL, 4, 20)
    assert out.padding_tokens == 4 * 20 - (18 + 17 + 20)
    s.update(out, run(out))
    out = s.schedule()  # decode: running requests are not starved
    assert out.phase == DECODE
    s.update(out, run(out))
    out = s.schedule()
    assert [r.request_id for r in out.rows] == ["long"]


def test_prefill_token_budget_limits_rows():
    buckets = BucketConfig(
        max_model_len=256, max_num_seqs=8, context_encoding_buckets=(64, 128, 256),
        token_generation_buckets=(256,), decode_batch_buckets=(1, 2, 4, 8),
        prefill_batch_buckets=(1, 2, 4), max_prefill_tokens=256,
    )
    s = Scheduler(buckets, [EOS])
    for i in range(4):
        s.add_request(req(f"r{i}", n_prompt=100))  # bucket 128: at most 2 rows (2*128=256)
    out = s.schedule()
    assert out.bucket == Bucket(PREFILL, 2, 128)
    assert len(out.rows) == 2


def test_decode_batch_covers_highest_slot_and_context_bucket():
    s = make_scheduler(max_num_seqs=8, max_model_len=256, prefill_batch=1)
    for rid in "abc":
        s.add_request(req(rid, n_prompt=14, max_tokens=20))
    step(s)  # prefill a (slot 0)
    step(s)  # decode
    step(s)  # prefill b (slot 1)
    s.abort_request("a")  # frees slot 0
    out, _ = step(s)  # decode b alone: row i is slot i, so the batch must reach slot 1
    assert out.phase == DECODE
    assert [r.slot for r in out.rows] == [1]
    assert out.bucket.batch_size == 2
    # context: b has 14 prompt + 2 tokens; crossing 16 moves to the 32 bucket
    assert out.bucket.seq_len == 16
    out, _ = step(s)  # prefill c into slot 0
    assert [(r.request_id, r.slot) for r in out.rows] == [("c", 0)]
    out, _ = step(s)  # b feeds position 15: context 16 still fits the 16 bucket
    assert out.bucket == Bucket(DECODE, 2, 16)
    out, _ = step(s)  # b feeds position 16: context 17 moves to the 32 bucket
    assert out.bucket == Bucket(DECODE, 2, 32)


def test_abort_waiting_and_running_requests():
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("run", max_tokens=10))
    s.add_request(req("wait", max_tokens=10))
    step(s)
    s.abort_request("wait")
    assert len(s.waiting) == 0
    s.abort_request("run")
    assert not s.has_unfinished() and s.slots.num_free == 1
    s.abort_request("unknown")  # ignored
    s.add_request(req("next"))
    out = s.schedule()
    assert out.finished_request_ids == {"run"}


def test_update_skips_rows_finished_during_the_step():
    s = make_scheduler()
    s.add_request(req("a", max_tokens=10))
    s.add_request(req("b", max_tokens=10))
    out = s.schedule()
    s.finish_requests(["a"], FinishReason.STOP)  # e.g. a stop string found by the output loop
    steps = s.update(out, run(out))
    assert [st.request_id for st in steps] == ["b"]


def test_fail_step_fails_only_that_steps_requests():
    s = make_scheduler(max_num_seqs=2, prefill_batch=1)
    s.add_request(req("a", max_tokens=10))
    step(s)
    step(s)
    s.add_request(req("b", max_tokens=10))
    out = s.schedule()  # prefill b
    assert [r.request_id for r in out.rows] == ["b"]
    failed = s.fail_step(out)
    assert [(f.request_id, f.finish_reason) for f in failed] == [("b", FinishReason.ERROR)]
    assert list(s.requests) == ["a"]
    out, steps = step(s)
    assert [st.request_id for st in steps] == ["a"]


def test_runner_output_must_match_rows():
    s = make_scheduler()
    s.add_request(req("a"))
    out = s.schedule()
    with pytest.raises(ValueError, match="do not match"):
        s.update(out, ModelRunnerOutput(["zzz"], [1]))


def test_too_long_requests_name_the_limits():
    s = make_scheduler(max_model_len=256)
    with pytest.raises(RequestTooLongError, match=r"prompt has 300 tokens; the largest prefill "
                                                  r"bucket is 256 tokens and max_model_len is 256"):
        s.add_request(req("a", n_prompt=300))
    with pytest.raises(RequestTooLongError, match=r"prompt \(200 tokens\) \+ max_tokens \(100\) = "
                                                  r"300 exceeds max_model_len \(256\)"):
        s.add_request(req("b", n_prompt=200, max_tokens=100))
    with pytest.raises(ValueError, match="duplicate"):
        s.add_request(req("c"))
        s.add_request(req("c"))


def test_max_tokens_none_runs_to_max_model_len():
    s = make_scheduler(max_model_len=32)
    s.add_request(GenerationRequest("a", tuple(range(100, 120)),
                                    SamplingParams(max_tokens=None)))
    n = 0
    while s.has_unfinished():
        _, steps = step(s)
        n += 1
    assert steps[0].finish_reason == FinishReason.LENGTH
    assert steps[0].num_output_tokens == 12


def test_stats():
    s = make_scheduler(max_num_seqs=4, max_model_len=256)
    for rid in "abcde":
        s.add_request(req(rid, n_prompt=10, max_tokens=10))
    step(s)
    st = s.stats()
    assert (st.num_running, st.num_waiting, st.num_free_slots) == (4, 1, 0)
    assert st.slot_usage == 1.0
    assert st.kv_tokens_used == 40 and st.kv_cache_usage == 40 / (4 * 256)
    it = s.last_iteration
    assert (it.phase, it.bucket, it.num_rows) == ("prefill", "prefill[4x16]", 4)
    assert it.num_prompt_tokens == 40
    assert it.num_padding_tokens == 4 * 16 - 40 and it.num_generation_tokens == 4
    step(s)
    it = s.last_iteration
    assert (it.phase, it.num_rows, it.num_padding_tokens, it.num_tokens) == ("decode", 4, 0, 4)


def test_sampling_params_validation():
    for kw, msg in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop=("",)), "stop"),
        (dict(temperature=float("nan")), "temperature"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(temperature=0).greedy


# -- mixed steps (a backend with forward_mixed) ----------------------------------------------


def test_mixed_admits_prompts_into_the_running_decode_step():
    s = make_scheduler(max_num_seqs=4, mixed=True)
    s.add_request(req("a", n_prompt=10, max_tokens=5))
    out, _ = step(s)  # nothing runs yet: a plain prefill
    assert (out.phase, [r.request_id for r in out.rows], out.decode_rows) == ("prefill", ["a"], ())
    s.add_request(req("b", n_prompt=20, max_tokens=5))
    s.add_request(req("c", n_prompt=30, max_tokens=5))
    out, steps = step(s)
    assert out.phase == "mixed" and out.is_prefill
    decode = [(r.request_id, r.start_pos, len(r.token_ids)) for r in out.decode_rows]
    assert decode == [("a", 10, 1)]
    assert [(r.request_id, r.start_pos) for r in out.rows] == [("b", 0), ("c", 0)]
    assert [r.request_id for r in out.scheduled_rows] == ["a", "b", "c"]
    assert out.bucket == Bucket(PREFILL, 2, 32)  # any number of prompts, no batch bucket
    assert [(o.request_id, o.num_output_tokens) for o in steps] == [("a", 2), ("b", 1), ("c", 1)]
    it = s.last_iteration
    assert (it.phase, it.num_rows, it.num_prompt_tokens, it.num_decode_rows,
            it.num_generation_tokens, it.num_tokens) == ("mixed", 3, 50, 1, 3, 51)
    out, _ = step(s)  # nothing waits: a plain decode of all three
    assert out.phase == "decode" and [r.slot for r in out.rows] == [0, 1, 2]


def test_mixed_budget_is_first_come_first_served():
    s = make_scheduler(max_num_seqs=8, mixed=True, max_num_batched_tokens=64)
    s.add_request(req("r", n_prompt=10, max_tokens=9))
    step(s)
    for rid, n in (("a", 30), ("b", 40), ("c", 5)):
        s.add_request(req(rid, n_prompt=n))
    out, _ = step(s)
    # budget 64 - 1 decode row: a (30) fits, b (40) does not, and c may not overtake b
    assert [r.request_id for r in out.rows] == ["a"]
    out, _ = step(s)
    assert [r.request_id for r in out.decode_rows] == ["r", "a"]
    assert [r.request_id for r in out.rows] == ["b", "c"]  # 62 tokens + 2 rows = 64


def test_mixed_admits_the_head_even_past_the_budget():
    s = make_scheduler(max_num_seqs=4, mixed=True, max_num_batched_tokens=16)
    s.add_request(req("a", n_prompt=10, max_tokens=9))
    step(s)
    s.add_request(req("long", n_prompt=100))
    s.add_request(req("short", n_prompt=2))
    out, _ = step(s)
    assert [r.request_id for r in out.rows] == ["long"]  # never waits for the budget
    out, _ = step(s)
    assert [r.request_id for r in out.rows] == ["short"]


def test_mixed_respects_free_slots_and_a_failed_step_fails_only_its_prompts():
    s = make_scheduler(max_num_seqs=3, mixed=True)
    s.add_request(req("a", n_prompt=10, max_tokens=9))
    step(s)
    for rid in "bcd":
        s.add_request(req(rid))
    out = s.schedule()
    assert [r.request_id for r in out.rows] == ["b", "c"] and s.stats().num_waiting == 1
    steps, retry = s.fail_mixed_step(out)  # the runner raised on the mixed step
    assert sorted((o.request_id, o.finish_reason) for o in steps) == [
        ("b", FinishReason.ERROR), ("c", FinishReason.ERROR)]
    # the running request retries alone, at the same position
    assert (retry.phase, [(r.request_id, r.start_pos) for r in retry.rows]) == (
        "decode", [("a", 10)])
    steps = s.update(retry, run(retry))
    assert [(o.request_id, o.num_output_tokens) for o in steps] == [("a", 2)]
    out, _ = step(s)
    assert [r.request_id for r in out.rows] == ["d"]
    assert [(r.request_id, r.start_pos) for r in out.decode_rows] == [("a", 11)]


def test_max_num_batched_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        make_scheduler(mixed=True, max_num_batched_tokens=0)


# -- prefix reuse ------------------------------------------------------------------------------


def prompt_req(rid, ids, max_tokens=3):
    return GenerationRequest(rid, tuple(ids), SamplingParams(max_tokens=max_tokens))


def drain(s: Scheduler, **kw):
    while s.has_unfinished():
        step(s, **kw)


@pytest.mark.parametrize("mixed", [True, False])
def test_a_prompt_starts_after_the_prefix_a_finished_slot_holds(mixed):
    s = make_scheduler(max_num_seqs=2, mixed=mixed, prefix_caching=True)
    system = list(range(100, 120))
    s.add_request(prompt_req("a", [*system, 1, 2, 3], max_tokens=3))
    drain(s, token=9)  # a: 23 prompt tokens + 2 of its 3 outputs computed, in slot 0
    s.add_request(prompt_req("b", [*system, 1, 2, 3, 9, 9, 9, 4]))  # the next turn
    out = s.schedule()
    row = out.rows[0]
    # the held 25 tokens (a's prompt and first two outputs) are skipped; its slot is slot 0
    assert (row.slot, row.start_pos, row.token_ids) == (0, 25, (9, 4))
    assert out.kv_copies == ()
    s.update(out, run(out))
    assert s.requests["b"].num_computed_tokens == 27
    it = s.last_iteration
    assert (it.num_prompt_tokens, it.num_cached_tokens, it.num_queried_tokens) == (2, 25, 27)
    assert (s.prefix_queries, s.prefix_hits) == (23 + 27, 25)


def test_a_prefix_held_by_a_running_request_is_copied_into_the_new_slot():
    s = make_scheduler(max_num_seqs=3, mixed=True, prefix_caching=True)
    system = list(range(200, 216))
    s.add_request(prompt_req("a", [*system, 1], max_tokens=10))
    step(s)
    s.add_request(prompt_req("b", [*system, 2, 3]))
    out = s.schedule()
    (row,) = out.rows
    assert (row.slot, row.start_pos, row.token_ids) == (1, 16, (2, 3))
    assert [(c.src, c.dst, c.num_tokens) for c in out.kv_copies] == [(0, 1, 16)]


def test_the_last_prompt_token_always_runs_and_failed_or_reallocated_slots_hold_nothing():
    s = make_scheduler(max_num_seqs=1, mixed=True, prefix_caching=True)
    s.add_request(prompt_req("a", [5, 6, 7, 8], max_tokens=1))
    drain(s)
    s.add_request(prompt_req("same", [5, 6, 7, 8], max_tokens=1))
    out = s.schedule()
    assert (out.rows[0].start_pos, out.rows[0].token_ids) == (3, (8,))  # logits need a token
    s.fail_step(out)  # the step raised: what the slot holds is not trusted
    assert s.slots.held() == {}
    s.add_request(prompt_req("again", [5, 6, 7, 8], max_tokens=1))
    out = s.schedule()
    assert out.rows[0].start_pos == 0


def test_without_prefix_caching_every_prompt_starts_at_zero():
    s = make_scheduler(max_num_seqs=2, mixed=True)
    s.add_request(prompt_req("a", [5, 6, 7, 8], max_tokens=1))
    drain(s)
    s.add_request(prompt_req("b", [5, 6, 7, 8, 9], max_tokens=1))
    out = s.schedule()
    assert out.rows[0].start_pos == 0 and out.kv_copies == ()
    assert s.slots.held() == {} and s.last_iteration.num_queried_tokens == 0


def test_slot_pool_forgets_what_an_allocated_slot_held():
    pool = SlotPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.free(b, (1, 2, 3))
    pool.free(a)
    assert pool.held() == {1: (1, 2, 3)} and pool.lowest_free() == 0
    assert pool.allocate(1) == 1 and pool.held() == {}
    with pytest.raises(ValueError, match="not free"):
        pool.allocate(1)


# -- the step policy, from measured step costs --------------------------------------------------


def costs(mixed_extra: float) -> StepCosts:
    """Decode 10 ms, prompts alone 20 ms; a mixed step costs their sum plus ``mixed_extra``."""
    return StepCosts((1, 4), (16, 256), (0.010, 0.010), (0.020, 0.020),
                     ((0.030 + mixed_extra,) * 2,) * 2)


@pytest.mark.parametrize("extra", [-0.005, 0.005], ids=["mixing-saves", "mixing-costs"])
def test_a_prompt_joins_the_decode_step_only_where_the_measured_costs_say_it_saves(extra):
    s = make_scheduler(max_num_seqs=4, mixed=True, step_costs=costs(extra))
    s.add_request(req("a", n_prompt=10, max_tokens=9))
    step(s)
    s.add_request(req("b", n_prompt=20, max_tokens=5))
    out, _ = step(s)
    if extra < 0:
        assert out.phase == "mixed" and [r.request_id for r in out.decode_rows] == ["a"]
    else:  # the separate policy: b's prompt alone, then a decode step of both
        assert out.phase == "prefill" and out.decode_rows == ()
        assert [r.request_id for r in out.rows] == ["b"]
        s.add_request(req("c", n_prompt=20, max_tokens=5))
        out, _ = step(s)  # no two prefill steps in a row while requests decode
        assert out.phase == "decode" and [r.request_id for r in out.rows] == ["a", "b"]
        out, _ = step(s)
        assert out.phase == "prefill" and [r.request_id for r in out.rows] == ["c"]


def test_step_costs_refuse_a_ragged_grid():
    with pytest.raises(ValueError, match="one time per grid point"):
        StepCosts((1, 4), (16,), (0.01,), (0.02,), ((0.03,),))
    c = costs(0.0)
    assert StepCosts.from_json(c.to_json()) == c
