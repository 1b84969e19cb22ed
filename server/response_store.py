"""Stored responses (``store: true``, OpenAI's default): what ``GET /v1/responses/{id}``
returns and what ``previous_response_id`` continues.

One SQLite database (stdlib ``sqlite3``), by default ``<cache dir>/responses.sqlite3``, so that
stored responses survive a restart; ``--responses-store-persist false`` keeps them in memory.
Each row holds the response JSON and the conversation that produced it (the chat messages up to
and including the response's own output, without the request's ``instructions``, which OpenAI
does not carry over). The store is bounded by count and by bytes; the least recently used go
first, and their ids are remembered (a bounded list) so that a 404 can say "evicted".
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ragserve")

#: evicted ids remembered for the 404 message (oldest forgotten first)
EVICTED_MEMORY = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    used INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_used ON responses (used);
CREATE TABLE IF NOT EXISTS evicted (id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS evicted_seq ON evicted (seq);
"""


@dataclass(frozen=True)
class Stored:
    body: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """A bounded LRU of responses: ``put``, ``get``, ``delete``, ``evicted``."""

    def __init__(self, path: Path | None, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.path = path
        self._lock = threading.Lock()
        self._db = self._open(path)
        with self._lock:
            self._db.executescript(SCHEMA)
            row = self._db.execute("SELECT COALESCE(MAX(used), 0) FROM responses").fetchone()
            self._clock = int(row[0])
            self._evict()

    def _open(self, path: Path | None) -> sqlite3.Connection:
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA busy_timeout=5000")
                log.info("responses store: %s", path)
                return db
            except (OSError, sqlite3.Error) as e:  # a read-only cache must not stop the server
                log.warning("responses store %s cannot be opened (%s): keeping stored "
                            "responses in memory only", path, e)
                self.path = None
        return sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def put(self, rid: str, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        body_text = json.dumps(body, ensure_ascii=False)
        conv_text = json.dumps(conversation, ensure_ascii=False)
        size = len(body_text.encode()) + len(conv_text.encode())
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (rid, self._tick(), size, body_text, conv_text))
            self._evict()

    def get(self, rid: str) -> Stored | None:
        """The stored response (now the most recently used), or None."""
        with self._lock:
            row = self._db.execute("SELECT body, conversation FROM responses WHERE id = ?",
                                   (rid,)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE responses SET used = ? WHERE id = ?", (self._tick(), rid))
        return Stored(json.loads(row[0]), json.loads(row[1]))

    def delete(self, rid: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

    def evicted(self, rid: str) -> bool:
        """Whether ``rid`` was stored here and evicted to stay within the bounds."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM evicted WHERE id = ?",
                                    (rid,)).fetchone() is not None

    def stats(self) -> tuple[int, int]:
        """(responses, bytes) held."""
        with self._lock:
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses").fetchone()
        return int(count), int(size)

    def _evict(self) -> None:
        """Least recently used first, until within both bounds (the caller holds the lock)."""
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses").fetchone()
        if count <= self.max_count and size <= self.max_bytes:
            return
        gone: list[str] = []
        for rid, n in self._db.execute("SELECT id, size FROM responses ORDER BY used"):
            if count <= self.max_count and size <= self.max_bytes:
                break
            gone.append(rid)
            count, size = count - 1, size - n
        self._db.execute("BEGIN")
        self._db.executemany("DELETE FROM responses WHERE id = ?", [(r,) for r in gone])
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM evicted").fetchone()[0]
        self._db.executemany("INSERT OR REPLACE INTO evicted VALUES (?, ?)",
                             [(r, seq + 1 + i) for i, r in enumerate(gone)])
        self._db.execute("DELETE FROM evicted WHERE seq <= ?",
                         (seq + len(gone) - EVICTED_MEMORY,))
        self._db.execute("COMMIT")
        log.info("responses store: evicted %d (bounds: %d responses, %d bytes)", len(gone),
                 self.max_count, self.max_bytes)

    def close(self) -> None:
        with self._lock:
            self._db.close()
