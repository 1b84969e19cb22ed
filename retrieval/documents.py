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
