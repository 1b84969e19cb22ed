"""RAG end to end: index build, the server with --index, /v1/retrieve, `rag` chat requests
through the openai client (plain and streamed), citations, the grounding check, metrics; once
per engine under test.

The retriever is a tiny ColBERT checkpoint built in the test (a soft lexical matcher). A tiny
random LLM cannot be made to cite, so the model here is scripted to spell a fixed answer, set by
each test: with ragserve's engine a backend whose logits spell it, with vLLM's a logits
processor loaded into vLLM's engine (tests/vllm_script.py). Everything else (scheduler, runner,
prompt building, retrieval, grounding, HTTP) is the production code.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import StubBackend
from serverutil import ThreadServer, engine_flags, metric, start_subprocess, wait_ready

from bucketing import BucketConfig
from engine.core import Engine
from retrieval.encoder import ColBERTEncoder
from retrieval.index import PassageIndex
from runtime.runner import ModelRunner
from scheduler import Scheduler
from server.app import build_app
from server.config import ServerConfig

EOT = 128009


class ScriptedBackend(StubBackend):
    """Logits that spell ``script`` after any prompt: the token at generated position ``j`` is
    ``script[j]``, then <|eot_id|>. Prefill records each slot's prompt length."""

    def __init__(self, buckets: BucketConfig, vocab_size: int) -> None:
        super().__init__(buckets, vocab_size)
        self.script: list[int] = []
        self.prompt_len: dict[int, int] = {}

    def forward(self, input_ids, cache_ids, start_ids, last_token_id) -> torch.Tensor:
        logits = torch.full((input_ids.shape[0], self.vocab_size), -1e4)
        for b in range(input_ids.shape[0]):
            if input_ids.shape[1] > 1:  # prefill: generated position 0 comes next
                slot, j = int(start_ids[b]), 0
                self.prompt_len[slot] = int(last_token_id[b]) + 1
            else:
                slot = b
                j = int(cache_ids[b, 0]) - self.prompt_len.get(slot, 0) + 1
            logits[b, self.script[j] if 0 <= j < len(self.script) else EOT] = 0.0
        return logits


class RagServer:
    """A running server with --index, and how to set the answer its model writes."""

    def __init__(self, url: str, tokenizer: object, set_script: object) -> None:
        self.url, self.tokenizer, self.set_script = url, tokenizer, set_script

    def say(self, text: str) -> None:
        self.set_script(self.tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def rag_server(engine_name: str, index_dir: Path, llama3_tokenizer_dir: Path, tiny_llama_dir: Path,
               tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    if engine_name == "ragserve":  # in-process, on a scripted backend
        buckets = BucketConfig.default(512, 2, context_encoding_buckets=(128, 256, 384),
                                       token_generation_buckets=(512,))
        backend = ScriptedBackend(buckets, len(tokenizer))

        def factory() -> Engine:
            return Engine(Scheduler(buckets, [EOT]), ModelRunner(backend), tokenizer,
                          "scripted")

        def set_script(ids: list[int]) -> None:
            backend.script = ids

        config = ServerConfig(index=index_dir, grounding_threshold=0.8, rag_answer_tokens=64)
        with ThreadServer(build_app(config, factory=factory)) as srv:
            wait_ready(srv.url, {})
            yield RagServer(srv.url, tokenizer, set_script)
        return
    # vLLM's engine on the tiny model (same tokenizer), scripted by a logits processor
    tmp = tmp_path_factory.mktemp("rag-vllm")
    script = tmp / "script.json"

    def write_script(ids: list[int]) -> None:
        script.write_text(json.dumps(ids))

    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", "scripted", "--dtype", "float32",
        "--max-model-len", "512", "--max-num-seqs", "2", "--index", str(index_dir),
        "--grounding-threshold", "0.8", "--rag-answer-tokens", "64", *engine_flags(engine_name),
        "--vllm-arg", 'logits_processors=["vllm_script:ScriptedLogits"]',
    ], tmp / "server.log", env={"RAGSERVE_TEST_SCRIPT": str(script)})
    try:
        wait_ready(url, proc=proc)
        yield RagServer(url, tokenizer, write_script)
    finally:
        proc.terminate()
        proc.wait(60)
        print((tmp / "server.log").read_text()[-3000:])


def say(srv: RagServer, text: str) -> None:
    srv.say(text)


@pytest.fixture
def client(rag_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{rag_server.url}/v1", api_key="none", max_retries=0,
                         timeout=60)


QUESTION = [{"role": "user", "content": "What is the capital of Zorvania?"}]
ANSWER = ("The capital of Zorvania is Quelthar [1]. Quelthar exports purple bananas to Mars [2]. "
          "It has glass towers [7].")


def test_retrieve_finds_the_passage(rag_server, tiny_colbert_dir):
    r = httpx.post(f"{rag_server.url}/v1/retrieve",
                   json={"query": "capital of Zorvania", "k": 2}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == str(tiny_colbert_dir)  # the encoder the index was built with
    top = body["data"][0]
    assert top["doc_id"] == "zorvania.txt" and "Quelthar" in top["text"]
    assert top["score"] > body["data"][1]["score"]
    assert {"chunk_id", "source", "page", "start", "end"} <= top.keys()


def test_retrieve_mode_per_request(rag_server):
    url = f"{rag_server.url}/v1/retrieve"
    hybrid = httpx.post(url, json={"query": "Brindle engines", "k": 2}, timeout=30).json()
    assert hybrid["data"][0]["doc_id"] == "brindle.md"  # the index's mode: hybrid
    assert set(hybrid["data"][0]["scores"]) == {"late_interaction", "lexical"}
    for mode in ("lexical", "late_interaction"):
        r = httpx.post(url, json={"query": "Brindle engines", "k": 2, "mode": mode}, timeout=30)
        assert r.status_code == 200, r.text
        top = r.json()["data"][0]
        assert top["doc_id"] == "brindle.md" and set(top["scores"]) == {mode}
    r = httpx.post(url, json={"query": "x", "mode": "bm25"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    r = httpx.post(f"{rag_server.url}/v1/chat/completions", timeout=30, json={
        "messages": QUESTION, "rag": {"retrieval": "lexical", "citations": "all"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "citations"


def test_rag_answer_with_sources_and_grounding(client, rag_server):
    say(rag_server, ANSWER)
    r = client.chat.completions.create(model="scripted", messages=QUESTION, temperature=0,
                                       extra_body={"rag": {"top_k": 2}})
    extra = r.model_extra
    sources = extra["sources"]
    assert [s["number"] for s in sources] == [1, 2]
    assert sources[0]["doc_id"] == "zorvania.txt" and "Quelthar" in sources[0]["text"]
    grounding = extra["grounding"]
    # [7] points to no passage: removed from the answer and reported
    assert grounding["invalid_citations"] == [7]
    assert "[7]" not in r.choices[0].message.content
    # the sentence left uncited is cited by attribution (citations: auto, the default)
    assert r.choices[0].message.content.endswith("It has glass towers [1].")
    by_text = {s["text"]: s for s in grounding["sentences"]}
    good = by_text["The capital of Zorvania is Quelthar [1]."]
    fabricated = by_text["Quelthar exports purple bananas to Mars [2]."]
    added = by_text["It has glass towers [1]."]
    assert good["supported"] is True and good["citations"] == [1] and good["attributed"] == []
    assert fabricated["supported"] is False and fabricated["support"] < good["support"]
    assert added["citations"] == added["attributed"] == [1] and added["supported"] is True
    assert grounding["unsupported"] == 1 and grounding["mode"] == "report"
    assert grounding["citations"] == "auto" and grounding["attributed"] == 1


def test_model_citations_only(client, rag_server):
    say(rag_server, ANSWER)
    r = client.chat.completions.create(model="scripted", messages=QUESTION, extra_body={
        "rag": {"top_k": 2, "citations": "model"}})
    assert r.choices[0].message.content.endswith("[2]. It has glass towers.")
    assert r.model_extra["grounding"]["attributed"] == 0


PLAIN = "The capital of Zorvania is Quelthar. A Brindle engine needs servicing every ninety days."


def test_answer_without_citations_comes_back_cited(client, rag_server):
    """The model writes no citation; each sentence is cited with the passage that holds it."""
    say(rag_server, PLAIN)
    question = [{"role": "user", "content": "Tell me about Zorvania and Brindle engines."}]
    r = client.chat.completions.create(model="scripted", messages=question,
                                       extra_body={"rag": {"top_k": 3}})
    sources = {s["number"]: s["doc_id"] for s in r.model_extra["sources"]}
    grounding = r.model_extra["grounding"]
    first, second = grounding["sentences"]
    assert sources[first["attributed"][0]] == "zorvania.txt"
    assert sources[second["attributed"][0]] == "brindle.md"
    n1, n2 = first["attributed"][0], second["attributed"][0]
    assert r.choices[0].message.content == (
        f"The capital of Zorvania is Quelthar [{n1}]. A Brindle engine needs servicing every "
        f"ninety days [{n2}].")
    # streamed through the openai client: sentence by sentence, the same cited text
    stream = client.chat.completions.create(model="scripted", messages=question, stream=True,
                                            extra_body={"rag": {"top_k": 3}})
    pieces = [c.choices[0].delta.content for c in stream
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == r.choices[0].message.content
    assert pieces[0] == f"The capital of Zorvania is Quelthar [{n1}]."  # a whole sentence


def test_attribute_replaces_the_models_citations(client, rag_server):
    say(rag_server, "Quelthar is the capital of Zorvania [2]. I don't know the rest.")
    r = client.chat.completions.create(model="scripted", messages=QUESTION, extra_body={
        "rag": {"top_k": 2, "citations": "attribute"}})
    assert r.choices[0].message.content == ("Quelthar is the capital of Zorvania [1]. "
                                            "I don't know the rest.")
    first, refusal = r.model_extra["grounding"]["sentences"]
    assert first["attributed"] == [1] and refusal["citations"] == []


def test_prompt_holds_numbered_passages_and_instructions(rag_server):
    say(rag_server, "ok")
    r = httpx.post(f"{rag_server.url}/v1/chat/completions", timeout=30, json={
        "messages": QUESTION, "rag": {"top_k": 3}, "max_tokens": 4})
    assert r.status_code == 200, r.text
    n_prompt = r.json()["usage"]["prompt_tokens"]
    plain = httpx.post(f"{rag_server.url}/tokenize", json={"messages": QUESTION}, timeout=30)
    assert n_prompt > plain.json()["count"] + 40  # the passages are in the prompt
    from server.rag import RAG_INSTRUCTIONS, rag_messages

    assert "I don't know" in RAG_INSTRUCTIONS and "[1]" in RAG_INSTRUCTIONS
    msgs = rag_messages([{"role": "system", "content": "Be brief."}, *QUESTION], [])
    assert msgs[0]["content"].endswith("Be brief.") and len(msgs) == 2


def test_strip_mode_removes_unsupported_sentences(client, rag_server):
    say(rag_server, ANSWER)
    r = client.chat.completions.create(model="scripted", messages=QUESTION,
                                       extra_body={"rag": {"top_k": 2, "grounding": "strip"}})
    assert r.choices[0].message.content == ("The capital of Zorvania is Quelthar [1]. "
                                            "It has glass towers [1].")
    assert r.model_extra["grounding"]["removed_sentences"] == 1


@pytest.mark.parametrize("citations", ["model", "auto"])
def test_streaming_sends_sources_first_and_grounding_last(rag_server, citations):
    say(rag_server, ANSWER)
    events = []
    with httpx.stream("POST", f"{rag_server.url}/v1/chat/completions", timeout=30, json={
            "messages": QUESTION, "rag": {"top_k": 2, "citations": citations},
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert "sources" in events[0] and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum("sources" in e for e in events) == 1
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e["choices"])
    last = "It has glass towers." if citations == "model" else "It has glass towers [1]."
    assert text == "The capital of Zorvania is Quelthar [1]. Quelthar exports purple bananas " \
                   "to Mars [2]. " + last  # the invalid [7] never went out
    assert events[-1]["choices"] == [] and events[-1]["grounding"]["invalid_citations"] == [7]
    finish = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"


def test_plain_requests_are_unchanged(client, rag_server):
    say(rag_server, "Hello there.")
    r = client.chat.completions.create(model="scripted", messages=QUESTION)
    assert r.choices[0].message.content == "Hello there."
    assert "sources" not in (r.model_extra or {})


def test_rag_errors_are_400(rag_server):
    url = f"{rag_server.url}/v1/chat/completions"
    r = httpx.post(url, json={"messages": [{"role": "system", "content": "x"}],
                              "rag": {}}, timeout=30)
    assert r.status_code == 400 and "user message" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": QUESTION, "rag": {"top_k": 0}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = httpx.post(url, json={"messages": QUESTION, "rag": {"topk": 3}}, timeout=30)
    assert r.status_code == 400 and "topk" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": QUESTION, "rag": {}, "n": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{rag_server.url}/v1/retrieve", json={"query": "", "k": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"
    r = httpx.post(f"{rag_server.url}/v1/retrieve", json={"query": "x", "k": 1000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "k"


def test_passages_that_do_not_fit_are_left_out(rag_server):
    say(rag_server, "ok")
    r = httpx.post(f"{rag_server.url}/v1/chat/completions", timeout=30, json={
        "messages": QUESTION, "rag": {"top_k": 3, "max_context_tokens": 60}, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert 1 <= len(r.json()["sources"]) < 3


def test_models_ready_and_metrics_show_the_retriever(rag_server):
    models = httpx.get(f"{rag_server.url}/v1/models", timeout=30).json()
    retriever = models["data"][0]["retriever"]
    assert retriever["status"] == "ready" and retriever["passages"] >= 3
    assert retriever["backend"] == "exact"
    ready = httpx.get(f"{rag_server.url}/ready", timeout=30).json()
    assert ready["retriever"]["status"] == "ready"
    text = httpx.get(f"{rag_server.url}/metrics", timeout=30).text
    assert metric(text, "ragserve_retrieval_seconds_count") >= 1
    assert metric(text, "ragserve_retrieved_passages_count") >= 1
    assert metric(text, "ragserve_unsupported_citations_total", kind="invalid") >= 1
    assert metric(text, "ragserve_unsupported_citations_total", kind="unsupported") >= 1
    assert metric(text, "ragserve_citations_total", origin="model") >= 1
    assert metric(text, "ragserve_citations_total", origin="attributed") >= 1


def test_server_without_index_says_how_to_enable_rag(tiny_colbert_dir, llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    buckets = BucketConfig.default(256, 1, context_encoding_buckets=(128, 256),
                                   token_generation_buckets=(256,))

    def factory() -> Engine:
        return Engine(Scheduler(buckets, [EOT]),
                      ModelRunner(ScriptedBackend(buckets, len(tokenizer))), tokenizer, "s")

    with ThreadServer(build_app(ServerConfig(), factory=factory)) as srv:
        wait_ready(srv.url, {})
        for path, body in [("/v1/retrieve", {"query": "x"}),
                           ("/v1/chat/completions", {"messages": QUESTION, "rag": {}})]:
            r = httpx.post(srv.url + path, json=body, timeout=30)
            assert r.status_code == 400 and "--index" in r.json()["error"]["message"]


def test_index_built_with_another_encoder_fails_the_server(index_dir, tmp_path):
    from helpers import make_tiny_colbert_dir

    other = make_tiny_colbert_dir(tmp_path / "other", seed=5)
    with pytest.raises(Exception, match="built with encoder"):
        PassageIndex.load(index_dir, ColBERTEncoder(other))


def test_cli_search_and_info(index_dir, capsys):
    from server.cli import main

    assert main(["index", "search", "glass towers harbour", "--index", str(index_dir),
                 "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out.strip())
    assert hit["doc_id"] == "zorvania.txt" and hit["rank"] == 1
    assert main(["index", "info", str(index_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["passages"] >= 3 and info["encoder"]["settings"]["dim"] == 64


def test_cli_add_replaces_and_extends(index_dir, docs_dir, tmp_path, tiny_colbert_dir):
    import shutil

    from server.cli import main

    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    more = tmp_path / "more"
    more.mkdir()
    (more / "veltra.txt").write_text("Veltra moss glows blue under moonlight.")
    assert main(["index", "add", str(more), "--index", str(idx)]) == 0
    index = PassageIndex.load(idx, ColBERTEncoder(tiny_colbert_dir))
    assert "veltra.txt" in index.doc_ids and "zorvania.txt" in index.doc_ids
    assert index.search("moss glows", 1)[0].doc_id == "veltra.txt"
    assert main(["index", "search", "x", "--index", str(tmp_path / "nope")]) == 2


def test_empty_docs_folder_is_an_error(tmp_path, tiny_colbert_dir):
    from server.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["index", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "i"),
                 "--retriever-model", str(tiny_colbert_dir)]) == 2
    assert not (tmp_path / "i" / "CURRENT").exists()
