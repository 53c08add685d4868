"""Hybrid grounding's lexical re-scoring: subtype numbers and series abbreviations, which embeddings barely see."""

from __future__ import annotations

import pytest

from ehrflow.knowledge.text import number_tokens, series_code
from ehrflow.retrieval import EntityIndex, SentenceTransformerEmbedder, chroma_client
from ehrflow.retrieval.entity_index import _number_agreement

from .test_entity_index import open_kg, write_tiny_kg

SERIES = [
    ("DOID:0110531", "disease", "autosomal recessive nonsyndromic deafness 61", "", "DFNB61", ""),
    ("DOID:0110533", "disease", "autosomal recessive nonsyndromic deafness 63", "", "", ""),
    ("DOID:0110518", "disease", "autosomal recessive nonsyndromic deafness 18A", "", "DFNB18A", ""),
    ("DOID:0110561", "disease", "autosomal dominant nonsyndromic deafness 7", "", "DFNA7", ""),
    ("DOID:9744", "disease", "type 1 diabetes mellitus", "", "", ""),
    ("DOID:9352", "disease", "type 2 diabetes mellitus", "", "NIDDM", ""),
    ("HP:0000365", "effect/phenotype", "Hearing impairment", "", "Deafness", ""),
]


@pytest.fixture(scope="module")
def series_index(tmp_path_factory) -> EntityIndex:
    root = tmp_path_factory.mktemp("series")
    write_tiny_kg(root / "kg", SERIES, [])
    with pytest.MonkeyPatch.context() as patch:
        kg = open_kg(root / "kg", root / "home", patch)
    index = EntityIndex(kg, SentenceTransformerEmbedder(), chroma_client(root / "chroma"), threshold=0.3)
    index.build(progress=False)
    return index


def test_number_and_series_helpers():
    assert series_code("DFNB63") == ("DFNB", "63") and series_code("CMT2B1") == ("CMT", "2b1")
    assert series_code("deafness 63") is None and series_code("CHF") is None
    assert number_tokens("autosomal recessive deafness 63") == {"63"}
    assert number_tokens("DFNB63") == {"63"} and number_tokens("Type 1A") == {"1a"}
    assert _number_agreement(frozenset({"63"}), [frozenset({"63"})]) == 1.0
    assert _number_agreement(frozenset({"63"}), [frozenset({"61"}), frozenset()]) == -1.0
    assert _number_agreement(frozenset({"2dm"}), [frozenset({"2"})]) == 0.0  # bare digits agree: no penalty
    assert _number_agreement(frozenset(), [frozenset({"61"})]) == 0.0
    assert _number_agreement(frozenset({"63"}), [frozenset()]) == 0.0  # an unnumbered node is not contradicted


def test_series_abbreviations_are_found_by_their_letters(series_index):
    found = {(abbreviation, node.id) for abbreviation, node in series_index.kg.series_abbreviations("DFNB")}
    assert found == {("DFNB61", "DOID:0110531"), ("DFNB18A", "DOID:0110518")}  # not DFNA7
    assert series_index.kg.series_abbreviations("DFN") == []  # "DFN" + digit: none
    assert series_index.kg.series_abbreviations("X1'") == []


def test_hybrid_prefers_the_node_with_the_mentioned_subtype_number(series_index):
    deafness, diabetes = series_index.ground(["autosomal recessive deafness 63", "diabetes mellitus type 1"])
    assert deafness[0].node.id == "DOID:0110533"
    assert diabetes[0].node.id == "DOID:9744"
    assert all(m.kind == "dense" and m.score < 1.0 for m in deafness + diabetes)


def test_an_unseen_series_abbreviation_is_read_off_its_siblings(series_index):
    (lexical,) = series_index.ground(["DFNB63"], mode="lexical")
    assert lexical == []  # no node carries the abbreviation itself
    (hybrid,) = series_index.ground(["DFNB63"])
    assert hybrid[0].node.id == "DOID:0110533"
    assert hybrid[0].matched == "autosomal recessive nonsyndromic deafness 63"
    (unknown,) = series_index.ground(["DFNB99"])  # no member 99: the series is not invented
    assert "DOID:0110533" not in [m.node.id for m in unknown[:1]]
