"""Ingestion off the request path: dispatcher threads in the server feed worker processes
(:mod:`retrieval.ingest_worker`) from the queue the database holds.

Each dispatcher owns one worker process (``--ingest-workers``, default 1) and loops: apply the
pending index operations (a file taken out of a store, a store deleted), then take the oldest
``in_progress`` files of one store (up to ``JOB_FILES`` files or ``JOB_BYTES`` bytes, so that
many small files cost one index save, not one each) and send them as one job. The worker saves
a new index version; the server loads it (``on_version``) and only then marks the files
``completed``, so a file is ``completed`` once a search can find it.

A store is written by one dispatcher at a time, of all the servers sharing the store directory:
a job holds the store's index lock (``DocumentStore.store_lock``) from before it reads the
store's queue again until its files are finished, and a dispatcher passes over a store whose
lock another server holds. A server killed mid-job drops the lock with its life (the kernel
releases POSIX locks; its worker dies with it, ``PR_SET_PDEATHSIG``); its files are still
``in_progress``, and the next dispatcher of any server takes them.

A job that spends more than ``--ingest-timeout`` seconds of CPU (waiting for the CPU while
serving is busy does not count, up to ``WALL_FACTOR`` times the timeout) or kills its worker is
retried one file at a time; a file that does it alone is ``failed`` with the reason, and the
next job gets a new worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retrieval.writer_lock import WriterLock
from server.document_store import DocumentStore, StoreFileRow

log = logging.getLogger("ragserve.ingest")

#: how often a dispatcher looks at a busy worker's CPU time
POLL_SECONDS = 1.0
#: a job may wait for the CPU this many times --ingest-timeout before it is given up
WALL_FACTOR = 20
JOB_FILES = 64
JOB_BYTES = 32 * 2**20
WORKER_START_SECONDS = 300.0


@dataclass
class IngestSettings:
    encoder_name: str | None
    cache_dir: str
    workers: int = 1
    threads: int = 1
    timeout: float = 600.0
    max_chars: int = 10_000_000


class WorkerDied(RuntimeError):
    """The worker exited, or ran past the timeout and was killed."""


class _Process:
    """One worker process and its pipe."""

    def __init__(self, settings: IngestSettings) -> None:
        from retrieval.ingest_worker import main

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main, name="ragserve-ingest", daemon=True,
                                args=(child, settings.encoder_name, settings.cache_dir,
                                      settings.threads, settings.max_chars))
        self.proc.start()
        child.close()
        hello = self.receive(WORKER_START_SECONDS)
        if not hello.get("ready"):
            self.kill()
            raise WorkerDied(f"the ingestion worker could not start: {hello.get('error')}")

    def cpu_seconds(self) -> float:
        """CPU time the worker has used (all its threads), from /proc; 0 where unreadable."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def receive(self, timeout: float, on_cpu: bool = False) -> dict[str, Any]:
        """The worker's answer. ``on_cpu``: ``timeout`` bounds the CPU time the worker spends
        on it, not the wall clock: at idle priority a job waits while serving is busy, and
        that wait is not the job's fault (the wall clock is bounded at WALL_FACTOR times)."""
        start, t0 = self.cpu_seconds(), time.monotonic()
        while not self.conn.poll(min(timeout, POLL_SECONDS)):
            used = self.cpu_seconds() - start if on_cpu else time.monotonic() - t0
            wall = time.monotonic() - t0
            if not self.proc.is_alive():
                self.kill()
                raise WorkerDied(f"the ingestion worker died (exit code {self.proc.exitcode})")
            if used > timeout or wall > WALL_FACTOR * timeout or (not on_cpu and wall > timeout):
                self.kill()
                what = "CPU seconds" if on_cpu and used > timeout else "s"
                raise WorkerDied(f"ingestion ran past --ingest-timeout ({timeout:g} {what}"
                                 f"{'' if used > timeout else f', {wall:.0f} s waited'})")
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise WorkerDied(f"the ingestion worker died (exit code {self.proc.exitcode})"
                             ) from None

    def ask(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            self.conn.send(job)
        except (BrokenPipeError, OSError):
            self.kill()
            raise WorkerDied("the ingestion worker died") from None
        return self.receive(timeout, on_cpu=True)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


class Ingestor:
    """The dispatchers. ``on_version(store_id, version)`` loads a store's new index version in
    the server; ``on_drop(store_id)`` forgets a deleted store; ``observe(seconds, files)``
    feeds the metrics; ``on_change()`` follows every job's updates of the database."""

    def __init__(self, docs: DocumentStore, settings: IngestSettings,
                 on_version: Callable[[str, str], None], on_drop: Callable[[str], None],
                 observe: Callable[[float, int], None] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.docs = docs
        self.on_change = on_change or (lambda: None)
        self.settings = settings
        self.on_version = on_version
        self.on_drop = on_drop
        self.observe = observe
        self._wake = threading.Condition()
        self._woken = False
        self._stopping = False
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # stores a dispatcher is writing
        self._in_flight: set[tuple[str, str]] = set()
        self._solo: set[tuple[str, str]] = set()  # files to retry alone
        self._threads: list[threading.Thread] = []
        self._procs: list[_Process | None] = []
        self._store_locks: dict[str, WriterLock] = {}  # one per store (POSIX locks: per process)

    def start(self) -> None:
        for n in range(self.settings.workers):
            self._procs.append(None)
            t = threading.Thread(target=self._run, args=(n,), name=f"ragserve-ingest-{n}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for t in self._threads:
            t.join(2)
        for proc in self._procs:
            if proc is not None:
                proc.stop()
        with self._lock:
            locks, self._store_locks = list(self._store_locks.values()), {}
        for lock in locks:
            lock.close()  # (not one a dispatcher still finishing a job holds)

    def wake(self) -> None:
        """There is new work (a file added, removed, a store deleted)."""
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- the loop --------------------------------------------------------------------------

    def _run(self, n: int) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                self._woken = False
            try:
                worked = self._step(n)
            except Exception:  # never let the loop die: log, wait, try again
                log.exception("ingestion dispatcher %d failed a step", n)
                worked = False
            if not worked:
                with self._wake:
                    if not self._woken and not self._stopping:
                        self._wake.wait(1.0)

    def _step(self, n: int) -> bool:
        """One job, if there is work for a store no other dispatcher (of any server) holds."""
        ops = self.docs.pending_ops()
        pending = self.docs.pending(set(self._in_flight), 4 * JOB_FILES)
        claimed = self._claim([*(o.store_id for o in ops), *(r.store_id for r in pending)])
        if claimed is None:
            return False
        store, lock = claimed
        dropped = False
        try:
            # read again under the lock: another server may have done this work meanwhile
            store_ops = [o for o in self.docs.pending_ops() if o.store_id == store]
            if any(o.op == "drop" for o in store_ops):
                self._drop(n, store, store_ops)
                lock.path.unlink(missing_ok=True)  # ids are never reused: nobody waits on it
                dropped = True
                self.on_change()
                return True
            pending = self.docs.pending(set(self._in_flight), 4 * JOB_FILES, store)
            if not pending and not store_ops:
                return True
            files = self._take(store, pending)
            with self._lock:
                self._in_flight.update((f.store_id, f.file_id) for f in files)
            try:
                self._job(n, store, store_ops, files)
            finally:
                self.on_change()
                with self._lock:
                    self._in_flight.difference_update((f.store_id, f.file_id) for f in files)
            return True
        finally:
            lock.release()
            with self._lock:
                self._busy.discard(store)
                if dropped:
                    self._store_locks.pop(store, None)
            if dropped:
                lock.close()

    def _claim(self, stores: list[str]) -> tuple[str, WriterLock] | None:
        """The first of ``stores`` that no dispatcher here is writing and whose index lock no
        other server holds, with that lock taken; None if there is none."""
        for store in dict.fromkeys(stores):
            with self._lock:
                if store in self._busy:
                    continue
                self._busy.add(store)
                lock = self._store_locks.get(store)
                if lock is None:
                    lock = self._store_locks[store] = self.docs.store_lock(store)
            try:
                if lock.acquire(timeout=0):
                    return store, lock
            except OSError:
                log.exception("store %s: its index lock could not be taken", store)
            with self._lock:
                self._busy.discard(store)
        return None

    def _take(self, store: str, pending: list[StoreFileRow]) -> list[StoreFileRow]:
        rows = [r for r in pending if r.store_id == store]
        out: list[StoreFileRow] = []
        size = 0
        for r in rows:
            if (r.store_id, r.file_id) in self._solo:
                return out or [r]
            with contextlib.suppress(ValueError):
                size += self.docs.file(r.file_id).bytes
            out.append(r)
            if len(out) >= JOB_FILES or size >= JOB_BYTES:
                break
        return out

    def _drop(self, n: int, store: str, ops: list[Any]) -> None:
        import shutil

        proc = self._procs[n]
        if proc is not None:
            try:
                proc.ask({"store_dir": str(self.docs.store_path(store)), "drop": True},
                         self.settings.timeout)
            except WorkerDied:
                self._procs[n] = None
        self.on_drop(store)
        shutil.rmtree(self.docs.store_path(store), ignore_errors=True)
        self.docs.ops_done([o.seq for o in ops])

    def _job(self, n: int, store: str, ops: list[Any], files: list[StoreFileRow]) -> None:
        add, skipped = [], []
        for r in files:
            try:
                row = self.docs.file(r.file_id)
            except ValueError:
                skipped.append(r)
                continue
            add.append({"doc_id": r.file_id, "blob": str(self.docs.blob_path(row.sha256)),
                        "filename": row.filename, "chunking": r.chunking})
        for r in skipped:
            self.docs.finish(r.store_id, r.file_id, error={
                "code": "invalid_file", "message": "the file was deleted before it was "
                                                   "ingested"})
        job = {"store_dir": str(self.docs.store_path(store)), "add": add,
               "remove": [o.doc_id for o in ops if o.op == "remove"]}
        t0 = time.perf_counter()
        try:
            proc = self._procs[n]
            if proc is None:
                proc = self._procs[n] = _Process(self.settings)
            result = proc.ask(job, self.settings.timeout)
        except WorkerDied as e:
            self._procs[n] = None
            self._died(store, files, str(e))
            return
        if "failed" in result:
            for r in files:
                self._finish(r, {"error": {"code": "server_error",
                                                 "message": result["failed"]}})
            return
        try:
            self.on_version(store, result["version"])
        except Exception as e:  # the new version cannot be read: say so on each file
            log.exception("store %s: version %s did not load", store, result["version"])
            for r in files:
                self._finish(r, {"error": {"code": "server_error",
                                                 "message": f"the index did not load: {e}"}})
            return
        self.docs.ops_done([o.seq for o in ops])
        for r in files:
            self._finish(r, result["files"].get(r.file_id, {"error": {
                "code": "server_error", "message": "the worker returned no result"}}))
            self._solo.discard((r.store_id, r.file_id))
        if self.observe is not None and add:
            self.observe(time.perf_counter() - t0, len(add))
        log.info("store %s: %d files in %.2fs (%d pages, %d passages) -> %s", store, len(add),
                 result["seconds"], result["pages"], result["passages"], result["version"])

    def _finish(self, r: StoreFileRow, outcome: dict) -> None:
        self.docs.finish(r.store_id, r.file_id, seq_added=r.seq,
                         error=outcome.get("error"), usage_bytes=outcome.get("usage_bytes", 0),
                         passages=outcome.get("passages", 0))

    def _died(self, store: str, files: list[StoreFileRow], reason: str) -> None:
        if len(files) > 1:  # one of them did it: each goes again alone
            log.warning("store %s: %s during a job of %d files; retrying them one by one",
                        store, reason, len(files))
            self._solo.update((r.store_id, r.file_id) for r in files)
            return
        for r in files:
            log.warning("store %s: file %s failed: %s", store, r.file_id, reason)
            self.docs.finish(r.store_id, r.file_id, error={"code": "server_error",
                                                           "message": reason})
            self._solo.discard((r.store_id, r.file_id))
