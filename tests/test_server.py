"""A real ragserve server (``python -m server`` on 127.0.0.1) driven by the official `openai`
client and by raw HTTP for every error case, once per engine under test (``make test``:
ragserve's; ``make test-vllm``: vLLM's): everything above the engine is the same code."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from serverutil import engine_flags, metric, start_subprocess, wait_ready

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
MSG = [{"role": "user", "content": "Tell me about buckets."}]


@pytest.fixture(scope="module")
def server(engine_name: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    buckets = ["--context-encoding-buckets", "16,32,64,128", "--token-generation-buckets",
               "32,64,128,256"] if engine_name == "ragserve" else []
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--api-key", KEY,
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
        "--max-queue-len", "4", "--max-request-bytes", "20000", *buckets,
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
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server: str, path: str, body: object, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers=headers or AUTH, timeout=60)


def greedy(**kw: object) -> dict:
    return dict(temperature=0, extra_body={"ignore_eos": True}, **kw)


# -- the openai client ----------------------------------------------------------------------

def test_chat_non_streaming_with_correct_usage(client: openai.OpenAI, server: str):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, **greedy())
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    n_prompt = post(server, "/tokenize", {"messages": MSG}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == n_prompt + 12


def test_streaming_equals_non_streaming_and_reports_usage(client: openai.OpenAI):
    full = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=20, **greedy())
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=20, stream=True,
        stream_options={"include_usage": True}, **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_reports_the_prompt_tokens_a_repeated_prefix_reused(client: openai.OpenAI,
                                                                   engine_name: str):
    # within ragserve's largest prefill bucket here (128); on vLLM, longer than one whole KV
    # block (its CPU build caches 128-token blocks)
    repeats = 20 if engine_name == "ragserve" else 45
    long = [{"role": "user", "content": "Describe the buckets. " * repeats + "Be brief."}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2, **greedy())
    n = first.usage.prompt_tokens
    again = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2, **greedy())
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=long, max_tokens=2, stream=True,
        stream_options={"include_usage": True}, **greedy()))
    for usage in (again.usage, chunks[-1].usage):
        cached = usage.prompt_tokens_details.cached_tokens
        assert usage.prompt_tokens == n and 0 < cached < n
        if engine_name == "ragserve":  # all but the last prompt token, whose logits are needed
            assert cached == n - 1
    other = [{"role": "user", "content": "Something else entirely."}]
    r = client.chat.completions.create(model=MODEL, messages=other, max_tokens=2, **greedy())
    assert r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens


def test_completions_same_tokens_as_chat_for_the_templated_prompt(client, server):
    ids = post(server, "/tokenize", {"messages": MSG}).json()["tokens"]
    chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=10, **greedy())
    comp = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, **greedy())
    assert comp.choices[0].text == chat.choices[0].message.content
    assert comp.usage.prompt_tokens == len(ids)


def test_completions_default_max_tokens_echo_n_and_stop(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", **greedy())
    assert r.usage.completion_tokens == 16  # OpenAI's default for completions
    text = r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="Once upon a time", echo=True,
                                  max_tokens=16, **greedy())
    assert r.choices[0].text == "Once upon a time" + text
    stop = text[3:6]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                  stop=[stop], temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=["a b", "c d e"], n=2, max_tokens=5,
                                  temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text  # n samples differ (seed, seed + 1)
    again = client.completions.create(model=MODEL, prompt=["a b", "c d e"], n=2, max_tokens=5,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_logprobs_chat_and_completions(client: openai.OpenAI):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, logprobs=True,
                                       top_logprobs=3, **greedy())
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for tok in content:
        assert len(tok.top_logprobs) == 3
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob)  # greedy: the top one
        assert tok.logprob <= 0
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=2,
                                  **greedy())
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0


def test_async_client_concurrent_requests_match_sequential(client: openai.OpenAI, server):
    prompts = [f"Request number {i} says" for i in range(8)]
    seq = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, **greedy())
           .choices[0].text for p in prompts]

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*[
            aclient.completions.create(model=MODEL, prompt=p, max_tokens=12, **greedy())
            for p in prompts])
        await aclient.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(run()) == seq


def test_async_streaming(server: str):
    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        stream = await aclient.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8,
                                                       stream=True, **greedy())
        out = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await aclient.close()
        return out

    assert len("".join(asyncio.run(run()))) > 0


def test_models_tokenize_detokenize(client: openai.OpenAI, server: str):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_dump()["max_model_len"] == 256
    ids = post(server, "/tokenize", {"prompt": "hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 256
    text = post(server, "/detokenize", {"tokens": ids["tokens"]}).json()["prompt"]
    assert text.endswith("hello world")


# -- raw HTTP: the SSE wire format and every error case ------------------------------------

def test_sse_wire_format(server: str):
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, timeout=60, json={
            "model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def _get_on(sock: socket.socket, path: str) -> int:
    """Send one GET on ``sock`` and read its whole response; the status (0: the server had
    closed the connection)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
                 f"\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def test_an_idle_connection_outlives_a_five_second_retry_after(server: str):
    # with uvicorn's 5 s default the server closed an idle connection just as a client that
    # had slept a 5 s Retry-After reused it: a broken read on a request the server never saw
    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        assert _get_on(sock, "/v1/models") == 200
        time.sleep(6)
        assert _get_on(sock, "/v1/models") == 200  # the same connection, still open


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
    ({"logit_bias": {"one": 2}}, "logit_bias", "logit_bias key 'one' is not a token id"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"max_tokens": 1000}, "max_tokens", "exceeds max_model_len (256)"),
    ({"messages": []}, "messages", "at least 1"),
    ({"stream_options": {"include_usage": True}}, None, "only allowed when stream is true"),
])
def test_400_for_invalid_parameters(server: str, body: dict, param: str | None, text: str):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert text in err["message"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_400_prompt_too_long_names_the_limits(server: str, engine_name: str):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": list(range(1000, 1200))})
    if engine_name == "ragserve":  # past the largest prefill graph; vLLM has no such limit
        assert r.status_code == 400
        msg = r.json()["error"]["message"]
        assert "prompt has 200 tokens" in msg and "largest prefill bucket is 128" in msg
    else:
        assert r.status_code == 200
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": list(range(1000, 1256))})
    assert r.status_code == 400
    assert "prompt has 256 tokens" in r.json()["error"]["message"]
    assert "max_model_len is 256" in r.json()["error"]["message"]


def test_400_for_malformed_json(server: str):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=10,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


BODY_ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
               "/v1/retrieve", "/invocations"]
HOSTILE = {
    "truncated": (b'{"model": "tiny", "prompt": "hi"', "Expecting"),
    "invalid UTF-8": (b'{"prompt": "\xff\xfe"}', "not valid UTF-8 (byte 12)"),
    "NaN": (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "NaN is not valid JSON"),
    "Infinity": (b'{"model": "tiny", "prompt": "hi", "top_p": -Infinity}', "-Infinity is not"),
    "deep 40": (b"[" * 40 + b"]" * 40, "nests deeper than 32 levels"),
    "deep 1,500": (b"[" * 1500 + b"]" * 1500, "nests deeper than 32 levels"),
    "deep 3,000": (b'{"a":' * 3_000 + b"1" + b"}" * 3_000, "nests deeper than 32"),  # 19 kB
    "empty": (b"", "the body is empty"),
    "lone surrogate": (b'{"model": "tiny", "prompt": "a\\ud800b"}', "lone UTF-16 surrogate"),
}


def assert_openai_error(r: httpx.Response, status: int, text: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and text in err["message"], err
    return err


@pytest.mark.parametrize("route", BODY_ROUTES)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bodies_get_an_openai_400_on_every_route(server: str, route: str, case: str):
    body, text = HOSTILE[case]
    r = httpx.post(f"{server}{route}", content=body, timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    assert_openai_error(r, 400, text)


@pytest.mark.parametrize("route", BODY_ROUTES)
def test_non_object_bodies_and_wrong_content_types(server: str, route: str):
    for body in (b"[1, 2]", b'"text"', b"17", b"null"):
        r = httpx.post(f"{server}{route}", content=body, timeout=30,
                       headers={**AUTH, "content-type": "application/json"})
        assert_openai_error(r, 400)
    r = httpx.post(f"{server}{route}", content=b'{"prompt": "hi"}', timeout=30,
                   headers={**AUTH, "content-type": "text/plain"})
    assert_openai_error(r, 415, "Content-Type 'text/plain' is not supported")


def test_json_without_a_content_type_is_read_as_json(server: str):
    r = httpx.post(f"{server}/tokenize", content=b'{"prompt": "hello"}', timeout=30,
                   headers=AUTH)
    assert r.status_code == 200 and r.json()["count"] >= 1


def test_unknown_paths_methods_and_bad_tokenize_bodies(server: str):
    err = assert_openai_error(httpx.get(f"{server}/v1/nope", headers=AUTH), 404, "/v1/nope")
    assert err["type"] == "not_found_error"
    r = httpx.get(f"{server}/v1/completions", headers=AUTH)
    assert_openai_error(r, 405, "method GET is not allowed on /v1/completions")
    assert r.headers["allow"] == "POST"
    assert_openai_error(post(server, "/tokenize", {"messages": []}), 400, "at least 1")
    assert_openai_error(post(server, "/tokenize", {}), 400, "exactly one of prompt or messages")
    assert_openai_error(post(server, "/detokenize", {"tokens": [2**70]}), 400,
                        "outside the vocabulary")


def test_echo_returns_the_prompt_as_sent(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt="  Hello there", echo=True, max_tokens=2,
                                  **greedy())
    assert r.choices[0].text.startswith("  Hello there")
    ids = [9906, 1070]  # "Hello there" in the Llama 3 vocabulary
    r = client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=2, **greedy())
    assert r.choices[0].text.startswith("Hello there")


def test_401_everywhere_but_health_and_ping(server: str):
    for path in ("/health", "/ping"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 200
    health = httpx.get(f"{server}/health", timeout=10)
    assert health.content == b"" and "content-type" not in health.headers  # as vLLM's
    for method, path in [("GET", "/v1/models"), ("GET", "/ready"), ("GET", "/metrics"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                         ("GET", "/openapi.json"), ("POST", "/invocations")]:
        r = httpx.request(method, f"{server}{path}", timeout=10,
                          headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.request(method, f"{server}{path}", timeout=10).status_code == 401


def test_404_unknown_model(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=MSG, max_tokens=2)


def test_413_body_over_the_limit_declared_or_chunked(server: str):
    big = {"model": MODEL, "prompt": "x" * 30000}
    r = post(server, "/v1/completions", big)
    assert r.status_code == 413 and "--max-request-bytes (20000" in r.json()["error"]["message"]

    def chunks():
        yield json.dumps(big).encode()

    r = httpx.post(f"{server}/v1/completions", content=chunks(), timeout=10,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_429_with_retry_after_when_the_queue_is_full(server: str):
    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as c:
            body = {"model": MODEL, "prompt": "long", "max_tokens": 200, "ignore_eos": True}
            tasks = [asyncio.ensure_future(c.post(f"{server}/v1/completions", json=body))
                     for _ in range(8)]  # 4 running + 4 waiting fill the queue (max 4)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = (await c.get(f"{server}/metrics")).text
                if metric(text, "vllm:num_requests_waiting") >= 4:
                    break
                await asyncio.sleep(0.02)
            extra = await c.post(f"{server}/v1/completions", json=body)
            assert int(extra.headers["retry-after"]) >= 1  # an estimate (server.admission)
            assert "queue is full" in extra.json()["error"]["message"]
            return [extra.status_code] + [(await t).status_code for t in tasks]

    codes = asyncio.run(run())
    assert codes[0] == 429
    assert codes[1:] == [200] * 8


def test_disconnect_mid_stream_aborts_and_frees_the_slot(server: str, engine_name: str):
    before = httpx.get(f"{server}/metrics", headers=AUTH).text
    aborted = metric(before, "vllm:request_success_total", finished_reason="abort")
    generated = metric(before, "vllm:generation_tokens_total")
    with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, timeout=60, json={
            "model": MODEL, "prompt": "go", "max_tokens": 250, "ignore_eos": True,
            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{server}/metrics", headers=AUTH).text
        if metric(text, "vllm:num_requests_running") == 0 and \
                metric(text, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.01)
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:kv_cache_usage_perc") == 0
    # stopped, not run to the end: far fewer than the 250 tokens asked for
    assert metric(text, "vllm:generation_tokens_total") - generated < 200
    if engine_name == "ragserve":  # vLLM counts only the requests that finish in its engine core
        assert metric(text, "vllm:request_success_total", finished_reason="abort") == aborted + 1


def test_invocations_takes_chat_and_completion_bodies(server: str):
    r = post(server, "/invocations", {"messages": MSG, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = post(server, "/invocations", {"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = post(server, "/invocations", {"input": "hi"})
    assert r.status_code == 400


def test_ready_reports_the_engine_and_its_buckets(server: str, engine_name: str):
    body = httpx.get(f"{server}/ready", headers=AUTH).json()
    assert body["status"] == "ready" and body["model"] == MODEL and body["engine"] == engine_name
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"]
    assert models[0]["engine"] == engine_name
    if engine_name == "ragserve":
        assert body["context_encoding_buckets"] == [16, 32, 64, 128]
        assert body["token_generation_buckets"] == [32, 64, 128, 256]
    else:  # no bucket graphs: nothing to report
        assert "context_encoding_buckets" not in body


# vLLM's names: exported by ragserve's engine and by vLLM's own PrometheusStatLogger
ENGINE_SERIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:iteration_tokens_total_bucket"]
# the server's own: the same with either engine
SERVER_SERIES = ["ragserve_token_delivery_seconds_bucket", "ragserve_http_requests_total"]
# ragserve's engine only: its bucket graphs and steps
RAGSERVE_ENGINE_SERIES = ["ragserve_bucket_selected_total", "ragserve_padding_tokens_total",
                          "ragserve_engine_step_seconds_bucket"]


def test_metrics_use_vllm_names(client: openai.OpenAI, server: str, engine_name: str):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=5, **greedy())
    list(client.completions.create(model=MODEL, prompt="streamed", max_tokens=5, stream=True,
                                   **greedy()))
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    expected = ENGINE_SERIES + SERVER_SERIES
    expected += RAGSERVE_ENGINE_SERIES if engine_name == "ragserve" else []
    for name in expected:
        assert metric(text, name, model_name=MODEL) > 0 or (
            re.search(rf'^{re.escape(name)}{{[^}}]*model_name="{MODEL}"', text, re.M)), name
    assert metric(text, "vllm:request_success_total", finished_reason="length") >= 1
    assert metric(text, "ragserve_token_delivery_seconds_count") >= 3  # streamed, not finals
    assert metric(text, "ragserve_http_requests_total", route="/v1/completions",
                  status="200") >= 2
    if engine_name == "ragserve":
        assert metric(text, "ragserve_bucket_selected_total", phase="prefill", bucket="16") >= 1
        # exact shapes: a prompt runs unpadded (the series' presence is checked above)
        assert metric(text, "ragserve_padding_tokens_total", phase="prefill") == 0
        # the test server pins step=eager (serverutil.engine_flags); the rest was chosen here
        assert metric(text, "ragserve_kernel_info", shape_class="decode_step",
                      kernel="eager") == 1
        assert metric(text, "ragserve_kernel_info", shape_class="decode_attention") == 1
        assert metric(text, "ragserve_kernels_pending", model_name=MODEL) == 0
    else:
        assert "ragserve_bucket_selected" not in text


def test_no_metric_is_registered_twice(server: str):
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert types and len(types) == len(set(types)), sorted(
        t for t in set(types) if types.count(t) > 1)
    r = httpx.post(f"{server}/v1/completions", json={"model": "nope", "prompt": "x"},
                   headers=AUTH, timeout=30)
    assert r.status_code == 404
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert metric(text, "ragserve_http_requests_total", route="/v1/completions",
                  status="404") >= 1


def test_openapi_describes_every_route(server: str):
    spec = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    paths = spec["paths"]
    for path, method in [("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                         ("/v1/models", "get"), ("/tokenize", "post"), ("/detokenize", "post"),
                         ("/health", "get"), ("/ready", "get"), ("/metrics", "get"),
                         ("/ping", "get"), ("/invocations", "post")]:
        assert method in paths[path], path
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest")
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
