"""Grounding check for cited answers: which citations point nowhere, which sentences their
passages do not support.

An answer cites passages as ``[n]`` (also ``[1, 2]`` or ``[1][2]``), numbered from 1 in prompt
order. The text helpers here are pure; ``support_scores`` uses the retriever's encoder: a
sentence's support by a passage is the mean, over the sentence's token vectors, of the best
cosine with any of the passage's token vectors (MaxSim normalized by the sentence length, so 1.0
means every token of the sentence has an exact match in the passage).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.encoder import ColBERTEncoder

CITATION = re.compile(r"\s?\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")
_SENTENCE_END = re.compile(r"[.!?](?:\s?\[\d{1,4}(?:\s*,\s*\d{1,4})*\])*(?=\s|$)|\n\s*\n")
_OPEN = re.compile(r"\[[\d,\s]{0,24}$")
MODES = ("report", "strip", "off")


def citations(text: str) -> list[int]:
    """Cited passage numbers in order of appearance, repeats kept.

    >>> citations("Paris [1]. Also Lyon [2, 3][1].")
    [1, 2, 3, 1]
    """
    return [int(n) for m in CITATION.finditer(text) for n in m.group(1).split(",")]


def remove_citations(text: str) -> str:
    """The text without its citation markers.

    >>> remove_citations("Paris is the capital [1][2]. Yes [3].")
    'Paris is the capital. Yes.'
    """
    return CITATION.sub("", text)


def drop_invalid_citations(text: str, num_sources: int) -> tuple[str, list[int]]:
    """Remove citations of passages that do not exist; returns the text and the removed numbers.

    >>> drop_invalid_citations("A [1]. B [4]. C [2, 7].", 2)
    ('A [1]. B. C [2].', [4, 7])
    """
    removed: list[int] = []

    def keep(m: re.Match) -> str:
        nums = [int(n) for n in m.group(1).split(",")]
        good = [n for n in nums if 1 <= n <= num_sources]
        removed.extend(n for n in nums if not 1 <= n <= num_sources)
        if not good:
            return ""
        lead = m.group(0)[:len(m.group(0)) - len(m.group(0).lstrip())]
        return f"{lead}[{', '.join(map(str, good))}]"

    return CITATION.sub(keep, text), removed


def stable_length(text: str) -> int:
    """How much of a growing text can be shown now: everything but a trailing ``[`` that may
    still become a citation (so a streamed invalid citation can be removed before it is sent).

    >>> stable_length("Paris [1")
    5
    >>> stable_length("Paris [1] is")
    12
    """
    m = _OPEN.search(text)
    if m is None:
        return len(text)
    return len(text[:m.start()].rstrip(" ")) if text[:m.start()].endswith(" ") else m.start()


def split_sentences(text: str) -> list[str]:
    """Sentences, each with the citations that follow its final punctuation.

    >>> split_sentences("Paris is the capital [1]. It is big.[2] Blank\\n\\nnext")
    ['Paris is the capital [1].', 'It is big.[2]', 'Blank', 'next']
    """
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


@dataclass
class SentenceCheck:
    text: str
    citations: list[int]
    support: float | None  # best support among its cited passages; None when nothing is cited
    supported: bool | None  # None when nothing is cited (nothing to check)


@dataclass
class GroundingReport:
    mode: str
    threshold: float
    invalid_citations: list[int] = field(default_factory=list)
    sentences: list[SentenceCheck] = field(default_factory=list)
    removed_sentences: int = 0

    @property
    def unsupported(self) -> int:
        return sum(s.supported is False for s in self.sentences)

    @property
    def unsupported_citations(self) -> int:
        """Citations that point to no passage, or whose sentence its passages do not support."""
        return len(self.invalid_citations) + sum(
            len(set(s.citations)) for s in self.sentences if s.supported is False)


def support_scores(encoder: ColBERTEncoder, claims: Sequence[str],
                   passages: Sequence[str]) -> list[float]:
    """``support(claims[i], passages[i])`` in [-1, 1]: mean over claim tokens of the best cosine
    with any passage token (late interaction, the retriever's own encoder)."""
    if not claims:
        return []
    vecs = encoder.encode_documents([*claims, *passages])
    out = []
    for c, p in zip(vecs[:len(claims)], vecs[len(claims):]):
        if len(c) == 0 or len(p) == 0:
            out.append(0.0)
            continue
        out.append(float((c @ p.T).max(dim=1).values.mean()))
    return out


def check(answer: str, passages: Sequence[str], encoder: ColBERTEncoder, *, mode: str = "report",
          threshold: float = 0.6) -> tuple[str, GroundingReport]:
    """Remove invalid citations, score each cited sentence against its passages and, in ``strip``
    mode, drop the sentences below ``threshold``. Returns the (possibly edited) answer and the
    report. ``passages[n-1]`` is the text of citation ``[n]``."""
    if mode not in MODES:
        raise ValueError(f"grounding mode must be one of {MODES}, got {mode!r}")
    report = GroundingReport(mode=mode, threshold=threshold)
    text, report.invalid_citations = drop_invalid_citations(answer, len(passages))
    if mode == "off":
        return text, report
    sentences = split_sentences(text)
    cited = [(i, s, sorted(set(citations(s)))) for i, s in enumerate(sentences)]
    pairs = [(i, remove_citations(s), n) for i, s, ns in cited for n in ns]
    scores = support_scores(encoder, [c for _, c, _ in pairs], [passages[n - 1] for *_, n in pairs])
    best: dict[int, float] = {}
    for (i, _, _), score in zip(pairs, scores):
        best[i] = max(best.get(i, -1.0), score)
    for i, s, ns in cited:
        support = round(best[i], 4) if i in best else None
        report.sentences.append(SentenceCheck(s, ns, support,
                                              None if support is None else support >= threshold))
    if mode == "strip" and report.unsupported:
        kept = [c.text for c in report.sentences if c.supported is not False]
        report.removed_sentences = len(report.sentences) - len(kept)
        text = " ".join(kept)
    return text, report
