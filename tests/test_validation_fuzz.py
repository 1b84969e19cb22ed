"""Property tests of the request validators (hypothesis): whatever JSON object a client sends to
/v1/completions or /v1/chat/completions, validation ends in one of two ways. Either the client
gets a 4xx naming the problem, or the request becomes SamplingParams that the sampler runs on
without raising. It is never any other exception (a 500)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from engine.client import ModelInfo
from runtime.sampler import RequestState, Sampler
from server.errors import APIError, validation_message
from server.preprocess import (
    chat_prompt_ids,
    check_unsupported,
    completion_prompts,
    echo_texts,
    sampling_params,
)
from server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

INT64 = 2**63
ints = st.one_of(st.integers(-3, 40), st.integers(-(2**80), 2**80),
                 st.sampled_from([0, 1, -1, 128255, 128256, INT64 - 1, INT64, 2**64, -INT64 - 1]))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, 1e-300, 5e-324, 1e308, -0.0, 2.0, 2.0000001]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=12)

SAMPLING = ["model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
            "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user",
            "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens",
            "skip_special_tokens", "include_stop_str_in_output", "not_a_field"]
COMPLETION = [*SAMPLING, "prompt", "logprobs", "echo", "suffix", "best_of"]
CHAT = [*SAMPLING, "messages", "max_completion_tokens", "logprobs", "top_logprobs",
        "response_format", "tools", "tool_choice", "chat_template", "add_generation_prompt"]

# plausible values for the fields that matter most, mixed with anything at all
prompts = st.one_of(st.text(max_size=30), st.lists(ints, max_size=6),
                    st.lists(st.text(max_size=10), max_size=3),
                    st.lists(st.lists(ints, max_size=4), max_size=3))
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]),
     "content": st.one_of(st.text(max_size=30), st.none(), st.lists(st.one_of(
         st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
         st.fixed_dictionaries({"type": st.just("image_url"), "image_url": values})),
         max_size=2))}), max_size=3)


near = st.one_of(st.floats(-3, 3), floats)  # around and past each float field's bounds
small = st.one_of(st.integers(-2, 30), ints)
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "model": st.sampled_from(["tiny", None]), "max_tokens": small, "n": st.integers(-1, 4),
    "temperature": near, "top_p": near, "presence_penalty": near, "frequency_penalty": near,
    "min_p": near, "repetition_penalty": near, "top_k": small, "seed": ints,
    "min_tokens": small, "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4),
                                                                         max_size=3)),
    "stop_token_ids": st.lists(ints, max_size=3), "logprobs": st.one_of(st.booleans(), small),
    "top_logprobs": small, "max_completion_tokens": small, "echo": st.booleans(),
    "ignore_eos": st.booleans(), "stream": st.booleans(), "best_of": small,
}


def bodies(fields: list[str], main: str, main_values: st.SearchStrategy, typed: bool = False
           ) -> st.SearchStrategy:
    """Objects with some of ``fields``: each a value of the field's type (in or out of its
    bounds) when ``typed``, so that validation gets past pydantic; otherwise often anything."""
    def value(name: str) -> st.SearchStrategy:
        plausible = PLAUSIBLE.get(name)
        if plausible is None:
            return values
        return plausible if typed else st.one_of(plausible, values)

    known = [f for f in fields if f in PLAUSIBLE] if typed else fields
    extra = st.lists(st.sampled_from(known), max_size=6, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: value(n) for n in names}))
    return st.builds(lambda e, m: {**e, main: m}, extra,
                     main_values if typed else st.one_of(main_values, values))


@pytest.fixture(scope="module")
def info(llama3_tokenizer_dir: Path) -> ModelInfo:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    return ModelInfo(name="tiny", tokenizer=tok, max_model_len=256, max_prompt_len=128,
                     context_encoding_buckets=(64, 128), token_generation_buckets=(128, 256))


def run_sampler(params: list, prompt_ids: list[int], vocab: int) -> None:
    """The engine's sampler accepts what validation let through: one step on random logits."""
    states = [RequestState.create(p, prompt_ids, torch.device("cpu")) for p in params]
    logits = torch.randn(len(states), vocab, generator=torch.Generator().manual_seed(0)) * 8
    out = Sampler()(logits, states)
    assert all(0 <= t < vocab for t in out.token_ids)


def finish(exc: Exception) -> None:
    """The ways validation may refuse a request: pydantic (a 400 via validation_message) or
    an APIError with a 4xx."""
    if isinstance(exc, ValidationError):
        message, _ = validation_message(exc.errors())
        assert message
    elif isinstance(exc, APIError):
        assert 400 <= exc.status < 500 and exc.message
    else:
        raise exc


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(body=st.one_of(bodies(COMPLETION, "prompt", prompts),
                      bodies(COMPLETION, "prompt", prompts, typed=True)))
def test_completions_bodies_validate_or_get_a_4xx(info: ModelInfo, body: dict[str, Any]):
    try:
        req = CompletionRequest.model_validate(body)
        check_unsupported(req)
        ids = completion_prompts(info.tokenizer, req.prompt)
        params = [sampling_params(req, len(p), info, j) for p in ids for j in range(req.n)]
        assert len(echo_texts(info.tokenizer, req.prompt)) == len(ids)
    except (ValidationError, APIError) as e:
        finish(e)
        return
    run_sampler(params, ids[0], info.vocab_size)


@FUZZ
@given(body=st.one_of(bodies(CHAT, "messages", messages),
                      bodies(CHAT, "messages", messages, typed=True)))
def test_chat_bodies_validate_or_get_a_4xx(info: ModelInfo, body: dict[str, Any]):
    try:
        req = ChatCompletionRequest.model_validate(body)
        check_unsupported(req)
        ids = chat_prompt_ids(info.tokenizer, req, None)
        params = [sampling_params(req, len(ids), info, j) for j in range(req.n)]
    except (ValidationError, APIError) as e:
        finish(e)
        return
    run_sampler(params, ids, info.vocab_size)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(["model", "prompt", "messages",
                                             "add_special_tokens", "add_generation_prompt"]),
                            st.one_of(values, messages), max_size=4))
def test_tokenize_bodies_validate_or_get_a_4xx(info: ModelInfo, body: dict[str, Any]):
    try:
        req = TokenizeRequest.model_validate(body)
        if req.messages is not None:
            chat = ChatCompletionRequest.model_construct(messages=req.messages, chat_template=None,
                                                         add_generation_prompt=True)
            chat_prompt_ids(info.tokenizer, chat, None)
    except (ValidationError, APIError) as e:
        finish(e)


def test_echo_is_the_prompt_as_sent_not_the_decoded_bos(llama3_tokenizer_dir: Path):
    """A tokenizer that adds a BOS to a completions prompt (SmolLM2's GGUF one does with some
    transformers versions): ``echo`` returns the string the client sent, and token prompts
    decoded as given."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
    ids = completion_prompts(tok, " Hello there")[0]
    assert ids[0] == 128000
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|> Hello there"
    assert echo_texts(tok, " Hello there") == [" Hello there"]
    assert echo_texts(tok, [" a", "b "]) == [" a", "b "]
    assert echo_texts(tok, ids[1:]) == [" Hello there"]
    assert echo_texts(tok, [ids[1:], [9906]]) == [" Hello there", "Hello"]
