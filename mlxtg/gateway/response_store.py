"""Stored OpenAI Responses: SQLite under $MLXTG_HOME, bounded by age and count.

Each row keeps the response body as returned, the request's own input items (for
`/input_items`) and the conversation so far as chat-template messages, so a request with
`previous_response_id` continues it without the client resending anything. Several
gateways may share the file (SQLite serialises writers).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

MAX_ROWS = 10_000
MAX_AGE_S = 30 * 24 * 3600


class ResponseStore:
    def __init__(self, path: Path, max_rows: int = MAX_ROWS, max_age_s: float = MAX_AGE_S):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created REAL, "
            "body TEXT, input_items TEXT, conversation TEXT, session TEXT)"
        )
        self._db.commit()

    def put(
        self,
        body: dict[str, Any],
        input_items: list[dict[str, Any]],
        conversation: list[dict[str, Any]],
        session: str,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                (
                    body["id"],
                    time.time(),
                    json.dumps(body),
                    json.dumps(input_items),
                    json.dumps(conversation),
                    session,
                ),
            )
            self._db.execute(
                "DELETE FROM responses WHERE created < ?", (time.time() - self.max_age_s,)
            )
            self._db.execute(
                "DELETE FROM responses WHERE id NOT IN "
                "(SELECT id FROM responses ORDER BY created DESC LIMIT ?)",
                (self.max_rows,),
            )
            self._db.commit()

    def _row(self, rid: str) -> tuple[str, str, str, str] | None:
        with self._lock:
            cur = self._db.execute(
                "SELECT body, input_items, conversation, session FROM responses WHERE id = ?",
                (rid,),
            )
            row = cur.fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def body(self, rid: str) -> dict[str, Any] | None:
        row = self._row(rid)
        return None if row is None else dict(json.loads(row[0]))

    def input_items(self, rid: str) -> list[dict[str, Any]] | None:
        row = self._row(rid)
        return None if row is None else list(json.loads(row[1]))

    def conversation(self, rid: str) -> tuple[list[dict[str, Any]], str] | None:
        row = self._row(rid)
        return None if row is None else (list(json.loads(row[2])), row[3])

    def delete(self, rid: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ?", (rid,))
            self._db.commit()
            return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
