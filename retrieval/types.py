"""Plain records that cross the retrieval boundary (standard library only)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One source file's text. ``pages`` holds (page number, text); page is None when the format
    has no pages (txt, md, html), 1-based for PDF."""

    doc_id: str  # path relative to the ingested root, '/'-separated: stable across machines
    source: str  # the path as given (absolute or relative to the working directory)
    pages: tuple[tuple[int | None, str], ...]


@dataclass(frozen=True)
class Chunk:
    """A span of a document that gets indexed. ``start``/``end`` are character offsets into the
    page text. With a parent/child split, ``parent_text`` is the larger span that goes into the
    prompt (ParentDocumentRetriever); otherwise it is None and ``text`` goes into the prompt."""

    doc_id: str
    source: str
    page: int | None
    start: int
    end: int
    text: str
    parent_text: str | None = None
    parent_start: int | None = None
    parent_end: int | None = None

    @property
    def prompt_text(self) -> str:
        return self.parent_text if self.parent_text is not None else self.text


@dataclass(frozen=True)
class Passage:
    """A search hit. ``text`` is what goes into the prompt (the parent span when the index was
    built with a parent/child split); ``chunk_text`` is the span that matched."""

    chunk_id: int
    doc_id: str
    text: str
    score: float
    source: str
    page: int | None
    start: int
    end: int
    chunk_text: str = field(default="", repr=False)
    # hybrid search: each retriever's own score for this passage (those that found it)
    scores: dict[str, float] | None = field(default=None, repr=False, compare=False)
    # the document's name as the model and the client see it, when ``doc_id`` is an id (a
    # vector store's file: its filename); None: ``doc_id`` is the name
    title: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.title if self.title is not None else self.doc_id
