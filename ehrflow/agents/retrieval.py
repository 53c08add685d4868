"""RetrievalAgent: definitions and relations of the grounded nodes, plus the patient's most
relevant note chunks. Caps are configuration (EMERGE's summary prompt needs them small)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ehrflow.agents.types import EvidenceChunk, GroundedEntity, NodeFacts


class RetrievalConfig(BaseModel):
    max_nodes: int = Field(12, gt=0)
    max_relations: int = Field(3, ge=0)
    max_chunks: int = Field(4, ge=0)


class RetrievalAgent:
    def __init__(self, kg, note_index=None, config: RetrievalConfig | None = None):  # noqa: ANN001
        self.kg = kg
        self.note_index = note_index
        self.config = config or RetrievalConfig()

    def facts(self, grounded: list[GroundedEntity]) -> list[NodeFacts]:
        from ehrflow.knowledge.context import node_context

        ids = list(dict.fromkeys(g.node_id for g in grounded))[: self.config.max_nodes]
        out = []
        for ctx in node_context(self.kg, ids, max_relations=self.config.max_relations):
            out.append(
                NodeFacts(
                    node_id=ctx.node_id,
                    name=ctx.name,
                    type=ctx.type,
                    definition=ctx.definition,
                    relations=[r.text for r in ctx.relations],
                    related_ids=[r.other_id for r in ctx.relations],
                )
            )
        return out

    def evidence(self, patient_id: str, grounded: list[GroundedEntity], task: str) -> list[EvidenceChunk]:
        """The patient's chunks that best match the grounded entities' names and the task."""
        if self.note_index is None or self.config.max_chunks == 0:
            return []
        names = [g.node_name for g in grounded if g.entity.origin != "timeseries"][: self.config.max_nodes]
        query = "; ".join(names) if names else task
        hits = self.note_index.search(query, patient_id=patient_id, k=self.config.max_chunks)
        return [EvidenceChunk(chunk_id=h.chunk_id, note_id=h.note_id, text=h.text, score=h.score) for h in hits]
