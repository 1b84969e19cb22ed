"""Tool calling on /v1/chat/completions against a real server (``python -m server``), driven
by the official openai client, LangChain and the OpenAI Agents SDK, once per engine under test
(``make test``: ragserve's; ``make test-vllm``: vLLM's).

The model is a tiny random Llama: it writes nothing sensible, so every call it makes here is
the constraint's doing (``tool_choice`` required or named), and its arguments must validate
against the tool's schema every time. Auto mode (the model decides, the parser reads) is
tested on the embedded SmolLM2 (``slow``) and, for the parsers, in test_tool_parsers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from serverutil import ROOT, engine_flags, start_subprocess, wait_ready

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"tz": {"type": "string", "enum": ["UTC", "Europe/Paris"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                      "parameters": TIME_SCHEMA}},
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(engine_name: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Auto tool choice on, llama3_json: the tiny model's template ignores tools, so the
    shipped Llama 3.1 JSON template renders them."""
    log = tmp_path_factory.mktemp("tools-server") / "server.log"
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--api-key", KEY,
        "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
        "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
        *engine_flags(engine_name)], log)
    try:
        wait_ready(url, AUTH, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def plain_server(engine_name: str, tiny_llama_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory):
    """No tool flags: required and named still work, auto is a 400."""
    log = tmp_path_factory.mktemp("plain-server") / "server.log"
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--api-key", KEY,
        "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "2",
        *engine_flags(engine_name)], log)
    try:
        wait_ready(url, AUTH, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        print(log.read_text()[-3000:])


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, **body},
                      headers=AUTH, timeout=120)


def valid(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def streamed_calls(chunks: list) -> tuple[str, dict[int, list[str]], list[str]]:
    """(content, {index: [id, name, arguments]}, finish reasons) of a streamed answer."""
    content, calls, reasons = "", {}, []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            if tc.id is not None:
                assert tc.type == "function" and tc.index not in calls
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                calls[tc.index][2] += tc.function.arguments or ""
        if c.choices[0].finish_reason:
            reasons.append(c.choices[0].finish_reason)
    return content, calls, reasons


# -- constrained calls: always valid, even from a random model ------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_tool_call_validates(client: openai.OpenAI, seed: int):
    r = client.chat.completions.create(
        model=MODEL, messages=MSG, tools=TOOLS, max_tokens=70, temperature=1.0, seed=seed,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    valid("get_weather", call.function.arguments)


def test_named_tool_call_streamed(client: openai.OpenAI):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MSG, tools=TOOLS, max_tokens=70, temperature=1.0, seed=3,
        stream=True, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content, calls, reasons = streamed_calls(chunks)
    assert content == "" and reasons == ["tool_calls"]
    [(cid, name, args)] = calls.values()
    assert name == "get_time" and cid
    valid("get_time", args)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_validate(client: openai.OpenAI, parallel: bool):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=70,
            temperature=1.0, seed=seed, parallel_tool_calls=parallel)
        choice = r.choices[0]
        if choice.finish_reason == "length":  # parallel: a random model may go on and on
            assert parallel and choice.message.tool_calls == []
            continue
        assert choice.finish_reason == "tool_calls", choice.message.content
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            valid(call.function.name, call.function.arguments)


def test_required_streamed_equals_non_streamed(client: openai.OpenAI):
    kw = dict(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=70,
              temperature=0, parallel_tool_calls=False)
    full = client.chat.completions.create(**kw).choices[0]
    content, calls, reasons = streamed_calls(list(client.chat.completions.create(
        **kw, stream=True)))
    assert content == "" and reasons == [full.finish_reason] == ["tool_calls"]
    assert [(n, json.loads(a)) for _, n, a in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in full.message.tool_calls]
    for _, name, args in calls.values():
        valid(name, args)


def test_required_and_named_need_no_flag(plain_server: str):
    r = post(plain_server, {"messages": MSG, "tools": TOOLS, "tool_choice": "required",
                            "max_tokens": 70, "temperature": 0,
                            "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    valid(call["function"]["name"], call["function"]["arguments"])


def test_history_with_tool_results(client: openai.OpenAI, server: str):
    history = [*MSG,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {
                       "name": "get_weather",
                       "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                       tool_choice="none", max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls in (None, [])
    # the shipped template rendered the call and its result into the prompt
    ids = httpx.post(f"{server}/tokenize", json={"messages": history}, headers=AUTH).json()
    plain = ids["count"]
    assert r.usage.prompt_tokens > plain  # with the tools listed


def test_auto_on_a_random_model_is_text_or_calls(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, max_tokens=8,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason != "tool_calls":
        assert choice.message.tool_calls == [] and isinstance(choice.message.content, str)


# -- hostile inputs: each a clear 400 -------------------------------------------------------

def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


def test_unknown_tool_in_tool_choice(server: str):
    err = error_of(post(server, {"messages": MSG, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "launch_rocket"}}}))
    assert err["param"] == "tool_choice" and "launch_rocket" in err["message"]


def test_tool_message_without_matching_call(server: str):
    err = error_of(post(server, {"messages": [
        *MSG, {"role": "tool", "tool_call_id": "call_nope", "content": "42"}]}))
    assert err["param"] == "messages" and "call_nope" in err["message"]


def test_history_arguments_must_be_json(server: str):
    err = error_of(post(server, {"messages": [*MSG, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}))
    assert "arguments is not valid JSON" in err["message"]


def test_malformed_parameters_schema(server: str):
    bad = [{"type": "function", "function": {"name": "broken", "parameters": {
        "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}]
    err = error_of(post(server, {"messages": MSG, "tools": bad, "tool_choice": "required"}))
    assert err["param"] == "tools" and "broken" in err["message"]
    err = error_of(post(server, {"messages": MSG, "tools": [
        {"type": "function", "function": {"name": "x", "parameters": "nope"}}]}))
    assert err["param"] == "tools"


def test_auto_without_the_flag(plain_server: str):
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
        err = error_of(post(plain_server, {"messages": MSG, **body}))
        assert err["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in err["message"]


def test_tool_constraint_with_response_format(server: str):
    err = error_of(post(server, {"messages": MSG, "tools": TOOLS, "tool_choice": "required",
                                 "response_format": {"type": "json_object"}}))
    assert err["param"] == "response_format"


def test_tool_choice_without_tools(server: str):
    err = error_of(post(server, {"messages": MSG, "tool_choice": "required"}))
    assert err["param"] == "tool_choice"


# -- frameworks -----------------------------------------------------------------------------

def test_langchain_bind_tools_and_structured_output(server: str):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model=MODEL, base_url=f"{server}/v1", api_key=KEY, temperature=0,
                     max_tokens=70, max_retries=0)

    def get_weather(city: str, unit: str, days: int) -> str:
        """Weather forecast."""
        return "sunny"

    bound = llm.bind_tools([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast",
        "parameters": WEATHER_SCHEMA}}], tool_choice="get_weather")
    msg = bound.invoke([HumanMessage("Weather in Paris?")])
    assert isinstance(msg, AIMessage)
    [call] = msg.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_SCHEMA)
    # the call and its result go back in the history
    again = llm.invoke([HumanMessage("Weather in Paris?"), msg,
                        ToolMessage("sunny", tool_call_id=call["id"])])
    assert isinstance(again.content, str)

    class Forecast(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    out = llm.with_structured_output(Forecast, method="json_schema").invoke("Forecast?")
    assert isinstance(out, Forecast)
    out = llm.with_structured_output(Forecast, method="function_calling").invoke("Forecast?")
    assert isinstance(out, Forecast)


def test_openai_agents_sdk_function_tool(server: str):
    """An Agents SDK agent whose model must call the tool; it stops on the tool's result. The
    argument is an enum and parallel calls are off: on some CPUs (fp32 argmax differs) the tiny
    random model's list of calls outruns max_tokens, leaving the constrained output unfinished."""
    script = f"""
import asyncio
from typing import Literal
from openai import AsyncOpenAI
from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                    set_tracing_disabled)

set_tracing_disabled(True)
calls = []

@function_tool
def get_time(tz: Literal["Europe/Paris", "UTC"]) -> str:
    '''The time now in a time zone.'''
    calls.append(tz)
    return "12:00 in " + tz

client = AsyncOpenAI(base_url="{server}/v1", api_key="{KEY}", max_retries=0)
agent = Agent(name="clock", instructions="Tell the time.", tools=[get_time],
              model=OpenAIChatCompletionsModel(model="{MODEL}", openai_client=client),
              model_settings=ModelSettings(tool_choice="required", temperature=0,
                                           max_tokens=60, parallel_tool_calls=False),
              tool_use_behavior="stop_on_first_tool")
result = asyncio.run(Runner.run(agent, "What time is it in Paris?", max_turns=2))
assert len(calls) == 1 and isinstance(calls[0], str), calls
assert result.final_output.startswith("12:00 in "), result.final_output
print("OK", calls[0])
"""
    env = dict(os.environ, OPENAI_AGENTS_DISABLE_TRACING="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK")


# -- auto mode on the embedded SmolLM2 (ChatML: the shipped Hermes template) ----------------

@pytest.mark.slow
def test_auto_on_the_embedded_model(tmp_path: Path):
    """The real auto path: Hermes template in, hermes parser out. SmolLM2-135M answers this
    prompt in words rather than with a ``<tool_call>`` (checked by hand), so what is asserted
    is that the answer comes through the parser whole, streamed and not alike; the parsing of
    calls themselves is test_tool_parsers.py's, on canned text."""
    log = tmp_path / "server.log"
    proc, url = start_subprocess(["--dtype", "float32", "--max-model-len", "1024",
                                  "--max-num-seqs", "2", "--kernels", "step=eager",
                                  "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                                 log)
    try:
        wait_ready(url, proc=proc)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]
        kw = dict(model=c.models.list().data[0].id, tools=tools, max_tokens=40, temperature=0,
                  messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        full = c.chat.completions.create(**kw).choices[0]
        content, calls, reasons = streamed_calls(list(c.chat.completions.create(
            **kw, stream=True)))
        assert reasons == [full.finish_reason]
        assert content == (full.message.content or "")
        assert [(n, json.loads(a)) for _, n, a in calls.values()] == [
            (t.function.name, json.loads(t.function.arguments))
            for t in full.message.tool_calls]
        if full.finish_reason == "tool_calls":
            assert full.message.tool_calls[0].function.name == "get_weather"
        # named: the constraint makes even this model call the tool with valid arguments
        r = c.chat.completions.create(**{**kw, "tool_choice": {
            "type": "function", "function": {"name": "get_weather"}}}).choices[0]
        assert r.finish_reason == "tool_calls"
        assert isinstance(json.loads(r.message.tool_calls[0].function.arguments)["city"], str)
    finally:
        proc.terminate()
        proc.wait(60)
    assert "tool_chat_template_hermes.jinja" in log.read_text()
