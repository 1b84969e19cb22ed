"""Structured outputs and logit_bias on ragserve's engine: the compiler's refusals, the sampler's
mask on mixed batches, and a real (tiny, random) Llama whose every constrained output parses
and validates: the grammar, not the model, makes it so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from serverutil import engine_dtype

from engine.core import Engine, EngineConfig
from runtime.sampler import RequestState, Sampler
from runtime.structured import (
    MAX_SPEC_BYTES,
    GrammarCompiler,
    GrammarMatcher,
    StructuredOutputError,
    unsupported_schema_feature,
)
from scheduler import FinishReason, SamplingParams, StructuredKind, StructuredOutput

EOT = 128009
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def json_so(schema: dict) -> StructuredOutput:
    return StructuredOutput(StructuredKind.JSON, json.dumps(schema))


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir), fix_mistral_regex=False)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), [EOT])


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.from_config(EngineConfig(
        model=str(tiny_llama_dir), dtype=engine_dtype(), max_model_len=256, max_num_seqs=4,
        kernels="step=eager", cache_dir=tmp_path_factory.mktemp("cache")))


# -- what cannot be enforced is refused, naming it ----------------------------------------

@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "multipleOf": 3}, "'multipleOf' at #"),
    ({"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}},
     "'uniqueItems' at #/properties/xs"),
    ({"type": "string", "format": "credit-card"}, "'format': 'credit-card' at #"),
    ({"allOf": [{"type": "string"}, {"enum": ["a"]}]}, "'allOf' with more than one branch"),
    ({"not": {"type": "string"}}, "'not' at #"),
    ({"type": "object", "if": {}, "then": {}}, "'if' at #"),
])
def test_schema_keywords_xgrammar_would_ignore_are_named(schema: dict, named: str):
    assert named in unsupported_schema_feature(schema)


def test_enforced_and_annotation_keywords_pass():
    schema = {"title": "T", "description": "d", "$defs": {"n": {"type": "integer"}},
              "type": "object", "properties": {"n": {"$ref": "#/$defs/n"},
                                               "s": {"type": "string", "pattern": "^a+$"},
                                               "d": {"type": "string", "format": "date"}}}
    assert unsupported_schema_feature(schema) is None


@pytest.mark.parametrize(("so", "message"), [
    (StructuredOutput(StructuredKind.JSON, "{not json"), "not valid JSON"),
    (json_so({"type": "strnig"}), "cannot be compiled"),
    (json_so({"$ref": "#/$defs/missing"}), "cannot be compiled"),
    (json_so({"type": "integer", "multipleOf": 2}), "'multipleOf' at #, which ragserve cannot"),
    (StructuredOutput(StructuredKind.REGEX, "(unclosed"), "regex constraint cannot be compiled"),
    (StructuredOutput(StructuredKind.GRAMMAR, "root ::= missing_rule"),
     "grammar constraint cannot be compiled"),
    (StructuredOutput(StructuredKind.CHOICE, "[]"), "non-empty list"),
    (json_so({"description": "x" * MAX_SPEC_BYTES}), f"the limit is {MAX_SPEC_BYTES}"),
])
def test_compile_errors_say_what(compiler: GrammarCompiler, so: StructuredOutput, message: str):
    with pytest.raises(StructuredOutputError, match=re.escape(message)):
        compiler.compile(so)


def test_compiled_grammars_are_cached_by_spec(compiler: GrammarCompiler):
    so = json_so(PERSON)
    first = compiler.compile(so)
    assert compiler.cached(so) and compiler.compile(so) is first
    assert not compiler.cached(json_so({**PERSON, "title": "other"}))


# -- the sampler ---------------------------------------------------------------------------

def test_constrained_and_free_rows_share_a_batch(compiler: GrammarCompiler, tokenizer):
    """Random logits, two rows: the constrained row's greedy walk is valid JSON ending in EOS;
    the free row gets exactly what it would get alone."""
    torch.manual_seed(0)
    vocab = len(tokenizer)
    constrained = RequestState.create(SamplingParams(temperature=0, max_tokens=200), [1],
                                      torch.device("cpu"),
                                      GrammarMatcher(compiler.compile(json_so(PERSON))))
    free = RequestState.create(SamplingParams(temperature=0), [1], torch.device("cpu"))
    sampler = Sampler()
    out: list[int] = []
    for _ in range(200):
        logits = torch.randn(2, vocab)
        expected_free = int(logits[1].argmax())
        tokens = sampler(logits.clone(), [constrained, free]).token_ids
        assert tokens[1] == expected_free
        if tokens[0] == EOT:
            break
        assert constrained.matcher.accept(tokens[0])
        out.append(tokens[0])
    else:
        pytest.fail("the constrained row never ended")
    jsonschema.validate(json.loads(tokenizer.decode(out)), PERSON)


def test_eos_only_where_the_grammar_accepts(compiler: GrammarCompiler):
    """Logits that favour EOS above everything: the mask keeps it out until the JSON is done."""
    m = GrammarMatcher(compiler.compile(StructuredOutput(StructuredKind.CHOICE, '["yes"]')))
    st = RequestState.create(SamplingParams(temperature=0), [1], torch.device("cpu"), m)
    logits = torch.zeros(1, compiler.vocab_size)
    logits[0, EOT] = 50.0
    tok = Sampler()(logits, [st]).token_ids[0]
    assert tok != EOT and m.accept(tok)
    while not m.completed:
        logits = torch.zeros(1, compiler.vocab_size)
        logits[0, EOT] = 50.0
        tok = Sampler()(logits, [st]).token_ids[0]
        assert tok != EOT and m.accept(tok)
    assert Sampler()(logits, [st]).token_ids[0] == EOT


def test_logit_bias_bans_and_forces_per_row():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0
    rows = [RequestState.create(SamplingParams(temperature=0, logit_bias=((3, -100),)), [1],
                                torch.device("cpu")),
            RequestState.create(SamplingParams(temperature=0, logit_bias=((7, 100),)), [1],
                                torch.device("cpu"))]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] != 3 and out.token_ids[1] == 7


def test_logit_bias_is_not_in_the_reported_logprobs():
    """Logprobs are the model's (vLLM's raw_logprobs), whatever the bias did to sampling."""
    logits = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]), dim=-1)
    st = RequestState.create(SamplingParams(temperature=0, logprobs=0, logit_bias=((0, 100),)),
                             [1], torch.device("cpu"))
    out = Sampler()(logits.clone(), [st])
    assert out.token_ids == [0]
    assert out.logprobs[0].logprob == pytest.approx(float(logits[0, 0]))


def test_sampling_params_refuse_what_a_grammar_cannot_honour():
    so = StructuredOutput(StructuredKind.JSON_OBJECT)
    with pytest.raises(ValueError, match="ignore_eos cannot be combined"):
        SamplingParams(structured=so, ignore_eos=True)
    with pytest.raises(ValueError, match="min_tokens cannot be combined"):
        SamplingParams(structured=so, min_tokens=2, max_tokens=5)
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias=((1, 101.0),))


# -- a real model, batched ----------------------------------------------------------------

def test_every_constrained_output_of_a_random_model_validates(engine: Engine):
    """A random tiny Llama would never write JSON; constrained, every output parses, matches
    its constraint and ends with EOS (finish_reason stop), in one batch with a free request."""
    prompt = [128000, 791, 1917]
    regex = r"[a-z]{3}-\d{2}"
    params = [
        SamplingParams(max_tokens=120, temperature=0, structured=json_so(PERSON)),
        SamplingParams(max_tokens=120, temperature=0.8, seed=1, structured=json_so(PERSON)),
        SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput(
            StructuredKind.REGEX, regex)),
        SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput(
            StructuredKind.CHOICE, '["left", "right"]')),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    ]
    outs = engine.generate([prompt] * len(params), params)
    for o in outs[:2]:
        assert o.finish_reason == FinishReason.STOP, o.text
        jsonschema.validate(json.loads(o.text), PERSON)
    assert re.fullmatch(regex, outs[2].text) and outs[2].finish_reason == FinishReason.STOP
    assert outs[3].text in ("left", "right")
    assert outs[4].finish_reason == FinishReason.LENGTH and len(outs[4].token_ids) == 8


def test_max_tokens_mid_json_is_length(engine: Engine):
    out = engine.generate([[128000, 791]], SamplingParams(
        max_tokens=3, temperature=0, structured=json_so(PERSON)))[0]
    assert out.finish_reason == FinishReason.LENGTH and out.text.startswith("{")


def test_an_uncompilable_constraint_fails_only_its_request(engine: Engine):
    with pytest.raises(StructuredOutputError):
        engine.add_request([128000, 791], SamplingParams(structured=StructuredOutput(
            StructuredKind.REGEX, "(")))
    assert not engine.has_unfinished()


def test_the_cpu_mask_equals_xgrammars_kernel(compiler: GrammarCompiler):
    """ragserve's byte-table mask against xgrammar's own, on real grammar states, all rows and
    a subset of rows."""
    import xgrammar as xgr

    from runtime.structured import allocate_bitmask, apply_bitmask

    vocab = compiler.vocab_size
    matchers = [GrammarMatcher(compiler.compile(json_so(PERSON))) for _ in range(3)]
    matchers[1].accept(compiler.tokenizer.encode("{", add_special_tokens=False)[0])
    bitmask = allocate_bitmask(3, vocab)
    for i, m in enumerate(matchers):
        m.fill(bitmask, i)
    for rows in ([0, 1, 2], [1, 2]):
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(len(rows)))
        ours, theirs = logits.clone(), logits.clone()
        apply_bitmask(ours, bitmask, rows)
        xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=rows)
        assert torch.equal(ours, theirs)
        assert torch.isinf(ours[rows]).any() and torch.isfinite(ours[rows]).any()
