"""SQLite cache of LLM answers, so re-running a workflow does not pay for the same call twice.

The key is a hash of everything that decides the answer: backend, model, messages, sampling
parameters and the JSON schema. One connection per operation keeps it safe across threads and
processes (Ray workers may share the file); SQLite's own locking serialises the writes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from ehrflow.llm.base import Completion, GenerationRequest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_responses (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    wall_s REAL NOT NULL,
    created REAL NOT NULL
)
"""


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    @staticmethod
    def key(backend: str, model: str, request: GenerationRequest) -> str:
        payload = {
            "backend": backend,
            "model": model,
            "messages": [m.model_dump() for m in request.messages],
            "params": {"max_tokens": request.max_tokens, "temperature": request.temperature, "seed": request.seed},
            "schema": request.json_schema,
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT text, prompt_tokens, completion_tokens, wall_s, model FROM llm_responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        text, prompt_tokens, completion_tokens, wall_s, model = row
        return Completion(text, prompt_tokens, completion_tokens, wall_s, model)

    def put(self, key: str, backend: str, completion: Completion) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute(
                "INSERT OR REPLACE INTO llm_responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    backend,
                    completion.model,
                    completion.text,
                    completion.prompt_tokens,
                    completion.completion_tokens,
                    completion.wall_s,
                    time.time(),
                ),
            )

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            return conn.execute("SELECT COUNT(*) FROM llm_responses").fetchone()[0]

    def clear(self) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute("DELETE FROM llm_responses")
