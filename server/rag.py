"""Retrieval-augmented chat: the in-process retriever, the RAG prompt, the grounding check.

A chat request opts in with a ``rag`` object (``{"rag": {"top_k": 5}}``). The last user turn is
the query; the passages found are numbered ``[1]..[k]`` and placed, with instructions to cite
them and to say "I don't know" when they lack the answer, in a system message at the head of the
conversation. Passages go in best first while the prompt fits the largest prefill bucket and
leaves room for the answer; those that do not fit are left out and counted in the response.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.errors import LOADING_RETRY_SECONDS, APIError, bad_request, retry_after
from server.protocol import Grounding, RetrieverInfo, Source

if TYPE_CHECKING:
    from retrieval.encoder import ColBERTEncoder
    from retrieval.grounding import Citer, GroundingReport
    from retrieval.index import PassageIndex
    from retrieval.types import Passage
    from server.config import ServerConfig
    from server.metrics import Metrics

log = logging.getLogger("ragserve.rag")

RAG_INSTRUCTIONS = (
    "Answer the question using only the numbered passages below. After each sentence, cite the "
    "passages that support it by their numbers in square brackets, like [1] or [2][3]. If the "
    "passages do not contain the answer, reply: I don't know."
)


def format_passages(passages: Sequence[Passage]) -> str:
    blocks = []
    for n, p in enumerate(passages, 1):
        where = p.name + (f", page {p.page}" if p.page is not None else "")
        blocks.append(f"[{n}] ({where})\n{p.text.strip()}")
    return "\n\n".join(blocks)


def rag_messages(messages: list[dict[str, Any]], passages: Sequence[Passage]) -> list[dict]:
    """``messages`` with the instructions and numbered passages in a leading system message
    (merged into the client's own system message, which keeps its text after ours)."""
    context = RAG_INSTRUCTIONS + "\n\nPassages:\n\n" + (format_passages(passages) or "(none)")
    if messages and messages[0]["role"] == "system":
        head = {**messages[0], "content": context + "\n\n" + messages[0]["content"]}
        return [head, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    raise bad_request("a rag request needs a user message with text: the last user turn is "
                      "the retrieval query", "messages")


@dataclass(frozen=True)
class StoreSearch:
    """What a ``file_search`` tool asks of :meth:`RAGService.prepare` (chat's ``rag`` options
    are the other caller): the stores, their filter and score threshold, how many passages."""

    vector_store_ids: list[str]
    top_k: int | None = None
    filters: dict[str, Any] | None = None
    score_threshold: float | None = None
    retrieval: str | None = None
    grounding: str | None = None
    max_context_tokens: int | None = None
    citations: str | None = None
    param: str = "vector_store_ids"


@dataclass
class RAGContext:
    """What one RAG request retrieved and put into its prompt."""

    prompt_ids: list[int]
    passages: list[Passage]  # in the prompt, numbered from 1
    retrieved: int
    grounding: str
    context_tokens: int
    citations: str = "auto"

    def sources(self) -> list[Source]:
        return [Source(number=n, chunk_id=p.chunk_id, doc_id=p.doc_id, source=p.source,
                       page=p.page, score=round(p.score, 4), text=p.text)
                for n, p in enumerate(self.passages, 1)]


class RAGService:
    """Owns the index: loads it in the background at start, searches off the event loop (one
    search at a time, on its own thread), runs the grounding check."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.on_failure = on_failure
        self.index: PassageIndex | None = None
        self.state = "disabled" if config.index is None else "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragserve-retriever")
        self._thread: threading.Thread | None = None
        self._encoder: ColBERTEncoder | None = None
        # the vector stores (server.serving_vector_stores), set by the app: RAG over a store
        self.vector_stores: Any = None
        self._encoder_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.index is not None

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._load, name="ragserve-index-load",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        from retrieval.default_encoder import load_encoder
        from retrieval.index import PassageIndex, read_manifest
        from runtime.loader import default_cache_dir, import_transformers

        t0 = time.perf_counter()
        try:
            import_transformers()  # the engine thread may be importing it right now
            path = self.config.index
            name = self.config.retriever_model or read_manifest(path)["encoder"]["name"]
            encoder = load_encoder(name, self.config.cache_dir or default_cache_dir())
            log.info("retriever encoder %s: %s, dim %d", encoder.name, encoder.label,
                     encoder.settings.dim)
            self.index = PassageIndex.load(path, encoder)
            self.index.search("warm up", 1)  # first-call costs out of the first request
        except Exception as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.error("the index at %s failed to load: %s", self.config.index, self.error)
            if self.on_failure is not None:
                self.on_failure(e)
            return
        self.load_seconds = time.perf_counter() - t0
        self.state = "ready"
        log.info("index %s loaded in %.1fs: %d passages from %d documents (%s backend)",
                 path, self.load_seconds, len(self.index), len(self.index.doc_ids),
                 self.index.backend.name)

    def refresh(self) -> bool:
        """Swap in the --index's current version if a writer (``ragserve index add``) published
        a newer one than the loaded one: loaded whole first, then one assignment, so a search
        runs on the old version or the new one. True if it swapped."""
        from retrieval.index import PassageIndex, current_name

        index = self.index
        if index is None or current_name(self.config.index) in (None, index.version):
            return False
        t0 = time.perf_counter()
        new = PassageIndex.load(self.config.index, index.encoder)
        new.lexical  # noqa: B018 - BM25 ready before the swap, not on the first search
        self.index = new
        log.info("index %s: version %s (%d passages from %d documents) swapped in for %s in "
                 "%.1fs", self.config.index, new.version, len(new), len(new.doc_ids),
                 index.version, time.perf_counter() - t0)
        return True

    def encoder(self) -> ColBERTEncoder:
        """The retriever's encoder: the --index's once it is loaded (a 503 before); without
        --index, --retriever-model or the offline default, loaded on first use (call it on the
        retriever's thread, :meth:`run`: the first call takes seconds)."""
        if self.enabled:
            return self.check_ready().encoder
        with self._encoder_lock:
            if self._encoder is None:
                from retrieval.default_encoder import load_encoder
                from runtime.loader import default_cache_dir, import_transformers

                import_transformers()
                self._encoder = load_encoder(self.config.retriever_model,
                                             self.config.cache_dir or default_cache_dir())
            return self._encoder

    def info(self) -> RetrieverInfo | None:
        if not self.enabled:
            return None
        if self.index is None:
            return RetrieverInfo(status=self.state, index=str(self.config.index))
        return RetrieverInfo(
            status=self.state, index=str(self.config.index), encoder=self.index.encoder.name,
            label=self.index.encoder.label, backend=self.index.backend.name,
            retrieval=self.index.retrieval.mode, passages=len(self.index),
            documents=len(self.index.doc_ids))

    def check_ready(self) -> PassageIndex:
        if not self.enabled:
            raise bad_request("retrieval is not enabled on this server: start it with "
                              "--index INDEX_DIR (see `ragserve index build`)", "rag")
        if self.index is None:
            if self.state == "loading":
                raise APIError(503, "the retrieval index is still loading",
                               code="index_loading",
                               headers=retry_after(LOADING_RETRY_SECONDS))
            raise APIError(503, f"the retrieval index is not available: {self.error}",
                           code="index_unavailable")
        return self.index

    async def search(self, query: str, k: int, mode: str | None = None) -> list[Passage]:
        index = self.check_ready()
        t0 = time.perf_counter()
        hits = await self.run(index.search, query, k, mode)
        if self.metrics is not None:
            self.metrics.observe_retrieval(time.perf_counter() - t0)
        return hits

    async def prepare(self, messages: list[dict[str, Any]], options: Any, max_tokens: int | None,
                      limits: tuple[int, int], tokenize: Callable[[list[dict]], list[int]]
                      ) -> RAGContext:
        """Retrieve for the last user turn and build the prompt: as many passages, best first,
        as fit ``limits`` = (largest prefill bucket, max_model_len) with room for the answer
        (``max_tokens``, else --rag-answer-tokens) and ``options.max_context_tokens``."""
        k = options.top_k or self.config.rag_top_k
        query = last_user_text(messages)
        store_ids = getattr(options, "vector_store_ids", None) or (
            [options.vector_store_id] if getattr(options, "vector_store_id", None) else None)
        if store_ids:
            self.vector_stores.check_ids(store_ids, getattr(options, "param",
                                                            "rag.vector_store_id"))
            hits = await self.vector_stores.search_stores(
                store_ids, [query], k, getattr(options, "filters", None), options.retrieval,
                getattr(options, "score_threshold", None))
            passages = [p for p, _ in hits]
        else:
            passages = await self.search(query, k, options.retrieval)
        largest, max_model_len = limits
        answer = max_tokens or min(self.config.rag_answer_tokens, max_model_len // 2)
        budget = min(largest, max_model_len - answer)
        base = tokenize(rag_messages(messages, []))
        cap = options.max_context_tokens
        ids, used = base, 0
        for m in range(len(passages), 0, -1):  # best first: drop from the end until it fits
            candidate = tokenize(rag_messages(messages, passages[:m]))
            if len(candidate) <= budget and (cap is None or len(candidate) - len(base) <= cap):
                ids, used = candidate, m
                break
        if used < len(passages):
            log.info("rag: %d of %d passages fit the prompt budget (%d tokens)", used,
                     len(passages), budget)
        return RAGContext(prompt_ids=ids, passages=passages[:used], retrieved=len(passages),
                          grounding=options.grounding or self.config.grounding,
                          context_tokens=len(ids) - len(base),
                          citations=options.citations or self.config.rag_citations)

    def citer(self, ctx: RAGContext) -> Citer:
        from retrieval.grounding import Citer

        return Citer(self.encoder(), [p.text for p in ctx.passages],
                     mode=ctx.grounding, citations=ctx.citations,
                     threshold=self.config.grounding_threshold,
                     attribution_threshold=self.config.attribution_threshold)

    async def check(self, ctx: RAGContext, text: str) -> tuple[str, Grounding]:
        """Cite and check one finished answer: the text to return and the report."""
        from retrieval.grounding import check

        encoder = self.encoder()
        text, report = await self.run(
            lambda: check(text, [p.text for p in ctx.passages], encoder,
                          mode=ctx.grounding, citations=ctx.citations,
                          threshold=self.config.grounding_threshold,
                          attribution_threshold=self.config.attribution_threshold))
        return text, self.reported(ctx, report)

    def reported(self, ctx: RAGContext, report: GroundingReport) -> Grounding:
        """The report as the response field, counted in the RAG metrics."""
        if self.metrics is not None:
            self.metrics.observe_rag(
                len(ctx.passages), len(report.invalid_citations),
                report.unsupported_citations - len(report.invalid_citations),
                sum(len(s.citations) for s in report.sentences) - report.attributed,
                report.attributed)
        # the report's attributes are the field names (two of them properties)
        return Grounding.model_validate(report, from_attributes=True)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the retriever's thread (encoder work off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


class SentenceStream:
    """Streams an answer sentence by sentence, each cited (and checked) as it completes: what
    ``auto`` and ``attribute`` citations need, since a sentence can only be attributed whole.
    Only the sentence being written is held back, never the whole answer."""

    def __init__(self, service: RAGService, ctx: RAGContext) -> None:
        self.service = service
        self.ctx = ctx
        self.citer = service.citer(ctx)
        self.done = 0  # characters of the model's text already sent (as cited sentences)

    async def feed(self, text: str, final: bool) -> str:
        """What to send now for the model's text so far."""
        from retrieval.grounding import sentence_spans

        rest = text[self.done:]
        spans = sentence_spans(rest, final)
        if not spans:
            return rest if final else ""
        cited = await self.service.run(self.citer.cite, [rest[a:b] for a, b in spans])
        pieces, last = [], 0
        for (a, b), sentence in zip(spans, cited):
            pieces += [rest[last:a], sentence]
            last = b
        if final:
            pieces.append(rest[last:])
            last = len(rest)
        self.done += last
        out = "".join(pieces)
        return out

    def report(self) -> Grounding:
        return self.service.reported(self.ctx, self.citer.report)


class CitationFilter:
    """Streams an answer without its invalid citations: text is released as soon as no later
    token can turn it into (part of) a citation to a passage that does not exist."""

    def __init__(self, num_sources: int) -> None:
        self.num_sources = num_sources
        self.sent = ""

    def feed(self, text: str, final: bool) -> str:
        from retrieval.grounding import drop_invalid_citations, stable_length

        ready = text if final else text[:stable_length(text.rstrip())]
        clean, _ = drop_invalid_citations(ready, self.num_sources)
        if not clean.startswith(self.sent):  # cannot happen for prefix-stable text; be safe
            return ""
        delta, self.sent = clean[len(self.sent):], clean
        return delta
