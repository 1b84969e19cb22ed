"""Structured outputs and logit_bias through the HTTP API, on each engine under test, driven by
the official openai client as its users drive it (``chat.completions.parse`` with a pydantic
model, ``response_format``, vLLM's ``structured_outputs`` and ``guided_*`` in ``extra_body``).

The model is a tiny random Llama: it never writes JSON by itself, so every valid output here is
the constraint's doing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serverutil import engine_flags, start_subprocess, wait_ready

MODEL = "tiny"
MSG = [{"role": "user", "content": "Describe a person."}]


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    kind: str = Field(json_schema_extra={"enum": ["cat", "dog"]})


@pytest.fixture(scope="module")
def server(engine_name: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
        "--max-model-len", "512", "--max-num-seqs", "4", *engine_flags(engine_name)], log)
    try:
        wait_ready(url, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        print(log.read_text()[-3000:])


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=120)


def chat(**kw: object) -> dict:
    return {"model": MODEL, "messages": MSG, "temperature": 0, "max_tokens": 80, **kw}


# -- what clients send -------------------------------------------------------------------

def test_parse_with_a_pydantic_model(client: openai.OpenAI):
    r = client.chat.completions.parse(model=MODEL, messages=MSG, response_format=Person,
                                      temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.parsed.kind in ("cat", "dog")


def test_json_schema_sampled_and_streamed_validate(client: openai.OpenAI):
    schema = Person.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                  "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=MSG, response_format=fmt,
                                       temperature=1.0, seed=7, n=3, max_tokens=80)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    stream = client.chat.completions.create(model=MODEL, messages=MSG, response_format=fmt,
                                            temperature=0, max_tokens=80, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:  # a random model may nest until max_tokens: the text is still a JSON prefix
        assert c.finish_reason == "length" and c.message.content.startswith("{")


def test_vllm_structured_outputs_and_the_guided_aliases(client: openai.OpenAI):
    def content(**extra: object) -> str:
        r = client.chat.completions.create(model=MODEL, messages=MSG, temperature=0,
                                           max_tokens=20, extra_body=extra)
        return r.choices[0].message.content

    assert content(structured_outputs={"choice": ["yes", "no"]}) in ("yes", "no")
    assert re.fullmatch(r"\d{3}-[a-z]{2}", content(structured_outputs={"regex": r"\d{3}-[a-z]{2}"}))
    assert content(guided_choice=["up", "down"]) in ("up", "down")
    assert re.fullmatch(r"[AB]{4}", content(guided_regex="[AB]{4}"))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    assert json.loads(content(guided_json=schema)) in ({"ok": True}, {"ok": False})
    assert content(structured_outputs={"grammar": 'root ::= "a" | "b" "c"'}) in ("a", "bc")


def test_completions_take_structured_outputs(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert r.choices[0].text in ("red", "blue")


def test_max_tokens_mid_json_is_length(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": Person.model_json_schema()}})
    assert r.choices[0].finish_reason == "length"


def test_logit_bias_bans_and_forces(client: openai.OpenAI):
    free = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True},
                                          logprobs=True)
    first = free.choices[0].logprobs.content[0].token
    ids = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"),
                     json={"prompt": first, "add_special_tokens": False}).json()["tokens"]
    banned = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4,
                                            temperature=0, extra_body={"ignore_eos": True},
                                            logit_bias={str(ids[0]): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first
    forced = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3,
                                            temperature=0, extra_body={"ignore_eos": True},
                                            logit_bias={"9906": 100})
    assert forced.choices[0].message.content == "Hello" * 3


# -- hostile input: a clear 400, nothing queued ------------------------------------------

@pytest.mark.parametrize(("body", "param", "words"), [
    (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strnig"}}}), "response_format", "cannot be compiled"),
    (chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "multipleOf": 3}}}), "response_format",
     "'multipleOf'"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format", "has no schema"),
    (chat(response_format={"type": "xml"}), "response_format", None),
    (chat(structured_outputs={"regex": "(", "choice": ["a"]}), "structured_outputs",
     "exactly one"),
    (chat(structured_outputs={"regex": "(unclosed"}), "structured_outputs", "regex"),
    (chat(guided_json={"$ref": "#/$defs/nowhere"}), "guided_json", "cannot be compiled"),
    (chat(guided_choice=[]), "guided_choice", "non-empty"),
    (chat(guided_regex="a", guided_choice=["a"]), "guided_choice", "one structured-output"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                         for i in range(5000)}}}}),
     "response_format", "the limit is"),
    (chat(response_format={"type": "json_object"}, ignore_eos=True), "ignore_eos",
     "cannot be combined"),
    (chat(logit_bias={"abc": 1}), "logit_bias", "not a token id"),
    (chat(logit_bias={"99999999": 1}), "logit_bias", "outside the vocabulary"),
    (chat(logit_bias={"5": 101}), "logit_bias", None),
])
def test_refused_with_a_400_naming_the_field(server: str, body: dict, param: str,
                                             words: str | None):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    # schema errors name the field's path in the message and its last part as param
    assert err["param"].startswith(param) or err["message"].startswith(param), err
    if words:
        assert words in err["message"], err


def test_a_recursive_schema_is_enforced_and_bounded(client: openai.OpenAI):
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                           "maxItems": 2}},
        "required": ["v", "kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
    r = client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": tree}})
    c = r.choices[0]
    if c.finish_reason == "stop":
        jsonschema.validate(json.loads(c.message.content), tree)
    else:
        assert c.finish_reason == "length"
    # the server still serves
    assert client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices
