"""What clients store through the API: files (``/v1/files``), vector stores and the files in them
(``/v1/vector_stores``), and the index operations still to apply. It survives restarts.

Under ``--store-dir`` (default ``<cache dir>/store``)::

    documents.sqlite3          files, vector stores, their files, batches, pending index ops
    blobs/ab/abcdef...         file contents by sha256 (written to a temporary name, fsynced,
                               renamed: a blob either exists whole or not at all)
    vector_stores/vs_.../      each store's index (``retrieval.index``: versions, segments)
    .writer.lock               the writer lock (``retrieval.writer_lock``): every write
                               transaction holds it, so writers on several machines take turns
    locks/vs_....lock          each store's index lock, held by the one ingestion job writing it

Acknowledged means durable: an upload is answered only after its blob is fsynced and its row
committed (``synchronous=FULL``), and the same holds for a file added to a store. The ingestion
queue is the database itself: a store's file whose status is ``in_progress`` is work to do, so a
server killed with ``kill -9`` picks it up again at start (or another server sharing the
directory does).

Several servers may share the directory (replicas on one ReadWriteMany volume, docs/deployment.md).
Every write transaction runs under ``.writer.lock``, so SQLite's own locking never has to
arbitrate between writers of different machines. SQLite is in WAL mode on a local file system
(readers never wait for the writer) and in rollback-journal mode on a network one: WAL's index
lives in shared memory, which machines do not share, and SQLite's documentation says WAL does not
work over a network file system. In rollback mode a reader takes SQLite's POSIX read lock, which
NFSv4 implements, and each transaction sees the last commit of any server (SQLite checks the
file's change counter when a read begins), so readers need no reopening.

Names from clients never touch the filesystem: blobs are named by their hash, stores by their
generated id; a filename is sanitized (:func:`clean_filename`) and kept only as a column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from retrieval.index import fsync_dir
from retrieval.writer_lock import LockTimeout, WriterLock, network_filesystem

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL, kind TEXT, created_at INTEGER NOT NULL, expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS vector_stores (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT, created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL, metadata TEXT NOT NULL, expires_after TEXT,
    chunking TEXT
);
CREATE TABLE IF NOT EXISTS store_files (
    store_id TEXT NOT NULL, file_id TEXT NOT NULL, status TEXT NOT NULL, last_error TEXT,
    attributes TEXT NOT NULL, chunking TEXT NOT NULL, usage_bytes INTEGER NOT NULL DEFAULT 0,
    passages INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, batch_id TEXT,
    seq INTEGER NOT NULL, PRIMARY KEY (store_id, file_id)
);
CREATE INDEX IF NOT EXISTS store_files_status ON store_files (status, seq);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, store_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS index_ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, store_id TEXT NOT NULL, op TEXT NOT NULL,
    doc_id TEXT
);
"""

STATUSES = ("in_progress", "completed", "failed", "cancelled")
#: how long a write waits for another server's transaction before it is a 503
LOCK_SECONDS = 30.0
#: an upload's temporary blob untouched this long was left by a killed server (a live upload
#: on another replica writes to its own temporary file all along)
STALE_UPLOAD_SECONDS = 3600.0


class StoreError(ValueError):
    """A request the store refuses: ``status`` is the HTTP status, ``param`` the field;
    ``retry_seconds``: when the client may try again (a busy store), None if waiting will not
    help."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_seconds: float | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.retry_seconds = retry_seconds


def not_found(kind: str, ident: str, param: str) -> StoreError:
    return StoreError(404, f"No {kind} found with id '{ident}'", param, "not_found")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")


def clean_filename(name: str | None) -> str:
    """A client's filename as a label: its last path component, NFC, no control or path
    characters, at most 255 characters; never used as a path.

    >>> clean_filename("../../etc/passwd"), clean_filename("C:\\\\x\\\\a b.md"), clean_filename("")
    ('passwd', 'a b.md', 'upload')
    """
    name = unicodedata.normalize("NFC", name or "")
    name = re.split(r"[/\\]", name)[-1]
    name = _UNSAFE.sub("_", name).strip(" .")
    return name[:255] or "upload"


@dataclass(frozen=True)
class FileRow:
    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    kind: str | None
    created_at: int
    expires_at: int | None


@dataclass(frozen=True)
class StoreRow:
    id: str
    name: str
    description: str | None
    created_at: int
    last_active_at: int
    metadata: dict[str, str]
    expires_after: dict[str, Any] | None
    chunking: dict[str, Any] | None

    @property
    def expires_at(self) -> int | None:
        if not self.expires_after:
            return None
        return self.last_active_at + int(self.expires_after["days"]) * 86400

    def expired(self, now: float | None = None) -> bool:
        at = self.expires_at
        return at is not None and (now or time.time()) >= at


@dataclass(frozen=True)
class StoreFileRow:
    store_id: str
    file_id: str
    status: str
    last_error: dict[str, str] | None
    attributes: dict[str, Any]
    chunking: dict[str, Any]
    usage_bytes: int
    passages: int
    created_at: int
    batch_id: str | None
    seq: int  # when it was (re)added: a result for an older add is stale


@dataclass(frozen=True)
class IndexOp:
    seq: int
    store_id: str
    op: str  # "remove" (doc_id's passages) | "drop" (the whole store's index)
    doc_id: str | None


class DocumentStore:
    """The database and the blobs. Every method is safe from any thread (one connection, one
    lock: each call is a short transaction)."""

    def __init__(self, root: Path, network: bool | None = None) -> None:
        """``network``: whether other machines share ``root`` (None: from the mount table)."""
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.stores_dir = self.root / "vector_stores"
        self.locks_dir = self.root / "locks"
        for d in (self.root, self.blobs, self.stores_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.filesystem = network_filesystem(self.root)
        self.network = self.filesystem is not None if network is None else network
        self.writer = WriterLock(self.root / ".writer.lock")
        self._lock = threading.Lock()
        self._commits = 0
        self._db = sqlite3.connect(self.root / "documents.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=LOCK_SECONDS)
        with self._writing():
            self._db.execute(f"PRAGMA journal_mode={'DELETE' if self.network else 'WAL'}")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        for stale in self.blobs.glob(".tmp-*"):  # an upload killed mid-write
            with contextlib.suppress(OSError):
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()

    @property
    def journal_mode(self) -> str:
        return self._query("PRAGMA journal_mode")[0][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.writer.close()

    def store_lock(self, store_id: str) -> WriterLock:
        """The lock of one store's index: the ingestion job writing it holds it (a new object
        each call: keep one per store and process, see ``retrieval.writer_lock``)."""
        return WriterLock(self.locks_dir / f"{store_id}.lock")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The store directory's writer lock, or a 503 naming who holds it."""
        try:
            with self.writer.hold(LOCK_SECONDS):
                yield
        except LockTimeout as e:
            raise StoreError(503, f"the store is busy: another server's write held its lock "
                                  f"for {e.seconds:g} s ({e.holder}); try again",
                             code="store_busy", retry_seconds=1.0) from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # the file lock first: while it waits for another server, reads here go on
        with self._writing(), self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._commits += 1

    def version(self) -> tuple[int, int]:
        """Changes once any server commits: this one's commits and SQLite's ``data_version``
        (which moves when another connection, of this process or another, commits)."""
        with self._lock:
            (data_version,) = self._db.execute("PRAGMA data_version").fetchone()
            return self._commits, int(data_version)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def store_path(self, store_id: str) -> Path:
        return self.stores_dir / store_id

    # -- blobs -----------------------------------------------------------------------------

    def write_blob(self, source: IO[bytes], limit: int) -> tuple[str, int]:
        """Copy ``source`` into the blob store; ``(sha256, size)``. More than ``limit`` bytes
        raises ``StoreError`` (413) and keeps nothing."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise StoreError(413, f"the file is larger than --max-upload-bytes "
                                              f"({limit} bytes)", "file", "file_too_large")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.blob_path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)  # same content, same name: replacing is harmless
            fsync_dir(final.parent)
            return sha, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def blob_path(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def forget_blob(self, sha: str) -> None:
        """Remove a blob that no file row took (an upload refused after it was written)."""
        with self._tx() as db:
            self._drop_blob_if_unused(db, sha)

    def _drop_blob_if_unused(self, db: sqlite3.Connection, sha: str) -> None:
        if not db.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (sha,)).fetchone():
            self.blob_path(sha).unlink(missing_ok=True)

    # -- files -----------------------------------------------------------------------------

    def add_file(self, filename: str, purpose: str, sha: str, size: int, kind: str | None,
                 expires_at: int | None, *, max_files: int, max_bytes: int) -> FileRow:
        """Record an uploaded blob as a file, within the quotas (checked in the same
        transaction, so concurrent uploads cannot pass them together)."""
        row = FileRow(new_id("file-"), clean_filename(filename), purpose, size, sha, kind,
                      int(time.time()), expires_at)
        try:
            with self._tx() as db:
                count, total = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files").fetchone()
                if count >= max_files:
                    raise StoreError(429, f"this server already holds --max-files ({max_files}) "
                                          "files: delete some first", "file", "quota_exceeded")
                if total + size > max_bytes:
                    raise StoreError(413, f"the upload would pass --max-stored-bytes "
                                          f"({max_bytes} bytes; {total} in use): delete files "
                                          "first", "file", "quota_exceeded")
                if not self.blob_path(sha).is_file():  # a delete of a file with the same
                    # bytes (on any server) took the blob between its write and this row
                    raise StoreError(503, "the upload's content was removed by a concurrent "
                                          "delete of a file with the same content: upload it "
                                          "again", "file", "upload_conflict", retry_seconds=1.0)
                db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (row.id, row.filename, row.purpose, row.bytes, row.sha256, row.kind,
                            row.created_at, row.expires_at))
        except StoreError:
            self.forget_blob(sha)
            raise
        return row

    def file(self, file_id: str) -> FileRow:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise not_found("file", file_id, "file_id")
        return FileRow(*rows[0])

    def files(self, purpose: str | None = None) -> list[FileRow]:
        sql, args = "SELECT * FROM files", ()
        if purpose is not None:
            sql, args = sql + " WHERE purpose = ?", (purpose,)
        return [FileRow(*r) for r in self._query(sql + " ORDER BY created_at, rowid", args)]

    def delete_file(self, file_id: str) -> list[str]:
        """Delete a file, and take it out of every store; the stores it was in."""
        with self._tx() as db:
            row = db.execute("SELECT sha256 FROM files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                raise not_found("file", file_id, "file_id")
            stores = [s for (s,) in db.execute(
                "SELECT store_id FROM store_files WHERE file_id = ?", (file_id,))]
            for store_id in stores:
                self._remove_from_store(db, store_id, file_id)
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            self._drop_blob_if_unused(db, row[0])
        return stores

    def usage(self) -> tuple[int, int]:
        """(files, bytes) uploaded."""
        count, total = self._query("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files")[0]
        return int(count), int(total)

    # -- vector stores ---------------------------------------------------------------------

    def create_store(self, name: str, description: str | None, metadata: dict[str, str],
                     expires_after: dict[str, Any] | None, chunking: dict[str, Any] | None, *,
                     max_stores: int) -> StoreRow:
        now = int(time.time())
        row = StoreRow(new_id("vs_"), name, description, now, now, metadata, expires_after,
                       chunking)
        with self._tx() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM vector_stores").fetchone()
            if count >= max_stores:
                raise StoreError(429, f"this server already holds --max-vector-stores "
                                      f"({max_stores}): delete one first", None,
                                 "quota_exceeded")
            db.execute("INSERT INTO vector_stores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (row.id, row.name, row.description, row.created_at, row.last_active_at,
                        json.dumps(metadata), _dumps(expires_after), _dumps(chunking)))
        return row

    def store(self, store_id: str) -> StoreRow:
        rows = self._query("SELECT * FROM vector_stores WHERE id = ?", (store_id,))
        if not rows:
            raise not_found("vector store", store_id, "vector_store_id")
        return _store_row(rows[0])

    def stores(self) -> list[StoreRow]:
        return [_store_row(r) for r in self._query(
            "SELECT * FROM vector_stores ORDER BY created_at, rowid")]

    def update_store(self, store_id: str, **changes: Any) -> StoreRow:
        columns = {"name": lambda v: v, "metadata": json.dumps, "expires_after": _dumps,
                   "last_active_at": int}
        with self._tx() as db:
            if db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone() \
                    is None:
                raise not_found("vector store", store_id, "vector_store_id")
            for key, value in changes.items():
                db.execute(f"UPDATE vector_stores SET {key} = ? WHERE id = ?",
                           (columns[key](value), store_id))
        return self.store(store_id)

    def touch(self, store_id: str) -> None:
        """The store was used (its ``last_active_at``, the anchor of ``expires_after``)."""
        with self._tx() as db:
            db.execute("UPDATE vector_stores SET last_active_at = ? WHERE id = ?",
                       (int(time.time()), store_id))

    def delete_store(self, store_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM vector_stores WHERE id = ?", (store_id,)).rowcount == 0:
                raise not_found("vector store", store_id, "vector_store_id")
            db.execute("DELETE FROM store_files WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM batches WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM index_ops WHERE store_id = ?", (store_id,))
            db.execute("INSERT INTO index_ops (store_id, op, doc_id) VALUES (?, 'drop', NULL)",
                       (store_id,))

    # -- files in stores -------------------------------------------------------------------

    def add_to_store(self, store_id: str, entries: list[tuple[str, dict, dict]],
                     batch_id: str | None = None, *, max_files: int) -> list[StoreFileRow]:
        """Attach files (``(file_id, attributes, chunking)``) to a store, ``in_progress``: the
        ingestion worker's queue. A file already in the store is ingested again with the new
        attributes and chunking (OpenAI's behaviour)."""
        now = int(time.time())
        with self._tx() as db:
            if db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone() \
                    is None:
                raise not_found("vector store", store_id, "vector_store_id")
            known = {f for (f,) in db.execute(
                f"SELECT id FROM files WHERE id IN ({','.join('?' * len(entries))})",
                [e[0] for e in entries])}
            missing = [e[0] for e in entries if e[0] not in known]
            if missing:
                raise StoreError(404, f"No file found with id '{missing[0]}'", "file_id",
                                 "not_found")
            present = {f for (f,) in db.execute(
                "SELECT file_id FROM store_files WHERE store_id = ?", (store_id,))}
            new = {e[0] for e in entries} - present
            if len(present) + len(new) > max_files:
                raise StoreError(400, f"the store would hold {len(present) + len(new)} files, "
                                      f"more than --max-files-per-vector-store ({max_files})",
                                 "file_ids", "quota_exceeded")
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM store_files").fetchone()
            for file_id, attributes, chunking in entries:
                seq += 1
                db.execute("INSERT OR REPLACE INTO store_files VALUES "
                           "(?, ?, 'in_progress', NULL, ?, ?, 0, 0, ?, ?, ?)",
                           (store_id, file_id, json.dumps(attributes), json.dumps(chunking),
                            now, batch_id, seq))
            if batch_id is not None:
                db.execute("INSERT INTO batches VALUES (?, ?, ?, 0)", (batch_id, store_id, now))
            db.execute("UPDATE vector_stores SET last_active_at = ? WHERE id = ?",
                       (now, store_id))
        return [self.store_file(store_id, e[0]) for e in entries]

    def store_file(self, store_id: str, file_id: str) -> StoreFileRow:
        rows = self._query("SELECT * FROM store_files WHERE store_id = ? AND file_id = ?",
                           (store_id, file_id))
        if not rows:
            raise StoreError(404, f"No file found with id '{file_id}' in vector store "
                                  f"'{store_id}'", "file_id", "not_found")
        return _store_file_row(rows[0])

    def store_files(self, store_id: str, status: str | None = None,
                    batch_id: str | None = None) -> list[StoreFileRow]:
        sql, args = "SELECT * FROM store_files WHERE store_id = ?", [store_id]
        if status is not None:
            sql, args = sql + " AND status = ?", [*args, status]
        if batch_id is not None:
            sql, args = sql + " AND batch_id = ?", [*args, batch_id]
        return [_store_file_row(r) for r in self._query(sql + " ORDER BY seq", tuple(args))]

    def update_attributes(self, store_id: str, file_id: str, attributes: dict) -> StoreFileRow:
        with self._tx() as db:
            n = db.execute("UPDATE store_files SET attributes = ? WHERE store_id = ? AND "
                           "file_id = ?", (json.dumps(attributes), store_id, file_id)).rowcount
        if n == 0:
            raise StoreError(404, f"No file found with id '{file_id}' in vector store "
                                  f"'{store_id}'", "file_id", "not_found")
        return self.store_file(store_id, file_id)

    def remove_from_store(self, store_id: str, file_id: str) -> None:
        with self._tx() as db:
            if not self._remove_from_store(db, store_id, file_id):
                raise StoreError(404, f"No file found with id '{file_id}' in vector store "
                                      f"'{store_id}'", "file_id", "not_found")

    def _remove_from_store(self, db: sqlite3.Connection, store_id: str, file_id: str) -> bool:
        if db.execute("DELETE FROM store_files WHERE store_id = ? AND file_id = ?",
                      (store_id, file_id)).rowcount == 0:
            return False
        db.execute("INSERT INTO index_ops (store_id, op, doc_id) VALUES (?, 'remove', ?)",
                   (store_id, file_id))
        return True

    def counts(self, store_id: str, batch_id: str | None = None) -> dict[str, int]:
        sql, args = "SELECT status, COUNT(*) FROM store_files WHERE store_id = ?", [store_id]
        if batch_id is not None:
            sql, args = sql + " AND batch_id = ?", [*args, batch_id]
        got = dict(self._query(sql + " GROUP BY status", tuple(args)))
        out = {s: int(got.get(s, 0)) for s in STATUSES}
        out["total"] = sum(out.values())
        return out

    def status_counts(self) -> dict[str, int]:
        """Files in all stores by status (the metrics)."""
        got = dict(self._query("SELECT status, COUNT(*) FROM store_files GROUP BY status"))
        return {s: int(got.get(s, 0)) for s in STATUSES}

    def usage_bytes(self, store_id: str) -> int:
        (n,) = self._query("SELECT COALESCE(SUM(usage_bytes), 0) FROM store_files WHERE "
                           "store_id = ? AND status = 'completed'", (store_id,))[0]
        return int(n)

    def batch(self, store_id: str, batch_id: str) -> tuple[int, bool]:
        rows = self._query("SELECT created_at, cancelled FROM batches WHERE id = ? AND "
                           "store_id = ?", (batch_id, store_id))
        if not rows:
            raise StoreError(404, f"No file batch found with id '{batch_id}' in vector store "
                                  f"'{store_id}'", "batch_id", "not_found")
        return int(rows[0][0]), bool(rows[0][1])

    def cancel_batch(self, store_id: str, batch_id: str) -> None:
        """Files of the batch not yet ingested are ``cancelled``; those done stay."""
        self.batch(store_id, batch_id)
        with self._tx() as db:
            db.execute("UPDATE batches SET cancelled = 1 WHERE id = ?", (batch_id,))
            db.execute("UPDATE store_files SET status = 'cancelled' WHERE store_id = ? AND "
                       "batch_id = ? AND status = 'in_progress'", (store_id, batch_id))

    # -- the ingestion queue ---------------------------------------------------------------

    def pending(self, exclude: set[tuple[str, str]], limit: int,
                store_id: str | None = None) -> list[StoreFileRow]:
        """The oldest ``in_progress`` store files not in ``exclude`` (those in flight), of
        every store or of ``store_id``."""
        where, args = "status = 'in_progress'", ()
        if store_id is not None:
            where, args = where + " AND store_id = ?", (store_id,)
        rows = self._query(f"SELECT * FROM store_files WHERE {where} ORDER BY seq LIMIT ?",
                           (*args, limit + len(exclude)))
        out = [_store_file_row(r) for r in rows]
        return [r for r in out if (r.store_id, r.file_id) not in exclude][:limit]

    def pending_ops(self) -> list[IndexOp]:
        return [IndexOp(*r) for r in self._query("SELECT * FROM index_ops ORDER BY seq")]

    def ops_done(self, seqs: list[int]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM index_ops WHERE seq = ?", [(s,) for s in seqs])

    def finish(self, store_id: str, file_id: str, *, seq_added: int | None = None,
               error: dict[str, str] | None = None, usage_bytes: int = 0,
               passages: int = 0) -> bool:
        """Record one file's outcome, unless it was removed, cancelled or re-added meanwhile
        (then False: the caller's result is stale)."""
        with self._tx() as db:
            sql = ("UPDATE store_files SET status = ?, last_error = ?, usage_bytes = ?, "
                   "passages = ? WHERE store_id = ? AND file_id = ? AND status = 'in_progress'")
            args: tuple = ("failed" if error else "completed", _dumps(error), usage_bytes,
                           passages, store_id, file_id)
            if seq_added is not None:
                sql, args = sql + " AND seq = ?", (*args, seq_added)
            return db.execute(sql, args).rowcount == 1

    def expired_files(self, now: float) -> list[str]:
        return [f for (f,) in self._query(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _store_row(r: tuple) -> StoreRow:
    return StoreRow(r[0], r[1], r[2], int(r[3]), int(r[4]), json.loads(r[5]), _loads(r[6]),
                    _loads(r[7]))


def _store_file_row(r: tuple) -> StoreFileRow:
    return StoreFileRow(r[0], r[1], r[2], _loads(r[3]), json.loads(r[4]), json.loads(r[5]),
                        int(r[6]), int(r[7]), int(r[8]), r[9], int(r[10]))
