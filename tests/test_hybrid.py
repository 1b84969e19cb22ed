"""Hybrid retrieval: BM25 terms, reciprocal-rank fusion, the index's modes, indexes written
before BM25 existed, and the mode chosen per index (CLI) and per request (/v1/retrieve)."""

from __future__ import annotations

import json
import shutil

import pytest

from retrieval.index import PassageIndex, current_version, read_manifest
from retrieval.lexical import HybridSettings, LexicalIndex, fuse, terms
from retrieval.types import Document

DOCS = [Document(name, name, ((None, text),)) for name, text in [
    ("bisect.md", "bisect(a, x) finds the insertion point for x in a sorted list a."),
    ("bisect_right.md", "bisect_right(a, x) returns an insertion point after any equal items."),
    ("insort_right.md", "insort_right(a, x) inserts x into a sorted list after equal items."),
    ("heapq.md", "heappush pushes an item onto the heap, keeping the heap invariant."),
    ("france.md", "Paris is the capital of France. It lies on the Seine river."),
]]


@pytest.fixture(scope="module")
def index(tiny_colbert) -> PassageIndex:
    idx = PassageIndex(tiny_colbert, "exact")
    idx.add_documents(DOCS)
    return idx


def test_terms_keep_identifiers_and_stem_words():
    assert "insort_right" in terms("call insort_right()")
    assert {"insort", "right"} <= set(terms("insort_right"))
    assert terms("Inserts inserted inserting") == ["insert"] * 3
    assert terms("the of and") == []


def test_fuse_weights_and_ranks():
    # equal weights: found by both beats first in one
    assert [p for p, _ in fuse([(1.0, [1, 2]), (1.0, [2, 3])], 60, 3)] == [2, 1, 3]
    # a zero weight ignores that ranking (ties keep the first ranking's order)
    assert [p for p, _ in fuse([(1.0, [1, 2]), (0.0, [2, 1])], 60, 2)] == [1, 2]
    assert fuse([(1.0, [])], 60, 5) == []
    with pytest.raises(ValueError, match="mode"):
        HybridSettings(mode="semantic")


def test_lexical_search_finds_the_identifier(index):
    hits = index.search("which function does insort_right call", 3, mode="lexical")
    assert hits[0].doc_id == "insort_right.md"
    assert set(hits[0].scores) == {"lexical"}
    assert hits[0].score == pytest.approx(hits[0].scores["lexical"], abs=1e-4)
    assert index.search("zzzz qqqq", 3, mode="lexical") == []  # no term in the vocabulary


def test_hybrid_is_the_fusion_of_both_rankings(index):
    q = "insert into a sorted list after equal items"
    k = len(index)
    late = [p.chunk_id for p in index.search(q, k, mode="late_interaction")]
    lexical = [p.chunk_id for p in index.search(q, k, mode="lexical")]
    hybrid = index.search(q, 3)  # the index's default mode
    assert index.retrieval.mode == "hybrid"
    s = index.retrieval
    assert [(p.chunk_id, pytest.approx(p.score)) for p in hybrid] == fuse(
        [(s.late_interaction_weight, late), (s.lexical_weight, lexical)], s.rrf_k, 3)
    top = hybrid[0]
    assert top.doc_id == "insort_right.md" and set(top.scores) == {"late_interaction",
                                                                    "lexical"}
    with pytest.raises(ValueError, match="retrieval mode"):
        index.search(q, 3, mode="bm25")


def test_lexical_follows_adds_and_removes(tiny_colbert):
    idx = PassageIndex(tiny_colbert, "exact")
    idx.add_documents(DOCS[:2])
    assert idx.search("heappush", 2, mode="lexical") == []
    idx.add_documents(DOCS[3:4])
    assert idx.search("heappush", 2, mode="lexical")[0].doc_id == "heapq.md"
    idx.remove_documents(["heapq.md"])
    assert idx.search("heappush", 2, mode="lexical") == []


def test_save_load_keeps_bm25_and_settings(tmp_path, tiny_colbert):
    idx = PassageIndex(tiny_colbert, "exact", retrieval=HybridSettings(
        mode="late_interaction", rrf_k=10, lexical_weight=2.0))
    idx.add_documents(DOCS)
    idx.save(tmp_path / "idx")
    assert (current_version(tmp_path / "idx") / "lexical" / "pids.json").is_file()
    assert read_manifest(tmp_path / "idx")["retrieval"]["rrf_k"] == 10
    loaded = PassageIndex.load(tmp_path / "idx", tiny_colbert)
    assert loaded.retrieval == idx.retrieval
    assert loaded._lexical is not None  # read from disk, not rebuilt
    q = "insort_right sorted list"
    for mode in ("lexical", "hybrid", "late_interaction"):
        assert [p.chunk_id for p in loaded.search(q, 3, mode)] == \
               [p.chunk_id for p in idx.search(q, 3, mode)]


def test_an_index_from_before_bm25_loads_as_hybrid(tmp_path, tiny_colbert):
    idx = PassageIndex(tiny_colbert, "exact")
    idx.add_documents(DOCS)
    version = idx.save(tmp_path / "idx")
    shutil.rmtree(version / "lexical")  # what an index written before this change holds
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["retrieval"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    old = PassageIndex.load(tmp_path / "idx", tiny_colbert)
    assert old.retrieval == HybridSettings() and old._lexical is None
    assert old.search("insort_right", 1, mode="lexical")[0].doc_id == "insort_right.md"
    assert [p.chunk_id for p in old.search("sorted list", 3)] == \
           [p.chunk_id for p in idx.search("sorted list", 3)]


def test_lexical_index_round_trip_of_an_empty_index(tmp_path):
    empty = LexicalIndex.build({})
    empty.save(tmp_path / "lx")
    assert len(LexicalIndex.load(tmp_path / "lx")) == 0
    assert LexicalIndex.load(tmp_path / "lx").search("x", 3) == []


def test_cli_build_sets_the_mode_and_search_overrides_it(tmp_path, tiny_colbert_dir, docs_dir,
                                                          capsys):
    from server.cli import main

    out = tmp_path / "idx"
    assert main(["index", "build", str(docs_dir), "--out", str(out), "--retriever-model",
                 str(tiny_colbert_dir), "--retrieval", "lexical", "--rrf-k", "5"]) == 0
    assert read_manifest(out)["retrieval"]["mode"] == "lexical"
    capsys.readouterr()
    assert main(["index", "search", "Brindle engines", "--index", str(out), "-k", "1",
                 "--json"]) == 0
    hit = json.loads(capsys.readouterr().out.strip())
    assert hit["doc_id"] == "brindle.md" and set(hit["scores"]) == {"lexical"}
    assert main(["index", "search", "Brindle engines", "--index", str(out), "-k", "1",
                 "--json", "--mode", "hybrid"]) == 0
    hit = json.loads(capsys.readouterr().out.strip())
    assert hit["doc_id"] == "brindle.md" and set(hit["scores"]) == {"lexical",
                                                                     "late_interaction"}
