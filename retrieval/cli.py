"""``ragserve index build | add | search | info``.

``build`` and ``add`` write under the index directory's writer lock (``retrieval.writer_lock``),
so that they may run while servers read the directory, on this machine or on others sharing it:
a save publishes a whole version, servers load it within ``--index-refresh-seconds``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from retrieval.index import (
    BACKENDS,
    KEEP_SUPERSEDED_SECONDS,
    ChunkSettings,
    PassageIndex,
    read_manifest,
)
from retrieval.lexical import MODES, HybridSettings
from retrieval.writer_lock import LockTimeout, WriterLock

log = logging.getLogger("ragserve.retrieval")


def add_index_parser(sub: argparse._SubParsersAction, cache_dir: Path) -> None:
    p = sub.add_parser("index", help="build, extend, query and describe a retrieval index")
    p.set_defaults(cache_dir=cache_dir)
    isub = p.add_subparsers(dest="index_command", required=True)

    b = isub.add_parser("build", help="index a folder (or file) of .txt .md .pdf .html")
    b.add_argument("docs", type=Path)
    b.add_argument("--out", type=Path, required=True, help="index directory (created/replaced)")
    b.add_argument("--backend", choices=BACKENDS, default="exact",
                   help="exact: MaxSim over all vectors in memory (small corpora); plaid: "
                        "colbert-ai's compressed PLAID index (large corpora)")
    _encoder_arg(b)
    b.add_argument("--chunk-tokens", type=int, default=ChunkSettings.chunk_tokens,
                   help="encoder tokens per indexed passage (<= the encoder's doc_maxlen - 3)")
    b.add_argument("--chunk-overlap", type=int, default=ChunkSettings.overlap_tokens)
    b.add_argument("--parent-tokens", type=int, default=None,
                   help="parent/child split: index small chunks, put their parent of this many "
                        "tokens into the prompt")
    b.add_argument("--nbits", type=int, default=2, help="plaid: bits per residual dimension")
    d = HybridSettings()
    b.add_argument("--retrieval", choices=MODES, default=d.mode,
                   help="how the index searches unless a request says otherwise: hybrid (late "
                        "interaction and BM25 fused by reciprocal rank), late_interaction or "
                        "lexical (BM25)")
    b.add_argument("--rrf-k", type=int, default=d.rrf_k,
                   help="hybrid: reciprocal-rank fusion constant (score = w / (rrf_k + rank))")
    b.add_argument("--lexical-weight", type=float, default=d.lexical_weight,
                   help="hybrid: weight of BM25's ranking (late interaction's is "
                        "--late-interaction-weight)")
    b.add_argument("--late-interaction-weight", type=float, default=d.late_interaction_weight)
    b.add_argument("--candidates", type=int, default=d.candidates,
                   help="hybrid: passages each retriever contributes to the fusion (at least k)")
    b.set_defaults(func=cmd_build)

    a = isub.add_parser("add", help="add (or replace) documents in an existing index")
    a.add_argument("docs", type=Path)
    a.add_argument("--index", type=Path, required=True)
    _encoder_arg(a)
    a.set_defaults(func=cmd_add)

    s = isub.add_parser("search", help="print the top-k passages for a query")
    s.add_argument("query")
    s.add_argument("--index", type=Path, required=True)
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="one JSON object per passage")
    s.add_argument("--mode", choices=MODES, default=None,
                   help="retrieval mode (default: the index's)")
    _encoder_arg(s)
    s.set_defaults(func=cmd_search)

    i = isub.add_parser("info", help="what an index holds and how it was built")
    i.add_argument("index", type=Path)
    i.set_defaults(func=cmd_info)


def _encoder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retriever-model", default=None,
                   help="HF_ColBERT checkpoint dir or hub id (e.g. colbert-ir/colbertv2.0); "
                        "default: the one the index was built with, or for a new index the "
                        "offline all-MiniLM-L6-v2 late-interaction encoder (not ColBERT-trained)"
                        ": 384 dims for --backend exact, projected to 128 for plaid "
                        "(ragserve/minilm-l6-late-interaction-128)")


def _encoder(args: argparse.Namespace, index: Path | None = None):
    from retrieval.default_encoder import PROJECTED_ENCODER_NAME, load_encoder

    name = args.retriever_model
    if name is None and index is not None:
        name = read_manifest(index)["encoder"]["name"]
    elif name is None and getattr(args, "backend", None) == "plaid":
        name = PROJECTED_ENCODER_NAME  # 128 dims: a third of the 384-dim default's search
    t0 = time.perf_counter()
    encoder = load_encoder(name, args.cache_dir)
    log.info("retriever encoder %s [%s] dim=%d loaded in %.1fs", encoder.name, encoder.label,
             encoder.settings.dim, time.perf_counter() - t0)
    return encoder


class _Progress:
    """``progress(done, total)`` for ``PassageIndex.add_documents``: a tqdm bar in passages/s."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="encoding", unit="passage", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add(index: PassageIndex, docs_root: Path) -> int:
    from retrieval.documents import load_documents

    docs = load_documents(docs_root)
    if not docs:
        raise ValueError(f"{docs_root}: no .txt, .md, .pdf or .html documents with text")
    progress = _Progress()
    try:
        return index.add_documents(docs, progress=progress)
    finally:
        progress.close()


#: how long `index build` / `index add` wait for another writer of the same directory
LOCK_WAIT_SECONDS = 600.0


def writer_lock(index_dir: Path) -> WriterLock:
    """The index directory's writer lock: servers read the directory while one command at a
    time writes it (two adds at once would each save their own documents on the same base,
    and the later would drop the other's)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    return WriterLock(index_dir / ".writer.lock")


def _locked(index_dir: Path) -> WriterLock:
    lock = writer_lock(index_dir)
    if not lock.acquire(timeout=0):
        log.info("waiting for %s's writer lock (held by %s)", index_dir, lock.holder())
        if not lock.acquire(timeout=LOCK_WAIT_SECONDS):
            raise LockTimeout(lock.path, LOCK_WAIT_SECONDS, lock.holder())
    return lock


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    options = {"nbits": args.nbits} if args.backend == "plaid" else {}
    retrieval = HybridSettings(args.retrieval, args.rrf_k, args.late_interaction_weight,
                               args.lexical_weight, args.candidates)
    index = PassageIndex(_encoder(args), args.backend, chunking=ChunkSettings(
        args.chunk_tokens, args.chunk_overlap, args.parent_tokens), retrieval=retrieval,
        **options)
    n = _add(index, args.docs)
    lock = _locked(args.out)  # encoding above needs no lock; writing does
    try:
        version = index.save(args.out, keep_seconds=KEEP_SUPERSEDED_SECONDS)
    finally:
        lock.release()
    dt = time.perf_counter() - t0
    log.info("built %s index of %d passages from %d documents in %.1fs (%.1f passages/s): %s",
             args.backend, n, len(index.doc_ids), dt, n / dt, version)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    encoder = _encoder(args, args.index)
    lock = _locked(args.index)  # from the load to the save: no other add between them
    try:
        index = PassageIndex.load(args.index, encoder)
        n = _add(index, args.docs)
        version = index.save(args.index, keep_seconds=KEEP_SUPERSEDED_SECONDS)
    finally:
        lock.release()
    log.info("%s is current: servers with --index %s load it within their "
             "--index-refresh-seconds", version.name, args.index)
    log.info("added %d passages; the index now holds %d passages from %d documents", n,
             len(index), len(index.doc_ids))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    index = PassageIndex.load(args.index, _encoder(args, args.index))
    t0 = time.perf_counter()
    hits = index.search(args.query, args.k, args.mode)
    log.info("search took %.1f ms", 1000 * (time.perf_counter() - t0))
    for rank, p in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, "chunk_id": p.chunk_id, "doc_id": p.doc_id,
                              "source": p.source, "page": p.page, "score": round(p.score, 4),
                              "scores": p.scores, "text": p.text}, ensure_ascii=False))
        else:
            where = p.doc_id + (f" p.{p.page}" if p.page is not None else "")
            snippet = " ".join(p.chunk_text.split())[:200]
            print(f"[{rank}] {p.score:7.3f}  {where}  #{p.chunk_id}\n     {snippet}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(read_manifest(args.index), indent=2))
    return 0
