"""GroundingAgent: entities and findings -> KG nodes, through the hybrid ``EntityIndex``."""

from __future__ import annotations

from ehrflow.agents.types import Entity, Finding, GroundedEntity


class GroundingAgent:
    """Grounds the patient's own mentions (negated and family mentions are skipped) and the
    time-series findings (whose phenotype node is known from the reference ranges)."""

    def __init__(self, kg, entity_index):  # noqa: ANN001
        self.kg = kg
        self.index = entity_index

    def __call__(self, entities: list[Entity], findings: list[Finding]) -> list[GroundedEntity]:
        own = [e for e in entities if not e.negated and not e.family]
        grounded: list[GroundedEntity] = []
        if own:
            for entity, matches in zip(own, self.index.ground([e.text for e in own]), strict=True):
                if matches:
                    best = matches[0]
                    grounded.append(self._grounded(entity, best.node, best.score, best.kind))
                elif entity.candidate_node_id and (node := self.kg.get(entity.candidate_node_id)):
                    grounded.append(self._grounded(entity, node, 1.0, "proposed"))
        for f in findings:
            if f.phenotype_node_id and (node := self.kg.get(f.phenotype_node_id)):
                grounded.append(
                    self._grounded(
                        Entity(text=f.text, kind="finding", origin="timeseries"), node, 1.0, "reference_range"
                    )
                )
        return _best_per_node(grounded)

    @staticmethod
    def _grounded(entity: Entity, node, score: float, match: str) -> GroundedEntity:  # noqa: ANN001
        return GroundedEntity(
            entity=entity, node_id=node.id, node_name=node.name, node_type=node.type, score=score, match=match
        )


def _best_per_node(items: list[GroundedEntity]) -> list[GroundedEntity]:
    best: dict[str, GroundedEntity] = {}
    for g in items:
        if g.node_id not in best or g.score > best[g.node_id].score:
            best[g.node_id] = g
    return sorted(best.values(), key=lambda g: -g.score)
