"""The ingestion worker: a process of its own that parses, chunks and encodes uploaded files into
a vector store's index, so that none of it runs on the server's request path.

It runs at idle CPU priority (``SCHED_IDLE``, else ``nice 19``), set before torch starts its
threads so that they inherit it, with its own torch thread count: the engine's decode steps
always come first, ingestion uses what they leave. A hostile file (a decompression bomb, a parser
that never ends) can at worst kill this process or run past its timeout; the server then fails
that file with the reason and starts a new worker.

Protocol (one ``multiprocessing`` pipe): the worker sends ``{"ready": True}`` once its encoder
is loaded (or ``{"ready": False, "error": ...}``), then answers each job dict with a result dict.
A job names one store directory, the documents to remove and the files to add::

    {"store_dir": "...", "remove": ["file-..."],
     "add": [{"doc_id": "file-...", "blob": "/.../blobs/ab/ab...", "filename": "a.pdf",
              "chunking": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}]}

and the result says what became of each file, and which index version now holds them::

    {"version": "v000007", "seconds": 1.9, "pages": 12, "passages": 40,
     "files": {"file-...": {"passages": 40, "usage_bytes": 123456, "kind": "pdf"}
                          | {"error": {"code": "invalid_file", "message": "..."}}}}
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from retrieval.encoder import ColBERTEncoder
    from retrieval.index import ChunkSettings, PassageIndex

log = logging.getLogger("ragserve.ingest")

#: indexes kept loaded between jobs (the stores written most recently)
CACHED_INDEXES = 4


def die_with_parent() -> None:
    """Be killed when the server dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``): a worker
    left behind would write the store alongside the next server's worker."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lower_priority() -> str:
    """Make this process (and the threads it starts from now on) yield the CPU to serving."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        try:
            os.nice(19)
            return "nice 19"
        except OSError:
            return "normal"


def chunk_settings(spec: dict[str, Any], max_tokens: int) -> ChunkSettings:
    """OpenAI's static chunking (``max_chunk_size_tokens``, ``chunk_overlap_tokens``) on an
    encoder that indexes at most ``max_tokens`` per passage: chunks that fit are indexed as they
    are; larger ones become parents (what goes into the prompt) over indexed children of
    ``max_tokens`` that overlap by at most half of that."""
    from retrieval.index import ChunkSettings

    size = int(spec["max_chunk_size_tokens"])
    overlap = int(spec["chunk_overlap_tokens"])
    if size <= max_tokens:
        return ChunkSettings(size, min(overlap, size - 1))
    return ChunkSettings(max_tokens, min(overlap, max_tokens // 2), parent_tokens=size)


class Worker:
    """The worker's state: the encoder and the indexes it wrote last."""

    def __init__(self, encoder: ColBERTEncoder, max_chars: int) -> None:
        self.encoder = encoder
        self.max_chars = max_chars
        self.indexes: dict[str, PassageIndex] = {}
        self.parent = os.getppid()

    def index(self, store_dir: Path) -> PassageIndex:
        from retrieval.index import PassageIndex

        key = str(store_dir)
        cached = self.indexes.pop(key, None)
        if cached is not None and cached._appendable(store_dir):
            index = cached
        elif (store_dir / "CURRENT").exists():
            index = PassageIndex.load(store_dir, self.encoder)
        else:
            index = PassageIndex(self.encoder, "exact")
        self.indexes[key] = index  # most recent last
        while len(self.indexes) > CACHED_INDEXES:
            self.indexes.pop(next(iter(self.indexes)))
        return index

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        from retrieval.documents import DocumentError, document_from_bytes, sniff

        t0 = time.perf_counter()
        store_dir = Path(job["store_dir"])
        if job.get("drop"):
            self.indexes.pop(str(store_dir), None)
            return {"dropped": True}
        index = self.index(store_dir)
        present = index.doc_ids
        gone = [d for d in job.get("remove", ()) if d in present]
        if gone:
            index.remove_documents(gone)
        files: dict[str, dict[str, Any]] = {}
        pages = passages = 0
        for item in job.get("add", ()):
            doc_id = item["doc_id"]
            try:
                data = Path(item["blob"]).read_bytes()
            except OSError as e:
                files[doc_id] = _error("server_error", f"the file's content is missing ({e})")
                continue
            try:
                kind = sniff(data, item.get("filename", ""))
                doc = document_from_bytes(data, kind, doc_id, item.get("filename", doc_id),
                                          max_chars=self.max_chars)
                del data
                chunking = chunk_settings(item["chunking"], index.max_chunk_tokens)
                n = index.add_documents([doc], chunking=chunking)
            except DocumentError as e:
                code = "unsupported_file" if "not text, Markdown, HTML or PDF" in str(e) \
                    else "invalid_file"
                files[doc_id] = _error(code, str(e))
                if doc_id in index.doc_ids:  # a re-added file whose new content failed
                    index.remove_documents([doc_id])
                continue
            except ValueError as e:
                files[doc_id] = _error("invalid_file", str(e))
                continue
            pages += len(doc.pages)
            passages += n
            files[doc_id] = {"passages": n, "usage_bytes": index.usage_bytes(doc_id),
                             "kind": kind}
        if os.getppid() != self.parent:  # orphaned (no PR_SET_PDEATHSIG here): write nothing
            raise RuntimeError("the server is gone")
        # the server holds the store's index lock for this job; replicas sharing the store
        # may still read the version this one supersedes
        from retrieval.index import KEEP_SUPERSEDED_SECONDS

        version = index.save(store_dir, keep_seconds=KEEP_SUPERSEDED_SECONDS).name
        return {"version": version, "files": files, "removed": gone, "pages": pages,
                "passages": passages, "seconds": time.perf_counter() - t0}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def main(conn: Connection, encoder_name: str | None, cache_dir: str, threads: int,
         max_chars: int) -> None:
    """The worker process's entry point (``multiprocessing``, spawn)."""
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the server died before the signal was armed
        return
    priority = lower_priority()  # before torch creates any thread
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    try:
        import torch

        torch.set_num_threads(threads)
        from retrieval.default_encoder import load_encoder

        encoder = load_encoder(encoder_name, Path(cache_dir))
    except Exception as e:  # the server reports it on every file waiting
        conn.send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    log.info("ingestion worker %d ready: encoder %s, %d torch threads, priority %s",
             os.getpid(), encoder.name, threads, priority)
    conn.send({"ready": True, "pid": os.getpid(), "fingerprint": encoder.fingerprint})
    worker = Worker(encoder, max_chars)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            result = worker.run(job)
        except Exception as e:  # the job as a whole failed (e.g. the disk is full)
            log.exception("ingestion job failed")
            result = {"failed": f"{type(e).__name__}: {e}"}
            worker.indexes.pop(str(job.get("store_dir")), None)  # reload from disk next time
        conn.send(result)
