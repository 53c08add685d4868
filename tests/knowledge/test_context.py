"""node_context: definition plus capped, prioritised relations, on the tiny fixture, a PrimeKG import and the default KG."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ehrflow.knowledge import KnowledgeGraph
from ehrflow.knowledge.build import import_primekg, index_openkg
from ehrflow.knowledge.context import RELATION_PRIORITY, node_context

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kg_tiny"


@pytest.fixture(scope="module")
def kg(tmp_path_factory) -> KnowledgeGraph:
    return KnowledgeGraph(index_openkg(FIXTURE, tmp_path_factory.mktemp("kg") / "tiny.sqlite"))


def priorities(context) -> list[int]:
    return [RELATION_PRIORITY.index(r.relation) for r in context.relations]


def test_definition_and_parent_first_without_protein_edges(kg: KnowledgeGraph) -> None:
    # hyperkalemia has one parent and 20 protein edges in the fixture: only the parent is worth a sentence
    assert {e.relation for e in kg.edges("HP:0002153")} >= {"phenotype_phenotype", "phenotype_protein"}
    [context] = node_context(kg, ["HP:0002153"], max_relations=3)
    assert (context.node_id, context.name, context.type) == ("HP:0002153", "Hyperkalemia", "effect/phenotype")
    assert context.definition == "An abnormally increased potassium concentration in the blood."
    assert [(r.relation, r.other_id, r.text) for r in context.relations] == [
        ("phenotype_phenotype", "HP:0011042", "Hyperkalemia parent-child Abnormal blood potassium concentration")
    ]


def test_unknown_and_repeated_ids_are_skipped_in_input_order(kg: KnowledgeGraph) -> None:
    contexts = node_context(kg, ["DOID:6000", "NOT:1", "HP:0002153", "DOID:6000", ""], max_relations=1)
    assert [c.node_id for c in contexts] == ["DOID:6000", "HP:0002153"]
    assert node_context(kg, ["NOT:1"]) == [] and node_context(kg, []) == []


@pytest.mark.parametrize("node_id", ["DOID:6000", "DOID:9352", "HP:0002153", "DrugCentral:1725", "MONDO:0005009"])
@pytest.mark.parametrize("cap", [0, 1, 2, 5, 50])
def test_relations_are_capped_and_in_priority_order(kg: KnowledgeGraph, node_id: str, cap: int) -> None:
    available = kg.edges(node_id, relations=RELATION_PRIORITY)
    [context] = node_context(kg, [node_id], max_relations=cap)
    others = {e.y_id if e.x_id == node_id else e.x_id for e in available}  # a pair listed twice counts once
    assert len(context.relations) == min(cap, len(others))
    assert len({r.other_id for r in context.relations}) == len(context.relations)
    assert priorities(context) == sorted(priorities(context))
    assert {r.relation for r in context.relations} <= set(RELATION_PRIORITY)
    if context.relations:  # the best relation available comes first
        assert priorities(context)[0] == min(RELATION_PRIORITY.index(e.relation) for e in available)


def test_a_higher_priority_relation_fills_the_cap_before_a_lower_one(kg: KnowledgeGraph) -> None:
    # congestive heart failure: one parent and six children (disease_disease) and one symptom (phenotype positive)
    relations = {e.relation for e in kg.edges("DOID:6000", relations=RELATION_PRIORITY)}
    assert relations == {"disease_disease", "disease_phenotype_positive"}
    [three] = node_context(kg, ["DOID:6000"], max_relations=3)
    assert [r.relation for r in three.relations] == ["disease_disease"] * 3
    [everything] = node_context(kg, ["DOID:6000"], max_relations=50)
    assert [r.relation for r in everything.relations] == ["disease_disease"] * 7 + ["disease_phenotype_positive"]
    # subject first whichever end the node is: the parent edge points out, the children's edges point in
    texts = {r.other_id: r.text for r in everything.relations}
    assert texts["DOID:114"] == "congestive heart failure parent-child heart disease"
    child = kg.node("DOID:9775")
    assert texts["DOID:9775"] == f"{child.name} parent-child congestive heart failure"


def test_node_without_definition_or_relations(kg: KnowledgeGraph) -> None:
    [context] = node_context(kg, ["MONDO:0005009"])
    assert context.definition is None and context.relations == ()  # only disease_xref edges, which are left out
    assert {e.relation for e in kg.edges("MONDO:0005009")} == {"disease_xref"}


def test_primekg_layout_written_here(tmp_path) -> None:
    """PrimeKG stores undirected edges twice and ranks protein edges like any other; the context must show each
    relation once and skip the protein ones."""
    rows = [
        ["disease_protein", "associated with", "5148", "disease", "type 2 diabetes mellitus", "9", "gene/protein", "INS"],
        ["disease_protein", "associated with", "9", "gene/protein", "INS", "5148", "disease", "type 2 diabetes mellitus"],
        ["indication", "indication", "DB00331", "drug", "Metformin", "5148", "disease", "type 2 diabetes mellitus"],
        ["indication", "indication", "5148", "disease", "type 2 diabetes mellitus", "DB00331", "drug", "Metformin"],
        ["disease_disease", "parent-child", "5148", "disease", "type 2 diabetes mellitus", "5015", "disease", "diabetes mellitus"],
        ["disease_disease", "parent-child", "5015", "disease", "diabetes mellitus", "5148", "disease", "type 2 diabetes mellitus"],
    ]  # fmt: skip
    sources = {"disease": "MONDO", "drug": "DrugBank", "gene/protein": "NCBI"}
    index = {node_id: str(i) for i, node_id in enumerate(dict.fromkeys(row[2] for row in rows))}
    directory = tmp_path / "primekg"
    directory.mkdir()
    with (directory / "kg.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["relation", "display_relation", "x_index", "x_id", "x_type", "x_name", "x_source"]
                        + ["y_index", "y_id", "y_type", "y_name", "y_source"])  # fmt: skip
        for relation, display, x_id, x_type, x_name, y_id, y_type, y_name in rows:
            writer.writerow([relation, display, index[x_id], x_id, x_type, x_name, sources[x_type]]
                            + [index[y_id], y_id, y_type, y_name, sources[y_type]])  # fmt: skip
    with (directory / "disease_features.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["node_index", "mondo_id", "mondo_name", "mondo_definition", "umls_description"])
        writer.writerow([index["5148"], "5148", "type 2 diabetes mellitus", "A diabetes with insulin resistance.", ""])
    kg = KnowledgeGraph(import_primekg(directory, tmp_path / "primekg.sqlite"))
    [context] = node_context(kg, ["MONDO:5148"], max_relations=5)
    assert context.definition == "A diabetes with insulin resistance."
    # the disease's own copy of the indication edge comes first, yet the triple reads drug -> disease
    assert kg.edges("MONDO:5148", relations=["indication"])[0].x_id == "MONDO:5148"
    assert [(r.relation, r.other_id) for r in context.relations] == [
        ("indication", "DrugBank:DB00331"),
        ("disease_disease", "MONDO:5015"),
    ]
    assert context.relations[0].text == "Metformin indication type 2 diabetes mellitus"


def test_default_kg_hyperkalemia() -> None:
    """The shipped KG: hyperkalemia has dozens of disease and protein edges; three prioritised relations are kept."""
    kg = KnowledgeGraph.default()
    assert len(kg.edges("HP:0002153", relations=["phenotype_protein"], limit=5)) == 5
    [context, unknown_skipped] = node_context(kg, ["HP:0002153", "HP:does-not-exist", "DOID:6000"], max_relations=3)
    assert context.name == "Hyperkalemia" and context.definition.startswith("An abnormally increased potassium")
    assert [r.relation for r in context.relations] == ["phenotype_phenotype"] + ["disease_phenotype_positive"] * 2
    assert context.relations[0].text == "Hyperkalemia parent-child Abnormal blood potassium concentration"
    assert all(r.text.endswith(" phenotype present Hyperkalemia") for r in context.relations[1:])
    assert unknown_skipped.node_id == "DOID:6000"
    assert [r.relation for r in unknown_skipped.relations] == ["indication"] * 3  # drugs for heart failure first
