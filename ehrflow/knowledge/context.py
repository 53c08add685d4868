"""What the summary agent is told about a grounded node: its definition and a few relations,
chosen by clinical usefulness rather than by edge count.

A phenotype node in PrimeKG has hundreds of protein edges; EMERGE's summary needs the parent
concept, the diseases it is a feature of and the drugs that treat it, so relations are taken
in ``RELATION_PRIORITY`` order and capped per node.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from ehrflow.knowledge.graph import KnowledgeGraph, NodeNotFound

RELATION_PRIORITY: tuple[str, ...] = (
    "indication",
    "phenotype_phenotype",
    "disease_disease",
    "disease_phenotype_positive",
    "drug_class",
    "contraindication",
    "disease_phenotype_negative",
    "code_code",
)
"""Relations worth a sentence in a summary, best first. Protein edges and code crosswalks are left out."""

_SUBJECT_TYPE: dict[str, str] = {
    "indication": "drug",
    "contraindication": "drug",
    "drug_class": "drug",
    "disease_phenotype_positive": "disease",
    "disease_phenotype_negative": "disease",
}
"""The node type a triple reads from. PrimeKG stores these edges in both directions, and the copy found first
may be the reverse one ("type 2 diabetes mellitus indication Metformin")."""


class Relation(BaseModel):
    model_config = ConfigDict(frozen=True)

    relation: str
    other_id: str
    text: str
    """A readable triple, e.g. "Hyperkalemia parent-child Abnormal blood potassium concentration"."""


class NodeContext(BaseModel):
    model_config = ConfigDict(frozen=True)

    node_id: str
    name: str
    type: str
    definition: str | None
    relations: tuple[Relation, ...] = ()


def node_context(kg: KnowledgeGraph, node_ids: Iterable[str], max_relations: int = 3) -> list[NodeContext]:
    """Definition and up to ``max_relations`` prioritised relations for each known id, in input order.

    Unknown ids are skipped (a grounding made against another KG version must not fail a job).
    """
    out: list[NodeContext] = []
    for node_id in dict.fromkeys(node_ids):
        node = kg.get(node_id)
        if node is None:
            continue
        relations: list[Relation] = []
        for relation in RELATION_PRIORITY:
            if len(relations) >= max_relations:
                break
            try:
                # over-fetch: a pair listed twice (e.g. "indication" and "disease-modifying indication") counts once
                pairs = kg.neighbors(node_id, relations=[relation], limit=2 * (max_relations - len(relations)))
            except NodeNotFound:  # pragma: no cover - the node was found above
                break
            for edge, other in pairs:
                if len(relations) >= max_relations or any(r.other_id == other.id for r in relations):
                    continue
                node_first = edge.x_id == node_id
                if _SUBJECT_TYPE.get(relation) in (node.type, other.type) and node.type != other.type:
                    node_first = node.type == _SUBJECT_TYPE[relation]
                x_name, y_name = (node.name, other.name) if node_first else (other.name, node.name)
                relations.append(
                    Relation(relation=relation, other_id=other.id, text=f"{x_name} {edge.display_relation} {y_name}")
                )
        out.append(
            NodeContext(
                node_id=node.id, name=node.name, type=node.type, definition=node.definition, relations=tuple(relations)
            )
        )
    return out
