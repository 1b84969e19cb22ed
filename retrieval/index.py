"""``PassageIndex``: encoder + passage table + backend, saved and loaded atomically.

On disk an index is a directory of versions, the segments they are made of, and a pointer to
the current version::

    INDEX_DIR/CURRENT                  "v000002" (replaced atomically with os.replace)
    INDEX_DIR/v000002/manifest.json    format, backend, encoder (name, label, fingerprint,
                                       settings), chunking and retrieval settings, counts, the
                                       segments this version is made of and its deleted pids
    INDEX_DIR/v000002/lexical/         BM25 over the live passages' text (``retrieval.lexical``)
    INDEX_DIR/segments/s000003/        one immutable segment: backend/ (the backend's files for
                                       its passages) and passages.jsonl (one chunk per line)

The manifest's ``retrieval`` settings say how the index searches by default: ``hybrid`` (late
interaction and BM25 fused by reciprocal rank), ``late_interaction`` or ``lexical``; a search
may ask for another mode.

A save writes a complete new version under a temporary name, renames it into place and only then
points ``CURRENT`` at it: a build killed at any moment leaves the previous index current and
usable, and a reader sees the old version or the new one, never half. A save into the directory
the index was loaded from (or last saved to) appends: only the passages added since are written,
as a new segment, and removed ones are listed as deleted; when deleted passages pass a quarter of
the total, or segments pass ``MAX_SEGMENTS``, the save compacts everything into one segment. The
``exact`` backend is segmented; ``plaid`` writes one segment each save. Segments and versions
nothing points at any more are removed after the pointer moves, or, where readers on other
machines share the directory, once superseded for ``KEEP_SUPERSEDED_SECONDS``. Version 1
directories (backend/ and passages.jsonl inside the version, no segments) still load. Loading
with an encoder other than the one recorded in the manifest is refused.

Writers take turns under the directory's ``.writer.lock`` (``retrieval.writer_lock``: the
``index`` CLI, or the store's lock for a vector store's ingestion); readers need no lock, and a
server sees a new version by polling ``CURRENT`` (``--index-refresh-seconds``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.backend import IndexBackend
from retrieval.lexical import MODES, HybridSettings, LexicalIndex, fuse
from retrieval.types import Chunk, Document, Passage

if TYPE_CHECKING:
    from retrieval.encoder import ColBERTEncoder

FORMAT = "ragserve-index/2"
_FORMATS = ("ragserve-index/1", FORMAT)
MAX_SEGMENTS = 8
#: how long writers that share a directory with readers on other machines keep a superseded
#: version: a reader swaps to the new one within its --index-refresh-seconds and finishes the
#: searches in flight; until then it may still read the old one's files, which an NFS server
#: does not keep for another client once they are deleted (on one machine, an open file
#: outlives its name)
KEEP_SUPERSEDED_SECONDS = 120.0
#: the BM25 score that :meth:`PassageIndex.relevance` maps to 0.5
LEXICAL_HALF = 5.0
BACKENDS = ("exact", "plaid")
_CURRENT = "CURRENT"
_MANIFEST = "manifest.json"
_PASSAGES = "passages.jsonl"
_BACKEND_DIR = "backend"
_LEXICAL_DIR = "lexical"
_SEGMENTS_DIR = "segments"


class IndexLoadError(ValueError):
    """The index directory is missing, corrupt, or was built with another encoder."""


@dataclass(frozen=True)
class ChunkSettings:
    chunk_tokens: int = 176
    overlap_tokens: int = 32
    parent_tokens: int | None = None


def new_backend(name: str, dim: int, **options: object) -> IndexBackend:
    if name == "exact":
        from retrieval.exact import ExactBackend

        return ExactBackend(dim)
    if name == "plaid":
        from retrieval.plaid import PlaidBackend

        return PlaidBackend(dim, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _load_backend(name: str, path: Path) -> IndexBackend:
    if name == "exact":
        from retrieval.exact import ExactBackend

        return ExactBackend.load(path)
    if name == "plaid":
        from retrieval.plaid import PlaidBackend

        return PlaidBackend.load(path)
    raise IndexLoadError(f"{path}: unknown index backend {name!r}")


def current_version(path: Path) -> Path:
    """The directory of the current version of the index at ``path``."""
    path = Path(path)
    pointer = path / _CURRENT
    if not pointer.exists():
        raise IndexLoadError(f"{path}: not a ragserve index (no {_CURRENT} file); build one with "
                             "`ragserve index build DOCS_DIR --out INDEX_DIR`")
    version = path / pointer.read_text().strip()
    if not (version / _MANIFEST).exists():
        raise IndexLoadError(f"{path}: {_CURRENT} names {version.name}, which has no manifest")
    return version


def current_name(path: Path) -> str | None:
    """The name of the current version of the index at ``path`` (one small read: a reader
    polls it), None where there is no index."""
    try:
        return (Path(path) / _CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def read_manifest(path: Path) -> dict:
    """The current manifest of the index at ``path`` (nothing else is loaded)."""
    return json.loads((current_version(path) / _MANIFEST).read_text())


class PassageIndex:
    """Search passages by text: ``add_documents``, ``remove_documents``, ``search``, ``save``,
    ``load``."""

    def __init__(self, encoder: ColBERTEncoder, backend: str | IndexBackend = "exact", *,
                 chunking: ChunkSettings | None = None, retrieval: HybridSettings | None = None,
                 **backend_options: object) -> None:
        self.encoder = encoder
        self.chunking = chunking or ChunkSettings()
        self.retrieval = retrieval or HybridSettings()
        self._lexical: LexicalIndex | None = None  # None: (re)built from the chunks when needed
        self.check_chunking(self.chunking)
        if isinstance(backend, str):
            backend = new_backend(backend, encoder.settings.dim, **backend_options)
        self.backend = backend
        self.chunks: dict[int, Chunk] = {}
        self.next_pid = 0
        self.created_at = time.time()
        #: the version directory's name this index was loaded from or last saved as (a reader
        #: compares it with ``CURRENT`` to see that a writer published a newer one)
        self.version: str | None = None
        # what is on disk at ``_saved`` (directory, version name): its segments' pids, and the
        # pids of theirs removed since; a save there appends instead of rewriting
        self._saved: tuple[Path, str] | None = None
        self._segments: dict[str, set[int]] = {}
        self._deleted: set[int] = set()

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def max_chunk_tokens(self) -> int:
        """The most text tokens the encoder indexes per passage."""
        return self.encoder.settings.doc_maxlen - 3  # [CLS], [D], [SEP]

    def check_chunking(self, c: ChunkSettings) -> None:
        if c.chunk_tokens > self.max_chunk_tokens:
            raise ValueError(f"chunk_tokens={c.chunk_tokens} exceeds what the encoder indexes "
                             f"per passage ({self.max_chunk_tokens} = doc_maxlen "
                             f"{self.encoder.settings.doc_maxlen} - 3 special tokens)")

    @property
    def doc_ids(self) -> set[str]:
        return {c.doc_id for c in self.chunks.values()}

    # -- writing ---------------------------------------------------------------------------------

    def add_documents(self, docs: Sequence[Document], *,
                      progress: Callable[[int, int], None] | None = None,
                      chunking: ChunkSettings | None = None) -> int:
        """Chunk, encode and add ``docs``; a document whose ``doc_id`` is already indexed is
        replaced. ``progress(done, total)`` follows the encoding, in passages; ``chunking``
        (default: the index's) cuts these documents. Returns the number of passages added."""
        from retrieval.chunking import chunk_documents

        replaced = {d.doc_id for d in docs} & self.doc_ids
        if replaced:
            self.remove_documents(replaced)
        c = chunking or self.chunking
        self.check_chunking(c)
        chunks = chunk_documents(docs, self.encoder.tokenizer, chunk_tokens=c.chunk_tokens,
                                 overlap_tokens=c.overlap_tokens, parent_tokens=c.parent_tokens)
        return self.add_chunks(chunks, progress=progress)

    def add_chunks(self, chunks: Sequence[Chunk], *,
                   progress: Callable[[int, int], None] | None = None) -> int:
        if not chunks:
            return 0
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], len(chunks))

        embeddings = self.encoder.encode_documents([c.text for c in chunks], progress=step)
        pids = list(range(self.next_pid, self.next_pid + len(chunks)))
        self.backend.add(pids, embeddings)
        self.chunks.update(zip(pids, chunks))
        self.next_pid += len(chunks)
        self._lexical = None
        return len(chunks)

    def remove_documents(self, doc_ids: Iterable[str]) -> int:
        """Remove every passage of the given documents; unknown ids raise ``KeyError``."""
        doc_ids = set(doc_ids)
        unknown = doc_ids - self.doc_ids
        if unknown:
            raise KeyError(f"documents not in the index: {sorted(unknown)[:5]}")
        pids = [p for p, c in self.chunks.items() if c.doc_id in doc_ids]
        self.backend.remove(pids)
        for p in pids:
            del self.chunks[p]
        self._deleted.update(p for p in pids if any(p in seg for seg in self._segments.values()))
        self._lexical = None
        return len(pids)

    def usage_bytes(self, doc_id: str) -> int:
        """What a document takes in the index: its passages' text, and their token vectors
        where the backend counts them (as stored: float16)."""
        vectors = getattr(self.backend, "vectors", None)
        dim = self.encoder.settings.dim
        return sum(len(c.text.encode()) + (2 * dim * vectors(p) if vectors else 0)
                   for p, c in self.chunks.items() if c.doc_id == doc_id)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def lexical(self) -> LexicalIndex:
        """BM25 over the chunks' text, rebuilt after the passages change."""
        if self._lexical is None:
            self._lexical = LexicalIndex.build({p: c.text for p, c in self.chunks.items()})
        return self._lexical

    def search(self, query: str, k: int = 5, mode: str | None = None,
               allow: Callable[[str], bool] | None = None) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first, by ``mode`` (default: the index's
        ``retrieval.mode``): ``late_interaction`` (MaxSim scores), ``lexical`` (BM25 scores) or
        ``hybrid`` (both retrievers' top ``max(k, retrieval.candidates)`` fused by weighted
        reciprocal rank; the score is the fused one). Each passage's ``scores`` holds what each
        retriever gave it (absent: not in that retriever's candidates). ``allow(doc_id)``: only
        passages of the documents it accepts (each retriever searches deeper until it has
        enough of them, or has ranked every passage)."""
        mode = mode or self.retrieval.mode
        if mode not in MODES:
            raise ValueError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k <= 0 or not self.chunks:
            return []
        allowed: set[int] | None = None
        if allow is not None:
            docs = {d: allow(d) for d in self.doc_ids}
            allowed = {p for p, c in self.chunks.items() if docs[c.doc_id]}
            if not allowed:
                return []
        s = self.retrieval
        n = k if mode != "hybrid" else max(k, s.candidates)
        late: list[tuple[int, float]] = []
        lexical: list[tuple[int, float]] = []
        if mode != "lexical":
            q = self.encoder.encode_queries([query])[0]
            late = _deepening(lambda m: self.backend.search(q, m, effort_k=max(k, m // 4)),
                              n, allowed, len(self.chunks))
        if mode != "late_interaction":
            lexical = _deepening(lambda m: self.lexical.search(query, m), n, allowed,
                                 len(self.chunks))
        if mode == "hybrid":
            ranked = fuse([(s.late_interaction_weight, [p for p, _ in late]),
                           (s.lexical_weight, [p for p, _ in lexical])], s.rrf_k, k)
        else:
            ranked = late or lexical
        by = {"late_interaction": dict(late), "lexical": dict(lexical)}
        return [self.passage(pid, score, {name: round(hits[pid], 4) for name, hits in by.items()
                                          if pid in hits})
                for pid, score in ranked]

    def relevance(self, score: float, mode: str | None = None) -> float:
        """A search score on 0..1 (what OpenAI's vector store search reports and
        ``score_threshold`` compares with): hybrid, the fused score over the most it can be (first
        in both rankings); late interaction, MaxSim over the query's vector count (the mean
        best cosine, clipped at 0); lexical, BM25 squashed as ``s / (s + LEXICAL_HALF)`` (a
        monotone map, not a probability)."""
        mode = mode or self.retrieval.mode
        if mode == "hybrid":
            s = self.retrieval
            best = (s.late_interaction_weight + s.lexical_weight) / (s.rrf_k + 1)
            value = score / best if best > 0 else 0.0
        elif mode == "late_interaction":
            value = score / self.encoder.settings.query_maxlen
        else:
            value = score / (score + LEXICAL_HALF) if score > 0 else 0.0
        return min(1.0, max(0.0, value))

    def passage(self, pid: int, score: float, scores: dict[str, float] | None = None
                ) -> Passage:
        c = self.chunks[pid]
        start, end = ((c.parent_start, c.parent_end) if c.parent_text is not None
                      else (c.start, c.end))
        return Passage(chunk_id=pid, doc_id=c.doc_id, text=c.prompt_text, score=score,
                       source=c.source, page=c.page, start=int(start or 0), end=int(end or 0),
                       chunk_text=c.text, scores=scores)

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "backend": self.backend.name,
            "created_at": self.created_at,
            "saved_at": time.time(),
            "encoder": self.encoder.describe(),
            "chunking": asdict(self.chunking),
            "retrieval": asdict(self.retrieval),
            "documents": len(self.doc_ids),
            "passages": len(self.chunks),
            "next_pid": self.next_pid,
        }

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path: Path, keep_seconds: float = 0.0) -> Path:
        """Write a new version under ``path`` and make it current atomically; returns it.
        Appends a segment when ``path`` holds the version this index was loaded from or last
        saved (and the backend is segmented), else writes every passage as one segment.
        Versions superseded less than ``keep_seconds`` ago stay, with their segments, for
        readers on other machines (``KEEP_SUPERSEDED_SECONDS``); older ones are removed.
        One writer at a time: the caller holds the directory's lock (``writer_lock``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        versions = sorted(p.name for p in path.glob("v[0-9]*") if p.is_dir())
        name = f"v{int(versions[-1][1:]) + 1 if versions else 1:06d}"
        seg_root = path / _SEGMENTS_DIR
        seg_root.mkdir(exist_ok=True)
        for stale in seg_root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        existing = sorted(p.name for p in seg_root.glob("s[0-9]*") if p.is_dir())
        seg_name = f"s{int(existing[-1][1:]) + 1 if existing else 1:06d}"

        segments = dict(self._segments) if self._appendable(path) else {}
        deleted = set(self._deleted) if segments else set()
        held = sum(len(pids) for pids in segments.values())
        if segments and (len(segments) >= MAX_SEGMENTS or 4 * len(deleted) > held):
            segments, deleted = {}, set()  # compact: everything into one new segment
        in_segments = set().union(*segments.values()) if segments else set()
        new_pids = sorted(p for p in self.chunks if p not in in_segments)
        written: Path | None = None
        if new_pids or not segments:
            written = self._write_segment(seg_root, seg_name, new_pids)
            segments[seg_name] = set(new_pids)
        tmp = Path(tempfile.mkdtemp(dir=path, prefix=".tmp-"))
        try:
            self.lexical.save(tmp / _LEXICAL_DIR)
            manifest = self.manifest()
            manifest["segments"] = sorted(segments)
            manifest["deleted"] = sorted(deleted)
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_tree(tmp)
            os.rename(tmp, path / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if written is not None:
                shutil.rmtree(written, ignore_errors=True)
            raise
        pointer = path / f".tmp-{_CURRENT}"
        pointer.write_text(name + "\n")
        os.replace(pointer, path / _CURRENT)
        fsync_dir(path)
        self._saved, self._segments, self._deleted = (path, name), segments, deleted
        self.version = name
        _collect(path, name, keep_seconds)  # only now is CURRENT past the old versions
        return path / name

    def _appendable(self, path: Path) -> bool:
        """Is ``path``'s current version the one this index was loaded from or saved last?"""
        if self._saved is None or not getattr(self.backend, "segmented", False):
            return False
        saved_path, version = self._saved
        try:
            current = (path / _CURRENT).read_text().strip()
        except OSError:
            return False
        return saved_path.resolve() == path.resolve() and current == version

    def _write_segment(self, root: Path, name: str, pids: list[int]) -> Path:
        """Write the passages ``pids`` as the segment ``root/name`` (renamed into place whole)."""
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            (tmp / _BACKEND_DIR).mkdir()
            if getattr(self.backend, "segmented", False):
                self.backend.save(tmp / _BACKEND_DIR, pids)  # type: ignore[call-arg]
            else:
                self.backend.save(tmp / _BACKEND_DIR)
            with open(tmp / _PASSAGES, "w", encoding="utf-8") as f:
                for pid in pids:
                    f.write(json.dumps({"pid": pid, **asdict(self.chunks[pid])},
                                       ensure_ascii=False) + "\n")
            _fsync_tree(tmp)
            os.rename(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return root / name

    @classmethod
    def load(cls, path: Path, encoder: ColBERTEncoder,
             retrieval: HybridSettings | None = None) -> PassageIndex:
        """The current version at ``path``; ``retrieval`` overrides the manifest's settings.
        A version replaced (and removed) by a writer while it was being read is read again
        from the new ``CURRENT``."""
        for attempt in range(5):
            version = current_version(path)
            try:
                return cls._load_version(path, version, encoder, retrieval)
            except FileNotFoundError:
                if attempt == 4 or current_version(path) == version:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load_version(cls, path: Path, version: Path, encoder: ColBERTEncoder,
                      retrieval: HybridSettings | None) -> PassageIndex:
        manifest = json.loads((version / _MANIFEST).read_text())
        if manifest.get("format") not in _FORMATS:
            raise IndexLoadError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
        recorded = manifest["encoder"]
        if recorded["fingerprint"] != encoder.fingerprint:
            raise IndexLoadError(
                f"{path} was built with encoder {recorded['name']!r} "
                f"(fingerprint {recorded['fingerprint'][:12]}), but the retriever model is "
                f"{encoder.name!r} (fingerprint {encoder.fingerprint[:12]}); pass "
                f"--retriever-model {recorded['name']} or rebuild the index")
        deleted = set(manifest.get("deleted", ()))
        if "segments" in manifest:
            seg_dirs = [Path(path) / _SEGMENTS_DIR / s for s in manifest["segments"]]
        else:  # format 1: one unnamed segment inside the version
            seg_dirs = [version]
        backend = _load_backend(manifest["backend"], seg_dirs[0] / _BACKEND_DIR)
        for seg in seg_dirs[1:]:
            backend.merge(_load_backend(manifest["backend"], seg / _BACKEND_DIR),  # type: ignore[attr-defined]
                          deleted)
        if deleted:
            backend.remove([p for p in deleted if p in getattr(backend, "_docs", {})])
        index = cls(encoder, backend, chunking=ChunkSettings(**manifest["chunking"]),
                    retrieval=retrieval or HybridSettings(**manifest.get("retrieval", {})))
        for seg in seg_dirs:
            pids: set[int] = set()
            with open(seg / _PASSAGES, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    pid = row.pop("pid")
                    pids.add(pid)
                    if pid not in deleted:
                        index.chunks[pid] = Chunk(**row)
            if "segments" in manifest:
                index._segments[seg.name] = pids
        if len(index.chunks) != len(index.backend):
            raise IndexLoadError(f"{path}: {len(index.chunks)} passages but the backend holds "
                                 f"{len(index.backend)}")
        index.next_pid = int(manifest["next_pid"])
        index.created_at = float(manifest["created_at"])
        index._deleted = deleted
        index.version = version.name
        if "segments" in manifest:
            index._saved = (Path(path), version.name)
        if (version / _LEXICAL_DIR).is_dir():
            lexical = LexicalIndex.load(version / _LEXICAL_DIR)
            if sorted(lexical.pids) == sorted(index.chunks):
                index._lexical = lexical
        return index


def _collect(path: Path, current: str, keep_seconds: float) -> None:
    """Remove the versions of ``path`` superseded more than ``keep_seconds`` ago (a version is
    superseded when the next one was written: its directory's mtime) and the segments that no
    version left uses."""
    now = time.time()
    versions = sorted((p for p in path.glob("v[0-9]*") if p.is_dir()),
                      key=lambda p: int(p.name[1:]))
    kept = []
    for i, version in enumerate(versions):
        if version.name != current and i + 1 < len(versions):
            try:
                superseded = versions[i + 1].stat().st_mtime
            except OSError:
                superseded = now
            # the mtime is the file server's clock, maybe ahead of ours: 0 keeps nothing
            if keep_seconds <= 0 or now - superseded >= keep_seconds:
                shutil.rmtree(version, ignore_errors=True)
                continue
        kept.append(version)
    used: set[str] = set()
    for version in kept:
        try:
            used.update(json.loads((version / _MANIFEST).read_text()).get("segments", ()))
        except (OSError, ValueError):
            return  # what it uses is unknown: remove no segment
    for seg in (path / _SEGMENTS_DIR).glob("s[0-9]*"):
        if seg.name not in used and seg.is_dir():
            shutil.rmtree(seg, ignore_errors=True)


def _deepening(search: Callable[[int], list[tuple[int, float]]], n: int,
               allowed: set[int] | None, total: int) -> list[tuple[int, float]]:
    """The ``n`` best hits of ``search(m)`` whose pid is in ``allowed`` (None: any), asking for
    four times as many each round until there are enough or every passage was ranked."""
    if allowed is None:
        return search(n)
    m = n
    while True:
        hits = search(m)
        kept = [(p, s) for p, s in hits if p in allowed]
        if len(kept) >= n or len(hits) < m or m >= total:
            return kept[:n]
        m = min(total, m * 4)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a power cut cannot bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
