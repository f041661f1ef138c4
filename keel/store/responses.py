"""Stored Responses API responses: what `GET /v1/responses/{id}` returns, the input items it was given,
and the conversation so far (chat messages) that `previous_response_id` continues from.

One SQLite database (the standard library's sqlite3; no server), a file by default so stored responses
survive a restart. Rows hold JSON text; the table is small and keyed by response id.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

from keel.errors import KeelError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,      -- the response object, as returned
    input_items TEXT NOT NULL,   -- this request's input items, with ids
    conversation TEXT NOT NULL   -- chat messages up to and including this response's output
)
"""


def default_state_path() -> str:
    """$KEEL_STATE_DB, else ~/.local/share/keel/state.sqlite3."""
    env = os.environ.get("KEEL_STATE_DB")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "keel", "state.sqlite3")


class ResponseStore:
    def __init__(self, path: str = ":memory:") -> None:
        """path: the database file (created with its folder), or ":memory:" for a store that ends with
        the process."""
        self.path = path
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        try:
            if path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL" if path != ":memory:" else "PRAGMA journal_mode=MEMORY")
            self._db.execute(SCHEMA)
            self._db.commit()
        except (OSError, sqlite3.Error) as e:  # unwritable folder, a file that is no SQLite database
            raise KeelError(f"the state database {path} cannot be opened: {e}") from None

    def put(self, response: dict, input_items: list[dict], conversation: list[dict]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (response["id"], int(response.get("created_at") or time.time()), json.dumps(response),
                              json.dumps(input_items), json.dumps(conversation)))
            self._db.commit()

    def _get(self, response_id: str, column: str):
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def response(self, response_id: str) -> dict | None:
        return self._get(response_id, "response")

    def input_items(self, response_id: str) -> list[dict] | None:
        return self._get(response_id, "input_items")

    def conversation(self, response_id: str) -> list[dict] | None:
        return self._get(response_id, "conversation")

    def delete(self, response_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            self._db.commit()
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
