"""The lexical side of hybrid retrieval: BM25 over the passages' text (``bm25s``), and the fusion
of its ranking with late interaction's.

Late interaction matches meaning but blurs identifiers: asked for "the bisect function that
inserts after equal items", a MaxSim retriever ranks ``bisect``, ``bisect_right`` and
``bisect_left`` above ``insort_right``. BM25 matches the words themselves. Both rankings are
fused by weighted reciprocal-rank fusion (Cormack et al. 2009): a passage scores
``sum_r w_r / (rrf_k + rank_r)`` over the retrievers that found it, so no score scale has to be
calibrated between two unrelated models.

Text becomes terms by :func:`terms`: lower case, words of letters and digits, an identifier
(``insort_right``, ``os.path.join``) kept whole and also split into its parts, English stop
words dropped, the rest stemmed with the Snowball stemmer (PyStemmer), so "pads", "padded" and
"padding" meet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MODES = ("hybrid", "late_interaction", "lexical")
_WORD = re.compile(r"[^\W_](?:[\w.]*[^\W_])?")  # letters/digits, with inner '_' and '.'
_PARTS = re.compile(r"[_.]+")
_PIDS = "pids.json"
# bm25s' English list; kept here so the terms do not change with the library's version.
_STOP = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with"))


@lru_cache(maxsize=1)
def _stemmer() -> Any:
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer("english")


def terms(text: str) -> list[str]:
    """BM25 terms of ``text``.

    >>> terms("Use insort_right() to insert items after equal ones")
    ['use', 'insort_right', 'insort', 'right', 'insert', 'item', 'after', 'equal', 'one']
    >>> terms("os.path.join, PADDING padded")
    ['os.path.join', 'os', 'path', 'join', 'pad', 'pad']
    """
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        parts = [p for p in _PARTS.split(word) if p]
        for w in ([word, *parts] if len(parts) > 1 else parts):
            if w not in _STOP:
                out.append(w)
    stem = _stemmer().stemWords
    whole = [w for w in out if "_" in w or "." in w]  # identifiers are matched as written
    stems = stem([w for w in out if w not in whole])
    it = iter(stems)
    return [w if w in whole else next(it) for w in out]


@dataclass(frozen=True)
class HybridSettings:
    """How an index searches by default; a request may choose another ``mode``."""

    # rrf_k and the weights were chosen on the dev half (odd ids) of benchmarks/data's
    # more_itertools questions, by recall@1, from rrf_k in {10, 30, 60} x lexical weight in
    # {0.3, 0.5, 0.7, 1.0}; BENCHMARKS.md reports them on the held-out even half. Late
    # interaction leads, BM25 breaks its near-ties and lifts what it ranks low.
    mode: str = "hybrid"  # one of MODES
    rrf_k: int = 10
    late_interaction_weight: float = 1.0
    lexical_weight: float = 0.3
    # per retriever, at least the k asked for; 20 recalled as much as 50 on both halves (10
    # did not). An approximate backend searches for them at the user's k's effort.
    candidates: int = 20

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"retrieval mode must be one of {', '.join(MODES)}, got "
                             f"{self.mode!r}")
        if self.rrf_k < 0 or self.candidates < 1:
            raise ValueError("rrf_k must be >= 0 and candidates >= 1")
        if min(self.late_interaction_weight, self.lexical_weight) < 0:
            raise ValueError("fusion weights must be >= 0")


def fuse(rankings: Sequence[tuple[float, Sequence[int]]], rrf_k: int, k: int
         ) -> list[tuple[int, float]]:
    """Weighted reciprocal-rank fusion of ``(weight, pids best first)`` rankings: the ``k``
    best ``(pid, fused score)``, ties broken by the first ranking that has the pid.

    >>> fuse([(1.0, [7, 8, 9]), (1.0, [9, 7])], rrf_k=0, k=3)
    [(7, 1.5), (9, 1.3333333333333333), (8, 0.5)]
    """
    score: dict[int, float] = {}
    first: dict[int, tuple[int, int]] = {}
    for r, (weight, pids) in enumerate(rankings):
        for rank, pid in enumerate(pids, 1):
            score[pid] = score.get(pid, 0.0) + weight / (rrf_k + rank)
            first.setdefault(pid, (r, rank))
    best = sorted(score, key=lambda p: (-score[p], first[p]))
    return [(p, score[p]) for p in best[:k]]


class LexicalIndex:
    """BM25 over passage texts, by passage id; built whole (bm25s has no incremental update:
    ``PassageIndex`` rebuilds it after adds and removes, about a second for 10k passages)."""

    def __init__(self, bm25: Any, order: list[int]) -> None:
        self._bm25 = bm25
        self._order = order  # bm25 row -> pid

    def __len__(self) -> int:
        return len(self._order)

    @property
    def pids(self) -> list[int]:
        return list(self._order)

    @classmethod
    def build(cls, texts: dict[int, str]) -> LexicalIndex:
        """An index of ``texts`` (pid -> passage text)."""
        import bm25s

        order = sorted(texts)
        if not order:
            return cls(None, [])
        bm25 = bm25s.BM25()
        bm25.index([terms(texts[p]) for p in order], show_progress=False)
        return cls(bm25, order)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best ``(pid, BM25 score)`` with a positive score, best first."""
        import numpy as np

        if self._bm25 is None or k <= 0:
            return []
        vocab = self._bm25.vocab_dict
        q = [t for t in terms(query) if t in vocab]
        if not q:
            return []
        scores = self._bm25.get_scores(q)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        return [(self._order[i], float(scores[i])) for i in top if scores[i] > 0]

    def save(self, path: Path) -> None:
        """Write the BM25 matrices and the pid order into the directory ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        (path / _PIDS).write_text(json.dumps(self._order))
        if self._bm25 is not None:
            self._bm25.save(str(path), show_progress=False)

    @classmethod
    def load(cls, path: Path) -> LexicalIndex:
        """What :meth:`save` wrote."""
        import bm25s

        order = [int(p) for p in json.loads((path / _PIDS).read_text())]
        bm25 = bm25s.BM25.load(str(path), show_progress=False) if order else None
        return cls(bm25, order)
