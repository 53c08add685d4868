"""What the agents pass to each other through the workflow state. Plain pydantic, checkpointable."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ehrflow.knowledge.findings import Finding

__all__ = [
    "Entity",
    "EntityKind",
    "EvidenceChunk",
    "Finding",
    "GroundedEntity",
    "HealthSummary",
    "NodeFacts",
    "NodeRun",
    "Statement",
]

EntityKind = Literal["disease", "symptom", "procedure", "medication", "finding", "other"]


class Entity(BaseModel):
    """A mention in a note, or an abnormal time-series finding, before grounding."""

    text: str
    kind: EntityKind = "other"
    origin: Literal["lexical", "llm", "timeseries"] = "lexical"
    note_id: str | None = None
    start: int | None = None
    end: int | None = None
    section: str | None = None
    negated: bool = False
    family: bool = False
    """Mentioned about a relative (family history), so not the patient's."""
    candidate_node_id: str | None = None
    """The KG node the lexical matcher proposed, if any."""


class GroundedEntity(BaseModel):
    entity: Entity
    node_id: str
    node_name: str
    node_type: str
    score: float
    match: str
    """How it matched: name, synonym, abbreviation, normalized, dense, or proposed."""


class NodeFacts(BaseModel):
    """A grounded node's definition and top relations, as the summary needs them."""

    node_id: str
    name: str
    type: str
    definition: str | None = None
    relations: list[str] = Field(default_factory=list)
    related_ids: list[str] = Field(default_factory=list)
    """The other node of each relation, in the same order, so a relation statement can cite both ends."""


class EvidenceChunk(BaseModel):
    chunk_id: str
    note_id: str
    text: str
    score: float


class Statement(BaseModel):
    """One sentence of the summary with the KG node ids / note chunk ids it rests on."""

    text: str
    citations: list[str] = Field(default_factory=list)


class HealthSummary(BaseModel):
    task: str
    statements: list[Statement] = Field(default_factory=list)
    dropped_uncited: int = 0
    """Statements removed because they cited nothing, or cited ids the workflow never saw."""
    rewritten_by_llm: bool = False

    @property
    def text(self) -> str:
        return "\n".join(f"{s.text} [{', '.join(s.citations)}]" for s in self.statements)


class NodeRun(BaseModel):
    """Timing and outcome of one workflow node, kept in the state for the report."""

    node: str
    status: Literal["ok", "skipped", "error"]
    seconds: float
    message: str | None = None
