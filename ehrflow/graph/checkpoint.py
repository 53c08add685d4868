"""The checkpointer shared by the patient-job and chat workflows: a SQLite file on one machine, PostgreSQL on a
cluster (every Workflow replica, on any node, then resumes the same jobs and continues the same chats).

Checkpoints are (de)serialised with an explicit allow-list of ehrflow's state types, so a
tampered checkpoint cannot make LangGraph construct arbitrary classes.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from pydantic import BaseModel

from ehrflow.agents import types as agent_types
from ehrflow.graph.chat import ChatState, ChatTurn
from ehrflow.graph.patient_job import PatientJobState


def state_types() -> list[type[BaseModel]]:
    own = [
        obj
        for obj in vars(agent_types).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == agent_types.__name__
    ]
    return [PatientJobState, ChatState, ChatTurn, agent_types.Finding, *own]


def open_checkpointer(location: str | Path, connect_timeout_s: float = 30.0) -> BaseCheckpointSaver:
    """A checkpointer for a SQLite file (a path or ``sqlite:///path``) or a PostgreSQL database (a
    ``postgresql://`` URL, SQLAlchemy's ``postgresql+psycopg://`` form included; needs ``ehrflow[postgres]``)."""
    serde = JsonPlusSerializer(allowed_msgpack_modules=state_types())
    text = str(location)
    if text.startswith("postgresql"):
        return _postgres_checkpointer(text, serde, connect_timeout_s)
    if "://" in text:
        if not text.startswith("sqlite:///"):
            scheme = text.split("://", 1)[0]  # never the rest: a URL may carry a password
            raise ValueError(f"checkpoint URL scheme {scheme!r}: expected a file path, sqlite:/// or postgresql:// URL")
        text = text.removeprefix("sqlite:///")
    path = Path(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    return SqliteSaver(conn, serde=serde)


def _postgres_checkpointer(url: str, serde: JsonPlusSerializer, connect_timeout_s: float) -> BaseCheckpointSaver:
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg import errors
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout
    except ImportError as exc:
        raise ImportError(
            "a postgresql:// checkpoint URL needs langgraph-checkpoint-postgres: pip install 'ehrflow[postgres]'"
        ) from exc
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url).set(drivername="postgresql")
    # a small pool rather than one connection: a connection the server dropped is checked and replaced on
    # checkout. The connection settings are those LangGraph's own from_conn_string uses.
    pool = ConnectionPool(
        parsed.render_as_string(hide_password=False),
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        min_size=1,
        max_size=2,
        check=ConnectionPool.check_connection,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=connect_timeout_s)
    except PoolTimeout as exc:
        pool.close()
        where = parsed.render_as_string(hide_password=True)
        raise ConnectionError(f"checkpoint database {where}: no connection within {connect_timeout_s:g} s") from exc
    saver = PostgresSaver(pool, serde=serde)
    # creates or migrates the tables; replicas starting together race on them, and the loser retries
    for attempt in range(3):
        try:
            saver.setup()
            break
        except (errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject):
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    return saver
