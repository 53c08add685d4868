"""NoteIndex search: dense, BM25 and hybrid over real notes, patient scope, KG expansion, bad input; BM25 and RRF."""

from __future__ import annotations

import pytest

from ehrflow.knowledge import KnowledgeGraph
from ehrflow.records.model import Note, Patient
from ehrflow.retrieval import SentenceTransformerEmbedder, chroma_client
from ehrflow.retrieval.bm25 import BM25Index, analyze
from ehrflow.retrieval.expansion import QueryExpander
from ehrflow.retrieval.hybrid import reciprocal_rank_fusion
from ehrflow.retrieval.notes import MAX_QUERY_CHARS, NoteIndex, patient_chunks

from .test_notes import fhir_patient, mtsamples_patients

# A tiny KG in the open-KG layout: myocardial infarction with its "MI" abbreviation and one child concept.
KG_NODES = [
    ("DOID:5844", "disease", "myocardial infarction", "", "heart attack|Myocardial infarct", ""),
    ("HP:0001658", "effect/phenotype", "Myocardial infarction", "", "Heart attack|MI", ""),
    ("DOID:9408", "disease", "acute myocardial infarction", "", "", ""),
    ("DOID:3393", "disease", "coronary artery disease", "", "CAD", ""),
]
KG_EDGES = [
    ("DOID:9408", "disease_disease", "parent-child", "DOID:5844"),
    ("DOID:5844", "disease_disease", "parent-child", "DOID:3393"),
]
MI_ONLY = "Cardiology follow-up. Status post MI in 2015, treated with a stent. No chest pain since."
UNRELATED = "Orthopedic visit. The left knee is swollen after a fall. Ice and rest were advised."


def write_kg(directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["node_id\tnode_type\tnode_name\tdefinition\tsynonyms\txrefs\tnode_source"]
    rows += ["\t".join([*row, "test"]) for row in KG_NODES]
    (directory / "nodes.tsv").write_text("\n".join(rows) + "\n")
    rows = ["x_id\trelation\tdisplay_relation\ty_id\tedge_source"] + ["\t".join([*r, "test"]) for r in KG_EDGES]
    (directory / "edges.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def kg(tmp_path_factory) -> KnowledgeGraph:
    root = tmp_path_factory.mktemp("kg")
    write_kg(root / "kg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EHRFLOW_HOME", str(root / "home"))  # the KG's SQLite cache goes under the test's tmp dir
        return KnowledgeGraph.open(root / "kg")


@pytest.fixture(scope="module")
def corpus(shared_data) -> list[Patient]:
    crafted = [
        Patient(id="crafted-mi", source="test", notes=[Note(id="n1", text=MI_ONLY)]),
        Patient(id="crafted-knee", source="test", notes=[Note(id="n1", text=UNRELATED)]),
    ]
    return [*mtsamples_patients(shared_data, 4), fhir_patient(shared_data), *crafted]


@pytest.fixture(scope="module")
def index(tmp_path_factory, corpus, kg) -> NoteIndex:
    root = tmp_path_factory.mktemp("notes")
    note_index = NoteIndex(SentenceTransformerEmbedder(), chroma_client(root / "chroma"), kg=kg, bm25_dir=root / "bm25")
    note_index.index_patients(corpus)
    return note_index


def a_chunk_of(patient: Patient) -> tuple[str, str]:
    """(chunk id, its text): a query that must find its own chunk first in every mode."""
    chunk = max(patient_chunks(patient), key=lambda c: len(c.text))
    return chunk.id, chunk.text[:MAX_QUERY_CHARS]


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_a_chunk_finds_itself(index, corpus, mode):
    for patient in corpus[:2]:
        wanted, query = a_chunk_of(patient)
        hits = index.search(query, k=5, mode=mode)
        assert hits[0].chunk_id == wanted, (mode, [h.chunk_id for h in hits])
        assert hits[0].patient_id == patient.id
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len({h.chunk_id for h in hits}) == len(hits) <= 5
        note = next(n for n in patient.all_notes() if n.id == hits[0].note_id)
        assert note.text[hits[0].start : hits[0].end] == hits[0].text


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_patient_scope(index, corpus, mode):
    patient = corpus[4]  # the Synthea patient
    _, query = a_chunk_of(corpus[0])  # a query about another patient's note
    hits = index.search(query, patient_id=patient.id, k=50, mode=mode)
    assert hits and {h.patient_id for h in hits} == {patient.id}
    assert index.search(query, patient_id="no-such-patient", mode=mode) == []


def test_corpus_bm25_is_persisted_and_rebuilt_when_the_collection_changes(index, corpus, tmp_path):
    first = index.corpus_bm25()
    assert len(first) == index.count()
    assert index.corpus_bm25() is first  # unchanged collection: the same index
    reopened = NoteIndex(index.embedder, index.client, kg=index.kg, bm25_dir=index._bm25_dir)
    assert reopened.corpus_bm25().ids == first.ids  # loaded from disk

    extra = Patient(id="crafted-extra", source="test", notes=[Note(id="n", text="Zymurgy consult note.")])
    index.index_patient(extra)
    assert [h.patient_id for h in index.search("zymurgy", mode="bm25")] == ["crafted-extra"]
    assert [h.patient_id for h in reopened.search("zymurgy", mode="bm25")] == ["crafted-extra"]
    index.delete_patient(extra.id)
    assert index.search("zymurgy", mode="bm25") == []


def test_expansion_finds_an_abbreviation_only_mention(index):
    plain = index.search("myocardial infarction", k=3, mode="bm25")
    assert "crafted-mi" not in {h.patient_id for h in plain}  # the note only says "MI"
    expanded = index.search("myocardial infarction", k=3, mode="bm25", expand=True)
    assert expanded[0].patient_id == "crafted-mi"
    hybrid = index.search("myocardial infarction", k=3, mode="hybrid", expand=True)
    assert hybrid[0].patient_id == "crafted-mi"


def test_expansion_ranks_beside_the_query_so_its_own_best_match_stays_first(index):
    question = "history of myocardial infarction"
    plain = [h.chunk_id for h in index.search(question, k=10, mode="bm25")]
    expanded = index.search(question, k=10, mode="bm25", expand=True)
    assert expanded[0].chunk_id == plain[0]  # the expansion terms do not push the query's best match down
    expanded_patients = [h.patient_id for h in expanded]
    assert "crafted-mi" in expanded_patients  # ...and the abbreviation-only note still comes up
    assert "crafted-mi" not in {h.patient_id for h in index.search(question, k=10, mode="bm25")}


def test_query_expander_terms(kg):
    expansion = QueryExpander(kg).expand("Does the patient have a history of myocardial infarction?")
    assert expansion.mentions == ("myocardial infarction",)
    assert set(expansion.node_ids) == {"DOID:5844", "HP:0001658"}
    kinds = {t.text: t.kind for t in expansion.terms}
    assert kinds["MI"] == "abbreviation"
    assert kinds["heart attack"] == "synonym"
    assert kinds["acute myocardial infarction"] == "child"
    assert "coronary artery disease" not in kinds  # a parent is not an expansion
    assert QueryExpander(kg).expand("knee swelling after a fall").terms == ()


@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        ("", ValueError, "query is empty"),
        ("   \n", ValueError, "query is empty"),
        ("x" * (MAX_QUERY_CHARS + 1), ValueError, "the limit is 2000"),
        (None, TypeError, "query must be a string"),
    ],
)
def test_bad_queries(index, query, error, message):
    with pytest.raises(error, match=message):
        index.search(query)


def test_bad_mode_and_k(index):
    with pytest.raises(ValueError, match="search mode 'sparse'"):
        index.search("asthma", mode="sparse")
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search("asthma", k=0)


def test_empty_collection_gives_no_hits(tmp_path, index):
    empty = NoteIndex(index.embedder, chroma_client(tmp_path / "chroma"), bm25_dir=tmp_path / "bm25")
    for mode in ("dense", "bm25", "hybrid"):
        assert empty.search("asthma", mode=mode) == []


def test_bm25_index_search_save_load(tmp_path):
    index = BM25Index.build(["a", "b", "c"], ["chest pain and MI", "knee pain", "Type 2 diabetes, insulin"])
    assert [i for i, _ in index.search("MI chest")] == ["a"]
    assert {i for i, _ in index.search("pain")} == {"a", "b"}
    assert index.search("unknownword") == []
    assert "2" in analyze("type 2 diabetes") and "mi" in analyze("MI")
    index.save(tmp_path / "bm25", {"revision": "r1"})
    loaded, meta = BM25Index.load(tmp_path / "bm25")
    assert meta["revision"] == "r1"
    assert loaded.search("insulin") == index.search("insulin")
    assert BM25Index.load(tmp_path / "nothing") is None


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]], k=60)
    assert [key for key, _ in fused] == ["b", "c", "a", "d"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert reciprocal_rank_fusion([["x", "x", "y"]], k=0) == [("x", 1.0), ("y", pytest.approx(1 / 3))]
    with pytest.raises(ValueError, match="2 rankings but 1 weights"):
        reciprocal_rank_fusion([["a"], ["b"]], weights=[1.0])
