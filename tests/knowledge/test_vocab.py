"""ICD and drug vocabularies on the tiny fixture, and one integration test on the shipped default KG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ehrflow.knowledge import KnowledgeGraph
from ehrflow.knowledge.build import index_openkg
from ehrflow.knowledge.graph import default_kg_dir
from ehrflow.knowledge.vocab import Vocabularies, format_icd, icd_node_id, icd_version

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kg_tiny"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocabularies:
    return Vocabularies(KnowledgeGraph(index_openkg(FIXTURE, tmp_path_factory.mktemp("kg") / "tiny.sqlite")))


@pytest.mark.parametrize(
    ("code", "version", "dotted"),
    [
        ("4280", 9, "428.0"),
        ("428.0", "9", "428.0"),
        ("E8790", 9, "E879.0"),
        ("V4581", 9, "V45.81"),
        ("0389", "ICD9CM", "038.9"),
        ("428", 9, "428"),
        ("I509", 10, "I50.9"),
        ("i50.9", "ICD10CM", "I50.9"),
        ("S86012D", 10, "S86.012D"),
        ("ICD10CM:E875", 10, "E87.5"),
        ("E70-E88", 10, "E70-E88"),
    ],
)
def test_format_icd(code: str, version: int | str, dotted: str) -> None:
    assert format_icd(code, version) == dotted


def test_icd_version_and_ids() -> None:
    assert icd_node_id("4280", 9) == "ICD9CM:428.0" and icd_node_id("E875", 10) == "ICD10CM:E87.5"
    assert icd_version("ICD-10-CM".replace("-CM", "CM")) == 10
    with pytest.raises(ValueError, match="unknown ICD version"):
        icd_version(11)


def test_titles_and_hierarchy(vocab: Vocabularies) -> None:
    assert vocab.title("I509", 10) == "Heart failure, unspecified"
    assert vocab.title("4280", 9) == "Congestive heart failure, unspecified"
    assert vocab.title("E875", 10) == "Hyperkalemia" and vocab.title("2767", 9) == "Hyperpotassemia"
    assert vocab.parent("I509", 10).id == "ICD10CM:I50"
    assert [n.id for n in vocab.ancestors("I509", 10)] == ["ICD10CM:I50", "ICD10CM:I30-I5A", "ICD10CM:CH9"]
    assert vocab.ancestors("4280", 9)[0].id == "ICD9CM:428"
    assert vocab.title("99999", 9) is None and vocab.parent("99999", 9) is None and vocab.ancestors("99999", 9) == []


def test_crosswalk(vocab: Vocabularies) -> None:
    assert "ICD10CM:I50.9" in {n.id for n in vocab.icd9_to_icd10("4280")}
    assert [n.id for n in vocab.icd9_to_icd10("2767")] == ["ICD10CM:E87.5"]
    assert vocab.icd9_to_icd10("99999") == []


def test_code_to_disease_links(vocab: Vocabularies) -> None:
    exact = vocab.diseases("I509", 10)
    assert [(link.node.id, link.via, link.distance) for link in exact] == [("DOID:6000", "exact", 0)]
    walked = vocab.diseases("E119", 10)
    assert {(link.node.id, link.code, link.via, link.distance) for link in walked} >= {
        ("DOID:9352", "ICD10CM:E11", "ancestor", 1)
    }
    assert vocab.diseases("E119", 10, walk_up=False) == []
    icd9 = {(link.node.id, link.code) for link in vocab.diseases("25000", 9)}
    assert ("DOID:9352", "ICD10CM:E11") in icd9  # reached through the crosswalk to E11.9, then up to E11
    assert vocab.diseases("E875", 10) == []  # hyperkalemia is an HPO phenotype, no disease names the code
    assert vocab.diseases("99999", 9) == []


@pytest.mark.parametrize(
    ("name", "drug_id"),
    [
        ("metformin", "DrugCentral:1725"),
        ("Furosemide 40mg Tab", "DrugCentral:1258"),
        ("Potassium Chloride 20 mEq (Powder)", "DrugCentral:4199"),
        ("Acetaminophen IV", "DrugCentral:52"),
        ("aspirin", "DrugCentral:74"),
    ],
)
def test_drug_names(vocab: Vocabularies, name: str, drug_id: str) -> None:
    assert [n.id for n in vocab.drugs(name)] == [drug_id]


def test_drug_unknown_and_smiles(vocab: Vocabularies) -> None:
    assert vocab.drugs("not a drug at all") == []
    assert vocab.smiles("metformin") == "CN(C)C(=N)NC(N)=N" == vocab.smiles("DrugCentral:1725")
    assert vocab.smiles("HP:0002153") is None and vocab.smiles("unknownium") is None


def test_default_kg_integration() -> None:
    """The KG shipped in the package: builds its cache index on first use, then opens in about a second."""
    manifest = json.loads((default_kg_dir() / "manifest.json").read_text())
    kg = KnowledgeGraph.default()
    assert KnowledgeGraph.default() is kg and kg.fingerprint == manifest["fingerprint"]
    stats = kg.stats()
    assert stats["node_types"] == manifest["node_types"] and stats["relations"] == manifest["relations"]
    assert stats["node_types"]["disease"] > 40_000 and stats["node_types"]["icd10cm"] > 90_000
    assert stats["smiles"] == manifest["smiles"] > 2_000
    assert [m.node.id for m in kg.lexical_lookup("hyperkalemia", types=["effect/phenotype"])] == ["HP:0002153"]
    vocab = Vocabularies(kg)
    assert vocab.title("E875", 10) == "Hyperkalemia"
    assert vocab.title("I509", 10) == "Heart failure, unspecified"
    assert {link.node.id for link in vocab.diseases("I509", 10)} >= {"DOID:6000"}
    assert "ICD10CM:I50.9" in {n.id for n in vocab.icd9_to_icd10("4280")}
    assert [n.name for n in vocab.drugs("Furosemide 40mg Tab")] == ["furosemide"]
    assert vocab.smiles("aspirin") == "CC(=O)OC1=CC=CC=C1C(O)=O"
