"""The vector stores clients create through the API, as the server searches them.

:class:`Stores` holds the :class:`~server.document_store.DocumentStore` (what is stored), the
:class:`~server.ingest.Ingestor` (what is being ingested) and, per store, the index version the
server searches. A new version is loaded whole by the ingestion thread and swapped in with one
assignment, so a search runs on the old version or the new one, never on half of either.

A search sees the passages of the store's ``completed`` files only, filtered by their
``attributes``: a file taken out of a store stops matching at once, before the worker has
written the version without it.

Several servers may share the store directory (replicas on one ReadWriteMany volume). Each
writes it: the database's transactions take the directory's writer lock, an ingestion job the
store's index lock (``server.ingest``). Each reads what the others wrote: the database at once
(the attribute maps are cached until any server commits), the index versions within
``--index-refresh-seconds`` (a thread compares each loaded version with ``CURRENT``, loads a newer
one whole and swaps it in; the ``--index`` too, which ``ragserve index add`` may write).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.document_store import DocumentStore, StoreError
from server.ingest import Ingestor, IngestSettings

if TYPE_CHECKING:
    from retrieval.index import PassageIndex
    from retrieval.types import Passage
    from server.config import ServerConfig
    from server.metrics import Metrics
    from server.rag import RAGService

log = logging.getLogger("ragserve.stores")

#: how often expired files and stores are looked for
SWEEP_SECONDS = 60.0
#: ``last_active_at`` is written at most this often per store (it is a day-scale anchor)
TOUCH_SECONDS = 60.0


def default_store_dir(cache_dir: Path) -> Path:
    """``--store-dir``'s default: ``$RAGSERVE_STORE_DIR`` (the flag's variable, read here too
    for servers built without the command line), else ``<cache dir>/store``."""
    return Path(os.environ.get("RAGSERVE_STORE_DIR") or cache_dir / "store")


class Stores:
    def __init__(self, config: ServerConfig, rag: RAGService,
                 metrics: Metrics | None = None) -> None:
        from runtime.loader import default_cache_dir

        cache = config.cache_dir or default_cache_dir()
        self.config = config
        self.rag = rag
        self.metrics = metrics
        self.docs = DocumentStore(config.store_dir or default_store_dir(cache))
        self._touched: dict[str, float] = {}
        self._indexes: dict[str, PassageIndex] = {}
        self._load_lock = threading.Lock()
        self._files: dict[str, tuple[tuple[int, ...], dict[str, dict[str, Any]]]] = {}
        self._generation = 0
        self.ingestor = Ingestor(
            self.docs, IngestSettings(encoder_name=self._encoder_name(), cache_dir=str(cache),
                                      workers=config.ingest_workers,
                                      threads=config.ingest_threads,
                                      timeout=config.ingest_timeout,
                                      max_chars=config.max_document_chars),
            on_version=self._loaded, on_drop=self._dropped, observe=self._observe,
            on_change=self._bump)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def _encoder_name(self) -> str | None:
        """The server's retriever encoder: every store is written and searched with it."""
        if self.config.retriever_model is not None or self.config.index is None:
            return self.config.retriever_model
        from retrieval.index import read_manifest

        return read_manifest(self.config.index)["encoder"]["name"]

    def touch(self, store_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(store_id, -TOUCH_SECONDS) >= TOUCH_SECONDS:
            self._touched[store_id] = now
            try:
                self.docs.touch(store_id)
            except StoreError as e:  # a busy store: the anchor moves on the next use
                log.warning("store %s: last_active_at not written: %s", store_id, e)

    def start(self) -> None:
        log.info("store directory %s: SQLite in %s mode (%s), index versions looked for every "
                 "%s", self.docs.root, self.docs.journal_mode,
                 f"on {self.docs.filesystem}" if self.docs.filesystem else "a local file system",
                 f"{self.config.index_refresh_seconds:g} s" if self.config.index_refresh_seconds
                 else "never (--index-refresh-seconds 0)")
        self.ingestor.start()
        if self.docs.pending(set(), 1) or self.docs.pending_ops():
            log.info("resuming ingestion: %d files in progress",
                     self.docs.status_counts()["in_progress"])
        loops = [(self._sweep, "ragserve-store-sweep")]
        if self.config.index_refresh_seconds > 0:
            loops.append((self._refresh_loop, "ragserve-index-refresh"))
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()  # the sweep and refresh threads end at their next wake-up
        self.ingestor.stop()
        self.docs.writer.close()  # its descriptor (a write after this opens it again)

    def changed(self) -> None:
        """A store's files changed: forget the cached attribute maps, wake the ingestion."""
        self._bump()
        self.ingestor.wake()

    def _bump(self) -> None:
        self._generation += 1

    # -- the indexes -----------------------------------------------------------------------

    def index(self, store_id: str) -> PassageIndex | None:
        """The version of ``store_id``'s index the server searches (loaded on first use; None
        while the store has no version yet)."""
        index = self._indexes.get(store_id)
        if index is not None:
            return index
        path = self.docs.store_path(store_id)
        with self._load_lock:
            if store_id not in self._indexes and (path / "CURRENT").exists():
                from retrieval.index import PassageIndex

                self._indexes[store_id] = PassageIndex.load(path, self.rag.encoder())
        return self._indexes.get(store_id)

    def _loaded(self, store_id: str, version: str) -> None:
        from retrieval.index import PassageIndex

        index = PassageIndex.load(self.docs.store_path(store_id), self.rag.encoder())
        index.lexical  # noqa: B018 - BM25 ready before the swap, not on the first search
        with self._load_lock:
            held = self._indexes.get(store_id)
            # the ingestion thread and the refresh thread both load: the newer one stays
            if held is None or _number(index.version) >= _number(held.version):
                self._indexes[store_id] = index

    def _dropped(self, store_id: str) -> None:
        with self._load_lock:
            self._indexes.pop(store_id, None)

    def searchable(self, store_id: str) -> dict[str, dict[str, Any]]:
        """file id -> attributes of the store's ``completed`` files (cached until a change here
        or a commit of any server sharing the database)."""
        key = (self._generation, *self.docs.version())
        cached = self._files.get(store_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        files = {r.file_id: r.attributes
                 for r in self.docs.store_files(store_id, status="completed")}
        self._files[store_id] = (key, files)
        return files

    def search(self, store_id: str, query: str, k: int, mode: str | None = None,
               filters: dict[str, Any] | None = None) -> list[Passage]:
        """The ``k`` best passages of the store's completed files that pass ``filters``. Runs
        on the retriever's thread (the caller's ``rag.run``)."""
        from retrieval.filters import matches

        files = self.searchable(store_id)
        index = self.index(store_id)
        if index is None or not files:
            return []

        def allow(doc_id: str) -> bool:
            attrs = files.get(doc_id)
            return attrs is not None and (filters is None or matches(filters, attrs))

        return index.search(query, k, mode, allow=allow)

    def filenames(self, file_ids: set[str]) -> dict[str, str]:
        out = {}
        for f in file_ids:
            try:
                out[f] = self.docs.file(f).filename
            except ValueError:
                out[f] = f
        return out

    # -- what other writers published --------------------------------------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.index_refresh_seconds):
            try:
                self.refresh()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("looking for new index versions failed")

    def refresh(self) -> list[str]:
        """Swap in the index versions published since they were loaded (by another server
        sharing the store directory, or ``ragserve index add`` on ``--index``); forget the
        stores another server deleted. What changed: store ids, and ``--index``."""
        from retrieval.index import current_name

        changed = []
        try:
            if self.rag.refresh():
                changed.append("--index")
        except Exception:  # the old version keeps serving
            log.exception("the new version of --index %s did not load", self.config.index)
        for store_id, index in list(self._indexes.items()):
            current = current_name(self.docs.store_path(store_id))
            if current == index.version:
                continue
            if current is None:  # deleted by another server
                self._dropped(store_id)
            else:
                try:
                    self._loaded(store_id, current)
                except Exception:  # the old version keeps serving; the next round tries again
                    log.exception("store %s: version %s did not load", store_id, current)
                    continue
                log.info("store %s: version %s swapped in for %s", store_id, current,
                         index.version)
            changed.append(store_id)
        return changed

    # -- housekeeping ----------------------------------------------------------------------

    def _sweep(self) -> None:
        """Delete files past their ``expires_after``."""
        while not self._stop.wait(SWEEP_SECONDS):
            try:
                self.sweep()
            except Exception:
                log.exception("expiry sweep failed")

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the files whose ``expires_at`` has passed; their ids."""
        gone = self.docs.expired_files(now if now is not None else time.time())
        for file_id in gone:
            try:
                self.docs.delete_file(file_id)
                log.info("file %s expired and was deleted", file_id)
            except ValueError:
                pass
        if gone:
            self.changed()
        return gone

    def _observe(self, seconds: float, files: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_ingest(seconds, files)


def _number(version: str | None) -> int:
    """``v000012`` -> 12 (-1 for none): versions are numbered in the order they were written."""
    return int(version[1:]) if version else -1
