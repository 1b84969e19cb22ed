"""The engine loop with a hand-made runner: failures, aborts and stop strings free slots."""

from pathlib import Path

import pytest

from bucketing import BucketConfig
from engine.core import Engine
from scheduler import FinishReason, ModelRunnerOutput, SamplingParams, Scheduler, SchedulerOutput


class ScriptedRunner:
    """Samples ``tokens[request_id]`` in turn (cycling); raises on chosen step numbers."""

    def __init__(self, tokens: dict[str, list[int]], fail_on: set[int] = frozenset()):
        self.tokens = tokens
        self.fail_on = fail_on
        self.steps = 0
        self.sampled: dict[str, int] = {}
        self.seen_finished: set[str] = set()

    def prepare(self, request_id: str, params: SamplingParams) -> None:
        pass

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.steps += 1
        self.seen_finished |= out.finished_request_ids
        if self.steps in self.fail_on:
            raise RuntimeError("device fell over")
        ids = [r.request_id for r in out.rows]
        toks = []
        for i in ids:
            n = self.sampled.get(i, 0)
            self.sampled[i] = n + 1
            toks.append(self.tokens[i][n % len(self.tokens[i])])
        return ModelRunnerOutput(ids, toks)


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir), fix_mistral_regex=False)


def make_engine(tokenizer, runner, max_num_seqs=2) -> Engine:
    buckets = BucketConfig.default(128, max_num_seqs, min_bucket=16)
    return Engine(Scheduler(buckets, eos_token_ids=[128009]), runner, tokenizer)


def test_a_failing_step_fails_only_its_requests(tokenizer):
    words = tokenizer.encode(" one two three four five six seven", add_special_tokens=False)
    runner = ScriptedRunner({"a": words, "b": words}, fail_on={3})
    engine = make_engine(tokenizer, runner)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=6), request_id="a")
    engine.step()  # prefill a
    engine.step()  # decode a
    engine.add_request([1, 2], SamplingParams(max_tokens=3), request_id="b")
    outs = engine.step()  # prefill b: raises
    assert [(o.request_id, o.finish_reason) for o in outs] == [("b", FinishReason.ERROR)]
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            final[o.request_id] = o
    assert final["a"].finish_reason == FinishReason.LENGTH and len(final["a"].token_ids) == 6
    assert "b" in runner.seen_finished  # the runner was told to drop b's state
    assert engine.scheduler.slots.num_free == 2


def test_abort_and_stop_string_free_their_slots(tokenizer):
    words = tokenizer.encode(" alpha beta gamma delta", add_special_tokens=False)
    runner = ScriptedRunner({"x": words, "y": words, "z": words})
    engine = make_engine(tokenizer, runner)
    engine.add_request([5], SamplingParams(max_tokens=50), request_id="x")
    engine.add_request([5], SamplingParams(max_tokens=50, stop=("gamma",)), request_id="y")
    engine.add_request([5], SamplingParams(max_tokens=2), request_id="z")  # waits for a slot
    engine.step()  # prefill x, y
    engine.abort("x")
    assert engine.scheduler.slots.num_free == 1
    finished = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    assert finished["y"].finish_reason == FinishReason.STOP
    assert finished["y"].text == " alpha beta "
    assert finished["z"].finish_reason == FinishReason.LENGTH
    assert "x" not in finished  # aborted: no output
    assert "x" in runner.seen_finished  # and the runner dropped its state
    assert engine.scheduler.slots.num_free == 2
