"""Token-aware chunking of ``Document`` pages into ``Chunk`` spans.

A page is tokenized once (fast tokenizer, character offsets, no truncation) and cut into windows
of at most ``chunk_tokens`` tokens that overlap by about ``overlap_tokens``. Windows are cut
between words, and where the last quarter of a window holds a paragraph, line or sentence break,
at the strongest such break, so chunks rarely end mid-sentence. Each chunk's text is re-tokenized
on its own and the window shrunk if it comes out longer than the limit, so the limit holds for
the text the encoder will see whatever the tokenizer. Chunks never cross pages, and together they
cover every non-whitespace character of a page.

With ``parent_tokens`` (LangChain's ParentDocumentRetriever) a page is first cut into
non-overlapping parent windows of at most ``parent_tokens`` tokens, then each parent into child
chunks; the child is what gets indexed, the parent what goes into the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from retrieval.types import Chunk, Document

# ColBERTv2 encodes a passage as [CLS] [D] text [SEP] truncated to doc_maxlen = 180 tokens, so
# 177 text tokens fit; one more is kept spare: 180 - [CLS] - [D] - [SEP] - 1 = 176.
CHUNK_TOKENS = 176
OVERLAP_TOKENS = 32
MIN_CHUNK_TOKENS = 8
_SENTENCE_END = frozenset(".!?…。！？")
_CLOSERS = "\"')]}»”’"


def chunk_documents(docs: Sequence[Document], tokenizer: Any, *,
                    chunk_tokens: int = CHUNK_TOKENS, overlap_tokens: int = OVERLAP_TOKENS,
                    parent_tokens: int | None = None) -> list[Chunk]:
    """Cut every page of ``docs`` into chunks of at most ``chunk_tokens`` tokens of
    ``tokenizer`` (a Hugging Face fast tokenizer; special tokens not counted).

    ``start``/``end`` are character offsets into the page text and ``text`` is exactly
    ``page_text[start:end]``, with no leading or trailing whitespace. Consecutive chunks of a page
    share about ``overlap_tokens`` tokens. With ``parent_tokens``, every chunk also carries the
    span of its parent window (``parent_text``, ``parent_start``, ``parent_end``).

    Example::

        tok = AutoTokenizer.from_pretrained("colbert-ir/colbertv2.0")
        chunks = chunk_documents(load_documents("corpus/"), tok, parent_tokens=512)
        chunks[0].text        # <= 176 tokens, what gets indexed
        chunks[0].parent_text  # <= 512 tokens around it, what goes into the prompt
    """
    if chunk_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(f"chunk_tokens must be >= {MIN_CHUNK_TOKENS}, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(f"overlap_tokens must be >= 0 and < chunk_tokens ({chunk_tokens}), "
                         f"got {overlap_tokens}")
    if parent_tokens is not None and parent_tokens <= chunk_tokens:
        raise ValueError(f"parent_tokens must be > chunk_tokens ({chunk_tokens}), "
                         f"got {parent_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("chunking needs a Hugging Face fast tokenizer (character offsets), got "
                        f"{type(tokenizer).__name__}")

    chunks: list[Chunk] = []
    for doc in docs:
        for page, text in doc.pages:
            if not text.strip():
                continue
            cutter = _PageCutter(text, tokenizer)
            if parent_tokens is None:
                for _, _, start, end in cutter.windows(0, cutter.n, 0, len(text), chunk_tokens,
                                                       overlap_tokens):
                    chunks.append(Chunk(doc.doc_id, doc.source, page, start, end,
                                        text[start:end]))
                continue
            for lo, hi, p_start, p_end in cutter.windows(0, cutter.n, 0, len(text),
                                                         parent_tokens, 0):
                parent = text[p_start:p_end]
                for _, _, start, end in cutter.windows(lo, hi, p_start, p_end, chunk_tokens,
                                                       overlap_tokens):
                    chunks.append(Chunk(doc.doc_id, doc.source, page, start, end,
                                        text[start:end], parent_text=parent,
                                        parent_start=p_start, parent_end=p_end))
    return chunks


class _PageCutter:
    """One page's tokens (character offsets, word starts) and the windowing over them."""

    def __init__(self, text: str, tokenizer: Any) -> None:
        self.text = text
        self.tokenizer = tokenizer
        # truncation=False and verbose=False: a page may be far longer than model_max_length,
        # and only this call sees the whole of it
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        truncation=False, verbose=False)
        offsets = enc["offset_mapping"]
        words = enc.word_ids()
        self.n = len(offsets)
        self.starts = [s for s, _ in offsets]
        self.ends = [e for _, e in offsets]
        # a window may start or end before token i without splitting a word
        self.word_start = [i == 0 or w is None or w != words[i - 1] for i, w in enumerate(words)]

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False,
                                  verbose=False)["input_ids"])

    def windows(self, lo: int, hi: int, first: int, last: int, size: int,
                overlap: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield ``(a, b, start, end)``: windows over tokens [a, b) within [lo, hi) and their
        character spans within [first, last). The first window starts at ``first``, the last
        ends at ``last`` and each other ends where the token after it begins, so characters the
        tokenizer drops are still covered."""
        a = lo
        while a < hi:
            b = self._end(a, hi, size)
            start, end = self._span(a, b, lo, hi, first, last)
            while b > a + 1 and self.count(self.text[start:end]) > size:
                b = self._previous_word_start(a, b)
                start, end = self._span(a, b, lo, hi, first, last)
            if start < end:
                yield a, b, start, end
            if b >= hi:
                return
            a = self._next_start(a, b, overlap)

    def _span(self, a: int, b: int, lo: int, hi: int, first: int, last: int) -> tuple[int, int]:
        start = first if a == lo else max(first, self.starts[a])
        end = last if b == hi else min(last, self.starts[b])
        end = max(start, end)
        text = self.text
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        return start, end

    def _end(self, a: int, hi: int, size: int) -> int:
        """Where the window starting at token ``a`` ends: at the strongest break in its last
        quarter (the latest among equals), else at its full size."""
        b_max = min(a + size, hi)
        if b_max == hi:
            return hi
        b_min = a + max(1, size - size // 4)
        best, best_rank = b_max, self._rank(b_max)
        for b in range(b_max - 1, b_min - 1, -1):
            if best_rank == 4:
                break
            rank = self._rank(b)
            if rank > best_rank:
                best, best_rank = b, rank
        if best_rank == 0:  # inside one long word: end before it, if it starts in the window
            earlier = self._previous_word_start(a, b_min)
            if self.word_start[earlier]:
                return earlier
        return best

    def _rank(self, b: int) -> int:
        """How good a cut before token ``b`` is: 4 blank line, 3 line break or sentence end,
        2 other whitespace, 1 word boundary with no space (punctuation), 0 inside a word."""
        if not self.word_start[b]:
            return 0
        text = self.text
        left = right = self.starts[b]
        while left > 0 and text[left - 1].isspace():
            left -= 1
        while right < len(text) and text[right].isspace():
            right += 1
        if left == right:
            return 1
        newlines = text.count("\n", left, right)
        if newlines >= 2:
            return 4
        prev = left
        while prev > 0 and text[prev - 1] in _CLOSERS:
            prev -= 1
        if newlines or (prev > 0 and text[prev - 1] in _SENTENCE_END):
            return 3
        return 2

    def _previous_word_start(self, a: int, b: int) -> int:
        """The last word start in (a, b), else b - 1."""
        for j in range(b - 1, a, -1):
            if self.word_start[j]:
                return j
        return max(a + 1, b - 1)

    def _next_start(self, a: int, b: int, overlap: int) -> int:
        """Where the window after [a, b) starts: ``overlap`` tokens back from ``b``, moved to the
        strongest break (the nearest among equals) within a quarter of the overlap, always
        after ``a``."""
        if overlap == 0:
            return b
        target = max(b - overlap, a + 1)
        radius = max(1, overlap // 4)
        candidates = range(max(a + 1, target - radius), min(b - 1, target + radius) + 1)
        best = max(candidates, key=lambda j: (self._rank(j), -abs(j - target)), default=target)
        return best if self.word_start[best] else target
