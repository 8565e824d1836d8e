"""The SQL of the choices the running agent makes by what it measures (the syntax it fetches
instances in, by the link's rate), kept so that `dirigo status` and `/status` show them and why.

`Store.choices` is the one instance, sharing the store's connection and lock. One row per choice,
replaced as it changes: the latest is what matters, its history is in the log.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.store import Store


FETCH_SYNTAX = "fetch_syntax"
"""The syntax Query/Retrieve asks the archive for an instance it holds uncompressed, and why (a
`Choice.document()` of agent.serve.fetchsyntax)."""


class Choices:
    """The latest document of each named choice, with when it was made."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def record(self, name: str, document: dict[str, Any], now: float | None = None) -> None:
        """Replace the choice `name` by `document` (JSON-serialisable)."""
        at = time.time() if now is None else now
        with self._store.write() as db:
            db.execute(
                "INSERT INTO choices (name, document, at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET document = excluded.document, at = excluded.at",
                (name, json.dumps(document, sort_keys=True), at),
            )

    def latest(self, name: str) -> tuple[dict[str, Any], float] | None:
        """Return the choice `name` and when it was made, or None if it never was."""
        with self._store.read() as db:
            row = db.execute("SELECT document, at FROM choices WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        document: dict[str, Any] = json.loads(row[0])
        return document, row[1]
