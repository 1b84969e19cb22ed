"""benchmarks.rag_eval: the metrics on hand-made cases, the dataset converters, the synthetic
set against the tiny ColBERT, and one end-to-end run against a real server subprocess."""

from __future__ import annotations

import argparse
import doctest
import json
from pathlib import Path

import pytest

from benchmarks import rag_eval as ev


def test_doctests() -> None:
    # pytest's --doctest-modules skips benchmarks/, so the module's examples run here.
    result = doctest.testmod(ev)
    assert result.attempted >= 10
    assert result.failed == 0


# -- metrics ----------------------------------------------------------------------------------


def test_exact_match_hand_cases() -> None:
    assert ev.exact_match("Paris", ["paris"]) == 1.0
    assert ev.exact_match("The Paris.", ["Paris"]) == 1.0  # article and punctuation dropped
    assert ev.exact_match("Paris, France", ["Paris"]) == 0.0
    assert ev.exact_match("Lyon", ["Paris", "lyon!"]) == 1.0  # any gold answer
    assert ev.exact_match("", ["Paris"]) == 0.0


def test_f1_hand_cases() -> None:
    # pred {cat, sat, on, mat}, gold {cat, on, mat}: p = 3/4, r = 1, F1 = 6/7
    assert ev.f1("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7)
    # repeated tokens count once per occurrence in both: same = min(2, 1) = 1, p = 1/3, r = 1
    assert ev.f1("paris paris lyon", ["Paris"]) == pytest.approx(0.5)
    assert ev.f1("Paris", ["Lyon", "Paris"]) == 1.0  # max over answers
    assert ev.f1("London", ["Paris"]) == 0.0
    assert ev.f1("", [""]) == 1.0 and ev.f1("", ["x"]) == 0.0


def test_accuracy_is_a_normalized_substring_without_citations() -> None:
    answer = ev.strip_citations("It was designed by Gustave Eiffel's company [1][2].")
    assert ev.accuracy(answer, ["Gustave Eiffel"]) == 1.0
    assert ev.exact_match(answer, ["Gustave Eiffel"]) == 0.0
    assert ev.accuracy("Eiffel", ["Gustave Eiffel"]) == 0.0
    assert ev.accuracy("The year 1889 [3]", ["1889"]) == 1.0
    # the citation number alone must not count as the answer
    assert ev.accuracy(ev.strip_citations("I do not know [1889]."), ["1889"]) == 0.0


def test_citations_are_parsed_like_the_server_writes_them() -> None:
    assert ev.parse_citations("A [1]. B [2, 3]. C [3][1]. D [x] [ 4 ].") == [1, 2, 3]
    assert ev.parse_citations("no citations") == []
    assert ev.strip_citations("A [1]. B [2, 3].") == "A. B."


def test_recall_and_hit() -> None:
    hits = [("paris.txt", "Paris is the capital of France."),
            ("lyon.txt", "Lyon lies at the\nconfluence of two rivers.")]
    assert ev.recall_at_k(["paris.txt"], hits) == (1.0, True)
    assert ev.recall_at_k(["paris.txt", "nice.txt"], hits) == (0.5, True)
    assert ev.recall_at_k(["LIES AT THE   confluence"], hits) == (1.0, True)  # normalized text
    assert ev.recall_at_k(["nice.txt", "Marseille"], hits) == (0.0, False)
    assert ev.recall_at_k(["paris.txt"], []) == (0.0, False)
    with pytest.raises(ValueError):
        ev.recall_at_k([], hits)


def test_citation_correct_uses_gold_passages_else_answers() -> None:
    src = ("paris.txt", "Paris is the capital of France.")
    assert ev.citation_correct(src, ["paris.txt"], ["Lyon"])  # gold passage decides
    assert not ev.citation_correct(src, ["lyon.txt"], ["Paris"])
    assert ev.citation_correct(src, [], ["the capital"])  # no gold: contains an answer
    assert not ev.citation_correct(src, [], ["Lyon"])
    assert not ev.citation_correct(None, ["paris.txt"], ["Paris"])  # cites a missing source


def _response(content: str, sources: list[tuple[str, str]], unsupported: int = 0) -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": content}}],
        "sources": [{"number": n, "chunk_id": n, "doc_id": d, "source": d, "page": None,
                     "score": 1.0, "text": t} for n, (d, t) in enumerate(sources, 1)],
        "grounding": {"mode": "report", "invalid_citations": [], "unsupported": unsupported,
                      "sentences": [{"text": content, "citations": [], "support": None,
                                     "supported": not unsupported}]},
    }


def test_score_answer_and_summarize() -> None:
    srcs = [("paris.txt", "Paris is the capital of France."), ("lyon.txt", "Lyon is big.")]
    a = ev.Example("Capital of France?", ("Paris",), ("paris.txt",))
    b = ev.Example("Where is Lyon?", ("France",), ())
    recs = [ev.Record(a.question, list(a.answers), list(a.gold_passages), recall=1.0, hit=True),
            ev.Record(b.question, list(b.answers), [])]
    # a: one right citation [1], one wrong [2], one to a missing source [5]
    ev.score_answer(recs[0], a, _response("Paris [1][2]. Really [5].", srcs))
    # b: no gold passages, so a citation is right when its source contains an answer: none does
    ev.score_answer(recs[1], b, _response("In France [2].", srcs, unsupported=1))
    assert recs[0].exact_match == 0.0 and recs[0].accuracy == 1.0
    assert recs[0].citations == [1, 2, 5] and recs[0].citations_correct == 1
    assert recs[1].accuracy == 1.0 and recs[1].citations_correct == 0
    assert recs[1].sources == ["paris.txt", "lyon.txt"]
    m = ev.summarize([*recs, ev.Record("q", ["x"], [], error="RuntimeError: boom")])
    assert (m["questions"], m["completed"], m["errors"], m["answered"]) == (3, 2, 1, 2)
    assert m["recall_at_k"] == 1.0 and m["with_gold_passages"] == 1
    assert m["accuracy"] == 1.0 and m["exact_match"] == 0.0
    assert m["citations"] == 4 and m["citation_precision"] == 0.25
    assert m["cited_fraction"] == 1.0
    assert m["unsupported_sentence_fraction"] == 0.5
    assert m["error_examples"] == ["RuntimeError: boom"]
    # a's [1] and b's none hold a gold answer ("Paris" / "France" in the passage text)
    assert m["citation_answer_precision"] == 0.25
    assert m["correct_answers"] == 2 and m["cited_fraction_of_correct"] == 1.0


def test_attributed_citations_and_recall_by_mode() -> None:
    ex = ev.Example("Capital of France?", ("Paris",), ("paris.txt",))
    rec = ev.Record(ex.question, ["Paris"], ["paris.txt"])
    response = _response("Paris is the capital [1]. It is big [1].",
                         [("paris.txt", "Paris is the capital of France.")])
    response["grounding"].update(attributed=1, sentences=[
        {"citations": [1], "attributed": []}, {"citations": [1], "attributed": [1]}])
    ev.score_answer(rec, ex, response)
    assert (rec.model_cited, rec.attributed) == (1, 1)
    rec.gold_ranks = {"hybrid": 1, "lexical": 4}
    other = ev.Record("q", ["x"], ["y.txt"], gold_ranks={"hybrid": None, "lexical": 1})
    assert ev.recall_by_mode([rec, other], [1, 5]) == {
        "hybrid": {"recall_at_1": 0.5, "recall_at_5": 0.5},
        "lexical": {"recall_at_1": 0.5, "recall_at_5": 1.0}}


def test_summarize_without_answers_reports_none() -> None:
    m = ev.summarize([ev.Record("q", ["a"], [])])
    assert m["answered"] == 0
    assert m["exact_match"] is None and m["citation_precision"] is None
    assert m["recall_at_k"] is None


# -- datasets ---------------------------------------------------------------------------------


def test_load_dataset_limit_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "q1", "answers": ["a"]}\n\n'
                    '{"question": "q2", "answers": ["b", 3], "gold_passages": ["d.txt"]}\n')
    assert ev.load_dataset(good) == [ev.Example("q1", ("a",)),
                                     ev.Example("q2", ("b", "3"), ("d.txt",))]
    assert len(ev.load_dataset(good, limit=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "answers": ["a"]}\n{"question": "q2"}\n')
    with pytest.raises(ev.EvalError, match=r"bad.jsonl:2"):
        ev.load_dataset(bad)


def test_convert_nq(tmp_path: Path) -> None:
    src = tmp_path / "nq.jsonl"
    src.write_text('{"question": "who wrote hamlet", "answer": ["Shakespeare", "W. S."]}\n')
    assert list(ev.convert_nq(src)) == [{"question": "who wrote hamlet",
                                         "answers": ["Shakespeare", "W. S."]}]


def test_convert_hotpotqa_writes_one_file_per_title(tmp_path: Path) -> None:
    from retrieval.documents import load_documents

    data = [
        {"question": "Which band, AC/DC or Queen, formed first?", "answer": "Queen",
         "supporting_facts": [["AC/DC", 0], ["Queen (band)", 1], ["Queen (band)", 0]],
         "context": [["AC/DC", ["AC/DC are an Australian rock band", " formed in 1973."]],
                     ["Queen (band)", ["Queen are a British rock band", " formed in 1970."]],
                     ["Slade", ["Slade are an English rock band."]]]},
        {"question": "Is Slade English?", "answer": "yes",
         "supporting_facts": [["Slade", 0]],
         "context": [["Slade", ["Slade are an English rock band."]]]},
    ]
    src = tmp_path / "hotpot.json"
    src.write_text(json.dumps(data))
    rows = list(ev.convert_hotpotqa(src, tmp_path / "docs"))
    assert rows[0] == {"question": data[0]["question"], "answers": ["Queen"],
                       "gold_passages": ["AC_DC.txt", "Queen (band).txt"]}
    assert rows[1]["answers"] == ["yes"] and rows[1]["gold_passages"] == ["Slade.txt"]
    docs = {d.doc_id: d for d in load_documents(tmp_path / "docs")}
    assert sorted(docs) == ["AC_DC.txt", "Queen (band).txt", "Slade.txt"]
    text = "".join(t for _, t in docs["AC_DC.txt"].pages)
    assert text.startswith("AC/DC\nAC/DC are an Australian rock band formed in 1973.")


def test_synthetic_dataset_is_deterministic_and_answerable(tmp_path: Path) -> None:
    docs, dataset = ev.synthetic_dataset(tmp_path / "a", 8, seed=3)
    again_docs, again = ev.synthetic_dataset(tmp_path / "b", 8, seed=3)
    assert dataset.read_text() == again.read_text()
    assert (docs / "fact_005.txt").read_text() == (again_docs / "fact_005.txt").read_text()
    examples = ev.load_dataset(dataset)
    assert len(examples) == 8 and len(list(docs.glob("*.txt"))) == 8
    for i, ex in enumerate(examples):
        assert ex.gold_passages == (f"fact_{i:03d}.txt",)
        text = (docs / ex.gold_passages[0]).read_text()
        assert ex.answers[0] in text  # the answer is in the gold document...
        others = [p.read_text() for p in docs.glob("*.txt") if p.name != ex.gold_passages[0]]
        assert not any(ex.answers[0] in t for t in others)  # ...and nowhere else


def _synthetic_index(tmp_path: Path, tiny_colbert, n: int) -> tuple[Path, Path]:
    from retrieval.documents import load_documents
    from retrieval.index import PassageIndex

    docs, dataset = ev.synthetic_dataset(tmp_path / "synthetic", n, seed=0)
    index = PassageIndex(tiny_colbert, "exact")
    index.add_documents(load_documents(docs))
    index.save(tmp_path / "index")
    return tmp_path / "index", dataset


def test_tiny_colbert_finds_the_gold_document(tmp_path: Path, tiny_colbert) -> None:
    from retrieval.index import PassageIndex

    index_dir, dataset = _synthetic_index(tmp_path, tiny_colbert, 12)
    index = PassageIndex.load(index_dir, tiny_colbert)
    examples = ev.load_dataset(dataset)
    recall = [ev.recall_at_k(ex.gold_passages,
                             [(p.doc_id, p.text) for p in index.search(ex.question, 3)])[0]
              for ex in examples]
    assert sum(recall) / len(recall) >= 0.75  # chance: 3/12


# -- end to end -------------------------------------------------------------------------------


def _server_has_index_flag() -> bool:
    from server.config import add_serve_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    return "--index" in p.format_help()


def test_end_to_end_against_a_server(tmp_path: Path, tiny_colbert, tiny_colbert_dir: Path,
                                     tiny_llama_dir: Path, capsys) -> None:
    if not _server_has_index_flag():
        pytest.skip("ragserve serve has no --index flag yet")
    index_dir, dataset = _synthetic_index(tmp_path, tiny_colbert, 12)
    out = tmp_path / "records.jsonl"
    argv = ["--dataset", str(dataset), "--index", str(index_dir), "--model", str(tiny_llama_dir),
            "--retriever-model", str(tiny_colbert_dir), "-k", "3", "--limit", "6",
            "--max-tokens", "8", "--concurrency", "2", "--ready-timeout", "120",
            "--timeout", "60", "--out", str(out),
            "--serve-args=--dtype float32 --max-model-len 512 --max-num-seqs 2 "
            "--context-encoding-buckets 128,256,512 --token-generation-buckets 256,512"]
    try:
        result = ev.main(argv)
    except ev.RetrieveUnsupported as e:
        pytest.skip(f"the server does not serve /v1/retrieve yet: {e}")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["benchmark"] == "rag_eval" and last["recall_at_k"] == result["recall_at_k"]
    assert result["questions"] == 6 and result["errors"] == 0, result["error_examples"]
    assert result["answered"] == 6 and result["with_gold_passages"] == 6
    assert result["recall_at_k"] >= 0.6  # chance: 3/12 = 0.25
    for key in ("recall_at_k", "hit_at_k", "exact_match", "f1", "accuracy", "cited_fraction"):
        assert 0.0 <= result[key] <= 1.0, key
    # a random tiny Llama rarely writes "[n]": precision is None exactly when nothing is cited
    assert (result["citation_precision"] is None) == (result["citations"] == 0)
    if result["citation_precision"] is not None:
        assert 0.0 <= result["citation_precision"] <= 1.0
    assert result["answers_without_sources"] == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all(len(r["retrieved"]) == 3 for r in records)
    assert all(1 <= len(r["sources"]) <= 3 for r in records)
