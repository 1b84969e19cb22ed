"""Encoder, exact backend and PassageIndex: tiny ColBERT checkpoints built in the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_colbert_dir

from retrieval.encoder import ColBERTEncoder, EncoderError
from retrieval.exact import ExactBackend
from retrieval.index import ChunkSettings, IndexLoadError, PassageIndex, read_manifest
from retrieval.maxsim import maxsim
from retrieval.types import Document

DOCS = [
    Document("france.txt", "france.txt", ((None, "Paris is the capital of France. It lies on "
                                                 "the Seine river."),)),
    Document("buckets.md", "buckets.md", ((None, "Prefill buckets are 128, 256 and 512 tokens; "
                                                 "a prompt runs in the smallest bucket that "
                                                 "fits."),)),
    Document("metrics.html", "metrics.html", ((None, "Metrics are exported at /metrics in "
                                                     "Prometheus text format."),)),
    Document("manual.pdf", "manual.pdf", ((1, "The scheduler admits new requests at every "
                                              "decode step."),
                                          (2, "Continuous batching keeps the accelerator "
                                              "busy."))),
]


# -- encoder -----------------------------------------------------------------------------------


def test_query_tokens_follow_colbert(tiny_colbert):
    tok = tiny_colbert.tokenizer
    ids, mask = tiny_colbert.query_ids(["capital of France"])
    words = tok.encode("capital of France", add_special_tokens=False)
    q = tiny_colbert.settings.query_maxlen
    assert ids.shape == mask.shape == (1, q)
    # [CLS] [Q] words [SEP] [MASK]... ; [MASK]s are outputs but not attended to
    expected = [tok.cls_token_id, tok.convert_tokens_to_ids("[unused0]"), *words,
                tok.sep_token_id]
    assert ids[0, :len(expected)].tolist() == expected
    assert set(ids[0, len(expected):].tolist()) == {tok.mask_token_id}
    assert mask[0].tolist() == [1] * len(expected) + [0] * (q - len(expected))
    emb = tiny_colbert.encode_queries(["capital of France", "x"])
    assert emb.shape == (2, q, tiny_colbert.settings.dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, q), atol=1e-5)


def test_long_query_is_cut_at_query_maxlen(tiny_colbert):
    ids, _ = tiny_colbert.query_ids(["word " * 100])
    assert ids.shape[1] == tiny_colbert.settings.query_maxlen
    assert ids[0, -1].item() == tiny_colbert.tokenizer.sep_token_id


def test_documents_drop_padding_and_punctuation(tiny_colbert):
    a, b = tiny_colbert.encode_documents(["Hello, world!", "one two three four five six"])
    # [CLS] [D] hello world [SEP]: ',' and '!' are masked like colbert-ai's skiplist
    assert a.shape == (5, tiny_colbert.settings.dim)
    assert b.shape == (9, tiny_colbert.settings.dim)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)
    # batching by length does not change a document's vectors
    (alone,) = tiny_colbert.encode_documents(["Hello, world!"])
    assert torch.allclose(alone, a, atol=1e-5)


def test_special_token_text_in_a_passage_is_plain_text(tiny_colbert):
    tok = tiny_colbert.tokenizer
    ids = tok("pads with [MASK] and [SEP] tokens")["input_ids"]
    assert tok.mask_token_id not in ids and ids.count(tok.sep_token_id) == 1
    (d,) = tiny_colbert.encode_documents(["[MASK] [MASK] [MASK]"])
    assert len(d) == 2 + 3 + 1  # [CLS] [D], 'mask' x3 (the brackets are punctuation), [SEP]


def test_fast_bert_is_transformers_bert(tiny_colbert):
    """The fused forward gives transformers' BertModel outputs, padding rows included."""
    from retrieval.encoder import FastBert

    enc = tiny_colbert
    fast = FastBert.of(enc.bert)
    assert fast is not None
    batch = enc.tokenizer(["a short one", "a somewhat longer sentence with more words in it"],
                          padding="longest", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.min() == 0  # the first row is padded
    with torch.inference_mode():
        ref = enc.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fast(ids, mask)
    rows = mask.bool()
    assert torch.allclose(got[rows], ref[rows], atol=1e-5)


def test_fast_bert_declines_other_architectures(tiny_colbert):
    from transformers import BertConfig, BertModel

    from retrieval.encoder import FastBert

    relu = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, hidden_act="relu"),
                     add_pooling_layer=False)
    assert FastBert.of(relu) is None


def test_queries_without_augmentation(tmp_path, tiny_colbert):
    """query_augmentation false: a query is its own tokens, no [MASK] padding; in a batch a
    shorter query's padding vectors are zero; the fingerprint (index compatibility) is the same."""
    import json

    path = make_tiny_colbert_dir(tmp_path / "ck")
    meta = json.loads((path / "artifact.metadata").read_text())
    (path / "artifact.metadata").write_text(json.dumps({**meta, "query_augmentation": False}))
    enc = ColBERTEncoder(path, dtype="float32")
    assert enc.settings.query_augmentation is False
    assert enc.fingerprint == tiny_colbert.fingerprint
    tok = enc.tokenizer
    words = tok.encode("capital of France", add_special_tokens=False)
    ids, mask = enc.query_ids(["capital of France"])
    assert ids[0].tolist() == [tok.cls_token_id, tok.convert_tokens_to_ids("[unused0]"), *words,
                               tok.sep_token_id]
    assert mask.all()
    short, long_ = "capital of France", "what is the capital city of the French republic"
    (alone,) = enc.encode_queries([short])
    both = enc.encode_queries([short, long_])
    assert both.shape[1] > len(alone)
    assert torch.allclose(both[0, :len(alone)], alone, atol=1e-5)
    assert both[0, len(alone):].abs().max() == 0
    # the augmented encoder's vectors of the query's own tokens are the same: [MASK]s are not
    # attended to
    augmented = tiny_colbert.encode_queries([short])[0]
    assert torch.allclose(augmented[:len(alone)], alone, atol=1e-5)


def test_default_encoder_does_not_augment_queries(tmp_path):
    from retrieval.default_encoder import load_encoder

    enc = load_encoder(None, tmp_path)
    assert enc.settings.query_augmentation is False
    ids, mask = enc.query_ids(["how do I build an index"])
    assert mask.all() and enc.tokenizer.mask_token_id not in ids[0].tolist()


def test_document_cut_at_doc_maxlen(tmp_path):
    enc = ColBERTEncoder(make_tiny_colbert_dir(tmp_path / "c", doc_maxlen=16))
    (d,) = enc.encode_documents(["word " * 100])
    assert d.shape[0] == 16


def test_fingerprint_tells_checkpoints_apart(tmp_path, tiny_colbert):
    other = ColBERTEncoder(make_tiny_colbert_dir(tmp_path / "other", seed=1))
    same = ColBERTEncoder(tiny_colbert.path)
    assert same.fingerprint == tiny_colbert.fingerprint
    assert other.fingerprint != tiny_colbert.fingerprint


def test_not_a_colbert_checkpoint(tmp_path, tiny_colbert_dir):
    with pytest.raises(EncoderError, match=r"config\.json"):
        ColBERTEncoder(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_colbert_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "model.safetensors"))
    del state["linear.weight"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(EncoderError, match=r"linear\.weight"):
        ColBERTEncoder(bad)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="could not be fetched"):
        ColBERTEncoder.from_pretrained("no-such-org/no-such-colbert")


# -- exact backend -----------------------------------------------------------------------------


def _random_docs(n: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randn(int(torch.randint(3, 30, (1,), generator=g)), dim, generator=g)
            for _ in range(n)]
    return [torch.nn.functional.normalize(d, dim=-1) for d in docs]


def test_exact_backend_is_exact_maxsim(tmp_path):
    docs = _random_docs(60, 16, seed=0)
    q = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator()
                                                  .manual_seed(1)), dim=-1)
    backend = ExactBackend(16, dtype="float32")
    backend.add(list(range(100, 160)), docs)
    expected = sorted(((100 + i, maxsim(q, d)) for i, d in enumerate(docs)),
                      key=lambda t: -t[1])[:7]
    got = backend.search(q, 7)
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [round(s, 4) for _, s in got] == [round(s, 4) for _, s in expected]

    backend.remove([expected[0][0]])
    assert backend.search(q, 1)[0][0] == expected[1][0]
    backend.save(tmp_path)
    loaded = ExactBackend.load(tmp_path, dtype="float32")
    assert len(loaded) == 59
    assert [p for p, _ in loaded.search(q, 6)] == [p for p, _ in expected[1:7]]


def test_exact_backend_in_bfloat16_scores_within_rounding():
    docs = _random_docs(40, 16, seed=2)
    q = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator()
                                                  .manual_seed(3)), dim=-1)
    full, half = ExactBackend(16, dtype="float32"), ExactBackend(16, dtype="bfloat16")
    for b in (full, half):
        b.add(list(range(40)), docs)
    exact = dict(full.search(q, 40))
    assert half._pack()[0].dtype == torch.bfloat16
    for pid, score in half.search(q, 40):
        assert score == pytest.approx(exact[pid], abs=0.05)  # 8 cosines, each to ~4e-3


def test_exact_backend_edges():
    backend = ExactBackend(4, dtype="float32")
    q = torch.eye(4)
    assert backend.search(q, 3) == []
    backend.add([0], [torch.eye(4)[:1]])
    assert [p for p, _ in backend.search(q, 10)] == [0]
    with pytest.raises(ValueError, match="already"):
        backend.add([0], [torch.eye(4)[:1]])
    with pytest.raises(ValueError, match=r"expected \[n, 4\]"):
        backend.add([1], [torch.zeros(2, 3)])
    with pytest.raises(KeyError):
        backend.remove([7])


# -- PassageIndex ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(tiny_colbert) -> PassageIndex:
    idx = PassageIndex(tiny_colbert, "exact")
    assert idx.add_documents(DOCS) == 5
    return idx


@pytest.mark.parametrize(("query", "doc_id", "page"), [
    ("What is the capital of France?", "france.txt", None),
    ("which bucket does a prompt run in?", "buckets.md", None),
    ("where are the Prometheus metrics exported?", "metrics.html", None),
    ("what keeps the accelerator busy?", "manual.pdf", 2),
])
def test_search_finds_the_right_passage(index, query, doc_id, page):
    hits = index.search(query, 3)
    assert len(hits) == 3
    assert (hits[0].doc_id, hits[0].page) == (doc_id, page)
    assert hits[0].score > hits[1].score >= hits[2].score
    assert hits[0].text == hits[0].chunk_text


def test_save_load_round_trip(tmp_path, index, tiny_colbert):
    index.save(tmp_path / "idx")
    loaded = PassageIndex.load(tmp_path / "idx", tiny_colbert)
    q = "capital of France"
    before, after = index.search(q, 5), loaded.search(q, 5)
    assert [p.chunk_id for p in after] == [p.chunk_id for p in before]
    # vectors are stored as float16: scores agree to ~1e-4 per query token
    assert [p.score for p in after] == pytest.approx([p.score for p in before], abs=0.01)
    manifest = read_manifest(tmp_path / "idx")
    assert manifest["backend"] == "exact"
    assert manifest["passages"] == 5 and manifest["documents"] == 4
    assert manifest["encoder"]["fingerprint"] == tiny_colbert.fingerprint
    assert manifest["encoder"]["settings"]["dim"] == tiny_colbert.settings.dim


def test_add_replace_and_remove_documents(tiny_colbert):
    idx = PassageIndex(tiny_colbert, "exact")
    idx.add_documents(DOCS[:2])
    idx.add_documents([Document("france.txt", "france.txt",
                                ((None, "Berlin is the capital of Germany."),))])
    assert len(idx) == 2
    assert "Berlin" in idx.search("capital of Germany", 1)[0].text
    assert idx.remove_documents(["buckets.md"]) == 1
    assert {p.doc_id for p in idx.search("prefill bucket", 5)} == {"france.txt"}
    with pytest.raises(KeyError, match=r"nope\.txt"):
        idx.remove_documents(["nope.txt"])


def test_load_with_another_encoder_is_refused(tmp_path, index):
    index.save(tmp_path / "idx")
    other = ColBERTEncoder(make_tiny_colbert_dir(tmp_path / "other", seed=3), name="other")
    with pytest.raises(IndexLoadError, match=r"built with encoder 'tiny-colbert'.*'other'"):
        PassageIndex.load(tmp_path / "idx", other)


def test_not_an_index(tmp_path, tiny_colbert):
    with pytest.raises(IndexLoadError, match="not a ragserve index"):
        PassageIndex.load(tmp_path, tiny_colbert)


def test_chunk_size_over_encoder_limit(tiny_colbert):
    with pytest.raises(ValueError, match=r"chunk_tokens=200 exceeds .* \(177"):
        PassageIndex(tiny_colbert, chunking=ChunkSettings(chunk_tokens=200))


def test_parent_child_passages_carry_the_parent(tiny_colbert):
    text = " ".join(f"Sentence {i} talks about topic{i}." for i in range(60))
    idx = PassageIndex(tiny_colbert, chunking=ChunkSettings(chunk_tokens=24, overlap_tokens=4,
                                                            parent_tokens=96))
    idx.add_documents([Document("long.txt", "long.txt", ((None, text),))])
    (hit,) = idx.search("topic42", 1)
    assert "topic42" in hit.chunk_text
    assert hit.chunk_text in hit.text and len(hit.text) > len(hit.chunk_text)
    assert text[hit.start:hit.end] == hit.text


_KILLED_SAVE = """
import os, sys
sys.path.insert(0, {tests!r})
from retrieval.encoder import ColBERTEncoder
from retrieval.exact import ExactBackend
from retrieval.index import PassageIndex
from retrieval.types import Document

def die(self, path, pids=None):
    os._exit(9)  # killed in the middle of writing the new version

idx = PassageIndex(ColBERTEncoder({ckpt!r}), "exact")
idx.add_documents([Document("new.txt", "new.txt", ((None, "brand new text"),))])
ExactBackend.save = die
idx.save({out!r})
"""


def test_killed_save_leaves_the_previous_index_usable(tmp_path, index, tiny_colbert):
    out = tmp_path / "idx"
    index.save(out)
    before = (out / "CURRENT").read_text()
    script = _KILLED_SAVE.format(tests=str(Path(__file__).parent), ckpt=str(tiny_colbert.path),
                                 out=str(out))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == 9
    # the half-written segment
    assert any(p.name.startswith(".tmp-") for p in (out / "segments").iterdir())
    assert (out / "CURRENT").read_text() == before
    loaded = PassageIndex.load(out, tiny_colbert)
    assert len(loaded) == len(index)
    assert loaded.search("capital of France", 1)[0].doc_id == "france.txt"
    loaded.save(out)  # the next save cleans up the leftovers
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    assert len([p for p in out.iterdir() if p.name.startswith("v")]) == 1


def _doc(name: str, text: str) -> Document:
    return Document(name, name, ((None, text),))


def _ranking(index: PassageIndex, query: str) -> list[tuple[str, str, float]]:
    return [(p.doc_id, p.chunk_text, round(p.score, 4)) for p in index.search(query, 10)]


def test_saves_append_segments_and_search_like_a_fresh_build(tmp_path, tiny_colbert):
    texts = {f"d{i}.txt": f"Document {i} says the number {i} is {'odd' if i % 2 else 'even'}."
             for i in range(12)}
    out = tmp_path / "idx"
    index = PassageIndex(tiny_colbert, "exact")
    index.add_documents([_doc(f"d{i}.txt", texts[f"d{i}.txt"]) for i in range(7)])
    index.save(out)
    first = sorted((out / "segments").iterdir())
    assert [p.name for p in first] == ["s000001"]
    stamp = (first[0] / "passages.jsonl").stat().st_mtime_ns
    for i in range(7, 12):  # incremental adds through a fresh load each time, as a writer does
        loaded = PassageIndex.load(out, tiny_colbert)
        loaded.add_documents([_doc(f"d{i}.txt", texts[f"d{i}.txt"])])
        loaded.save(out)
    manifest = read_manifest(out)
    assert manifest["segments"] == [f"s{i:06d}" for i in range(1, 7)]
    assert (first[0] / "passages.jsonl").stat().st_mtime_ns == stamp  # never rewritten
    loaded = PassageIndex.load(out, tiny_colbert)
    loaded.remove_documents(["d2.txt"])
    loaded.add_documents([_doc("d3.txt", "Document 3 was replaced by new text.")])
    loaded.save(out)
    assert read_manifest(out)["deleted"]  # removed passages listed, their segments kept

    fresh = PassageIndex(tiny_colbert, "exact")
    fresh.add_documents([_doc(f"d{i}.txt", texts[f"d{i}.txt"]) for i in range(12)
                         if i not in (2, 3)]
                        + [_doc("d3.txt", "Document 3 was replaced by new text.")])
    again = PassageIndex.load(out, tiny_colbert)
    assert again.doc_ids == fresh.doc_ids
    for query in ("the number 3", "odd", "replaced", "Document 9"):
        assert _ranking(again, query) == _ranking(fresh, query)


def test_segments_are_compacted(tmp_path, tiny_colbert):
    out = tmp_path / "idx"
    index = PassageIndex(tiny_colbert, "exact")
    for i in range(12):
        index.add_documents([_doc(f"d{i}.txt", f"text number {i}")])
        index.save(out)  # the same object saving again also appends
    assert 1 <= len(read_manifest(out)["segments"]) <= 8
    on_disk = {p.name for p in (out / "segments").iterdir()}
    assert on_disk == set(read_manifest(out)["segments"])  # unreferenced segments removed
    index.remove_documents([f"d{i}.txt" for i in range(10)])
    index.save(out)  # most passages deleted: one compacted segment
    manifest = read_manifest(out)
    assert len(manifest["segments"]) == 1 and manifest["deleted"] == []
    assert PassageIndex.load(out, tiny_colbert).doc_ids == {"d10.txt", "d11.txt"}


def test_search_only_in_allowed_documents(tiny_colbert):
    index = PassageIndex(tiny_colbert, "exact")
    index.add_documents([_doc(f"d{i}.txt", f"Paris is in France, says document {i}.")
                         for i in range(30)])
    for mode in ("hybrid", "late_interaction", "lexical"):
        hits = index.search("Paris France", 3, mode, allow=lambda d: d in ("d7.txt", "d29.txt"))
        assert {p.doc_id for p in hits} == {"d7.txt", "d29.txt"}
    assert index.search("Paris", 3, allow=lambda d: False) == []
