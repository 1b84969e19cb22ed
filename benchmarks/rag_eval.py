"""RAG quality over a question set: retrieval recall, answer accuracy, citation precision.

Talks to a running ragserve (``--server URL``) or starts one (``--index DIR --model M``: runs
``ragserve serve --model M --index DIR`` on a free port of 127.0.0.1, waits for ``/ready``, stops
it at the end). The dataset is JSONL, one question per line::

    {"question": str, "answers": [str, ...], "gold_passages": [str, ...], "split": str}
                                   # gold_passages and split optional; each split is also
                                   # summarized apart ("by_split": e.g. dev and test)

For each question ``POST /v1/retrieve {"query", "k"}`` gives the top-k passages, and a chat
completion with ``"rag": {"top_k": k}`` (temperature 0) gives the answer, its ``sources`` and its
``grounding`` report. Metrics (the pure functions below, each with doctests):

- ``recall_at_k``: mean fraction of a question's gold passages in its top k; ``hit_at_k``: the
  fraction of questions with any gold passage in the top k. A gold string matches a passage when
  it equals the passage's ``doc_id`` or when its normalized text (lowercase, whitespace
  collapsed) is contained in the passage text. Only questions with ``gold_passages`` count.
- ``exact_match`` and ``f1``: SQuAD v1.1 (lowercase, no punctuation, no articles, single
  spaces; the max over the gold answers); ``accuracy``: NQ-style "some normalized gold answer is
  a substring of the normalized output", the metric of NinjaLLM's table. All three are computed
  on the answer with its ``[n]`` citation markers removed.
- ``citation_precision``: of all citations (distinct numbers per answer), the fraction whose
  source is a gold passage (questions with gold passages) or else contains a gold answer;
  ``cited_fraction``: the fraction of answers with at least one citation;
  ``citation_answer_precision``: the fraction of citations whose passage holds a gold answer
  (normalized substring, as ``accuracy``). The same three over the answers that contain a gold
  answer (``*_of_correct``), and how many citations the model wrote and how many ragserve
  attributed (the response's ``grounding``).
- ``by_mode``: with ``--modes``, recall@k at each of ``--recall-ks`` for each retrieval mode
  (``/v1/retrieve``'s ``mode``: hybrid, late_interaction, lexical), from one retrieval of the
  largest k per mode: the fraction of the question's gold passages in the top k.

    python -m benchmarks.rag_eval --dataset qa.jsonl --server http://127.0.0.1:8000 -k 5
    python -m benchmarks.rag_eval --dataset benchmarks/data/more_itertools/questions.jsonl \
        --index IDX -k 3 --modes hybrid,late_interaction,lexical   # benchmarks/data/README.md
    python -m benchmarks.rag_eval --dataset qa.jsonl --index idx --model M --out records.jsonl
    python -m benchmarks.rag_eval convert --nq NQ-open.dev.jsonl > nq.jsonl
    python -m benchmarks.rag_eval convert --hotpotqa hotpot_dev_distractor_v1.json \\
        --corpus-dir hotpot_docs > hotpot.jsonl
    python -m benchmarks.rag_eval synthetic OUT_DIR --n 50   # made-up facts, for smoke tests

Reproducing NinjaLLM's table (arXiv 2407.12057, Table 1: accuracy 62.22% on NQ and 58.84% on
HotPotQA with a fine-tuned Llama3-70B-Instruct and ColBERTv2 top-10 retrieval):

1. Download the public files: NQ-open's dev set (3,610 questions,
   github.com/google-research-datasets/natural-questions, ``nq_open/NQ-open.dev.jsonl``) and
   HotPotQA's distractor dev set (7,405 questions, hotpotqa.github.io,
   ``hotpot_dev_distractor_v1.json``); and the retriever checkpoint ``colbert-ir/colbertv2.0``
   (``huggingface-cli download colbert-ir/colbertv2.0 --local-dir colbertv2.0``).
2. Convert. HotPotQA: ``convert --hotpotqa FILE --corpus-dir hotpot_docs`` writes one
   ``TITLE.txt`` per context paragraph (title line, then its sentences; about 66k files) and
   questions whose ``gold_passages`` are the supporting titles' doc ids. NQ: ``convert --nq
   FILE`` (answers only, no gold passages); NQ's corpus is Wikipedia, e.g. DPR's 21M-passage
   ``psgs_w100.tsv`` written out as files (one per article) for ``ragserve index build``.
3. Index: ``ragserve index build hotpot_docs --out hotpot_index --backend plaid
   --retriever-model ./colbertv2.0`` (the plaid backend is the one for corpora this size).
4. Serve and run: ``python -m benchmarks.rag_eval --dataset hotpot.jsonl --index hotpot_index
   --model meta-llama/Meta-Llama-3-70B-Instruct --retriever-model ./colbertv2.0 -k 10
   --max-tokens 128 --concurrency 16`` (or ``Meta-Llama-3-8B-Instruct``; add server flags with
   ``--serve-args="--tensor-parallel-size 8 ..."``). Compare ``accuracy`` with the table.
NinjaLLM's model is their own fine-tune, so stock Llama-3 Instruct is expected to land below it;
``recall_at_k`` tells retrieval misses apart from answer misses.

The last stdout line is one JSON object: the metrics, the counts and the configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, mean, round_floats

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"\s?\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")  # [1], [1, 2]; [1][2] is two
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


class EvalError(RuntimeError):
    """The evaluation cannot run (bad dataset, server failed to start, unsupported server)."""


class RetrieveUnsupported(EvalError):
    """The server answered 404 to ``POST /v1/retrieve``: not a RAG-enabled ragserve."""


# -- metrics: pure functions ------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Lowercase, whitespace collapsed: how gold passage text is matched against passages.

    >>> normalize_text("  The Eiffel\\n Tower ")
    'the eiffel tower'
    """
    return " ".join(text.lower().split())


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalization: lowercase, drop punctuation, drop a/an/the, single spaces.

    >>> normalize_answer("The  Eiffel-Tower, in Paris!")
    'eiffeltower in paris'
    >>> normalize_answer("An apple a day")
    'apple day'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized gold answer.

    >>> exact_match("the Eiffel Tower.", ["Eiffel Tower", "tour Eiffel"])
    1.0
    >>> exact_match("Eiffel Tower in Paris", ["Eiffel Tower"])
    0.0
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the max over gold answers (two empty answers score 1, one empty 0).

    >>> f1("Eiffel Tower in Paris", ["the Eiffel Tower"])  # p = 2/4, r = 2/2
    0.6666666666666666
    >>> f1("Paris", ["Lyon", "Paris France"])  # p = 1, r = 1/2
    0.6666666666666666
    >>> f1("", ["Paris"]), f1("the", ["a"])
    (0.0, 1.0)
    """
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """NQ-style accuracy: 1.0 when some normalized gold answer occurs in the normalized output.

    >>> accuracy("It was built in 1889 by Gustave Eiffel.", ["1889"])
    1.0
    >>> accuracy("It opened in 1890.", ["1889", ""])  # an answer that normalizes to '' never hits
    0.0
    """
    pred = normalize_answer(prediction)
    return float(any(g and g in pred for g in map(normalize_answer, answers)))


def parse_citations(text: str) -> list[int]:
    """The distinct passage numbers cited as ``[n]`` / ``[n, m]``, in order of first appearance.

    >>> parse_citations("Paris [1]. It is big [2, 3][1]. Year [1889 is not closed")
    [1, 2, 3]
    """
    seen: dict[int, None] = {}
    for m in CITATION.finditer(text):
        for n in m.group(1).split(","):
            seen.setdefault(int(n), None)
    return list(seen)


def strip_citations(text: str) -> str:
    """The answer without its citation markers.

    >>> strip_citations("Paris [1][2]. Yes [3, 4].")
    'Paris. Yes.'
    """
    return CITATION.sub("", text)


def passage_matches(gold: str, doc_id: str, text: str) -> bool:
    """Whether gold passage ``gold`` (a doc id, or passage text) is the passage ``doc_id, text``.

    >>> passage_matches("paris.txt", "paris.txt", "Paris is the capital of France.")
    True
    >>> passage_matches("capital of\\nFRANCE", "a.txt", "Paris is the capital of France.")
    True
    >>> passage_matches("lyon.txt", "paris.txt", "Paris is the capital of France.")
    False
    """
    if gold == doc_id:
        return True
    g = normalize_text(gold)
    return bool(g) and g in normalize_text(text)


def recall_at_k(gold: Sequence[str], passages: Sequence[tuple[str, str]]) -> tuple[float, bool]:
    """(fraction of ``gold`` found among ``passages`` as (doc_id, text) pairs, any found).

    >>> hits = [("a.txt", "alpha"), ("b.txt", "beta gamma")]
    >>> recall_at_k(["a.txt", "c.txt"], hits)
    (0.5, True)
    >>> recall_at_k(["Gamma", "b.txt"], hits)
    (1.0, True)
    >>> recall_at_k(["c.txt"], hits)
    (0.0, False)
    """
    if not gold:
        raise ValueError("recall@k needs at least one gold passage")
    found = sum(any(passage_matches(g, d, t) for d, t in passages) for g in gold)
    return found / len(gold), found > 0


def citation_correct(source: tuple[str, str] | None, gold: Sequence[str],
                     answers: Sequence[str]) -> bool:
    """Whether a citation of ``source`` (doc_id, text; None: no such source) is right: the
    source is a gold passage when the question has gold passages, else it contains an answer.

    >>> citation_correct(("a.txt", "Paris is the capital."), ["a.txt"], ["Paris"])
    True
    >>> citation_correct(("b.txt", "Paris is the capital."), ["a.txt"], ["Paris"])
    False
    >>> citation_correct(("b.txt", "Paris is the capital."), [], ["paris"])
    True
    >>> citation_correct(None, [], ["Paris"])
    False
    """
    if source is None:
        return False
    doc_id, text = source
    if gold:
        return any(passage_matches(g, doc_id, text) for g in gold)
    return accuracy(text, answers) == 1.0


# -- dataset ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    question: str
    answers: tuple[str, ...]
    gold_passages: tuple[str, ...] = ()
    split: str | None = None  # e.g. "dev" / "test": summarized apart as well


def load_dataset(path: Path, limit: int | None = None) -> list[Example]:
    """The first ``limit`` questions of a JSONL dataset (blank lines skipped)."""
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                q, answers = row["question"], row["answers"]
                gold = row.get("gold_passages") or []
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{path}:{lineno}: expected {{'question': str, 'answers': "
                                f"[str], 'gold_passages'?: [str]}} ({type(e).__name__}: {e})"
                                ) from e
            if not isinstance(q, str) or not isinstance(answers, list) or not answers:
                raise EvalError(f"{path}:{lineno}: 'question' must be a string and 'answers' a "
                                "non-empty list")
            split = row.get("split")
            out.append(Example(q, tuple(map(str, answers)), tuple(map(str, gold)),
                               None if split is None else str(split)))
    if not out:
        raise EvalError(f"{path}: no questions")
    return out


# -- one question -----------------------------------------------------------------------------


@dataclass
class Record:
    """Everything measured for one question (one line of ``--out``)."""

    question: str
    answers: list[str]
    gold_passages: list[str]
    split: str | None = None
    retrieved: list[str] = field(default_factory=list)  # doc ids, best first
    recall: float | None = None
    hit: bool | None = None
    output: str | None = None
    exact_match: float | None = None
    f1: float | None = None
    accuracy: float | None = None
    citations: list[int] = field(default_factory=list)
    citations_correct: int = 0
    citations_holding_answer: int = 0
    model_cited: int = 0  # citations the model wrote (grounding sentences, repeats kept)
    sources: list[str] = field(default_factory=list)  # doc id of source n at index n - 1
    invalid_citations: list[int] = field(default_factory=list)
    sentences: int = 0
    unsupported_sentences: int = 0
    attributed: int = 0  # citations ragserve added (grounding.attributed)
    has_sources: bool = False
    gold_ranks: dict[str, int | None] = field(default_factory=dict)  # mode -> first gold rank
    error: str | None = None


RETRIES = 5


class Client:
    """The two calls rag_eval makes, over one pooled httpx connection set."""

    def __init__(self, url: str, api_key: str | None, timeout: float, concurrency: int) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                      limits=httpx.Limits(max_connections=concurrency))

    async def post(self, path: str, body: dict) -> dict:
        for _ in range(RETRIES):  # the server sheds load with 429/503 + Retry-After: honour it
            r = await self.http.post(path, json=body)
            if r.status_code not in (429, 503):
                break
            await asyncio.sleep(min(float(r.headers.get("retry-after") or 1), 30.0))
        if r.status_code == 404 and path == "/v1/retrieve":
            raise RetrieveUnsupported(f"{self.http.base_url}{path} answered 404: the server "
                                      "has no retrieval endpoint (start it with --index DIR)")
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    async def model(self) -> str:
        r = await self.http.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def retrieve(self, query: str, k: int, mode: str | None = None) -> list[dict]:
        body: dict[str, Any] = {"query": query, "k": k}
        if mode is not None:
            body["mode"] = mode
        return (await self.post("/v1/retrieve", body))["data"]

    async def chat(self, model: str, question: str, k: int, max_tokens: int) -> dict:
        return await self.post("/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "rag": {"top_k": k}})

    async def close(self) -> None:
        await self.http.aclose()


def score_answer(rec: Record, ex: Example, response: dict) -> None:
    """Fill ``rec``'s answer and citation fields from a chat completion with RAG fields."""
    output = response["choices"][0]["message"].get("content") or ""
    answer = strip_citations(output)
    rec.output = output
    rec.exact_match = exact_match(answer, ex.answers)
    rec.f1 = f1(answer, ex.answers)
    rec.accuracy = accuracy(answer, ex.answers)
    rec.has_sources = "sources" in response
    sources = {int(s["number"]): (str(s["doc_id"]), str(s.get("text") or ""))
               for s in response.get("sources") or []}
    rec.sources = [sources[n][0] for n in sorted(sources)]
    rec.citations = parse_citations(output)
    rec.citations_correct = sum(citation_correct(sources.get(n), ex.gold_passages, ex.answers)
                                for n in rec.citations)
    rec.citations_holding_answer = sum(citation_correct(sources.get(n), [], ex.answers)
                                       for n in rec.citations)
    grounding = response.get("grounding") or {}
    rec.invalid_citations = list(grounding.get("invalid_citations") or [])
    rec.sentences = len(grounding.get("sentences") or [])
    rec.unsupported_sentences = int(grounding.get("unsupported") or 0)
    rec.attributed = int(grounding.get("attributed") or 0)
    rec.model_cited = sum(len(s.get("citations") or []) - len(s.get("attributed") or [])
                          for s in grounding.get("sentences") or [])


def gold_rank(gold: Sequence[str], passages: Sequence[tuple[str, str]]) -> int | None:
    """1-based rank of the first passage that is a gold passage, None if none is.

    >>> gold_rank(["b.txt"], [("a.txt", "x"), ("b.txt", "y")])
    2
    >>> gold_rank(["c.txt"], [("a.txt", "x")]) is None
    True
    """
    for rank, (doc_id, text) in enumerate(passages, 1):
        if any(passage_matches(g, doc_id, text) for g in gold):
            return rank
    return None


def recall_by_mode(records: Sequence[Record], ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{mode: {"recall_at_K": fraction of questions whose first gold rank is <= K}}`` (one
    gold passage per question, as in benchmarks/data; with several it is hit@k)."""
    out: dict[str, dict[str, float]] = {}
    with_ranks = [r for r in records if r.error is None and r.gold_ranks]
    for mode in dict.fromkeys(m for r in with_ranks for m in r.gold_ranks):
        ranks = [r.gold_ranks.get(mode) for r in with_ranks]
        out[mode] = {f"recall_at_{k}": mean([float(x is not None and x <= k) for x in ranks])
                     for k in ks}
    return out


async def evaluate_one(client: Client, model: str, ex: Example, args: argparse.Namespace
                       ) -> Record:
    rec = Record(ex.question, list(ex.answers), list(ex.gold_passages), ex.split)
    try:
        hits = await client.retrieve(ex.question, args.k)
        rec.retrieved = [h["doc_id"] for h in hits]
        if ex.gold_passages:
            rec.recall, rec.hit = recall_at_k(ex.gold_passages,
                                              [(h["doc_id"], h["text"]) for h in hits])
        if ex.gold_passages:
            for mode in args.modes:
                ranked = await client.retrieve(ex.question, max(args.recall_ks), mode)
                rec.gold_ranks[mode] = gold_rank(ex.gold_passages,
                                                 [(h["doc_id"], h["text"]) for h in ranked])
        if not args.retrieval_only:
            score_answer(rec, ex, await client.chat(model, ex.question, args.k, args.max_tokens))
    except RetrieveUnsupported:
        raise
    except Exception as e:  # counted and reported, the run goes on
        rec.error = f"{type(e).__name__}: {e}"[:300]
    return rec


# -- the run ----------------------------------------------------------------------------------


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """The metrics over all records (None where no record has what a metric needs)."""
    ok = [r for r in records if r.error is None]
    answered = [r for r in ok if r.output is not None]
    with_gold = [r for r in ok if r.recall is not None]
    n_cit = sum(len(r.citations) for r in answered)
    n_sent = sum(r.sentences for r in answered)
    correct = [r for r in answered if r.accuracy == 1.0]
    n_cit_correct = sum(len(r.citations) for r in correct)

    def avg(xs: list[float]) -> float | None:
        return mean(xs) if xs else None

    return {
        "questions": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_examples": [r.error for r in records if r.error][:3],
        "with_gold_passages": len(with_gold),
        "recall_at_k": avg([r.recall for r in with_gold]),
        "hit_at_k": avg([float(r.hit) for r in with_gold]),
        "answered": len(answered),
        "exact_match": avg([r.exact_match for r in answered]),
        "f1": avg([r.f1 for r in answered]),
        "accuracy": avg([r.accuracy for r in answered]),
        "citations": n_cit,
        "citation_precision": sum(r.citations_correct for r in answered) / n_cit if n_cit
        else None,
        "cited_fraction": avg([float(bool(r.citations)) for r in answered]),
        "correct_answers": len(correct),
        "cited_fraction_of_correct": avg([float(bool(r.citations)) for r in correct]),
        "citation_precision_of_correct": sum(r.citations_correct for r in correct)
        / n_cit_correct if n_cit_correct else None,
        "citation_answer_precision": sum(r.citations_holding_answer for r in answered) / n_cit
        if n_cit else None,
        "citation_answer_precision_of_correct": sum(r.citations_holding_answer for r in correct)
        / n_cit_correct if n_cit_correct else None,
        "attributed_citations": sum(r.attributed for r in answered),
        "model_citations": sum(r.model_cited for r in answered),
        "invalid_citations": sum(len(r.invalid_citations) for r in answered),
        "unsupported_sentence_fraction": sum(r.unsupported_sentences for r in answered) / n_sent
        if n_sent else None,
        "answers_without_sources": sum(not r.has_sources for r in answered),
    }


async def evaluate(url: str, examples: Sequence[Example], args: argparse.Namespace
                   ) -> tuple[list[Record], str]:
    client = Client(url, args.api_key, args.timeout, args.concurrency)
    try:
        try:  # fail fast: unreachable, 404, auth, ...
            model = args.served_model or await client.model()
            await client.retrieve(examples[0].question, args.k)
        except (httpx.HTTPError, RuntimeError) as e:
            if isinstance(e, EvalError):
                raise
            raise EvalError(f"{url}: {type(e).__name__}: {e}") from e
        records: list[Record | None] = [None] * len(examples)
        next_index = iter(range(len(examples)))
        done = [0]

        async def worker() -> None:
            for i in next_index:  # shared iterator: a bounded loop over all questions
                records[i] = await evaluate_one(client, model, examples[i], args)
                done[0] += 1
                if done[0] % 50 == 0 or done[0] == len(examples):
                    print(f"# {done[0]}/{len(examples)} questions", file=sys.stderr, flush=True)

        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
    finally:
        await client.close()
    return [r for r in records if r is not None], model


# -- a server of our own ----------------------------------------------------------------------


SPLIT_KEYS = ("questions", "recall_at_k", "accuracy", "cited_fraction",
              "cited_fraction_of_correct", "citation_precision", "citation_precision_of_correct",
              "citation_answer_precision", "citation_answer_precision_of_correct",
              "correct_answers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EvalError(f"the server exited with code {proc.returncode}; its log ends:\n"
                            f"{log_tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise EvalError(f"{url} not ready after {timeout:.0f}s; its log ends:\n{log_tail(log_path)}")


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@contextlib.contextmanager
def serve(model: str | None, index: Path, retriever_model: str | None, serve_args: str,
          ready_timeout: float) -> Iterator[str]:
    """``ragserve serve --model M --index DIR`` on a free 127.0.0.1 port; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--index", str(index),
           "--host", "127.0.0.1", "--port", str(port)]
    if model:
        cmd += ["--model", model]
    if retriever_model:
        cmd += ["--retriever-model", retriever_model]
    cmd += shlex.split(serve_args)
    with tempfile.TemporaryDirectory(prefix="rag-eval-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"# started {shlex.join(cmd)}", file=sys.stderr, flush=True)
            wait_ready(url, proc, ready_timeout, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# -- dataset converters and the synthetic set -------------------------------------------------


def convert_nq(path: Path) -> Iterator[dict]:
    """NQ-open JSONL (``{"question", "answer": [...]}``) to our rows (no gold passages)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield {"question": row["question"], "answers": list(row["answer"])}


def title_file_name(title: str, taken: set[str]) -> str:
    """A flat, portable file name for a Wikipedia title (unique within ``taken``, added to it).

    >>> taken = set()
    >>> title_file_name("AC/DC", taken), title_file_name("AC_DC", taken)
    ('AC_DC.txt', 'AC_DC (2).txt')
    >>> title_file_name(".hack", taken)
    '_hack.txt'
    """
    base = re.sub(r"[/\\\x00]", "_", title.strip()) or "untitled"
    if base.startswith("."):
        base = "_" + base[1:]
    base = base.encode()[:200].decode(errors="ignore")
    name, n = f"{base}.txt", 1
    while name.lower() in taken:
        n += 1
        name = f"{base} ({n}).txt"
    taken.add(name.lower())
    return name


def convert_hotpotqa(path: Path, corpus_dir: Path | None) -> Iterator[dict]:
    """HotPotQA dev JSON to our rows: gold passages are the supporting titles' doc ids; with
    ``corpus_dir``, one ``TITLE.txt`` per context paragraph (a title's first version wins)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    names: dict[str, str] = {}
    taken: set[str] = set()
    if corpus_dir is not None:
        Path(corpus_dir).mkdir(parents=True, exist_ok=True)
    for row in data:
        for title, sentences in row["context"]:
            if title in names:
                continue
            names[title] = title_file_name(title, taken)
            if corpus_dir is not None:
                (Path(corpus_dir) / names[title]).write_text(
                    f"{title}\n{''.join(sentences).strip()}\n", encoding="utf-8")
    for row in data:
        gold = list(dict.fromkeys(names[t] for t, _ in row["supporting_facts"] if t in names))
        yield {"question": row["question"], "answers": [row["answer"]], "gold_passages": gold}


_SYLLABLES = ("zor", "van", "quel", "thar", "mib", "ost", "ral", "dun", "kep", "yor", "bel",
              "trin", "gav", "lum", "pex", "shon", "drel", "wix", "nor", "fal", "cru", "vid",
              "mox", "sel", "bra", "tuk", "ilm", "ezra", "hob", "jun")
_FACTS = (  # (fact, question): {a} is the subject, {b} the answer
    ("The capital of {a} is {b}.", "What is the capital of {a}?"),
    ("{a} was founded by the explorer {b}.", "Which explorer founded {a}?"),
    ("The national animal of {a} is the {b}.", "What is the national animal of {a}?"),
    ("The river {a} flows into Lake {b}.", "Which lake does the river {a} flow into?"),
    ("The {a} engine was invented by {b}.", "Who invented the {a} engine?"),
)
_FILLER = ("It is known for its mild climate and busy markets.",
           "Travellers often arrive by train in the spring.",
           "Local historians have written several books about the region.",
           "The area has a small museum and a public library.",
           "Many families visit during the summer festival.",
           "The old bridge was rebuilt after a flood.",
           "Farmers there grow wheat, barley and apples.",
           "A weekly newspaper reports on council meetings.")


def made_up_name(rng: random.Random, taken: set[str]) -> str:
    """A new capitalized nonsense word of three syllables (unique within ``taken``)."""
    for _ in range(10_000):
        name = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
        if name not in taken:
            taken.add(name)
            return name
    raise RuntimeError("ran out of made-up names")


def synthetic_dataset(out_dir: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` small .txt documents with one made-up fact each ("The capital of Zorvania is
    Quelthar.") among filler sentences, and the matching questions: returns (docs dir, dataset
    JSONL). Question i's answer is in ``fact_{i:03d}.txt`` and nowhere else."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    docs = out_dir / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    dataset = out_dir / "questions.jsonl"
    taken: set[str] = set()
    with open(dataset, "w", encoding="utf-8") as f:
        for i in range(n):
            fact, question = _FACTS[i % len(_FACTS)]
            a, b = made_up_name(rng, taken), made_up_name(rng, taken)
            filler = rng.sample(_FILLER, 3)
            filler.insert(rng.randrange(4), fact.format(a=a, b=b))
            doc_id = f"fact_{i:03d}.txt"
            (docs / doc_id).write_text(" ".join(filler) + "\n", encoding="utf-8")
            f.write(json.dumps({"question": question.format(a=a), "answers": [b],
                                "gold_passages": [doc_id]}) + "\n")
    return docs, dataset


# -- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rag_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True, help="JSONL of questions")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="URL of a running ragserve with an index")
    where.add_argument("--index", type=Path, help="start a server over this index")
    p.add_argument("--model", help="with --index: the server's --model (default: the embedded "
                                   "default model); with --server: the request's model "
                                   "(default: the server's first model)")
    p.add_argument("--retriever-model", default=None, help="with --index: the server's "
                                                           "--retriever-model")
    p.add_argument("--serve-args", default="", help='with --index: more server flags, e.g. '
                                                    '--serve-args="--max-model-len 4096"')
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("-k", type=int, default=5, help="passages retrieved and put in the prompt")
    p.add_argument("--limit", type=int, default=None, help="the first N questions only")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--api-key", default=os.environ.get("RAGSERVE_API_KEY"))
    p.add_argument("--retrieval-only", action="store_true", help="no chat completions")
    p.add_argument("--modes", default="", help="comma-separated retrieval modes to compare "
                   "(hybrid,late_interaction,lexical): recall at each of --recall-ks")
    p.add_argument("--recall-ks", default="1,5,10", help="the k of the per-mode recall")
    p.add_argument("--out", type=Path, help="write one JSON record per question here")
    p.add_argument("--quick", action="store_true", help="the first 20 questions")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; prints a summary and the JSON line, and returns that JSON object."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.limit = min(args.limit or 20, 20)
    if args.k < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise EvalError("-k, --concurrency and --max-tokens must be >= 1")
    args.served_model = args.model if args.server else None
    args.modes = [m for m in args.modes.split(",") if m]
    args.recall_ks = sorted({int(k) for k in args.recall_ks.split(",") if k})
    if not args.recall_ks or args.recall_ks[0] < 1 or args.recall_ks[-1] > 100:
        raise EvalError("--recall-ks must be integers in 1..100")
    examples = load_dataset(args.dataset, args.limit)
    t0 = time.perf_counter()
    if args.server:
        records, model = asyncio.run(evaluate(args.server, examples, args))
    else:
        with serve(args.model, args.index, args.retriever_model, args.serve_args,
                   args.ready_timeout) as url:
            t0 = time.perf_counter()
            records, model = asyncio.run(evaluate(url, examples, args))
    wall = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    metrics = summarize(records)
    result = {
        "dataset": str(args.dataset),
        "server": args.server,
        "index": str(args.index) if args.index else None,
        "model": model,
        "retriever_model": args.retriever_model,
        "k": args.k,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "retrieval_only": args.retrieval_only,
        **metrics,
        "by_mode": recall_by_mode(records, args.recall_ks),
        "by_split": {split: {**{k: v for k, v in summarize(sub).items() if k in SPLIT_KEYS},
                             "by_mode": recall_by_mode(sub, args.recall_ks)}
                     for split in sorted({r.split for r in records if r.split})
                     if (sub := [r for r in records if r.split == split])},
        "wall_s": wall,
        "questions_per_s": len(records) / wall if wall else None,
    }
    _print_summary(result)
    result = round_floats(result, 4)
    emit("rag_eval", args, result)
    return result


def _print_summary(r: dict[str, Any]) -> None:
    def pct(key: str) -> str:
        return "n/a" if r[key] is None else f"{100 * r[key]:.1f}%"

    print(f"{r['completed']}/{r['questions']} questions ok ({r['errors']} errors), k={r['k']}: "
          f"recall@k {pct('recall_at_k')}, hit@k {pct('hit_at_k')} "
          f"({r['with_gold_passages']} with gold passages); EM {pct('exact_match')}, "
          f"F1 {pct('f1')}, accuracy {pct('accuracy')}; citation precision "
          f"{pct('citation_precision')} over {r['citations']} citations, "
          f"{pct('cited_fraction')} of answers cite", flush=True)
    for mode, recalls in r["by_mode"].items():
        print(f"{mode}: " + ", ".join(f"{k.replace('_at_', '@')} {100 * v:.1f}%"
                                      for k, v in recalls.items()), flush=True)


def convert_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rag_eval convert",
                                description="public QA sets to rag_eval JSONL (on stdout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--nq", type=Path, help="NQ-open JSONL (question, answer list)")
    src.add_argument("--hotpotqa", type=Path, help="HotPotQA dev JSON (distractor or fullwiki)")
    p.add_argument("--corpus-dir", type=Path, help="HotPotQA: write one TITLE.txt per context "
                                                   "paragraph here, for `ragserve index build`")
    args = p.parse_args(argv)
    if args.nq and args.corpus_dir:
        p.error("--corpus-dir goes with --hotpotqa (NQ-open has no passages)")
    rows = convert_nq(args.nq) if args.nq else convert_hotpotqa(args.hotpotqa, args.corpus_dir)
    n = 0
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    print(f"# {n} questions", file=sys.stderr)
    return 0


def synthetic_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rag_eval synthetic",
                                description="write made-up-fact documents and their questions")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    docs, dataset = synthetic_dataset(args.out_dir, args.n, args.seed)
    print(json.dumps({"docs": str(docs), "dataset": str(dataset), "n": args.n}))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        if argv[:1] == ["convert"]:
            sys.exit(convert_main(argv[1:]))
        if argv[:1] == ["synthetic"]:
            sys.exit(synthetic_main(argv[1:]))
        main(argv)
    except EvalError as e:
        raise SystemExit(f"rag_eval: error: {e}") from None
