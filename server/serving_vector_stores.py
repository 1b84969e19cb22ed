"""``/v1/vector_stores``: the index the server was started with (``--index``) as OpenAI's one
vector store, read-only: list, retrieve, search. Each source document is a "file".

Ids are stable across restarts and machines: the store's is ``vs_`` + a hash of the index's
creation time and encoder fingerprint (kept by ``ragserve index add``, new for a new build);
a file's is ``file-`` + a hash of its ``doc_id`` (the path relative to the ingested folder),
which is also its ``filename``.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import TYPE_CHECKING

from server.errors import APIError, bad_request
from server.protocol_responses import (
    FileCounts,
    SearchContent,
    VectorStore,
    VectorStoreList,
    VectorStoreSearchPage,
    VectorStoreSearchRequest,
    VectorStoreSearchResult,
)
from server.rag import RAGService

if TYPE_CHECKING:
    from retrieval.types import Passage

NO_STORE = ("this server has no vector store: start it with --index INDEX_DIR (see "
            "`ragserve index build`)")


def file_id(doc_id: str) -> str:
    """A document's stable file id: the same ``doc_id`` gives the same id on every server.

    >>> file_id("zorvania.txt") == file_id("zorvania.txt") != file_id("other.txt")
    True
    >>> len(file_id("zorvania.txt")), file_id("zorvania.txt")[:5]
    (29, 'file-')
    """
    return "file-" + hashlib.sha256(doc_id.encode()).hexdigest()[:24]


def attributes(p: Passage, number: int | None = None) -> dict[str, str | float | bool]:
    """A passage's place in its document (OpenAI's ``attributes``: strings, numbers, bools)."""
    out: dict[str, str | float | bool] = {"doc_id": p.doc_id, "chunk_id": p.chunk_id,
                                          "start": p.start, "end": p.end}
    if p.page is not None:
        out["page"] = p.page
    if number is not None:
        out["number"] = number  # what [n] in the prompt called it
    return out


class ServingVectorStores:
    def __init__(self, rag: RAGService) -> None:
        self.rag = rag

    @cached_property
    def store_id(self) -> str | None:
        """The store's id, read from the index's manifest (no need to wait for its load)."""
        if not self.rag.enabled:
            return None
        from retrieval.index import read_manifest

        manifest = read_manifest(self.rag.config.index)
        key = f"{manifest.get('created_at')}:{manifest['encoder'].get('fingerprint')}"
        return "vs_" + hashlib.sha256(key.encode()).hexdigest()[:24]

    def check_ids(self, ids: list[str], param: str) -> None:
        """The ids a request names must be this server's store; a 400 naming the field."""
        if self.store_id is None:
            raise bad_request(NO_STORE, param)
        unknown = [i for i in ids if i != self.store_id]
        if unknown:
            raise bad_request(f"vector store {unknown[0]!r} not found: this server has one, "
                              f"{self.store_id!r} (its --index)", param)

    def _check_known(self, store_id: str) -> None:
        if self.store_id is None:
            raise APIError(404, NO_STORE, param="vector_store_id", code="not_found")
        if store_id != self.store_id:
            raise APIError(404, f"No vector store found with id '{store_id}' (this server has "
                                f"{self.store_id!r})", param="vector_store_id",
                           code="not_found")

    # -- routes ----------------------------------------------------------------------------

    def list(self) -> VectorStoreList:
        data = [self._describe()] if self.store_id is not None else []
        return VectorStoreList(data=data, first_id=data[0].id if data else None,
                               last_id=data[-1].id if data else None)

    def retrieve(self, store_id: str) -> VectorStore:
        self._check_known(store_id)
        return self._describe()

    async def search(self, store_id: str, req: VectorStoreSearchRequest) -> VectorStoreSearchPage:
        self._check_known(store_id)
        if req.rewrite_query:
            raise bad_request("rewrite_query is not supported (the query is searched as "
                              "given)", "rewrite_query")
        if req.filters is not None:
            raise bad_request("filters are not supported (the index has no file attributes "
                              "to filter on)", "filters")
        if req.ranking_options is not None:
            raise bad_request("ranking_options is not supported (ranking is the index's "
                              "retrieval mode)", "ranking_options")
        queries = [req.query] if isinstance(req.query, str) else list(req.query)
        if not queries or not all(q.strip() for q in queries):
            raise bad_request("query must be a non-empty string (or a list of them)", "query")
        hits: dict[int, Passage] = {}
        for q in queries:  # several queries: their passages merged, each at its best score
            for p in await self.rag.search(q, req.max_num_results):
                if p.chunk_id not in hits or hits[p.chunk_id].score < p.score:
                    hits[p.chunk_id] = p
        best = sorted(hits.values(), key=lambda p: -p.score)[:req.max_num_results]
        return VectorStoreSearchPage(search_query=queries, data=[
            VectorStoreSearchResult(file_id=file_id(p.doc_id), filename=p.doc_id,
                                    score=round(p.score, 6), attributes=attributes(p),
                                    content=[SearchContent(text=p.text)])
            for p in best])

    def _describe(self) -> VectorStore:
        index = self.rag.index
        manifest = self._manifest()
        docs = len(index.doc_ids) if index is not None else int(manifest.get("documents", 0))
        status = "completed" if self.rag.state == "ready" else (
            "in_progress" if self.rag.state == "loading" else "expired")
        created = int(float(manifest.get("created_at", 0)))
        return VectorStore(
            id=self.store_id or "", created_at=created,
            name=self.rag.config.index.name if self.rag.config.index else "",
            status=status, usage_bytes=self._usage_bytes(),
            file_counts=FileCounts(completed=docs if status == "completed" else 0,
                                   in_progress=docs if status == "in_progress" else 0,
                                   failed=docs if status == "expired" else 0, total=docs),
            last_active_at=created)

    def _manifest(self) -> dict:
        from retrieval.index import read_manifest

        return read_manifest(self.rag.config.index)

    def _usage_bytes(self) -> int:
        from retrieval.index import current_version

        version = current_version(self.rag.config.index)
        return sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
