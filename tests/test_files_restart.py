"""A server killed with SIGKILL in the middle of ingestion loses nothing it acknowledged: after
a restart on the same --store-dir every uploaded file is there, whole, and every file added to
the store ends ``completed`` (resumed) or ``failed`` with a reason, and is searchable.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from serverutil import start_subprocess, wait_ready

N_FILES = 24


def server(tiny_llama_dir: Path, index_dir: Path, store: Path, log: Path):
    return start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32",
        "--max-model-len", "256", "--max-num-seqs", "2", "--kernels", "step=eager",
        "--index", str(index_dir), "--store-dir", str(store),
        "--responses-store-persist", "false"], log)


def test_sigkill_during_ingestion_loses_nothing(tiny_llama_dir, index_dir, tmp_path):
    store = tmp_path / "store"
    proc, url = server(tiny_llama_dir, index_dir, store, tmp_path / "first.log")
    try:
        wait_ready(url, proc=proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        texts = {}
        for i in range(N_FILES):
            text = f"Document {i}: the lighthouse of Port {i} is painted color number {i}."
            f = client.files.create(file=(f"port{i}.txt", text.encode()), purpose="assistants")
            texts[f.id] = text
        vs = client.vector_stores.create(name="restart")
        ids = list(texts)
        batch = client.vector_stores.file_batches.create(vs.id, file_ids=ids[:N_FILES // 2])
        for f in ids[N_FILES // 2:]:  # and some added one by one
            client.vector_stores.files.create(vector_store_id=vs.id, file_id=f)
        # the worker process is still starting (it loads the encoder): ingestion is under way
        assert client.vector_stores.retrieve(vs.id).file_counts.in_progress > 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    proc, url = server(tiny_llama_dir, index_dir, store, tmp_path / "second.log")
    try:
        wait_ready(url, proc=proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert sorted(f.id for f in client.files.list()) == sorted(texts)
        for fid, text in texts.items():
            assert client.files.content(fid).read() == text.encode()
        deadline = time.monotonic() + 240
        while client.vector_stores.retrieve(vs.id).file_counts.in_progress:
            assert time.monotonic() < deadline, "ingestion did not resume"
            time.sleep(0.3)
        files = list(client.vector_stores.files.list(vs.id))
        assert sorted(f.id for f in files) == sorted(texts)
        assert all(f.status == "completed" for f in files), [f.last_error for f in files]
        got = client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=vs.id)
        assert got.status == "completed" and got.file_counts.completed == N_FILES // 2
        for i in (0, N_FILES - 1):
            hits = list(client.vector_stores.search(vs.id, query=f"lighthouse of Port {i}",
                                                    max_num_results=N_FILES))
            assert {h.file_id for h in hits} == set(texts)  # every passage, each once
        text = httpx.get(f"{url}/metrics").text
        assert "ragserve_ingest_queue_depth" in text
    finally:
        proc.terminate()
        proc.wait(60)
    log = (tmp_path / "second.log").read_text()
    assert "resuming ingestion" in log, log[-3000:]


def test_worker_killed_mid_job_fails_only_after_a_solo_retry(tmp_path):
    """The dispatcher's crash path without a server: a job whose worker dies is retried one
    file at a time, and the file that kills it alone is failed with the reason."""
    from server.document_store import DocumentStore
    from server.ingest import Ingestor, IngestSettings, WorkerDied

    docs = DocumentStore(tmp_path / "store")
    sha, size = docs.write_blob(_bytes(b"fine text"), 1 << 20)
    good = docs.add_file("good.txt", "assistants", sha, size, "text", None, max_files=10,
                         max_bytes=1 << 30)
    sha, size = docs.write_blob(_bytes(b"deadly text"), 1 << 20)
    bad = docs.add_file("bad.txt", "assistants", sha, size, "text", None, max_files=10,
                        max_bytes=1 << 30)
    store = docs.create_store("s", None, {}, None, None, max_stores=5)
    chunking = {"max_chunk_size_tokens": 176, "chunk_overlap_tokens": 32}
    docs.add_to_store(store.id, [(good.id, {}, chunking), (bad.id, {}, chunking)],
                      max_files=10)
    loaded = []
    ingestor = Ingestor(docs, IngestSettings(encoder_name=None, cache_dir=str(tmp_path)),
                        on_version=lambda s, v: loaded.append(v), on_drop=lambda s: None)

    class FakeProcess:  # dies on any job holding the deadly file
        def __init__(self, settings: object) -> None:
            pass

        def ask(self, job: dict, timeout: float) -> dict:
            if any(a["doc_id"] == bad.id for a in job["add"]):
                raise WorkerDied("the ingestion worker died (exit code -9)")
            return {"version": "v000001", "pages": 1, "passages": 1, "seconds": 0.0,
                    "files": {a["doc_id"]: {"passages": 1, "usage_bytes": 10}
                              for a in job["add"]}}

    import server.ingest as ingest

    real, ingest._Process = ingest._Process, FakeProcess
    try:
        ingestor._procs = [None]
        while ingestor._step(0):
            pass
    finally:
        ingest._Process = real
    assert docs.store_file(store.id, good.id).status == "completed"
    failed = docs.store_file(store.id, bad.id)
    assert failed.status == "failed" and "died" in failed.last_error["message"]
    assert loaded == ["v000001"]


def _bytes(data: bytes):
    import io

    return io.BytesIO(data)


def _answer_after(conn, seconds: float, busy: bool) -> None:
    import time as t

    end = t.monotonic() + seconds
    while t.monotonic() < end:
        if not busy:
            t.sleep(0.05)
    conn.send({"ok": True})


def _child(busy: bool, seconds: float):
    import multiprocessing

    from server.ingest import _Process

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_answer_after, args=(child, seconds, busy), daemon=True)
    proc.start()
    worker = _Process.__new__(_Process)
    worker.conn, worker.proc = parent, proc
    return worker


def test_the_ingest_timeout_counts_cpu_not_waiting():
    """A job that waits (here: sleeps, as at idle priority behind busy serving) past the
    timeout is not killed; one that burns that much CPU is."""
    from server.ingest import WorkerDied

    waiting = _child(busy=False, seconds=3.0)
    assert waiting.receive(1.0, on_cpu=True) == {"ok": True}
    waiting.kill()
    burning = _child(busy=True, seconds=60.0)
    with pytest.raises(WorkerDied, match="CPU seconds"):
        burning.receive(1.0, on_cpu=True)
    assert not burning.proc.is_alive()
