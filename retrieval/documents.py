"""Document loading: text, Markdown, PDF and HTML files into ``Document`` records.

``load_documents(root)`` reads one file or walks a directory (recursively, hidden entries
skipped, sorted by path so the order is the same on every machine). Text files are decoded as
UTF-8 with undecodable bytes replaced; PDF text is extracted per page with ``pypdf`` (imported
only when a PDF is read); HTML keeps its visible text only, with block elements as line breaks.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

from retrieval.types import Document

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".md", ".pdf", ".html", ".htm")


class DocumentError(ValueError):
    """A file could not be read as a document (missing, unsupported, corrupt or encrypted)."""


def load_documents(root: Path | str, *, skipped: Counter[str] | None = None) -> list[Document]:
    """Load every supported file under ``root`` (a file or a directory).

    ``doc_id`` is the path relative to ``root`` with '/' separators (a single file: its name);
    ``source`` is the path as found. Files with other suffixes are skipped, and so are documents
    with no text; both are counted in the log line and, when ``skipped`` is given, added to it
    under ``"unsupported"`` and ``"empty"``. A missing root, a single file with an unsupported
    suffix, or an unreadable PDF raises ``DocumentError``.

    Example::

        docs = load_documents("corpus/")   # corpus/a.md, corpus/sub/b.pdf
        [d.doc_id for d in docs]            # ['a.md', 'sub/b.pdf']
        docs[1].pages[0]                    # (1, 'text of page 1')
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DocumentError(f"{root}: unsupported file type {root.suffix or '(no suffix)'!r}; "
                                f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
        files = [(root.name, root)]
    elif root.is_dir():
        files = _walk(root)
    else:
        raise DocumentError(f"{root}: no such file or directory")

    docs: list[Document] = []
    unsupported: Counter[str] = Counter()
    empty = 0
    for doc_id, path in files:
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            unsupported[suffix or "(no suffix)"] += 1
            continue
        pages = _read(path, suffix)
        if not pages:
            empty += 1
            continue
        docs.append(Document(doc_id=doc_id, source=str(path), pages=pages))

    log.info("loaded %d documents from %s (skipped: %d unsupported%s, %d empty)", len(docs), root,
             unsupported.total(),
             f" [{', '.join(f'{s} x{n}' for s, n in sorted(unsupported.items()))}]"
             if unsupported else "", empty)
    if skipped is not None:
        skipped["unsupported"] += unsupported.total()
        skipped["empty"] += empty
    return docs


# -- bytes from a client ---------------------------------------------------------------------------

KINDS = ("pdf", "html", "markdown", "text")
_MARKDOWN_SUFFIXES = (".md", ".markdown")
_HTML_START = re.compile(rb"\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b",
                         re.IGNORECASE | re.DOTALL)


def sniff(data: bytes, filename: str = "") -> str:
    """The kind of a client's file, from its content (the name only tells Markdown from plain
    text): ``pdf``, ``html``, ``markdown`` or ``text``. Content that is none of them (binary,
    or text in no encoding we read) raises ``DocumentError`` whatever the name says.

    >>> sniff(b"%PDF-1.7 ..."), sniff(b"<!DOCTYPE html><p>x"), sniff(b"# T", "a.md")
    ('pdf', 'html', 'markdown')
    >>> sniff("plain café".encode(), "notes.pdf")
    'text'
    """
    if not data:
        raise DocumentError("the file is empty")
    if b"%PDF-" in data[:1024]:
        return "pdf"
    text = decode_text(data, partial=True)
    if _HTML_START.match(text[:4096].encode()):
        return "html"
    return "markdown" if filename.lower().endswith(_MARKDOWN_SUFFIXES) else "text"


def decode_text(data: bytes, partial: bool = False) -> str:
    """UTF-8 (BOM or not) or UTF-16 with a BOM; anything with NUL bytes or many control
    characters is binary: ``DocumentError``. ``partial``: ``data`` is the head of a file (a
    character cut at its end is not an error)."""
    import codecs

    def decode(encoding: str) -> str:
        return codecs.getincrementaldecoder(encoding)().decode(data, final=not partial)

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = decode("utf-16")
        except UnicodeDecodeError as e:
            raise DocumentError(f"not valid UTF-16 text ({e.reason} at byte {e.start})") from e
    else:
        if b"\x00" in data:
            raise DocumentError("binary content (NUL bytes): not text, Markdown, HTML or PDF")
        try:
            text = decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DocumentError(f"binary or non-UTF-8 content (invalid byte at offset "
                                f"{e.start}): not text, Markdown, HTML or PDF") from e
    control = sum(1 for c in text[:65536] if ord(c) < 32 and c not in "\t\n\r\f")
    if control > max(8, len(text[:65536]) // 100):
        raise DocumentError("binary content (control characters): not text, Markdown, HTML or "
                            "PDF")
    return text


def document_from_bytes(data: bytes, kind: str, doc_id: str, source: str, *,
                        max_chars: int) -> Document:
    """A client's file as a ``Document`` (``kind`` from :func:`sniff`). Its text may hold at
    most ``max_chars`` characters (a PDF is read page by page and stopped there): more raises
    ``DocumentError``, as does a file with no text."""
    if kind == "pdf":
        pages = _pdf_pages(data, source, max_chars)
    else:
        text = decode_text(data)
        if kind == "html":
            text = html_to_text(text)
        if len(text) > max_chars:
            raise DocumentError(f"the document's text has {len(text)} characters, more than "
                                f"the {max_chars} allowed per file")
        pages = [(None, text)]
    kept = tuple((n, t) for n, t in pages if t.strip())
    if not kept:
        raise DocumentError("the file has no text to index" + (
            " (a scanned PDF needs OCR first)" if kind == "pdf" else ""))
    return Document(doc_id=doc_id, source=source, pages=kept)


def _pdf_pages(data: bytes, source: str, max_chars: int) -> list[tuple[int | None, str]]:
    import io

    from pypdf import PdfReader

    pages: list[tuple[int | None, str]] = []
    total = 0
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError("the PDF is encrypted")
        for i, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            total += len(text)
            if total > max_chars:
                raise DocumentError(f"the PDF's text passes the {max_chars} characters allowed "
                                    f"per file at page {i}")
            pages.append((i, text))
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many kinds of error on damaged or hostile files
        raise DocumentError(f"unreadable PDF ({type(exc).__name__}: {exc})") from exc
    return pages


def _walk(root: Path) -> list[tuple[str, Path]]:
    """(doc_id, path) of every non-hidden file under ``root``, sorted by path components."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).parts, path))
    found.sort(key=lambda item: item[0])
    return [("/".join(parts), path) for parts, path in found]


def _read(path: Path, suffix: str) -> tuple[tuple[int | None, str], ...]:
    """The document's pages, without pages that hold no text (empty tuple: nothing to index)."""
    if suffix == ".pdf":
        pages = _read_pdf(path)
    else:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        if suffix in (".html", ".htm"):
            text = html_to_text(text)
        pages = [(None, text)]
    return tuple((n, text) for n, text in pages if text.strip())


def _read_pdf(path: Path) -> list[tuple[int | None, str]]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{path}: PDF is encrypted")
        return [(i, page.extract_text() or "") for i, page in enumerate(reader.pages, start=1)]
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises many kinds of error on damaged files
        raise DocumentError(f"{path}: unreadable PDF ({type(exc).__name__}: {exc})") from exc


# -- HTML ----------------------------------------------------------------------------------------

_DROPPED = frozenset({"script", "style", "head", "title", "template", "noscript"})
_HEAD_ONLY = frozenset({"title", "meta", "link", "base", "style", "script", "noscript",
                        "template"})
_PARAGRAPH = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
                        "header", "footer", "main", "nav", "aside", "blockquote", "pre", "table",
                        "ul", "ol", "dl", "figure", "form", "fieldset", "address", "hr", "body"})
_LINE = frozenset({"br", "li", "tr", "dt", "dd", "caption", "figcaption", "summary", "details",
                   "option"})
_CELL = frozenset({"td", "th"})


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: script/style/head dropped, entities decoded, block elements
    as line breaks (paragraph-like blocks as a blank line), other whitespace collapsed except
    inside ``<pre>``.

    >>> html_to_text("<head><title>T</title></head><p>a &amp; b</p><script>x()</script>c<br>d")
    'a & b\\n\\nc\\nd'
    """
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    return re.sub(r"[ \t]+\n", "\n", text).strip()


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._dropping: list[str] = []  # open elements whose content is not visible
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if "head" in self._dropping and tag not in _HEAD_ONLY:
            self._dropping.remove("head")  # </head> left out: the body has started
        if tag in _DROPPED:
            self._dropping.append(tag)
        elif not self._dropping:
            if tag == "pre":
                self._pre += 1
            self._block(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED:
            if tag in self._dropping:
                del self._dropping[len(self._dropping) - 1 - self._dropping[::-1].index(tag):]
        elif not self._dropping:
            if tag == "pre" and self._pre:
                self._pre -= 1
            self._block(tag)

    def handle_data(self, data: str) -> None:
        if self._dropping:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith(("\n", " ")):
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)

    def _block(self, tag: str) -> None:
        if tag in _PARAGRAPH:
            self._newlines(2)
        elif tag in _LINE:
            self._newlines(1)
        elif tag in _CELL and self.parts and not self.parts[-1].endswith(("\n", " ")):
            self.parts.append(" ")

    def _newlines(self, n: int) -> None:
        """End the output with at least ``n`` line breaks (none at the very start)."""
        while self.parts and self.parts[-1].endswith(" ") and not self._pre:
            self.parts[-1] = self.parts[-1].rstrip(" ")
            if not self.parts[-1]:
                self.parts.pop()
        if not self.parts:
            return
        have = 0
        for part in reversed(self.parts):
            stripped = part.rstrip("\n")
            have += len(part) - len(stripped)
            if stripped:
                break
        if have < n:
            self.parts.append("\n" * (n - have))
