"""Entity grounding on a tiny KG with the real (offline) embedder and a throwaway persistent Chroma directory."""

from __future__ import annotations

import numpy as np
import pytest

from ehrflow.knowledge import KnowledgeGraph
from ehrflow.retrieval import EntityIndex, GroundingConfig, SentenceTransformerEmbedder, chroma_client
from ehrflow.retrieval.entity_index import IndexNotBuilt

NODES = [
    (
        "HP:0002153",
        "effect/phenotype",
        "Hyperkalemia",
        "An abnormally increased potassium concentration in the blood.",
        "Elevated serum potassium levels",
        "UMLS:C0020461",
    ),
    (
        "HP:0002902",
        "effect/phenotype",
        "Hyponatremia",
        "An abnormally decreased sodium concentration in the blood.",
        "Low blood sodium levels",
        "",
    ),
    (
        "HP:0001945",
        "effect/phenotype",
        "Fever",
        "Body temperature elevated above the normal range.",
        "Pyrexia|Hyperthermia",
        "",
    ),
    (
        "DOID:9352",
        "disease",
        "type 2 diabetes mellitus",
        "A diabetes mellitus with insulin resistance.",
        "NIDDM|type II diabetes mellitus",
        "ICD10CM:E11",
    ),
    ("DOID:6000", "disease", "congestive heart failure", "A heart failure with fluid build-up.", "CHF", ""),
    ("MONDO:0005148", "disease", "type 2 diabetes mellitus", "", "", ""),
    ("DrugCentral:1600", "drug", "metformin", "", "", ""),
    ("ICD10CM:E87.5", "icd10cm", "Hyperkalemia", "", "", ""),
]
EDGES = [
    ("DrugCentral:1600", "indication", "indication", "DOID:9352"),
    ("DOID:9352", "disease_phenotype_positive", "phenotype present", "HP:0002153"),
]


def write_tiny_kg(directory, nodes=NODES, edges=EDGES) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["node_id\tnode_type\tnode_name\tdefinition\tsynonyms\txrefs\tnode_source"]
    lines += ["\t".join([*row, "test"]) for row in nodes]
    (directory / "nodes.tsv").write_text("\n".join(lines) + "\n")
    lines = ["x_id\trelation\tdisplay_relation\ty_id\tedge_source"] + ["\t".join([*row, "test"]) for row in edges]
    (directory / "edges.tsv").write_text("\n".join(lines) + "\n")


def open_kg(directory, home, monkeypatch) -> KnowledgeGraph:
    monkeypatch.setenv("EHRFLOW_HOME", str(home))  # the KG's SQLite cache goes under the test's tmp dir
    return KnowledgeGraph.open(directory)


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture
def kg(tmp_path, monkeypatch) -> KnowledgeGraph:
    write_tiny_kg(tmp_path / "kg")
    return open_kg(tmp_path / "kg", tmp_path / "home", monkeypatch)


@pytest.fixture
def index(kg, embedder, tmp_path) -> EntityIndex:
    built = EntityIndex(kg, embedder, chroma_client(tmp_path / "chroma"), threshold=0.5, top_k=3)
    built.build(progress=False)
    return built


def ids(matches) -> list[str]:
    return [m.node.id for m in matches]


def test_build_embeds_names_synonyms_and_definitions_in_scope_only(index):
    # 3 phenotypes (1+1+1+1+1+2 labels), DOID (3+2), drug (1), and the 5 in-scope definitions; MONDO and ICD nodes
    # are out of the dense scope
    labels = index.labels()
    node_ids = {meta["node_id"] for _, meta in labels.values()}
    assert node_ids == {"HP:0002153", "HP:0002902", "HP:0001945", "DOID:9352", "DOID:6000", "DrugCentral:1600"}
    assert index.collection.count() == len(labels) == 18
    kinds = {text: meta["kind"] for text, meta in labels.values()}
    assert kinds["CHF"] == "abbreviation" and kinds["Pyrexia"] == "synonym" and kinds["metformin"] == "name"
    assert kinds["A heart failure with fluid build-up."] == "definition"


DESCRIBED = [  # HPO names and definitions; the lay synonyms ("Extreme thirst", "Decreased bowel sounds") left out
    ("HP:0001959", "effect/phenotype", "Polydipsia", "Excessive thirst manifested by excessive fluid intake.", "", ""),
    ("HP:0001944", "effect/phenotype", "Dehydration", "", "Exsiccosis", ""),
    ("HP:0030144", "effect/phenotype", "Hypoactive bowel sounds", "An decreased amount of bowel sounds.", "", ""),
    (
        "HP:0030143",
        "effect/phenotype",
        "Hyperactive bowel sounds",
        "Abnormally increased gurgling/rumbling sounds made by the movement of fluid and gas in the intestines.",
        "Borborygmi",
        "",
    ),
]


def test_definitions_let_a_description_reach_the_term_it_describes(embedder, tmp_path, monkeypatch):
    write_tiny_kg(tmp_path / "kg", nodes=DESCRIBED, edges=[])
    kg = open_kg(tmp_path / "kg", tmp_path / "home", monkeypatch)
    found, reports = {}, {}
    for definitions in (False, True):  # one collection: turning definitions on embeds only the definitions
        index = EntityIndex(kg, embedder, chroma_client(tmp_path / "chroma"), definitions=definitions)
        reports[definitions] = index.build(progress=False)
        found[definitions] = index.ground(["Extreme thirst", "Decreased bowel sounds"], mode="dense")
    assert [(r.added, r.removed, r.labels) for r in reports.values()] == [(6, 0, 6), (3, 0, 9)]
    assert [m[0].node.name for m in found[False]] == ["Dehydration", "Hyperactive bowel sounds"]
    thirst, bowel = found[True]
    assert (thirst[0].node.name, thirst[0].matched) == ("Polydipsia", DESCRIBED[0][3])
    assert bowel[0].node.name == "Hypoactive bowel sounds"


def test_lexical_grounding_finds_exact_and_abbreviation_matches(index):
    hyperkalemia, chf, t2dm = index.ground(["hyperkalemia", "CHF", "Type 2 Diabetes Mellitus"], mode="lexical")
    assert [(m.node.id, m.kind, m.score) for m in hyperkalemia] == [("HP:0002153", "name", 1.0)]  # not the ICD node
    assert [(m.node.id, m.kind) for m in chf] == [("DOID:6000", "abbreviation")]
    assert set(ids(t2dm)) == {"DOID:9352", "MONDO:0005148"}  # lexical scope covers every node of the types


def test_dense_grounding_finds_paraphrases(index):
    potassium, fever, chf = index.ground(
        ["high potassium in the blood", "high fever", "heart failure with fluid overload"], mode="dense"
    )
    assert potassium[0].node.id == "HP:0002153"
    assert potassium[0].kind == "dense" and 0.5 <= potassium[0].score < 1.0
    assert fever[0].node.id == "HP:0001945"
    assert chf[0].node.id == "DOID:6000"
    assert all(a.score >= b.score for a, b in zip(potassium, potassium[1:], strict=False))


def test_hybrid_puts_lexical_first_and_keeps_one_entry_per_node(index):
    (matches,) = index.ground(["Hyperkalemia"], mode="hybrid")
    assert matches[0].node.id == "HP:0002153" and matches[0].kind == "name" and matches[0].score == 1.0
    assert len(ids(matches)) == len(set(ids(matches)))
    (paraphrase,) = index.ground(["elevated potassium level in serum"])  # hybrid is the default mode
    assert paraphrase[0].node.id == "HP:0002153" and paraphrase[0].kind == "dense"


def test_threshold_and_top_k_are_honoured(index):
    (loose,) = index.ground(["high potassium in the blood"], mode="dense", threshold=-1.0, top_k=4)
    assert len(loose) == 4
    (strict,) = index.ground(["high potassium in the blood"], mode="dense", threshold=0.99)
    assert strict == []
    (one,) = index.ground(["high potassium in the blood"], mode="dense", threshold=-1.0, top_k=1)
    assert ids(one) == ["HP:0002153"]


def test_unknown_and_blank_mentions_give_no_match(index):
    assert index.ground(["qzxv wrplk", "", "   "]) == [[], [], []]
    assert index.ground([]) == []
    with pytest.raises(TypeError):
        index.ground("hyperkalemia")


def test_rebuild_is_skipped_when_unchanged_and_incremental_when_kg_changes(index, embedder, tmp_path, monkeypatch):
    again = EntityIndex(index.kg, embedder, chroma_client(tmp_path / "chroma"))
    assert again.is_current()
    report = again.build(progress=False)
    assert report.skipped and report.added == 0

    changed = [row for row in NODES if row[0] != "HP:0002902"] + [
        ("HP:0003228", "effect/phenotype", "Hypernatremia", "", "High blood sodium levels", "")
    ]
    write_tiny_kg(tmp_path / "kg2", changed)
    kg2 = open_kg(tmp_path / "kg2", tmp_path / "home", monkeypatch)
    updated = EntityIndex(kg2, embedder, chroma_client(tmp_path / "chroma"))
    assert not updated.is_current()
    report = updated.build(progress=False)
    # Hyponatremia's name, synonym and definition go; Hypernatremia's name and synonym come
    assert (report.skipped, report.added, report.removed, report.labels) == (False, 2, 3, 17)
    assert updated.is_current() and updated.collection.count() == 17
    (sodium,) = updated.ground(["high sodium in blood"], mode="dense", threshold=0.3)
    assert sodium[0].node.id == "HP:0003228"


class _RenamedEmbedder:
    """Same vectors, different name: stands for a different embedding model."""

    def __init__(self, inner: SentenceTransformerEmbedder):
        self.inner = inner
        self.name = "another-model"
        self.dim = inner.dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.inner.encode(texts, batch_size)


def test_a_different_embedder_rebuilds_from_scratch(index, embedder, tmp_path):
    other = EntityIndex(index.kg, _RenamedEmbedder(embedder), chroma_client(tmp_path / "chroma"))
    assert not other.is_current()
    report = other.build(progress=False)
    assert (report.added, report.removed, report.embedded_texts) == (18, 0, 18)
    assert other.collection.metadata["embedder"] == "another-model"


def test_dense_grounding_before_build_is_a_clear_error(kg, embedder, tmp_path):
    empty = EntityIndex(kg, embedder, chroma_client(tmp_path / "empty"))
    with pytest.raises(IndexNotBuilt, match="call EntityIndex.build"):
        empty.ground(["fever"], mode="dense")
    assert empty.ground(["fever"], mode="lexical")[0][0].node.id == "HP:0001945"


def test_config_exposes_model_threshold_and_top_k(kg, tmp_path):
    config = GroundingConfig(threshold=0.7, top_k=2, mode="lexical", node_types=("disease",))
    configured = EntityIndex.from_config(kg, config, client=chroma_client(tmp_path / "cfg"))
    assert (configured.threshold, configured.top_k, configured.mode) == (0.7, 2, "lexical")
    assert configured.ground(["Hyperkalemia"]) == [[]]  # phenotypes are out of this scope
    with pytest.raises(FileNotFoundError, match="not a local sentence-transformers directory"):
        EntityIndex.from_config(kg, GroundingConfig(model="sentence-transformers/all-MiniLM-L6-v2"), client=object())
