"""POST /v1/responses, stored responses and /v1/vector_stores, through the official openai
client, once per engine under test.

The model is scripted to write a fixed answer (as in tests/test_rag_server.py: with ragserve's
engine a backend whose logits spell it, with vLLM's a logits processor), so that texts,
citations, calls and JSON are known; everything else is the production code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import BaseModel
from serverutil import ThreadServer, engine_flags, start_subprocess, wait_ready
from test_rag_server import EOT, RagServer, ScriptedBackend

from bucketing import BucketConfig
from engine.core import Engine
from runtime.runner import ModelRunner
from runtime.structured import GrammarCompiler
from scheduler import Scheduler
from server.app import build_app
from server.config import ServerConfig

MAX_COUNT = 6  # --responses-store-max-count of the test server
QUESTION = "What is the capital of Zorvania?"
ANSWER = ("The capital of Zorvania is Quelthar [1]. Quelthar exports purple bananas to Mars [2]. "
          "It has glass towers [7].")


def scripted_app(config: ServerConfig, tokenizer: object) -> tuple[object, ScriptedBackend]:
    buckets = BucketConfig.default(512, 2, context_encoding_buckets=(128, 256, 384),
                                   token_generation_buckets=(512,))
    backend = ScriptedBackend(buckets, len(tokenizer))

    def factory() -> Engine:  # with a grammar compiler: text.format and named tools
        grammars = GrammarCompiler(tokenizer, len(tokenizer), [EOT])
        return Engine(Scheduler(buckets, [EOT]), ModelRunner(backend, grammars=grammars),
                      tokenizer, "scripted")

    return build_app(config, factory=factory), backend


@pytest.fixture(scope="module")
def srv(engine_name: str, index_dir: Path, llama3_tokenizer_dir: Path, tiny_llama_dir: Path,
        tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    tmp = tmp_path_factory.mktemp("responses")
    store = tmp / "responses.sqlite3"
    if engine_name == "ragserve":
        config = ServerConfig(index=index_dir, grounding_threshold=0.8, rag_answer_tokens=64,
                              responses_store_path=store, responses_store_max_count=MAX_COUNT)
        app, backend = scripted_app(config, tokenizer)

        def set_script(ids: list[int]) -> None:
            backend.script = ids

        with ThreadServer(app) as s:
            wait_ready(s.url, {})
            yield RagServer(s.url, tokenizer, set_script)
        return
    script = tmp / "script.json"

    def write_script(ids: list[int]) -> None:
        script.write_text(json.dumps(ids))

    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", "scripted", "--dtype", "float32",
        "--max-model-len", "512", "--max-num-seqs", "2", "--index", str(index_dir),
        "--grounding-threshold", "0.8", "--rag-answer-tokens", "64",
        "--responses-store-path", str(store), "--responses-store-max-count", str(MAX_COUNT),
        *engine_flags(engine_name),
        "--vllm-arg", 'logits_processors=["vllm_script:ScriptedLogits"]',
    ], tmp / "server.log", env={"RAGSERVE_TEST_SCRIPT": str(script)})
    try:
        wait_ready(url, proc=proc)
        yield RagServer(url, tokenizer, write_script)
    finally:
        proc.terminate()
        proc.wait(60)
        print((tmp / "server.log").read_text()[-3000:])


@pytest.fixture
def client(srv: RagServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)


def post(srv: RagServer, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=60)


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- create ---------------------------------------------------------------------------------

def test_string_input(client, srv):
    srv.say("Hello there.")
    r = client.responses.create(model="scripted", input="Hi", temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello there." and r.model == "scripted"
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert r.usage.output_tokens == len(srv.tokenizer.encode("Hello there.",
                                                             add_special_tokens=False)) + 1
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_items_and_instructions(client, srv):
    srv.say("Fine.")
    plain = client.responses.create(model="scripted", input="Hi")
    items = [{"role": "developer", "content": "Answer in one word."},
             {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]},
             {"role": "user", "content": "How are you?"}]
    r = client.responses.create(model="scripted", input=items, instructions="Be kind.")
    assert r.output_text == "Fine." and r.instructions == "Be kind."
    assert r.usage.input_tokens > plain.usage.input_tokens + 10


def test_max_output_tokens_makes_it_incomplete(client, srv):
    srv.say("one two three four five six seven eight")
    r = client.responses.create(model="scripted", input="Count.", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"


def test_stream_events_in_order(client, srv):
    srv.say("Streams of text arrive in pieces.")
    with client.responses.stream(model="scripted", input="Tell me.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert final.output_text == "Streams of text arrive in pieces."
    assert final.status == "completed" and final.usage.output_tokens > 1
    # the streamed response was stored like any other
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_stream_incomplete(srv):
    srv.say("one two three four five six")
    with httpx.stream("POST", f"{srv.url}/v1/responses", timeout=60, json={
            "input": "Count.", "max_output_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert lines[-1] == "event: response.incomplete"


# -- store ------------------------------------------------------------------------------------

def test_store_get_delete_and_continue(client, srv):
    srv.say("Quelthar.")
    first = client.responses.create(model="scripted", input=QUESTION)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == "Quelthar." and got.usage == first.usage
    srv.say("It has glass towers.")
    second = client.responses.create(model="scripted", input="Tell me more.",
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # the prompt holds the first turn: its question and its answer
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    deleted = client.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    r = httpx.delete(f"{srv.url}/v1/responses/{second.id}", timeout=30)
    assert r.json() == {"id": second.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    e = error(post(srv, "/v1/responses", {"input": "x", "previous_response_id": first.id}))
    assert e["param"] == "previous_response_id" and first.id in e["message"]
    assert error(httpx.delete(f"{srv.url}/v1/responses/{first.id}"), 404)["type"] == \
        "not_found_error"


def test_store_false_is_not_stored(client, srv):
    srv.say("Ok.")
    r = client.responses.create(model="scripted", input="Hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_eviction_by_count(client, srv):
    srv.say("Ok.")
    ids = [client.responses.create(model="scripted", input=f"n{i}", max_output_tokens=2).id
           for i in range(MAX_COUNT + 1)]
    e = error(httpx.get(f"{srv.url}/v1/responses/{ids[0]}", timeout=30), 404)
    assert "evicted" in e["message"]
    assert client.responses.retrieve(ids[-1]).id == ids[-1]


def test_persists_across_a_restart(engine_name, index_dir, llama3_tokenizer_dir, tmp_path):
    if engine_name != "ragserve":
        pytest.skip("the store is the same code on both engines: run once")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    config = ServerConfig(responses_store_path=tmp_path / "store.sqlite3")
    app, backend = scripted_app(config, tokenizer)
    backend.script = tokenizer.encode("Remember me.", add_special_tokens=False)
    with ThreadServer(app) as s:
        wait_ready(s.url, {})
        rid = httpx.post(f"{s.url}/v1/responses", json={"input": "Hi"}, timeout=60).json()["id"]
    app, backend = scripted_app(config, tokenizer)  # a new server on the same store
    backend.script = tokenizer.encode("Again.", add_special_tokens=False)
    with ThreadServer(app) as s:
        wait_ready(s.url, {})
        got = httpx.get(f"{s.url}/v1/responses/{rid}", timeout=30).json()
        assert got["output"][0]["content"][0]["text"] == "Remember me."
        r = httpx.post(f"{s.url}/v1/responses", timeout=60,
                       json={"input": "More", "previous_response_id": rid})
        assert r.status_code == 200, r.text


# -- file_search and vector stores ------------------------------------------------------------

def file_id(doc_id: str) -> str:
    return "file-" + hashlib.sha256(doc_id.encode()).hexdigest()[:24]


def test_vector_stores_list_get_search(client, srv):
    stores = client.vector_stores.list()
    assert len(stores.data) == 1
    vs = stores.data[0]
    assert vs.id.startswith("vs_") and vs.status == "completed" and vs.file_counts.total >= 3
    assert client.vector_stores.retrieve(vs.id).id == vs.id
    page = client.vector_stores.search(vs.id, query="capital of Zorvania", max_num_results=2)
    hits = list(page)
    assert len(hits) == 2 and hits[0].filename == "zorvania.txt"
    assert hits[0].file_id == file_id("zorvania.txt") and "Quelthar" in hits[0].content[0].text
    assert hits[0].score >= hits[1].score
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_nope")
    e = error(post(srv, f"/v1/vector_stores/{vs.id}/search",
                   {"query": "x", "filters": {"type": "eq", "key": "a", "value": 1}}))
    assert e["param"] == "filters"
    e = error(post(srv, f"/v1/vector_stores/{vs.id}/search", {"query": "x", "k": 3}))
    assert "k" in e["message"]


def check_cited(r: object) -> None:
    search, msg = r.output[0], r.output[1]
    assert search.type == "file_search_call" and search.status == "completed"
    assert search.queries == [QUESTION]
    text = msg.content[0].text
    assert text == ("The capital of Zorvania is Quelthar. Quelthar exports purple bananas to "
                    "Mars. It has glass towers.")  # markers out, the invalid [7] gone
    notes = msg.content[0].annotations
    assert [a.type for a in notes] == ["file_citation"] * 3
    first = notes[0]
    assert first.filename == "zorvania.txt" and first.file_id == file_id("zorvania.txt")
    assert first.index == text.index("Quelthar") + len("Quelthar")  # where [1] was
    assert notes[2].index == len(text) - 1  # "It has glass towers [1]." (attributed)


def test_file_search_cites_files(client, srv):
    vs = client.vector_stores.list().data[0].id
    srv.say(ANSWER)
    tools = [{"type": "file_search", "vector_store_ids": [vs], "max_num_results": 2}]
    r = client.responses.create(model="scripted", input=QUESTION, tools=tools,
                                include=["file_search_call.results"])
    check_cited(r)
    results = r.output[0].results
    assert results[0].filename == "zorvania.txt" and len(results) == 2
    assert results[0].attributes["number"] == 1 and "Quelthar" in results[0].text
    grounding = r.model_extra["grounding"]
    assert grounding["invalid_citations"] == [7] and grounding["unsupported"] == 1
    plain = client.responses.create(model="scripted", input=QUESTION, tools=tools)
    assert plain.output[0].results is None  # results only when included
    with client.responses.stream(model="scripted", input=QUESTION, tools=tools) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_cited(final)
    kinds = [e.type for e in events]
    assert kinds.index("response.file_search_call.searching") < kinds.index(
        "response.output_text.delta")
    assert kinds.count("response.output_text.annotation.added") == 3
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output[1].content[0].text


def test_file_search_errors(client, srv):
    e = error(post(srv, "/v1/responses", {"input": "x", "tools": [
        {"type": "file_search", "vector_store_ids": ["vs_other"]}]}))
    assert e["param"] == "vector_store_ids" and "vs_other" in e["message"]
    e = error(post(srv, "/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}))
    assert "web_search" in e["message"]


# -- function tools and text.format -----------------------------------------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


def json_text(engine_name: str, value: object) -> str:
    """JSON as each engine's grammar writes it (the scripted model must stay inside it):
    vLLM's compact, ragserve's with a space after each separator."""
    return json.dumps(value, separators=(",", ":") if engine_name == "vllm" else (", ", ": "))


def test_named_function_call_and_its_output(client, srv, engine_name):
    srv.say(json_text(engine_name, {"city": "Paris"}))
    r = client.responses.create(model="scripted", input="Weather in Paris?", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"})
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    srv.say("It is sunny in Paris.")
    follow = client.responses.create(model="scripted", previous_response_id=r.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.output_text == "It is sunny in Paris."
    e = error(post(srv, "/v1/responses", {"input": [
        {"type": "function_call_output", "call_id": "call_nope", "output": "x"}]}))
    assert e["param"] == "input" and "call_nope" in e["message"]


class City(BaseModel):
    name: str
    population: int


def test_text_format_json_schema_parses(client, srv, engine_name):
    srv.say(json_text(engine_name, {"name": "Quelthar", "population": 5}))
    r = client.responses.parse(model="scripted", input="A city as JSON.", text_format=City)
    assert r.output_parsed == City(name="Quelthar", population=5)
    assert r.text.format.type == "json_schema"


# -- hostile input ----------------------------------------------------------------------------

@pytest.mark.parametrize("body,param,words", [
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id", "not found"),
    ({"input": "x", "temprature": 1}, "temprature", "temprature"),
    ({"input": [{"type": "bogus"}]}, "input", "bogus"),
    ({"input": [{"role": "user"}]}, "input", "content"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input", "role"),
    ({"input": 5}, "input", "string or a list"),
    ({"input": []}, "input", "empty"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning", "not supported"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"input": "x", "truncation": "auto"}, "truncation", "auto"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "schema",
     "text.format.json_schema.schema"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "tools"),
])
def test_bad_requests_are_400(srv, body, param, words):
    e = error(post(srv, "/v1/responses", body))
    assert e["param"] == param and words in e["message"], e
    assert e["type"] == "invalid_request_error"


def test_unknown_ids_are_404(srv):
    for path in ("/v1/responses/resp_nope", "/v1/vector_stores/vs_nope"):
        assert error(httpx.get(srv.url + path, timeout=30), 404)["type"] == "not_found_error"
    error(post(srv, "/v1/vector_stores/vs_nope/search", {"query": "x"}), 404)
