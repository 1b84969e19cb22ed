"""Citations and the grounding check of RAG answers: which citations point nowhere, which
sentences their passages do not support, and citations for the sentences the model left uncited.

An answer cites passages as ``[n]`` (also ``[1, 2]`` or ``[1][2]``), numbered from 1 in prompt
order. The text helpers here are pure; ``support_scores`` uses the retriever's encoder: a
sentence's support by a passage is the mean, over the sentence's token vectors, of the best
cosine with any of the passage's token vectors (MaxSim normalized by the sentence length, so 1.0
means every token of the sentence has an exact match in the passage).

Attribution (``citations="auto"`` or ``"attribute"``): a sentence without a citation is cited
with the passage that supports it best, when that support reaches the attribution threshold; a
model that never writes ``[n]`` (small models do not) still gives the user provenance, and the
report says which citations the model wrote and which ragserve added. Every cited sentence,
attributed or not, is then judged against the grounding threshold: an attribution whose best
support is below it is reported unsupported (in ``strip`` mode it is not made at all, so
attribution never causes a sentence to be removed). Sentences of fewer than
``MIN_ATTRIBUTED_WORDS`` words and refusals ("I don't know") are not attributed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from retrieval.encoder import ColBERTEncoder

CITATION = re.compile(r"\s?\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")
_SENTENCE_END = re.compile(r"[.!?](?:\s?\[\d{1,4}(?:\s*,\s*\d{1,4})*\])*(?=\s|$)|\n\s*\n")
_OPEN = re.compile(r"\[[\d,\s]{0,24}$")
MODES = ("report", "strip", "off")
CITATION_POLICIES = ("auto", "model", "attribute")
MIN_ATTRIBUTED_WORDS = 3
_REFUSAL = re.compile(r"\bI (?:do not|don'?t|cannot|can'?t) (?:know|answer|tell)\b", re.I)
_FINAL_PUNCT = re.compile(r"[.!?]+$")


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


def sentence_spans(text: str, final: bool = True) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence, whitespace around it excluded. While a text is still
    growing (``final=False``), only sentences known to be complete: their end is followed by
    whitespace already, so no more text (or citation) can join them.

    >>> t = "Paris is big [1]. It is old. It"
    >>> [t[a:b] for a, b in sentence_spans(t)]
    ['Paris is big [1].', 'It is old.', 'It']
    >>> [t[a:b] for a, b in sentence_spans(t, final=False)]
    ['Paris is big [1].', 'It is old.']
    """
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if not final and m.end() >= len(text):
            break
        out.append((start, m.end()))
        start = m.end()
    if final:
        out.append((start, len(text)))
    spans = []
    for a, b in out:
        piece = text[a:b]
        if piece.strip():
            a += len(piece) - len(piece.lstrip())
            spans.append((a, a + len(piece.strip())))
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences, each with the citations that follow its final punctuation.

    >>> split_sentences("Paris is the capital [1]. It is big.[2] Blank\\n\\nnext")
    ['Paris is the capital [1].', 'It is big.[2]', 'Blank', 'next']
    """
    return [text[a:b] for a, b in sentence_spans(text)]


def insert_citation(sentence: str, numbers: Sequence[int]) -> str:
    """``sentence`` with ``[n, ...]`` before its final punctuation.

    >>> insert_citation("Paris is the capital.", [2])
    'Paris is the capital [2].'
    >>> insert_citation("Paris", [1, 3])
    'Paris [1, 3]'
    """
    marker = f" [{', '.join(map(str, numbers))}]"
    m = _FINAL_PUNCT.search(sentence)
    cut = m.start() if m else len(sentence)
    return sentence[:cut].rstrip() + marker + sentence[cut:]


def attributable(sentence: str) -> bool:
    """Whether a sentence says enough to be attributed: at least ``MIN_ATTRIBUTED_WORDS`` words
    and not a refusal.

    >>> attributable("I don't know."), attributable("Yes."), attributable("Paris is big.")
    (False, False, True)
    """
    return len(re.findall(r"\w+", sentence)) >= MIN_ATTRIBUTED_WORDS and not \
        _REFUSAL.search(sentence)


@dataclass
class SentenceCheck:
    text: str
    citations: list[int]
    support: float | None  # best support among its cited passages; None when nothing is cited
    supported: bool | None  # None when nothing is cited (nothing to check)
    attributed: list[int] = field(default_factory=list)  # the citations ragserve added


@dataclass
class GroundingReport:
    mode: str
    threshold: float
    invalid_citations: list[int] = field(default_factory=list)
    sentences: list[SentenceCheck] = field(default_factory=list)
    removed_sentences: int = 0
    citations: str = "model"  # the policy: auto, model or attribute

    @property
    def attributed(self) -> int:
        """Citations ragserve added (the model did not write them)."""
        return sum(len(s.attributed) for s in self.sentences)

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
    return [_support(c, p) for c, p in zip(vecs[:len(claims)], vecs[len(claims):])]


def _support(claim: torch.Tensor, passage: torch.Tensor) -> float:
    if len(claim) == 0 or len(passage) == 0:
        return 0.0
    return float((claim @ passage.T).max(dim=1).values.mean())


class Citer:
    """Cites and checks an answer sentence by sentence against one request's passages
    (``passages[n-1]`` is citation ``[n]``), encoding each passage once. ``cite`` is what a
    stream calls as each sentence completes; :func:`check` runs it over a whole answer."""

    def __init__(self, encoder: ColBERTEncoder, passages: Sequence[str], *,
                 mode: str = "report", citations: str = "auto",
                 threshold: float = 0.6, attribution_threshold: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"grounding mode must be one of {MODES}, got {mode!r}")
        if citations not in CITATION_POLICIES:
            raise ValueError(f"citations must be one of {CITATION_POLICIES}, got {citations!r}")
        self.encoder = encoder
        self.passages = list(passages)
        self.report = GroundingReport(mode=mode, threshold=threshold, citations=citations)
        attribution = threshold if attribution_threshold is None else attribution_threshold
        self.attribution_threshold = max(attribution, threshold) if mode == "strip" \
            else attribution
        self._passage_vecs: list[torch.Tensor] | None = None

    def _vecs(self) -> list[torch.Tensor]:
        if self._passage_vecs is None:
            self._passage_vecs = (self.encoder.encode_documents(self.passages)
                                  if self.passages else [])
        return self._passage_vecs

    def cite(self, sentences: Sequence[str]) -> list[str]:
        """Each sentence without invalid citations (``attribute``: without any of the model's)
        and, when uncited, cited by attribution; their checks are appended to the report."""
        r = self.report
        texts, claims, todo = [], [], []
        for sentence in sentences:
            text, removed = drop_invalid_citations(sentence, len(self.passages))
            r.invalid_citations.extend(removed)
            if r.citations == "attribute":
                text = remove_citations(text)
            texts.append(text)
            cited = bool(citations(text))
            score = (cited and r.mode != "off") or (
                not cited and r.citations != "model" and attributable(text)
                and bool(self.passages))
            claims.append(remove_citations(text))
            todo.append(score)
        need = [c for c, t in zip(claims, todo) if t]
        vecs = iter(self.encoder.encode_documents(need) if need else [])
        out = []
        for text, scored in zip(texts, todo):
            ns = sorted(set(citations(text)))
            support = supported = None
            added: list[int] = []
            if scored:
                v = next(vecs)
                per = [_support(v, p) for p in self._vecs()]
                if ns:
                    support = round(max(per[n - 1] for n in ns), 4)
                    supported = support >= r.threshold
                else:
                    best = max(range(len(per)), key=per.__getitem__)
                    if per[best] >= self.attribution_threshold:
                        added = ns = [best + 1]
                        text = insert_citation(text, ns)
                        support = round(per[best], 4)
                        supported = support >= r.threshold
            r.sentences.append(SentenceCheck(text, ns, support, supported, added))
            out.append(text)
        return out

    def finish(self, text: str) -> str:
        """The answer as returned: in ``strip`` mode without its unsupported sentences."""
        r = self.report
        if r.mode == "strip" and r.unsupported:
            kept = [c.text for c in r.sentences if c.supported is not False]
            r.removed_sentences = len(r.sentences) - len(kept)
            return " ".join(kept)
        return text


def check(answer: str, passages: Sequence[str], encoder: ColBERTEncoder, *, mode: str = "report",
          threshold: float = 0.6, citations: str = "model",
          attribution_threshold: float | None = None) -> tuple[str, GroundingReport]:
    """Cite and check a whole answer: remove invalid citations, attribute uncited sentences
    (``citations`` auto or attribute), score each cited sentence against its passages and, in
    ``strip`` mode, drop the sentences below ``threshold``. Returns the answer (whitespace
    between sentences kept) and the report. ``passages[n-1]`` is the text of citation ``[n]``."""
    citer = Citer(encoder, passages, mode=mode, citations=citations, threshold=threshold,
                  attribution_threshold=attribution_threshold)
    spans = sentence_spans(answer)
    cited = citer.cite([answer[a:b] for a, b in spans])
    pieces, last = [], 0
    for (a, b), text in zip(spans, cited):
        pieces += [answer[last:a], text]
        last = b
    pieces.append(answer[last:])
    return citer.finish("".join(pieces)), citer.report
