"""``/v1/vector_stores``: the stores clients create (read-write, ingested by
:mod:`server.ingest`, searched through :mod:`server.stores`) and the index the server was
started with (``--index``) as one more store, read-only.

The ``--index`` store's ids are stable across restarts and machines: the store's is ``vs_`` + a
hash of the index's creation time and encoder fingerprint (kept by ``ragserve index add``, new
for a new build); a document's file id is ``file-`` + a hash of its ``doc_id`` (the path
relative to the ingested folder), which is also its ``filename``. A created store's files are
the ``/v1/files`` uploads added to it.

Search returns OpenAI's shape with scores on 0..1 (:meth:`retrieval.index.PassageIndex
.relevance`), which ``ranking_options.score_threshold`` compares with; ``filters`` select files
by their ``attributes`` (:mod:`retrieval.filters`); ``retrieval`` (an extension) picks the mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from server.document_store import StoreError, StoreFileRow, StoreRow, new_id
from server.errors import APIError, bad_request, retry_after
from server.protocol_vector_stores import (
    ChunkingOut,
    FileBatchCreateRequest,
    FileCounts,
    LastError,
    SearchContent,
    StaticChunkingOut,
    VectorStore,
    VectorStoreCreateRequest,
    VectorStoreDeleted,
    VectorStoreFile,
    VectorStoreFileBatch,
    VectorStoreFileCreateRequest,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreList,
    VectorStoreModifyRequest,
    VectorStoreSearchPage,
    VectorStoreSearchRequest,
    VectorStoreSearchResult,
)
from server.rag import RAGService
from server.serving_files import paginate

if TYPE_CHECKING:
    from retrieval.types import Passage
    from server.config import ServerConfig
    from server.stores import Stores

NO_STORE = ("this server has no vector store: create one with POST /v1/vector_stores, or start "
            "it with --index INDEX_DIR (see `ragserve index build`)")
#: ``auto`` chunking: ragserve's own defaults (``ragserve index build``'s, chosen on
#: benchmarks/data), not OpenAI's 800/400, which is larger than ColBERT indexes per passage
AUTO_CHUNKING = {"max_chunk_size_tokens": 176, "chunk_overlap_tokens": 32}


def file_id(doc_id: str) -> str:
    """A ``--index`` document's stable file id: the same ``doc_id`` gives the same id on every
    server.

    >>> file_id("zorvania.txt") == file_id("zorvania.txt") != file_id("other.txt")
    True
    >>> len(file_id("zorvania.txt")), file_id("zorvania.txt")[:5]
    (29, 'file-')
    """
    return "file-" + hashlib.sha256(doc_id.encode()).hexdigest()[:24]


def passage_file(p: Passage) -> tuple[str, str]:
    """(file id, filename) of a passage: a created store's passage is named by its file's id
    and titled with its filename; an ``--index`` passage by its document's path."""
    if p.title is not None:
        return p.doc_id, p.title
    return file_id(p.doc_id), p.doc_id


def attributes(p: Passage, number: int | None = None,
               file_attributes: dict[str, Any] | None = None) -> dict[str, str | float | bool]:
    """A passage's attributes: its file's (a created store's), then its place in its document
    (``chunk_id``, ``start``, ``end``, ``page``; ``number``: what [n] in the prompt called it)."""
    out: dict[str, str | float | bool] = dict(file_attributes or {})
    out.update({"doc_id": p.doc_id, "chunk_id": p.chunk_id, "start": p.start, "end": p.end})
    if p.page is not None:
        out["page"] = p.page
    if number is not None:
        out["number"] = number
    return out


def _error(e: StoreError) -> APIError:
    return APIError(e.status, str(e), param=e.param, code=e.code,
                    headers=retry_after(e.retry_seconds))


class ServingVectorStores:
    def __init__(self, config: ServerConfig, rag: RAGService, stores: Stores) -> None:
        self.config = config
        self.rag = rag
        self.stores = stores
        self.docs = stores.docs

    # -- the --index store -----------------------------------------------------------------

    @cached_property
    def index_store_id(self) -> str | None:
        """The ``--index`` store's id, read from its manifest (no need to wait for its load)."""
        if not self.rag.enabled:
            return None
        from retrieval.index import read_manifest

        manifest = read_manifest(self.rag.config.index)
        key = f"{manifest.get('created_at')}:{manifest['encoder'].get('fingerprint')}"
        return "vs_" + hashlib.sha256(key.encode()).hexdigest()[:24]

    def _is_index(self, store_id: str) -> bool:
        return store_id == self.index_store_id

    def _read_only(self, store_id: str) -> APIError:
        return APIError(400, f"vector store {store_id!r} is the server's --index, which is "
                             "read-only (`ragserve index add` changes it); create a store with "
                             "POST /v1/vector_stores to add files", param="vector_store_id")

    def _row(self, store_id: str) -> StoreRow:
        try:
            return self.docs.store(store_id)
        except StoreError as e:
            raise _error(e) from None

    def _writable(self, store_id: str) -> StoreRow:
        if self._is_index(store_id):
            raise self._read_only(store_id)
        row = self._row(store_id)
        if row.expired():
            raise APIError(400, f"vector store {store_id!r} expired at {row.expires_at} "
                                "(its expires_after): modify expires_after to use it again",
                           param="vector_store_id", code="expired")
        return row

    def check_ids(self, ids: list[str], param: str) -> None:
        """Every id a request names must be a store of this server: a 400 naming the field."""
        for store_id in ids:
            if self._is_index(store_id):
                continue
            try:
                row = self.docs.store(store_id)
            except StoreError:
                known = [s for s in [self.index_store_id] if s] + [
                    r.id for r in self.docs.stores()[:5]]
                raise bad_request(f"vector store {store_id!r} not found"
                                  + (f" (this server has {', '.join(map(repr, known))}"
                                     f"{', ...' if len(known) > 5 else ''})" if known
                                     else f": {NO_STORE}"), param) from None
            if row.expired():
                raise bad_request(f"vector store {store_id!r} has expired", param)

    # -- stores ----------------------------------------------------------------------------

    def create(self, req: VectorStoreCreateRequest) -> VectorStore:
        chunking = self._chunking(req.chunking_strategy)
        if len(req.file_ids) > self.config.max_batch_files:
            raise bad_request(f"file_ids holds {len(req.file_ids)} files, more than "
                              f"--max-batch-files ({self.config.max_batch_files})", "file_ids")
        try:
            row = self.docs.create_store(
                req.name, req.description, req.metadata or {},
                req.expires_after.model_dump() if req.expires_after else None, chunking,
                max_stores=self.config.max_vector_stores)
            if req.file_ids:
                self.docs.add_to_store(row.id, [(f, {}, chunking) for f in req.file_ids],
                                       max_files=self.config.max_files_per_vector_store)
        except StoreError as e:
            if "row" in locals():
                self.docs.delete_store(row.id)
            raise _error(e) from None
        self.stores.changed()
        return self._describe(row)

    def list(self, limit: int, order: str, after: str | None) -> VectorStoreList:
        data = [self._describe_index()] if self.index_store_id is not None else []
        data += [self._describe(r) for r in self.docs.stores()]
        page, more = paginate(data, limit, order, after, lambda v: v.id)
        return VectorStoreList(data=page, first_id=page[0].id if page else None,
                               last_id=page[-1].id if page else None, has_more=more)

    def retrieve(self, store_id: str) -> VectorStore:
        if self._is_index(store_id):
            return self._describe_index()
        return self._describe(self._row(store_id))

    def modify(self, store_id: str, req: VectorStoreModifyRequest) -> VectorStore:
        if self._is_index(store_id):
            raise self._read_only(store_id)
        self._row(store_id)
        changes: dict[str, Any] = {}
        fields = req.model_fields_set
        if "name" in fields and req.name is not None:
            changes["name"] = req.name
        if "metadata" in fields:
            changes["metadata"] = req.metadata or {}
        if "expires_after" in fields:
            changes["expires_after"] = (req.expires_after.model_dump() if req.expires_after
                                        else None)
            changes["last_active_at"] = int(time.time())
        try:
            row = self.docs.update_store(store_id, **changes)
        except StoreError as e:
            raise _error(e) from None
        return self._describe(row)

    def delete(self, store_id: str) -> VectorStoreDeleted:
        if self._is_index(store_id):
            raise self._read_only(store_id)
        try:
            self.docs.delete_store(store_id)
        except StoreError as e:
            raise _error(e) from None
        self.stores.changed()
        return VectorStoreDeleted(id=store_id)

    def _describe(self, row: StoreRow) -> VectorStore:
        counts = self.docs.counts(row.id)
        status = "expired" if row.expired() else (
            "in_progress" if counts["in_progress"] else "completed")
        return VectorStore(
            id=row.id, created_at=row.created_at, name=row.name, status=status,
            usage_bytes=self.docs.usage_bytes(row.id), file_counts=FileCounts(**counts),
            last_active_at=row.last_active_at, metadata=row.metadata,
            expires_after=row.expires_after, expires_at=row.expires_at,
            description=row.description)

    def _describe_index(self) -> VectorStore:
        from retrieval.index import current_version, read_manifest

        index = self.rag.index
        manifest = read_manifest(self.rag.config.index)
        docs = len(index.doc_ids) if index is not None else int(manifest.get("documents", 0))
        status = "completed" if self.rag.state == "ready" else (
            "in_progress" if self.rag.state == "loading" else "expired")
        created = int(float(manifest.get("created_at", 0)))
        version = current_version(self.rag.config.index)
        usage = sum(f.stat().st_size for f in version.parent.rglob("*") if f.is_file())
        return VectorStore(
            id=self.index_store_id or "", created_at=created,
            name=self.rag.config.index.name if self.rag.config.index else "",
            status=status, usage_bytes=usage,
            file_counts=FileCounts(completed=docs if status == "completed" else 0,
                                   in_progress=docs if status == "in_progress" else 0,
                                   failed=docs if status == "expired" else 0, total=docs),
            last_active_at=created, metadata={"read_only": "true"})

    # -- files in a store ------------------------------------------------------------------

    def _chunking(self, strategy: Any) -> dict[str, int]:
        if strategy is None or strategy.type == "auto":
            return dict(AUTO_CHUNKING)
        return strategy.static.model_dump()

    def add_file(self, store_id: str, req: VectorStoreFileCreateRequest) -> VectorStoreFile:
        row = self._writable(store_id)
        chunking = self._chunking(req.chunking_strategy) if req.chunking_strategy else (
            row.chunking or dict(AUTO_CHUNKING))
        try:
            (added,) = self.docs.add_to_store(
                store_id, [(req.file_id, req.attributes or {}, chunking)],
                max_files=self.config.max_files_per_vector_store)
        except StoreError as e:
            raise _error(e) from None
        self.stores.changed()
        return self._file(added)

    def list_files(self, store_id: str, limit: int, order: str, after: str | None,
                   status: str | None, batch_id: str | None = None) -> VectorStoreFileList:
        if status not in (None, "in_progress", "completed", "failed", "cancelled"):
            raise bad_request("filter must be in_progress, completed, failed or cancelled",
                              "filter")
        if self._is_index(store_id):
            rows = self._index_files() if status in (None, "completed") else []
        else:
            self._row(store_id)
            rows = [self._file(r) for r in self.docs.store_files(store_id, status, batch_id)]
        page, more = paginate(rows, limit, order, after, lambda f: f.id)
        return VectorStoreFileList(data=page, first_id=page[0].id if page else None,
                                   last_id=page[-1].id if page else None, has_more=more)

    def _index_files(self) -> list[VectorStoreFile]:
        index = self.rag.check_ready()
        return [VectorStoreFile(id=file_id(d), created_at=int(index.created_at),
                                vector_store_id=self.index_store_id or "", status="completed",
                                usage_bytes=index.usage_bytes(d), attributes={"filename": d})
                for d in sorted(index.doc_ids)]

    def get_file(self, store_id: str, fid: str) -> VectorStoreFile:
        if self._is_index(store_id):
            for f in self._index_files():
                if f.id == fid:
                    return f
            raise APIError(404, f"No file found with id '{fid}' in vector store "
                                f"'{store_id}'", param="file_id", code="not_found")
        try:
            return self._file(self.docs.store_file(store_id, fid))
        except StoreError as e:
            raise _error(e) from None

    def update_file(self, store_id: str, fid: str, attributes: dict | None
                    ) -> VectorStoreFile:
        if self._is_index(store_id):
            raise self._read_only(store_id)
        try:
            row = self.docs.update_attributes(store_id, fid, attributes or {})
        except StoreError as e:
            raise _error(e) from None
        self.stores.changed()
        return self._file(row)

    def remove_file(self, store_id: str, fid: str) -> VectorStoreFileDeleted:
        if self._is_index(store_id):
            raise self._read_only(store_id)
        try:
            self.docs.remove_from_store(store_id, fid)
        except StoreError as e:
            raise _error(e) from None
        self.stores.changed()
        return VectorStoreFileDeleted(id=fid)

    def _file(self, r: StoreFileRow) -> VectorStoreFile:
        return VectorStoreFile(
            id=r.file_id, created_at=r.created_at, vector_store_id=r.store_id,
            status=r.status,  # type: ignore[arg-type]
            usage_bytes=r.usage_bytes,
            last_error=LastError(**r.last_error) if r.last_error else None,
            attributes=r.attributes,
            chunking_strategy=ChunkingOut(static=StaticChunkingOut(**r.chunking)))

    # -- file batches ----------------------------------------------------------------------

    def create_batch(self, store_id: str, req: FileBatchCreateRequest) -> VectorStoreFileBatch:
        row = self._writable(store_id)
        if (req.file_ids is None) == (req.files is None):
            raise bad_request("give file_ids or files (one of them)", "file_ids")
        default = self._chunking(req.chunking_strategy) if req.chunking_strategy else (
            row.chunking or dict(AUTO_CHUNKING))
        if req.files is not None:
            if req.attributes is not None or req.chunking_strategy is not None:
                raise bad_request("with files, give attributes and chunking_strategy per file",
                                  "files")
            entries = [(f.file_id, f.attributes or {},
                        self._chunking(f.chunking_strategy) if f.chunking_strategy
                        else default) for f in req.files]
        else:
            entries = [(f, req.attributes or {}, default) for f in req.file_ids or ()]
        if not entries:
            raise bad_request("the batch has no files", "file_ids")
        if len(entries) > self.config.max_batch_files:
            raise bad_request(f"the batch holds {len(entries)} files, more than "
                              f"--max-batch-files ({self.config.max_batch_files})", "file_ids")
        if len({e[0] for e in entries}) != len(entries):
            raise bad_request("a file appears twice in the batch", "file_ids")
        batch_id = new_id("vsfb_")
        try:
            self.docs.add_to_store(store_id, entries, batch_id,
                                   max_files=self.config.max_files_per_vector_store)
        except StoreError as e:
            raise _error(e) from None
        self.stores.changed()
        return self.get_batch(store_id, batch_id)

    def get_batch(self, store_id: str, batch_id: str) -> VectorStoreFileBatch:
        try:
            created, cancelled = self.docs.batch(store_id, batch_id)
        except StoreError as e:
            raise _error(e) from None
        counts = self.docs.counts(store_id, batch_id)
        status = ("cancelled" if cancelled and not counts["in_progress"] else
                  "in_progress" if counts["in_progress"] else
                  "failed" if counts["failed"] and not counts["completed"] else "completed")
        return VectorStoreFileBatch(id=batch_id, created_at=created, vector_store_id=store_id,
                                    status=status, file_counts=FileCounts(**counts))

    def cancel_batch(self, store_id: str, batch_id: str) -> VectorStoreFileBatch:
        try:
            self.docs.cancel_batch(store_id, batch_id)
        except StoreError as e:
            raise _error(e) from None
        self.stores.changed()
        return self.get_batch(store_id, batch_id)

    # -- search ----------------------------------------------------------------------------

    async def search(self, store_id: str, req: VectorStoreSearchRequest) -> VectorStoreSearchPage:
        if not self._is_index(store_id):
            row = self._row(store_id)
            if row.expired():
                raise APIError(400, f"vector store {store_id!r} has expired",
                               param="vector_store_id", code="expired")
        if req.rewrite_query:
            raise bad_request("rewrite_query is not supported (the query is searched as "
                              "given)", "rewrite_query")
        queries = [req.query] if isinstance(req.query, str) else list(req.query)
        if not queries or not all(q.strip() for q in queries):
            raise bad_request("query must be a non-empty string (or a list of them)", "query")
        limit = self.config.max_search_query_chars
        if any(len(q) > limit for q in queries):
            raise bad_request(f"query is longer than --max-search-query-chars ({limit})",
                              "query")
        threshold = req.ranking_options.score_threshold if req.ranking_options else None
        hits = await self.search_stores([store_id], queries, req.max_num_results,
                                        req.filters, req.retrieval, threshold)
        return VectorStoreSearchPage(search_query=queries, data=[
            VectorStoreSearchResult(file_id=passage_file(p)[0], filename=passage_file(p)[1],
                                    score=round(p.score, 6),
                                    attributes=attributes(p, file_attributes=extra),
                                    content=[SearchContent(text=p.text)])
            for p, extra in hits])

    async def search_stores(self, store_ids: list[str], queries: list[str], k: int,
                            filters: dict[str, Any] | None = None, mode: str | None = None,
                            threshold: float | None = None
                            ) -> list[tuple[Passage, dict[str, Any]]]:
        """The ``k`` best passages over ``store_ids`` and ``queries`` (each passage once, at
        its best), scored 0..1, with their files' attributes."""
        import dataclasses

        from retrieval.filters import FilterError, check

        if filters is not None:
            try:
                check(filters)
            except FilterError as e:
                raise bad_request(f"filters: {e}", "filters") from None
        best: dict[tuple[str, int], tuple[Passage, dict[str, Any]]] = {}
        for store_id in store_ids:
            for q in queries:
                if self._is_index(store_id):
                    if filters is not None:
                        raise bad_request("filters apply to files' attributes; the --index "
                                          "store's documents have none", "filters")
                    index = self.rag.check_ready()
                    found = await self.rag.search(q, k, mode)
                    scored = [(dataclasses.replace(p, score=index.relevance(p.score, mode)), {})
                              for p in found]
                else:
                    scored = await self._search_store(store_id, q, k, mode, filters)
                for p, extra in scored:
                    key = (store_id, p.chunk_id)
                    if key not in best or best[key][0].score < p.score:
                        best[key] = (p, extra)
        ranked = sorted(best.values(), key=lambda h: -h[0].score)
        if threshold is not None:
            ranked = [h for h in ranked if h[0].score >= threshold]
        return ranked[:k]

    async def _search_store(self, store_id: str, query: str, k: int, mode: str | None,
                            filters: dict[str, Any] | None
                            ) -> list[tuple[Passage, dict[str, Any]]]:
        import dataclasses

        stores = self.stores

        def run() -> list[tuple[Passage, dict[str, Any]]]:
            found = stores.search(store_id, query, k, mode, filters)
            index = stores.index(store_id)
            files = stores.searchable(store_id)
            names = stores.filenames({p.doc_id for p in found})
            return [(dataclasses.replace(p, score=index.relevance(p.score, mode),
                                         title=names[p.doc_id]), files.get(p.doc_id, {}))
                    for p in found]

        from retrieval.index import IndexLoadError

        t0 = asyncio.get_running_loop().time()
        try:
            hits = await self.rag.run(run)
        except IndexLoadError as e:  # e.g. the server restarted with another encoder
            raise APIError(503, f"vector store {store_id!r} cannot be searched: {e}",
                           code="index_unavailable") from None
        if self.rag.metrics is not None:
            self.rag.metrics.observe_retrieval(asyncio.get_running_loop().time() - t0)
        self.stores.touch(store_id)
        return hits
