"""POST /v1/embeddings, /v1/rerank, /v2/rerank and /v1/score from the in-process retriever
encoder, against a real server with --index (the tiny ColBERT checkpoint of conftest.py),
through the official openai client, LangChain's OpenAIEmbeddings and plain HTTP.

The pooled vectors are checked against mean pooling computed here with transformers' own
BertModel; the scores against the encoder's MaxSim. The LLM is a scripted stub: these routes
never reach it. One test runs on each engine under test (``engines``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import FACTS
from serverutil import ThreadServer, engine_flags, start_subprocess, wait_ready
from test_rag_server import EOT, ScriptedBackend

from bucketing import BucketConfig
from engine.core import Engine
from retrieval.encoder import ColBERTEncoder
from runtime.runner import ModelRunner
from scheduler import Scheduler
from server.app import build_app
from server.config import ServerConfig

MAX_BATCH = 8  # --max-embedding-batch of the test server
TEXTS = ["The capital of Zorvania is Quelthar.", "Brindle engines run on kelp oil.",
         "Marmots hibernate."]
ZORVANIA, BRINDLE, OSTRAVA = (FACTS["zorvania.txt"], FACTS["brindle.md"],
                              "The Ostravian marmot hibernates for seven months in limestone "
                              "burrows.")


@contextmanager
def scripted_server(config: ServerConfig, tokenizer_dir: Path) -> Iterator[str]:
    """A ready server for ``config`` on a scripted stub LLM named ``scripted``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    buckets = BucketConfig.default(512, 2, context_encoding_buckets=(128,),
                                   token_generation_buckets=(512,))
    backend = ScriptedBackend(buckets, len(tokenizer))

    def factory() -> Engine:
        return Engine(Scheduler(buckets, [EOT]), ModelRunner(backend), tokenizer, "scripted")

    with ThreadServer(build_app(config, factory=factory)) as srv:
        wait_ready(srv.url, {})
        yield srv.url


@pytest.fixture(scope="module")
def url(index_dir: Path, llama3_tokenizer_dir: Path):
    config = ServerConfig(index=index_dir, max_embedding_batch=MAX_BATCH)
    with scripted_server(config, llama3_tokenizer_dir) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def encoder(tiny_colbert_dir: Path) -> ColBERTEncoder:
    """The encoder as the server loads it (the dtype too: auto)."""
    return ColBERTEncoder(tiny_colbert_dir, name=str(tiny_colbert_dir))


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def n_tokens(encoder: ColBERTEncoder, text: str) -> int:
    return len(encoder.tokenizer(text, add_special_tokens=False)["input_ids"])


def reference_embeddings(ckpt: Path, texts: list[str]) -> torch.Tensor:
    """Mean pooling done independently: transformers' BertModel in float32 on the checkpoint's
    BERT weights (``bert.*``, or a plain BERT's), its last hidden state averaged over the
    attention mask, projected by ``linear`` if the checkpoint has one, L2-normalized: for
    all-MiniLM-L6-v2, what sentence-transformers computes (its modules: mean pooling,
    normalize)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    state = load_file(str(ckpt / "model.safetensors"))
    bert = BertModel(BertConfig.from_pretrained(str(ckpt)), add_pooling_layer=False).eval()
    bert.load_state_dict({k.removeprefix("bert."): v for k, v in state.items()
                          if not k.startswith(("linear.", "pooler."))}, strict=False)
    enc = AutoTokenizer.from_pretrained(str(ckpt))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    if "linear.weight" in state:
        pooled = pooled @ state["linear.weight"].T
    return torch.nn.functional.normalize(pooled, dim=-1)


# -- /v1/embeddings --------------------------------------------------------------------------


def test_embeddings_through_the_openai_client(client, encoder, tiny_colbert_dir):
    floats = client.embeddings.create(model="scripted", input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.model == str(tiny_colbert_dir) and floats.object == "list"
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert vectors.shape == (3, encoder.settings.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokens = sum(n_tokens(encoder, t) + 2 for t in TEXTS)  # [CLS] and [SEP] counted
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    # the client's default: it asks for base64 and decodes it back to floats
    default = client.embeddings.create(model="scripted", input=TEXTS)
    assert np.array_equal(np.array([d.embedding for d in default.data], np.float32), vectors)
    # base64 asked for: little-endian float32 bytes, bit for bit the float form
    b64 = client.embeddings.create(model="scripted", input=TEXTS, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                        for d in b64.data])
    assert np.array_equal(decoded, vectors)


def test_embeddings_are_mean_pooled(client, tiny_colbert_dir):
    got = client.embeddings.create(model="scripted", input=TEXTS, encoding_format="float")
    got = torch.tensor([d.embedding for d in got.data])
    want = reference_embeddings(tiny_colbert_dir, TEXTS)
    # the server's BERT runs in the CPU's auto dtype (bf16 where native): a bf16 tolerance
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.999
    assert torch.allclose(got, want, atol=2e-2)
    # and they mean something: a text is closest to itself, not to the others
    one = torch.tensor(client.embeddings.create(model="scripted", input=TEXTS[0],
                                                encoding_format="float").data[0].embedding)
    assert int((got @ one).argmax()) == 0


def test_token_ids_give_the_text_vectors(client, encoder):
    text = client.embeddings.create(model="scripted", input=TEXTS[:2], encoding_format="float")
    ids = [encoder.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:2]]
    many = client.embeddings.create(model="scripted", input=ids, encoding_format="float")
    one = client.embeddings.create(model="scripted", input=ids[1], encoding_format="float")
    assert [d.embedding for d in many.data] == [d.embedding for d in text.data]
    # alone, its batch has no padding: the same vector up to rounding
    assert np.allclose(one.data[0].embedding, text.data[1].embedding, atol=1e-3)
    assert many.usage.prompt_tokens == text.usage.prompt_tokens == sum(len(x) + 2 for x in ids)


def test_embeddings_model_and_dimensions(url, encoder, tiny_colbert_dir):
    dim = encoder.settings.dim
    for model in (None, "scripted", str(tiny_colbert_dir)):  # served name or encoder name
        body = {"input": "hi", "dimensions": dim} | ({"model": model} if model else {})
        assert post(url, "/v1/embeddings", body).status_code == 200
    e = error(post(url, "/v1/embeddings", {"model": "gpt-4", "input": "hi"}), 404)
    assert e["param"] == "model" and e["code"] == "model_not_found"
    assert str(tiny_colbert_dir) in e["message"]
    e = error(post(url, "/v1/embeddings", {"input": "hi", "dimensions": 32}))
    assert e["param"] == "dimensions" and str(dim) in e["message"]


def test_embeddings_limits(url, encoder):
    limit = encoder.bert.config.max_position_embeddings - 2
    long = "city " * (limit + 5)
    e = error(post(url, "/v1/embeddings", {"input": ["ok", long]}))
    assert e["param"] == "input" and f"the {limit} this encoder reads" in e["message"]
    assert "input[1]" in e["message"]
    # truncate_prompt_tokens: -1 cuts at the limit, k keeps the first k tokens
    ids = encoder.tokenizer.encode(long, add_special_tokens=False)
    cut = post(url, "/v1/embeddings", {"input": long, "truncate_prompt_tokens": -1}).json()
    same = post(url, "/v1/embeddings", {"input": ids[:limit]}).json()
    assert cut["data"][0]["embedding"] == same["data"][0]["embedding"]
    assert cut["usage"]["prompt_tokens"] == limit + 2
    three = post(url, "/v1/embeddings", {"input": long, "truncate_prompt_tokens": 3}).json()
    assert three["usage"]["prompt_tokens"] == 5
    for k in (0, limit + 1):
        e = error(post(url, "/v1/embeddings", {"input": "hi", "truncate_prompt_tokens": k}))
        assert e["param"] == "truncate_prompt_tokens"
    for empty in ("", "   ", [], ["a", ""], [[]]):
        e = error(post(url, "/v1/embeddings", {"input": empty}))
        assert e["param"] == "input" and "empty" in e["message"]
    e = error(post(url, "/v1/embeddings", {"input": ["a"] * (MAX_BATCH + 1)}))
    assert e["param"] == "input" and f"--max-embedding-batch ({MAX_BATCH})" in e["message"]
    vocab = encoder.bert.config.vocab_size
    e = error(post(url, "/v1/embeddings", {"input": [101, vocab]}))
    assert e["param"] == "input" and f"token id {vocab}" in e["message"]
    e = error(post(url, "/v1/embeddings", {"input": "hi", "encoding_format": "int8"}))
    assert e["param"] == "encoding_format"
    e = error(post(url, "/v1/embeddings", {"input": "hi", "normalize": True}))
    assert "normalize" in e["message"]


def test_langchain_openai_embeddings(url, client):
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model="scripted", base_url=f"{url}/v1", api_key="none",
                          check_embedding_ctx_length=False)
    docs = lc.embed_documents(TEXTS)
    query = lc.embed_query(TEXTS[1])
    ours = client.embeddings.create(model="scripted", input=TEXTS, encoding_format="float")
    assert np.allclose(docs, [d.embedding for d in ours.data], atol=1e-6)
    assert np.allclose(query, ours.data[1].embedding, atol=1e-6)


def test_without_an_index_the_default_encoder_serves(llama3_tokenizer_dir, tmp_path):
    """No --index: the offline default encoder, loaded on first use; its embeddings are
    all-MiniLM-L6-v2's own sentence embeddings."""
    from retrieval.default_encoder import DEFAULT_ENCODER_NAME, minilm_source_dir

    with scripted_server(ServerConfig(cache_dir=tmp_path), llama3_tokenizer_dir) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                               timeout=120)
        got = client.embeddings.create(model=DEFAULT_ENCODER_NAME, input=TEXTS)
        assert got.model == DEFAULT_ENCODER_NAME
        vectors = torch.tensor([d.embedding for d in got.data])
        assert vectors.shape == (3, 384)
        want = reference_embeddings(minilm_source_dir(), TEXTS)
        assert torch.nn.functional.cosine_similarity(vectors, want).min() > 0.999
        ranked = post(base, "/v1/rerank", {"query": "What is the capital of Zorvania?",
                                           "documents": [BRINDLE, OSTRAVA, ZORVANIA]}).json()
        assert ranked["results"][0]["index"] == 2


# -- /v1/rerank, /v2/rerank, /v1/score -------------------------------------------------------


def test_rerank_orders_by_late_interaction(url, encoder, tiny_colbert_dir):
    docs = [BRINDLE, OSTRAVA, ZORVANIA]
    query = "What is the capital of Zorvania?"
    body = post(url, "/v1/rerank", {"model": "scripted", "query": query,
                                    "documents": docs}).json()
    assert body["id"].startswith("rerank-") and body["model"] == str(tiny_colbert_dir)
    results = body["results"]
    assert results[0]["index"] == 2 and results[0]["document"] == {"text": ZORVANIA}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in results) == \
        [0, 1, 2]
    assert all(-1 <= s <= 1 for s in scores)
    # MaxSim of the encoder's own vectors, over the query's vector count
    q = encoder.encode_queries([query])[0]
    d = encoder.encode_documents(docs)
    want = {i: (q @ d[i].T).max(dim=1).values.sum().item() / q.shape[0] for i in range(3)}
    assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(want, abs=1e-5)
    tokens = n_tokens(encoder, query) + 3 + sum(n_tokens(encoder, t) + 3 for t in docs)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    v2 = post(url, "/v2/rerank", {"query": query, "documents": docs}).json()
    assert v2["results"] == results


def test_rerank_top_n_and_return_documents(url):
    body = {"query": "Brindle engine servicing", "documents": [ZORVANIA, BRINDLE, OSTRAVA]}
    full = post(url, "/v1/rerank", body).json()["results"]
    assert full[0]["index"] == 1
    assert post(url, "/v1/rerank", body | {"top_n": 0}).json()["results"] == full
    top = post(url, "/v1/rerank", body | {"top_n": 2, "return_documents": False}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full[:2]]
    assert all(r["document"] is None for r in top["results"])
    assert post(url, "/v1/rerank", body | {"top_n": 9}).json()["results"] == full


def test_score_pairs_as_vllm_does(url):
    query, docs = "capital of Zorvania", [ZORVANIA, BRINDLE]
    rerank = post(url, "/v1/rerank", {"query": query, "documents": docs}).json()["results"]
    by_index = {r["index"]: r["relevance_score"] for r in rerank}
    one_n = post(url, "/v1/score", {"model": "scripted", "text_1": query, "text_2": docs}).json()
    assert one_n["object"] == "list" and one_n["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in one_n["data"]] == [(0, "score"), (1, "score")]
    assert [d["score"] for d in one_n["data"]] == [by_index[0], by_index[1]]
    assert one_n["usage"]["completion_tokens"] == 0
    assert one_n["usage"]["prompt_tokens"] == one_n["usage"]["total_tokens"] > 0
    one_one = post(url, "/v1/score", {"text_1": [query], "text_2": ZORVANIA}).json()
    assert [d["score"] for d in one_one["data"]] == [by_index[0]]
    n_n = post(url, "/v1/score", {"text_1": [query, "Brindle engines"],
                                  "text_2": docs}).json()["data"]
    assert n_n[0]["score"] == by_index[0]
    brindle = post(url, "/v1/score", {"text_1": "Brindle engines", "text_2": BRINDLE}).json()
    assert n_n[1]["score"] == pytest.approx(brindle["data"][0]["score"], abs=1e-5)
    e = error(post(url, "/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}))
    assert e["param"] == "text_2" and "1:1, 1:N or N:N" in e["message"]
    for body in ({"text_1": [], "text_2": "x"}, {"text_1": "x", "text_2": []}):
        assert error(post(url, "/v1/score", body))["param"] in ("text_1", "text_2")


def test_rerank_and_score_limits(url, encoder):
    s = encoder.settings
    q_limit, d_limit = s.query_maxlen - 3, s.doc_maxlen - 3
    long_query = "capital " * (q_limit + 1)  # one token a word
    e = error(post(url, "/v1/rerank", {"query": long_query, "documents": [ZORVANIA]}))
    assert e["param"] == "query" and f"the {q_limit} this encoder reads" in e["message"]
    assert f"query_maxlen {s.query_maxlen}" in e["message"]
    long_doc = "engine " * (d_limit + 1)
    e = error(post(url, "/v1/rerank", {"query": "kelp", "documents": [BRINDLE, long_doc]}))
    assert e["param"] == "documents" and "documents[1]" in e["message"]
    assert f"doc_maxlen {s.doc_maxlen}" in e["message"]
    e = error(post(url, "/v1/score", {"text_1": "kelp", "text_2": long_doc}))
    assert e["param"] == "text_2"
    # truncated as an index build truncates: the same score as the text cut at the limit
    cut = post(url, "/v1/rerank", {"query": long_query, "documents": [BRINDLE, long_doc],
                                   "truncate_prompt_tokens": -1})
    assert cut.status_code == 200, cut.text
    exact = post(url, "/v1/rerank", {"query": "capital " * q_limit,
                                     "documents": [BRINDLE, "engine " * d_limit]}).json()
    assert [(r["index"], r["relevance_score"]) for r in cut.json()["results"]] == \
        [(r["index"], r["relevance_score"]) for r in exact["results"]]
    by_index = {r["index"]: r for r in cut.json()["results"]}
    assert by_index[1]["document"]["text"] == long_doc  # as sent
    for k in (0, d_limit + 1):
        e = error(post(url, "/v1/rerank", {"query": "q", "documents": ["d"],
                                           "truncate_prompt_tokens": k}))
        assert e["param"] == "truncate_prompt_tokens"
    for body in ({"query": "", "documents": ["d"]}, {"query": "q", "documents": ["d", " "]},
                 {"query": "q", "documents": []}):
        e = error(post(url, "/v1/rerank", body))
        assert "empty" in e["message"] and e["param"] in ("query", "documents")
    e = error(post(url, "/v1/rerank", {"query": "q", "documents": ["d"] * (MAX_BATCH + 1)}))
    assert e["param"] == "documents" and "--max-embedding-batch" in e["message"]
    e = error(post(url, "/v1/score", {"text_1": "q", "text_2": ["d"] * (MAX_BATCH + 1)}))
    assert e["param"] == "text_2" and "--max-embedding-batch" in e["message"]
    e = error(post(url, "/v1/rerank", {"model": "other", "query": "q", "documents": ["d"]}),
              404)
    assert e["param"] == "model"
    e = error(post(url, "/v1/rerank", {"query": "q", "documents": ["d"], "rank_fields": []}))
    assert "rank_fields" in e["message"]


# -- on each engine under test ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_url(engine_name: str, index_dir: Path, tiny_llama_dir: Path,
               tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    if engine_name == "ragserve":
        yield request.getfixturevalue("url")
        return
    tmp = tmp_path_factory.mktemp("pooling-vllm")
    proc, base = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", "scripted", "--dtype",
        "float32", "--max-model-len", "512", "--max-num-seqs", "2", "--index", str(index_dir),
        *engine_flags(engine_name)], tmp / "server.log")
    try:
        wait_ready(base, proc=proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(60)
        print((tmp / "server.log").read_text()[-3000:])


def test_pooling_routes_on_each_engine(engine_url: str, tiny_colbert_dir: Path):
    client = openai.OpenAI(base_url=f"{engine_url}/v1", api_key="none", max_retries=0,
                           timeout=60)
    got = client.embeddings.create(model="scripted", input=TEXTS)
    want = reference_embeddings(tiny_colbert_dir, TEXTS)
    assert torch.allclose(torch.tensor([d.embedding for d in got.data]), want, atol=2e-2)
    ranked = post(engine_url, "/v1/rerank", {"query": "capital of Zorvania",
                                             "documents": [BRINDLE, ZORVANIA]}).json()
    assert ranked["results"][0]["index"] == 1
    scored = post(engine_url, "/v1/score", {"text_1": "capital of Zorvania",
                                            "text_2": [BRINDLE, ZORVANIA]}).json()
    assert scored["data"][1]["score"] == ranked["results"][0]["relevance_score"]
