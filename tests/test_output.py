"""The output loop: incremental detokenization (no broken UTF-8) and stop strings."""

from pathlib import Path

import pytest

from engine.output import OutputProcessor
from scheduler import FinishReason, SamplingParams, StepOutput

TEXT = "Résumé: 你好, world! 🎉 The end."


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir), fix_mistral_regex=False)


def feed(tokenizer, ids, params, finish_last=FinishReason.LENGTH, prompt=(128000,)):
    proc = OutputProcessor(tokenizer)
    proc.add("r", list(prompt), params)
    outs, stopped = [], []
    for i, t in enumerate(ids):
        reason = finish_last if i == len(ids) - 1 else None
        o, s = proc.process([StepOutput("r", (t,), reason, len(prompt), i + 1)])
        outs += o
        stopped += s
        if o and o[0].finished:
            break
    return outs, stopped


def test_incremental_text_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > 10
    outs, _ = feed(tokenizer, ids, SamplingParams())
    deltas = [o.delta for o in outs]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT
    assert outs[-1].text == TEXT
    assert any(d == "" for d in deltas)  # some tokens held back until their character completed


def test_special_tokens_skipped_by_default(tokenizer):
    ids = [*tokenizer.encode("Hi there", add_special_tokens=False), 128009]
    outs, _ = feed(tokenizer, ids, SamplingParams(), FinishReason.STOP)
    assert outs[-1].text == "Hi there"
    outs, _ = feed(tokenizer, ids, SamplingParams(skip_special_tokens=False), FinishReason.STOP)
    assert outs[-1].text == "Hi there<|eot_id|>"


def test_stop_string_cuts_text_and_reports_the_request(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    outs, stopped = feed(tokenizer, ids, SamplingParams(stop=("ee f", "zzz")), None)
    last = outs[-1]
    assert last.finish_reason == FinishReason.STOP and last.stop_reason == "ee f"
    assert last.text == "one two thr"
    assert "".join(o.delta for o in outs) == "one two thr"
    assert stopped == ["r"]  # the scheduler must be told: it still counts the request running
    outs, _ = feed(tokenizer, ids, SamplingParams(stop=("ee f",),
                                                   include_stop_str_in_output=True), None)
    assert outs[-1].text == "one two three f"


def test_streamed_deltas_hold_back_a_possible_stop_prefix(tokenizer):
    ids = tokenizer.encode("alpha beta gamma", add_special_tokens=False)
    outs, _ = feed(tokenizer, ids, SamplingParams(stop=("gamma ray",)))
    # while "gamma" could still start "gamma ray", it was held back from the stream
    streamed = [o.delta for o in outs]
    assert "gamma" not in "".join(streamed[:-1])
    assert "gamma" in streamed[-1]
    assert "".join(o.delta for o in outs) == "alpha beta gamma"
    assert outs[-1].finish_reason == FinishReason.LENGTH


def test_stop_string_found_on_the_last_token_wins_over_length(tokenizer):
    ids = tokenizer.encode("stop here", add_special_tokens=False)
    outs, stopped = feed(tokenizer, ids, SamplingParams(stop=(" here",)), FinishReason.LENGTH)
    assert outs[-1].finish_reason == FinishReason.STOP
    assert outs[-1].text == "stop"
    assert stopped == []  # already finished by the scheduler (length)
