"""``PassageIndex``: encoder + passage table + backend, saved and loaded atomically.

On disk an index is a directory of versions and a pointer to the current one::

    INDEX_DIR/CURRENT            "v000002" (replaced atomically with os.replace)
    INDEX_DIR/v000002/manifest.json   format, backend, encoder (name, label, fingerprint,
                                      settings), chunking settings, counts
    INDEX_DIR/v000002/passages.jsonl  one chunk per line, with its passage id
    INDEX_DIR/v000002/backend/        the backend's own files
    INDEX_DIR/v000002/lexical/        BM25 over the passages' text (``retrieval.lexical``)

The manifest's ``retrieval`` settings say how the index searches by default: ``hybrid`` (late
interaction and BM25 fused by reciprocal rank), ``late_interaction`` or ``lexical``; a search
may ask for another mode. An index written before BM25 existed (no ``lexical/``, no
``retrieval``) loads as a hybrid index: its BM25 is built from its passages at load.

A save writes a complete new version under a temporary name, renames it into place and only then
points ``CURRENT`` at it: a build killed at any moment leaves the previous index current and
usable. Loading with an encoder other than the one recorded in the manifest is refused.
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

FORMAT = "ragserve-index/1"
BACKENDS = ("exact", "plaid")
_CURRENT = "CURRENT"
_MANIFEST = "manifest.json"
_PASSAGES = "passages.jsonl"
_BACKEND_DIR = "backend"
_LEXICAL_DIR = "lexical"


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
        limit = encoder.settings.doc_maxlen - 3  # [CLS], [D], [SEP]
        if self.chunking.chunk_tokens > limit:
            raise ValueError(f"chunk_tokens={self.chunking.chunk_tokens} exceeds what the encoder "
                             f"indexes per passage ({limit} = doc_maxlen "
                             f"{encoder.settings.doc_maxlen} - 3 special tokens)")
        if isinstance(backend, str):
            backend = new_backend(backend, encoder.settings.dim, **backend_options)
        self.backend = backend
        self.chunks: dict[int, Chunk] = {}
        self.next_pid = 0
        self.created_at = time.time()

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def doc_ids(self) -> set[str]:
        return {c.doc_id for c in self.chunks.values()}

    # -- writing ---------------------------------------------------------------------------------

    def add_documents(self, docs: Sequence[Document], *,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Chunk, encode and add ``docs``; a document whose ``doc_id`` is already indexed is
        replaced. ``progress(done, total)`` follows the encoding, in passages. Returns the number
        of passages added."""
        from retrieval.chunking import chunk_documents

        replaced = {d.doc_id for d in docs} & self.doc_ids
        if replaced:
            self.remove_documents(replaced)
        c = self.chunking
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
        self._lexical = None
        return len(pids)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def lexical(self) -> LexicalIndex:
        """BM25 over the chunks' text, rebuilt after the passages change."""
        if self._lexical is None:
            self._lexical = LexicalIndex.build({p: c.text for p, c in self.chunks.items()})
        return self._lexical

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first, by ``mode`` (default: the index's
        ``retrieval.mode``): ``late_interaction`` (MaxSim scores), ``lexical`` (BM25 scores) or
        ``hybrid`` (both retrievers' top ``max(k, retrieval.candidates)`` fused by weighted
        reciprocal rank; the score is the fused one). Each passage's ``scores`` holds what each
        retriever gave it (absent: not in that retriever's candidates)."""
        mode = mode or self.retrieval.mode
        if mode not in MODES:
            raise ValueError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k <= 0 or not self.chunks:
            return []
        s = self.retrieval
        n = k if mode != "hybrid" else max(k, s.candidates)
        late: list[tuple[int, float]] = []
        lexical: list[tuple[int, float]] = []
        if mode != "lexical":
            q = self.encoder.encode_queries([query])[0]
            late = self.backend.search(q, n, effort_k=k)
        if mode != "late_interaction":
            lexical = self.lexical.search(query, n)
        if mode == "hybrid":
            ranked = fuse([(s.late_interaction_weight, [p for p, _ in late]),
                           (s.lexical_weight, [p for p, _ in lexical])], s.rrf_k, k)
        else:
            ranked = late or lexical
        by = {"late_interaction": dict(late), "lexical": dict(lexical)}
        return [self.passage(pid, score, {name: round(hits[pid], 4) for name, hits in by.items()
                                          if pid in hits})
                for pid, score in ranked]

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

    def save(self, path: Path) -> Path:
        """Write a new version under ``path`` and make it current atomically; returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        versions = sorted(p.name for p in path.glob("v[0-9]*") if p.is_dir())
        name = f"v{int(versions[-1][1:]) + 1 if versions else 1:06d}"
        tmp = Path(tempfile.mkdtemp(dir=path, prefix=".tmp-"))
        try:
            (tmp / _BACKEND_DIR).mkdir()
            self.backend.save(tmp / _BACKEND_DIR)
            self.lexical.save(tmp / _LEXICAL_DIR)
            with open(tmp / _PASSAGES, "w", encoding="utf-8") as f:
                for pid, c in sorted(self.chunks.items()):
                    f.write(json.dumps({"pid": pid, **asdict(c)}, ensure_ascii=False) + "\n")
            (tmp / _MANIFEST).write_text(json.dumps(self.manifest(), indent=2))
            _fsync_tree(tmp)
            os.rename(tmp, path / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer = path / f".tmp-{_CURRENT}"
        pointer.write_text(name + "\n")
        os.replace(pointer, path / _CURRENT)
        for old in versions:  # only now is nothing pointing at them
            shutil.rmtree(path / old, ignore_errors=True)
        return path / name

    @classmethod
    def load(cls, path: Path, encoder: ColBERTEncoder,
             retrieval: HybridSettings | None = None) -> PassageIndex:
        """The current version at ``path``; ``retrieval`` overrides the manifest's settings."""
        version = current_version(path)
        manifest = json.loads((version / _MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise IndexLoadError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
        recorded = manifest["encoder"]
        if recorded["fingerprint"] != encoder.fingerprint:
            raise IndexLoadError(
                f"{path} was built with encoder {recorded['name']!r} "
                f"(fingerprint {recorded['fingerprint'][:12]}), but the retriever model is "
                f"{encoder.name!r} (fingerprint {encoder.fingerprint[:12]}); pass "
                f"--retriever-model {recorded['name']} or rebuild the index")
        index = cls(encoder, _load_backend(manifest["backend"], version / _BACKEND_DIR),
                    chunking=ChunkSettings(**manifest["chunking"]),
                    retrieval=retrieval or HybridSettings(**manifest.get("retrieval", {})))
        with open(version / _PASSAGES, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                pid = row.pop("pid")
                index.chunks[pid] = Chunk(**row)
        if len(index.chunks) != len(index.backend):
            raise IndexLoadError(f"{path}: {len(index.chunks)} passages but the backend holds "
                                 f"{len(index.backend)}")
        index.next_pid = int(manifest["next_pid"])
        index.created_at = float(manifest["created_at"])
        if (version / _LEXICAL_DIR).is_dir():
            lexical = LexicalIndex.load(version / _LEXICAL_DIR)
            if sorted(lexical.pids) == sorted(index.chunks):
                index._lexical = lexical
        return index


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
