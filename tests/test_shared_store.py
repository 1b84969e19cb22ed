"""Replicas that share one store directory and one index (issue 25): two real servers on the same
--store-dir and a copy of the ``index_dir`` fixture, with --index-refresh-seconds 1.

- a file uploaded and added to a vector store through one is searchable through the other, and
  a second file too, after both hold the store's first version (the one that did not ingest it
  must swap the new version in);
- `ragserve index add` while both run is seen by both, without a restart;
- a writer SIGKILLed while it holds the store directory's writer lock and a store's index lock
  blocks nobody: the upload waiting behind it completes, and so does the ingestion.

And without servers: the lock itself (threads, processes, bounded waits, a SIGKILLed holder),
the network file system test, SQLite's journal on one, and superseded index versions kept for
readers on other machines. Every wait polls to a deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serverutil import ROOT, start_subprocess, wait_ready

from retrieval.writer_lock import LockTimeout, WriterLock, network_filesystem
from server.document_store import DocumentStore

#: how long a change through one server may take to show through the other: ingestion (a worker
#: process starts on first use) plus --index-refresh-seconds 1 plus a load, on a busy 2-core CI
#: machine
VISIBLE_SECONDS = 120.0
#: how long a write may take once a killed holder's lock is gone
WRITE_SECONDS = 30.0

#: the `ragserve` command (``python -m server`` is `ragserve serve`)
RAGSERVE = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"

HOLD = """
import sys, time
from retrieval.writer_lock import WriterLock
locks = [WriterLock(p) for p in sys.argv[1:]]
if all(lock.acquire(timeout=10) for lock in locks):
    print("held", flush=True)
    time.sleep(300)  # until the test kills it
"""


def hold(*paths: Path) -> subprocess.Popen:
    """A process that takes the locks at ``paths`` and keeps them until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, paths)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # bounded: the helper prints or exits within 10 s
    if line.strip() != "held":
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"the lock helper did not take {paths} (exit {proc.poll()})")
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


def poll(check, seconds: float, what: str):
    """``check()`` until it returns something true; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not within {seconds:g} s"
        time.sleep(0.25)


# -- two servers on one store ---------------------------------------------------------------


class Pair:
    def __init__(self, store: Path, index: Path, urls: list[str]) -> None:
        self.store, self.index, self.urls = store, index, urls
        self.clients = [openai.OpenAI(base_url=f"{u}/v1", api_key="none", max_retries=0,
                                      timeout=60) for u in urls]


@pytest.fixture(scope="module")
def pair(tiny_llama_dir: Path, index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shared")
    store, index = root / "store", root / "index"
    shutil.copytree(index_dir, index)  # `index add` writes it: not the session's fixture
    procs, urls = [], []
    try:
        for name in ("a", "b"):
            proc, url = start_subprocess([
                "--model", str(tiny_llama_dir), "--served-model-name", "tiny",
                "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "2",
                "--kernels", "step=eager", "--engine-process", "false",
                "--index", str(index), "--store-dir", str(store),
                "--index-refresh-seconds", "1", "--responses-store-persist", "false"],
                root / f"{name}.log")
            procs.append(proc)
            urls.append(url)
        for proc, url in zip(procs, urls):
            wait_ready(url, proc=proc)
        yield Pair(store, index, urls)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def found(client: openai.OpenAI, store_id: str, query: str) -> set[str]:
    return {h.file_id for h in client.vector_stores.search(store_id, query=query,
                                                           max_num_results=10)}


def upload(client: openai.OpenAI, name: str, text: str) -> str:
    return client.files.create(file=(name, text.encode()), purpose="assistants").id


def test_a_file_added_through_one_server_is_found_through_the_other(pair: Pair):
    a, b = pair.clients
    first = upload(a, "harbor.txt", "The harbor of Quenmoor keeps a green lighthouse.")
    assert b.files.retrieve(first).filename == "harbor.txt"  # one database: at once
    vs = a.vector_stores.create(name="shared")
    assert b.vector_stores.retrieve(vs.id).name == "shared"
    a.vector_stores.files.create(vector_store_id=vs.id, file_id=first)
    for client in (b, a):  # both now hold the store's first version
        poll(lambda c=client: first in found(c, vs.id, "green lighthouse of Quenmoor"),
             VISIBLE_SECONDS, "the first file's passages")

    # whichever server ingests the second file, the other one holds a version without it
    second = upload(a, "mill.txt", "A windmill in Dravik grinds blue barley every spring.")
    a.vector_stores.files.create(vector_store_id=vs.id, file_id=second)
    for client in (b, a):
        poll(lambda c=client: second in found(c, vs.id, "windmill grinds blue barley"),
             VISIBLE_SECONDS, "the second file's passages")
    assert b.vector_stores.files.retrieve(second, vector_store_id=vs.id).status == "completed"


def retrieved(url: str, query: str) -> set[str]:
    r = httpx.post(f"{url}/v1/retrieve", json={"query": query, "k": 10}, timeout=30)
    assert r.status_code == 200, r.text
    return {p["doc_id"] for p in r.json()["data"]}


def test_index_add_while_both_run_is_seen_by_both(pair: Pair, tmp_path: Path):
    query = "the observatory of Pellmark counts falling stars"
    assert all("pellmark.md" not in retrieved(u, query) for u in pair.urls)
    docs = tmp_path / "more"
    docs.mkdir()
    (docs / "pellmark.md").write_text("# Pellmark\n\nThe observatory of Pellmark counts "
                                      "falling stars every night.\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", RAGSERVE, "index", "add", str(docs),
                           "--index", str(pair.index)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for url in pair.urls:
        poll(lambda u=url: "pellmark.md" in retrieved(u, query), VISIBLE_SECONDS,
             f"the added document through {url}")


def test_a_writer_killed_holding_the_locks_blocks_nobody(pair: Pair):
    a, b = pair.clients
    vs = a.vector_stores.create(name="killed")
    helper = hold(pair.store / ".writer.lock", pair.store / "locks" / f"{vs.id}.lock")
    # the holder signed the lock file: a writer that waits too long can name it
    assert f"pid {helper.pid} " in (pair.store / ".writer.lock").read_text()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(upload, a, "ferry.txt", "The night ferry to Olvask carries "
                                                       "copper bells.")
        try:
            time.sleep(0.5)
            assert not pending.done()  # it waits for the lock (a 503 only after 30 s)
        finally:
            kill(helper)  # SIGKILL: the kernel releases its locks
        file_id = pending.result(timeout=WRITE_SECONDS)
    assert b.files.retrieve(file_id).filename == "ferry.txt"
    # the store's index lock died with it too: ingestion goes on (most likely on the server
    # woken by the add, whose worker runs already), and the other server searches it
    a.vector_stores.files.create(vector_store_id=vs.id, file_id=file_id)
    poll(lambda: file_id in found(b, vs.id, "night ferry to Olvask"), VISIBLE_SECONDS,
         "ingestion after the index lock's holder was killed")


# -- the pieces, without servers ------------------------------------------------------------


def test_writer_lock_between_threads_and_processes(tmp_path: Path):
    path = tmp_path / ".writer.lock"
    lock = WriterLock(path)
    assert lock.acquire(timeout=0)
    took: list[bool] = []
    t = threading.Thread(target=lambda: took.append(lock.acquire(timeout=0.2)))
    t.start()
    t.join(10)
    assert took == [False]  # another thread of this process waits too
    lock.release()

    helper = hold(path)
    try:
        assert not lock.acquire(timeout=0.2)  # another process holds it
        with pytest.raises(LockTimeout) as e, lock.hold(0.2):
            pass
        assert f"pid {helper.pid} " in e.value.holder
    finally:
        kill(helper)
    assert lock.acquire(timeout=WRITE_SECONDS)  # the dead holder's lock is gone
    lock.release()
    lock.close()


def test_network_filesystem_reads_the_mount_table(tmp_path: Path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/root / ext4 rw 0 0\n"
                      "fs-0123.efs.us-east-1.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0\n"
                      "tmpfs /mnt/efs/tmp tmpfs rw 0 0\n"
                      "srv:/x /mnt/with\\040space nfs rw 0 0\n")
    assert network_filesystem(Path("/mnt/efs/store"), str(mounts)) == "nfs4"
    assert network_filesystem(Path("/mnt/efs"), str(mounts)) == "nfs4"
    assert network_filesystem(Path("/mnt/efs/tmp/x"), str(mounts)) is None  # deepest wins
    assert network_filesystem(Path("/mnt/efsx/store"), str(mounts)) is None
    assert network_filesystem(Path("/mnt/with space/s"), str(mounts)) == "nfs"
    assert network_filesystem(Path("/x"), str(tmp_path / "missing")) is None


@pytest.mark.parametrize(("network", "mode"), [(True, "delete"), (False, "wal")])
def test_document_store_journal_and_commits_seen_by_another_connection(
        tmp_path: Path, network: bool, mode: str):
    one = DocumentStore(tmp_path / "store", network=network)
    other = DocumentStore(tmp_path / "store", network=network)  # as another server would
    try:
        assert one.journal_mode == other.journal_mode == mode
        before = other.version()
        row = one.create_store("s", None, {}, None, None, max_stores=5)
        assert other.version() != before  # its cached attribute maps are stale now
        assert other.store(row.id).name == "s"
    finally:
        one.close()
        other.close()


def test_superseded_versions_stay_for_readers_elsewhere_then_go(tmp_path: Path, tiny_colbert):
    from retrieval.index import PassageIndex, current_name
    from retrieval.types import Document

    path = tmp_path / "idx"
    index = PassageIndex(tiny_colbert, "exact")
    index.add_documents([Document("a", "a.txt", ((None, "alpha text about rivers"),))])
    first = index.save(path)
    index.add_documents([Document("b", "b.txt", ((None, "beta text about hills"),))])
    index.save(path, keep_seconds=600)
    assert first.is_dir()  # a reader elsewhere may still be reading it
    old = PassageIndex.load(path, tiny_colbert)
    assert old.version == current_name(path) != first.name
    index.add_documents([Document("c", "c.txt", ((None, "gamma text about lakes"),))])
    last = index.save(path)  # keep 0: everything superseded goes
    versions = sorted(p.name for p in path.glob("v*"))
    assert versions == [last.name]
    used = set(json.loads((last / "manifest.json").read_text())["segments"])
    assert {p.name for p in (path / "segments").iterdir()} == used
    assert PassageIndex.load(path, tiny_colbert).doc_ids == {"a", "b", "c"}
