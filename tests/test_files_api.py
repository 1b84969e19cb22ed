"""Files and vector stores through the official openai client: uploads, stores, ingestion in
the background (a real worker process), search with filters, ``file_search`` and chat ``rag``
over an uploaded file, deletion, hostile uploads, expiry and concurrent search and ingestion.
The restart in the middle of ingestion (a real SIGKILL) is tests/test_files_restart.py.

The model is scripted (tests/test_rag_server.py's backend) so that answers and their citations
are known; the retriever is the tiny ColBERT of the ``index_dir`` fixture.
"""

from __future__ import annotations

import concurrent.futures
import io
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from serverutil import ThreadServer, metric, wait_ready
from test_rag_server import RagServer
from test_responses import scripted_app

from server.config import ServerConfig

QUESTION = "What is the capital of Zorvania?"
ANSWER = "The capital of Zorvania is Quelthar [1]."
ZORVANIA = ("# Zorvania\n\nThe capital of Zorvania is Quelthar. Quelthar exports purple bananas "
            "to Mars.\n")
OTHER = "Glass towers stand in Vintaro, a city famous for its copper bridges and tea.\n"


def pdf(pages: list[str], extra_stream: bytes | None = None) -> bytes:
    """A minimal PDF with one text line per page (Helvetica); ``extra_stream``: a
    FlateDecode content stream appended to the first page (for a decompression bomb)."""
    objects: list[bytes] = []
    n_pages = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    font = 3 + 2 * n_pages
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    bomb = 4 + 2 * n_pages
    for i, text in enumerate(pages):
        contents = f"{4 + 2 * i} 0 R" if extra_stream is None or i else \
            f"[{4 + 2 * i} 0 R {bomb} 0 R]"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
                       f"{contents} /Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    if extra_stream is not None:
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(extra_stream)
                       + extra_stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % n + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


@pytest.fixture(scope="module")
def srv(index_dir: Path, llama3_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    tmp = tmp_path_factory.mktemp("files")
    config = ServerConfig(index=index_dir, grounding_threshold=0.8, rag_answer_tokens=64,
                          responses_store_persist=False, store_dir=tmp / "store",
                          max_upload_bytes=2**20, max_files=40, max_stored_bytes=8 * 2**20,
                          max_document_chars=200_000, max_batch_files=20)
    app, backend = scripted_app(config, tokenizer)

    def set_script(ids: list[int]) -> None:
        backend.script = ids

    with ThreadServer(app) as s:
        wait_ready(s.url, {})
        server = RagServer(s.url, tokenizer, set_script)
        server.app = app
        yield server


@pytest.fixture
def client(srv: RagServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)


def upload(client: openai.OpenAI, name: str, data: bytes | str) -> object:
    data = data.encode() if isinstance(data, str) else data
    return client.files.create(file=(name, data), purpose="assistants")


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def wait_files(client: openai.OpenAI, store: str, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(client.vector_stores.files.list(store))
        if files and all(f.status != "in_progress" for f in files):
            return files
        time.sleep(0.2)
    raise TimeoutError(f"files of {store} still in progress")


# -- files -----------------------------------------------------------------------------------

def test_files_upload_list_get_content_delete(client):
    f = upload(client, "zorvania.md", ZORVANIA)
    assert f.id.startswith("file-") and f.object == "file" and f.purpose == "assistants"
    assert f.bytes == len(ZORVANIA.encode()) and f.filename == "zorvania.md"
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).read() == ZORVANIA.encode()
    d = client.files.delete(f.id)
    assert d.deleted and d.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_upload_detects_the_type_from_the_content(client, srv):
    p = upload(client, "report.txt", pdf(["Quelthar is the capital."]))
    h = upload(client, "page.md", "<!DOCTYPE html><html><body><p>Hi there</p></body></html>")
    for f, kind in ((p, "application/pdf"), (h, "text/html")):
        r = httpx.get(f"{srv.url}/v1/files/{f.id}/content")
        assert r.headers["content-type"].startswith(kind)
        client.files.delete(f.id)


# -- the whole path ----------------------------------------------------------------------------

def test_upload_search_answer_and_delete(client, srv):
    store = client.vector_stores.create(name="docs")
    assert store.id.startswith("vs_") and store.status == "completed"
    assert store.file_counts.total == 0
    first = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("zorvania.md", ZORVANIA.encode()),
        poll_interval_ms=100)
    assert first.status == "completed" and first.last_error is None and first.usage_bytes > 0
    second = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("vintaro.pdf", pdf([OTHER.strip()])),
        poll_interval_ms=100)
    assert second.status == "completed", second.last_error
    got = client.vector_stores.retrieve(store.id)
    assert got.file_counts.completed == 2 and got.status == "completed" and got.usage_bytes > 0

    hits = list(client.vector_stores.search(store.id, query="capital of Zorvania"))
    assert hits[0].file_id == first.id and hits[0].filename == "zorvania.md"
    assert "Quelthar" in hits[0].content[0].text and 0 <= hits[0].score <= 1
    pdf_hits = list(client.vector_stores.search(store.id, query="copper bridges Vintaro"))
    assert pdf_hits[0].file_id == second.id and pdf_hits[0].attributes["page"] == 1

    srv.say(ANSWER)
    r = client.responses.create(model="scripted", input=QUESTION, tools=[
        {"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 2}])
    note = r.output[1].content[0].annotations[0]
    assert note.type == "file_citation" and note.file_id == first.id
    assert note.filename == "zorvania.md"
    srv.say(ANSWER)
    chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": QUESTION}],
        "rag": {"vector_store_id": store.id, "top_k": 2}}).json()
    assert chat["sources"][0]["doc_id"] == first.id and chat["sources"][0]["source"] == \
        "zorvania.md"

    client.vector_stores.files.delete(first.id, vector_store_id=store.id)
    hits = list(client.vector_stores.search(store.id, query="capital of Zorvania"))
    assert first.id not in {h.file_id for h in hits}  # at once, before the new version
    assert client.files.retrieve(first.id).id == first.id  # the file itself stays
    client.files.delete(second.id)  # deleting the file takes it out of the store too
    assert list(client.vector_stores.search(store.id, query="copper bridges")) == []
    assert client.vector_stores.delete(store.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store.id)


def test_batches_attributes_filters_and_threshold(client):
    store = client.vector_stores.create(name="filtered")
    ids = [upload(client, f"doc{i}.md", f"Report {i}: the harvest of year {2020 + i} was "
                                         f"{'good' if i % 2 else 'poor'} in Zorvania.").id
           for i in range(4)]
    batch = client.vector_stores.file_batches.create_and_poll(
        store.id, files=[{"file_id": f, "attributes": {"year": 2020 + i, "good": bool(i % 2)}}
                         for i, f in enumerate(ids)], poll_interval_ms=100)
    assert batch.status == "completed" and batch.file_counts.completed == 4
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert sorted(f.id for f in listed) == sorted(ids)
    recent = {"type": "gte", "key": "year", "value": 2022}
    hits = list(client.vector_stores.search(store.id, query="harvest", filters=recent))
    assert {h.file_id for h in hits} == set(ids[2:])
    assert all(h.attributes["year"] >= 2022 for h in hits)
    both = {"type": "and", "filters": [recent, {"type": "eq", "key": "good", "value": True}]}
    assert [h.file_id for h in client.vector_stores.search(store.id, query="harvest",
                                                           filters=both)] == [ids[3]]
    scores = [h.score for h in client.vector_stores.search(store.id, query="harvest")]
    cut = sorted(scores)[len(scores) // 2]
    kept = list(client.vector_stores.search(store.id, query="harvest",
                                            ranking_options={"score_threshold": cut}))
    assert kept and all(h.score >= cut for h in kept) and len(kept) < len(scores)
    client.vector_stores.files.update(ids[0], vector_store_id=store.id,
                                      attributes={"year": 2030, "good": True})
    assert ids[0] in {h.file_id for h in client.vector_stores.search(
        store.id, query="harvest", filters=both)}
    bad = httpx.post(f"{client.base_url}vector_stores/{store.id}/search",
                     json={"query": "x", "filters": {"type": "near", "key": "a", "value": 1}})
    assert error(bad)["param"] == "filters"


def test_chunking_strategy_static(client):
    text = " ".join(f"Sentence {i} mentions the river Quell." for i in range(200))
    f = upload(client, "long.txt", text)
    store = client.vector_stores.create(name="chunks")
    small = client.vector_stores.files.create_and_poll(
        f.id, vector_store_id=store.id, poll_interval_ms=100, chunking_strategy={
            "type": "static", "static": {"max_chunk_size_tokens": 100,
                                         "chunk_overlap_tokens": 20}})
    assert small.status == "completed"
    assert small.chunking_strategy.static.max_chunk_size_tokens == 100
    passages = srv_index(client, store.id)
    assert passages > 10
    r = httpx.post(f"{client.base_url}vector_stores/{store.id}/files", json={
        "file_id": f.id, "chunking_strategy": {"type": "static", "static": {
            "max_chunk_size_tokens": 100, "chunk_overlap_tokens": 80}}})
    assert "half" in error(r)["message"]


def srv_index(client: openai.OpenAI, store: str) -> int:
    return len(list(client.vector_stores.search(store, query="river Quell",
                                                max_num_results=50)))


# -- what a client may get wrong, or do on purpose ---------------------------------------------

def test_hostile_uploads(client, srv):
    store = client.vector_stores.create(name="hostile")
    r = httpx.post(f"{srv.url}/v1/files", files={"file": ("empty.txt", b"")},
                   data={"purpose": "assistants"})
    assert "empty" in error(r)["message"]
    # a 2 GB Content-Length that the body does not have: refused before it is read
    status, body = lying_upload(srv.url, 2 * 2**30)
    assert status == 413 and "--max-upload-bytes" in body
    # over the limit without a declared length (chunked)
    r = httpx.post(f"{srv.url}/v1/files", files={"file": ("big.txt", b"a " * 2**20)},
                   data={"purpose": "assistants"})
    assert "--max-upload-bytes" in error(r, 413)["message"]
    garbage = bytes(range(256)) * 64
    r = httpx.post(f"{srv.url}/v1/files", files={"file": ("notes.md", garbage)},
                   data={"purpose": "assistants"})
    e = error(r)
    assert e["code"] == "unsupported_file" and "binary" in e["message"]
    evil = upload(client, "../../etc/passwd", "root:x:0:0:root:/root:/bin/bash")
    assert evil.filename == "passwd"
    store_dir = srv.app.state.stores.docs.root
    assert not any(p.name == "passwd" for p in store_dir.rglob("*"))
    r = httpx.post(f"{srv.url}/v1/files", files={"file": ("a.txt", b"hi")},
                   data={"purpose": "fine-tune"})
    assert error(r)["param"] == "purpose"
    # a PDF whose stream inflates to 200 MB: the worker stops at pypdf's limit, the file fails
    bomb = pdf(["Title page."], extra_stream=zlib.compress(b" " * (200 * 2**20), 9))
    assert len(bomb) < 2**20
    b = upload(client, "bomb.pdf", bomb)
    done = client.vector_stores.files.create_and_poll(b.id, vector_store_id=store.id,
                                                      poll_interval_ms=100)
    assert done.status == "failed" and done.last_error.code == "invalid_file"
    assert done.last_error.message
    ok = client.vector_stores.files.create_and_poll(evil.id, vector_store_id=store.id,
                                                    poll_interval_ms=100)
    assert ok.status == "completed"  # the worker survived and serves the next file
    for f in (evil.id, b.id):
        client.files.delete(f)


def test_many_tiny_files_against_the_quota(client, srv):
    """10,000 uploads against --max-files 40: each past the quota is a 429 naming it, and the
    files under it are all there, whole."""
    docs = srv.app.state.stores.docs
    before, _ = docs.usage()
    statuses: dict[int, int] = {}
    kept: list[str] = []

    def one(i: int) -> None:
        r = client_post(srv.url, f"tiny{i}.txt", f"tiny file {i}".encode())
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:
            kept.append(r.json()["id"])
        else:
            assert "--max-files" in r.json()["error"]["message"], r.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(10_000)))
    assert statuses[200] == 40 - before and statuses[429] == 10_000 - (40 - before)
    assert docs.usage()[0] == 40
    for f in kept:
        assert client.files.content(f).read().startswith(b"tiny file ")
        client.files.delete(f)


_HTTP = httpx.Client(timeout=60)


def lying_upload(url: str, declared: int) -> tuple[int, str]:
    """POST /v1/files declaring ``declared`` bytes and sending ten (no client library sends
    such a request): the status and body of the answer."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                     f"multipart/form-data; boundary=b\r\nContent-Length: {declared}\r\n\r\n"
                     "0123456789".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def client_post(url: str, name: str, data: bytes) -> httpx.Response:
    return _HTTP.post(f"{url}/v1/files", files={"file": (name, data)},
                      data={"purpose": "user_data"})


def test_read_only_index_store_and_unknown_ids(client, srv):
    index_store = next(s for s in client.vector_stores.list() if s.metadata.get("read_only"))
    r = httpx.post(f"{srv.url}/v1/vector_stores/{index_store.id}/files",
                   json={"file_id": "file-x"})
    assert "read-only" in error(r)["message"]
    r = httpx.post(f"{srv.url}/v1/responses", json={"input": "x", "tools": [
        {"type": "file_search", "vector_store_ids": ["vs_nope"]}]})
    assert error(r)["param"] == "vector_store_ids"
    store = client.vector_stores.create(name="x")
    r = httpx.post(f"{srv.url}/v1/vector_stores/{store.id}/files", json={"file_id": "file-no"})
    assert error(r, 404)["param"] == "file_id"
    client.vector_stores.delete(store.id)


def test_expiry(client, srv):
    stores = srv.app.state.stores
    f = upload(client, "brief.txt", "short lived")
    r = httpx.post(f"{srv.url}/v1/files", files={"file": ("later.txt", b"expires")}, data={
        "purpose": "assistants", "expires_after[anchor]": "created_at",
        "expires_after[seconds]": "3600"})
    later = r.json()
    assert later["expires_at"] >= time.time() + 3500
    assert stores.sweep(now=time.time() + 7200) == [later["id"]]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(later["id"])
    assert client.files.retrieve(f.id)  # no expiry: kept
    vs = client.vector_stores.create(name="brief",
                                     expires_after={"anchor": "last_active_at", "days": 1})
    assert vs.expires_at == vs.last_active_at + 86400
    stores.docs.update_store(vs.id, last_active_at=int(time.time()) - 2 * 86400)
    assert client.vector_stores.retrieve(vs.id).status == "expired"
    r = httpx.post(f"{srv.url}/v1/vector_stores/{vs.id}/search", json={"query": "x"})
    assert error(r)["code"] == "expired"
    client.vector_stores.delete(vs.id)
    client.files.delete(f.id)


def test_search_while_ingesting(client, srv):
    store = client.vector_stores.create(name="busy")
    first = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("zorvania.md", ZORVANIA.encode()),
        poll_interval_ms=100)
    assert first.status == "completed"
    ids = [upload(client, f"more{i}.txt", f"Filler document {i} about weather and rain.").id
           for i in range(12)]
    client.vector_stores.file_batches.create(store.id, file_ids=ids)
    seen = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # every search during ingestion finds the old file
        hits = list(client.vector_stores.search(store.id, query="capital of Zorvania"))
        assert hits[0].file_id == first.id
        seen += 1
        if client.vector_stores.retrieve(store.id).file_counts.in_progress == 0:
            break
    assert client.vector_stores.retrieve(store.id).file_counts.completed == 13 and seen
    text = httpx.get(f"{srv.url}/metrics").text
    assert metric(text, "ragserve_vector_store_files", status="completed") >= 13
    assert metric(text, "ragserve_ingest_seconds_count") >= 1
    assert metric(text, "ragserve_ingest_queue_depth") == 0
    assert metric(text, "ragserve_stored_file_bytes") > 0
    client.vector_stores.delete(store.id)
    for f in [first.id, *ids]:
        client.files.delete(f)


def test_every_route_needs_the_api_key(llama3_tokenizer_dir, tmp_path):
    """A server without --index serves stores too; every files and vector store route is behind
    the key."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    config = ServerConfig(api_key="sekret", store_dir=tmp_path / "store",
                          responses_store_persist=False)
    app, _ = scripted_app(config, tokenizer)
    with ThreadServer(app) as s:
        wait_ready(s.url, {"Authorization": "Bearer sekret"})
        for method, path in (("GET", "/v1/files"), ("POST", "/v1/files"),
                             ("GET", "/v1/files/file-x/content"), ("GET", "/v1/vector_stores"),
                             ("POST", "/v1/vector_stores"), ("DELETE", "/v1/vector_stores/vs_x"),
                             ("POST", "/v1/vector_stores/vs_x/search"),
                             ("POST", "/v1/vector_stores/vs_x/file_batches")):
            assert httpx.request(method, f"{s.url}{path}").status_code == 401, path
        keyed = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
        store = keyed.vector_stores.create(name="no index")
        assert [v.id for v in keyed.vector_stores.list()] == [store.id]
