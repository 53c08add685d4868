"""The SQLite checkpointer shared by the patient-job and chat workflows.

Checkpoints are (de)serialised with an explicit allow-list of ehrflow's state types, so a
tampered checkpoint cannot make LangGraph construct arbitrary classes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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


def sqlite_checkpointer(path: str | Path) -> SqliteSaver:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    return SqliteSaver(conn, serde=JsonPlusSerializer(allowed_msgpack_modules=state_types()))
