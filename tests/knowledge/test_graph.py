"""KnowledgeGraph on the tiny fixture, the PrimeKG reader, bad input, and the default-KG build."""

from __future__ import annotations

import csv
import gzip
import pickle
import shutil
from pathlib import Path

import pytest

from ehrflow.knowledge import KGFormatError, KnowledgeGraph, Node, NodeNotFound, normalize
from ehrflow.knowledge.build import build_default_kg, import_primekg, index_openkg
from ehrflow.knowledge.text import canonical_xref, is_abbreviation

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kg_tiny"


@pytest.fixture(scope="module")
def kg(tmp_path_factory) -> KnowledgeGraph:
    return KnowledgeGraph(index_openkg(FIXTURE, tmp_path_factory.mktemp("kg") / "tiny.sqlite"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("Crohn's Disease", "crohn disease"),
        ("Crohns  disease", "crohn disease"),
        ("Heart-failure, unspecified", "heart failure unspecified"),
        ("Arteries", "artery"),
        ("Sepsis", "sepsis"),
        ("Ménière's disease", "meniere disease"),
        ("  ", ""),
    ],
)
def test_normalize(text: str, key: str) -> None:
    assert normalize(text) == key


def test_abbreviation_and_xref_spelling() -> None:
    assert is_abbreviation("CHF") and is_abbreviation("MEN2A") and is_abbreviation("COVID-19")
    assert not is_abbreviation("all") and not is_abbreviation("Weak heart")
    assert canonical_xref("UMLS_CUI:C0018802") == "UMLS:C0018802"
    assert canonical_xref("MIM:605727") == "OMIM:605727"
    assert canonical_xref("CHEBI:CHEBI:404903") == "CHEBI:404903"
    assert canonical_xref("SNOMEDCT_US_2025_09_01:194382008") == "SNOMEDCT:194382008"


def test_get_node_and_not_found(kg: KnowledgeGraph) -> None:
    node = kg.node("HP:0002153")
    assert (node.type, node.name) == ("effect/phenotype", "Hyperkalemia")
    assert node.definition and "potassium" in node.definition
    assert "UMLS:C0020461" in node.xrefs and node.synonyms == ("Elevated serum potassium levels",)
    assert kg.get("HP:0002153") == node and "HP:0002153" in kg
    assert kg.get("NOPE:1") is None and "NOPE:1" not in kg
    with pytest.raises(NodeNotFound, match="NOPE:1"):
        kg.node("NOPE:1")
    with pytest.raises(NodeNotFound):
        kg.edges("NOPE:1")
    with pytest.raises(NodeNotFound):
        kg.neighbors("NOPE:1")


def test_nodes_and_stats(kg: KnowledgeGraph) -> None:
    stats = kg.stats()
    assert len(kg) == stats["nodes"] == sum(1 for _ in kg.nodes()) == 179
    assert stats["edges"] == 241 and stats["smiles"] == 21
    drugs = list(kg.nodes(types=["drug"]))
    assert len(drugs) == stats["node_types"]["drug"] and {n.type for n in drugs} == {"drug"}
    assert len(list(kg.nodes(types=["drug", "icd9cm"]))) == stats["node_types"]["drug"] + stats["node_types"]["icd9cm"]
    assert list(kg.nodes(types=[])) == []
    assert len(kg.fingerprint) == 24


def test_edges_and_neighbors(kg: KnowledgeGraph) -> None:
    both = {(e.x_id, e.relation, e.y_id) for e in kg.edges("ICD10CM:I50.9")}
    assert both == {
        ("ICD10CM:I50.9", "code_code", "ICD10CM:I50"),
        ("DOID:6000", "disease_xref", "ICD10CM:I50.9"),
        ("ICD9CM:428.0", "code_crosswalk", "ICD10CM:I50.9"),
    }
    parents = kg.neighbors("ICD10CM:I50.9", relations=["code_code"], direction="out")
    assert [(e.relation, n.id, n.name) for e, n in parents] == [("code_code", "ICD10CM:I50", "Heart failure")]
    assert [e.x_id for e in kg.edges("ICD10CM:I50.9", direction="in", relations=["disease_xref"])] == ["DOID:6000"]
    assert len(kg.edges("DOID:6000", limit=2)) == 2
    assert kg.edges("DOID:6000", relations=["no_such_relation"]) == []
    edge, other = kg.neighbors("DrugCentral:1725", relations=["indication"], limit=1)[0]
    assert edge.x_id == "DrugCentral:1725" and other.id == edge.y_id and other.type == "disease"
    with pytest.raises(ValueError, match="direction"):
        kg.edges("DOID:6000", direction="sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "types", "expected"),
    [
        ("hyperkalemia", None, [("HP:0002153", "name", "Hyperkalemia"), ("ICD10CM:E87.5", "name", "Hyperkalemia")]),
        ("HYPERKALEMIA", ["effect/phenotype"], [("HP:0002153", "name", "Hyperkalemia")]),
        ("elevated serum potassium levels", None, [("HP:0002153", "synonym", "Elevated serum potassium levels")]),
        ("CHF", ["disease"], [("DOID:6000", "abbreviation", "CHF")]),
        ("ALL", None, [("DOID:9952", "abbreviation", "ALL")]),
        ("all", None, []),
        (
            "Crohns disease",
            ["disease"],
            [("DOID:8778", "normalized", "Crohn's disease"), ("MONDO:0005011", "normalized", "Crohn disease")],
        ),
        ("acetaminophen", ["drug"], [("DrugCentral:52", "synonym", "acetaminophen")]),
        ("", None, []),
        ("no such thing", None, []),
    ],
)
def test_lexical_lookup_kinds(kg: KnowledgeGraph, text: str, types: list[str] | None, expected: list) -> None:
    assert [(m.node.id, m.kind, m.matched) for m in kg.lexical_lookup(text, types=types)] == expected


def test_lexical_lookup_prefers_name_over_normalized(kg: KnowledgeGraph) -> None:
    matches = kg.lexical_lookup("congestive heart failure")
    assert [m.kind for m in matches] == sorted(
        (m.kind for m in matches), key=["name", "synonym", "abbreviation", "normalized"].index
    )
    assert ("DOID:6000", "name") in {(m.node.id, m.kind) for m in matches}


def test_xref_smiles_and_pickle(kg: KnowledgeGraph) -> None:
    assert [n.id for n in kg.by_xref("UMLS_CUI:C0020461")] == [n.id for n in kg.by_xref("UMLS:C0020461")]
    assert "HP:0002153" in {n.id for n in kg.by_xref("UMLS:C0020461")}
    assert kg.smiles("DrugCentral:1725") == "CN(C)C(=N)NC(N)=N"
    assert kg.smiles("HP:0002153") is None and kg.smiles("NOPE:1") is None
    clone = pickle.loads(pickle.dumps(kg))
    assert clone.fingerprint == kg.fingerprint and clone.node("DOID:6000") == kg.node("DOID:6000")
    assert isinstance(clone.node("DOID:6000"), Node)


def test_open_directory_builds_cache_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    first = KnowledgeGraph.open(FIXTURE)
    assert first.path.parent == tmp_path / "home" / "kg" and first.path.name == f"{first.fingerprint}.sqlite"
    mtime = first.path.stat().st_mtime_ns
    again = KnowledgeGraph.open(FIXTURE)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert KnowledgeGraph.open(first.path).fingerprint == first.fingerprint


# ---------------------------------------------------------------- bad input


def _copy_fixture(tmp_path: Path) -> Path:
    target = tmp_path / "kg"
    shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns("*.py", "*.md"))
    return target


def test_missing_node_column_names_file_line_column(tmp_path) -> None:
    kg_dir = _copy_fixture(tmp_path)
    lines = (kg_dir / "nodes.tsv").read_text().splitlines()
    lines[0] = lines[0].replace("node_type", "kind")
    (kg_dir / "nodes.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(KGFormatError) as err:
        index_openkg(kg_dir, tmp_path / "out.sqlite")
    assert (err.value.path, err.value.line, err.value.column) == (str(kg_dir / "nodes.tsv"), 1, "node_type")
    assert "nodes.tsv, line 1, column 'node_type'" in str(err.value)
    assert not (tmp_path / "out.sqlite").exists()


def test_dangling_edge_names_file_line_column(tmp_path) -> None:
    kg_dir = _copy_fixture(tmp_path)
    with (kg_dir / "edges.tsv").open("a") as fh:
        fh.write("DOID:6000\tdisease_xref\thasDbXref\tICD10CM:Z99.999\tDOID xref\n")
    line = len((kg_dir / "edges.tsv").read_text().splitlines())
    with pytest.raises(KGFormatError, match=rf"edges.tsv, line {line}, column 'y_id': .*ICD10CM:Z99.999"):
        index_openkg(kg_dir, tmp_path / "out.sqlite")


def test_short_row_and_empty_id(tmp_path) -> None:
    kg_dir = _copy_fixture(tmp_path)
    with (kg_dir / "edges.tsv").open("a") as fh:
        fh.write("DOID:6000\tdisease_xref\n")
    with pytest.raises(KGFormatError, match="edges.tsv, line 243, column 'display_relation'"):
        index_openkg(kg_dir, tmp_path / "out.sqlite")
    kg_dir = _copy_fixture(tmp_path / "second")
    with (kg_dir / "nodes.tsv").open("a") as fh:
        fh.write("\tdisease\tnameless\t\t\t\tx\n")
    with pytest.raises(KGFormatError, match="nodes.tsv, line 181, column 'node_id': empty value"):
        index_openkg(kg_dir, tmp_path / "out.sqlite")


def test_not_a_kg_file(tmp_path) -> None:
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(KGFormatError, match="not an ehrflow KG index"):
        KnowledgeGraph.open(bogus)
    with pytest.raises(FileNotFoundError):
        KnowledgeGraph.open(tmp_path / "missing.sqlite")


# ---------------------------------------------------------------- PrimeKG layout

PRIMEKG_HEADER = [
    "relation", "display_relation", "x_index", "x_id", "x_type", "x_name", "x_source",
    "y_index", "y_id", "y_type", "y_name", "y_source",
]  # fmt: skip
PRIMEKG_ROWS = [
    ["indication", "indication", "0", "DB00331", "drug", "Metformin", "DrugBank", "1", "5148", "disease", "type 2 diabetes mellitus", "MONDO"],
    ["indication", "indication", "1", "5148", "disease", "type 2 diabetes mellitus", "MONDO", "0", "DB00331", "drug", "Metformin", "DrugBank"],
    ["disease_phenotype_positive", "phenotype present", "1", "5148", "disease", "type 2 diabetes mellitus", "MONDO", "2", "3074", "effect/phenotype", "Hyperglycemia", "HPO"],
    ["phenotype_phenotype", "parent-child", "2", "3074", "effect/phenotype", "Hyperglycemia", "HPO", "3", "11014", "effect/phenotype", "Abnormal glucose homeostasis", "HPO"],
]  # fmt: skip


def _write_primekg(directory: Path, header: list[str] = PRIMEKG_HEADER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "kg.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(row[: len(header)] for row in PRIMEKG_ROWS)
    with (directory / "disease_features.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["node_index", "mondo_id", "mondo_name", "mondo_definition", "umls_description"])
        writer.writerow(["1", "5148", "type 2 diabetes mellitus", "", "A type of diabetes, with, commas."])
    with gzip.open(directory / "drug_features.csv.gz", "wt", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["node_index", "description", "half_life"])
        writer.writerow(["0", "Metformin is a biguanide.", "6 h"])
    return directory


def test_primekg_import(tmp_path, monkeypatch) -> None:
    primekg = _write_primekg(tmp_path / "primekg")
    kg = KnowledgeGraph.open(import_primekg(primekg, tmp_path / "primekg.sqlite"))
    assert kg.layout == "primekg" and len(kg) == 4 and kg.stats()["edges"] == 4
    disease = kg.node("MONDO:5148")
    assert (disease.type, disease.name, disease.definition) == (
        "disease",
        "type 2 diabetes mellitus",
        "A type of diabetes, with, commas.",
    )
    assert kg.node("DrugBank:DB00331").definition == "Metformin is a biguanide."
    assert kg.node("HPO:3074").definition is None
    # kg.csv lists undirected edges twice; edges() shows each once
    assert [(e.x_id, e.relation, e.y_id) for e in kg.edges("DrugBank:DB00331")] == [
        ("DrugBank:DB00331", "indication", "MONDO:5148")
    ]
    assert [m.node.id for m in kg.lexical_lookup("metformin")] == ["DrugBank:DB00331"]
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    assert KnowledgeGraph.open(primekg).fingerprint == kg.fingerprint


def test_primekg_missing_column(tmp_path) -> None:
    primekg = _write_primekg(tmp_path / "primekg", header=PRIMEKG_HEADER[:-1])
    with pytest.raises(KGFormatError, match="kg.csv, line 1, column 'y_source': missing column"):
        import_primekg(primekg, tmp_path / "out.sqlite")


# ---------------------------------------------------------------- building the shipped default


def test_build_default_kg_from_open_layout(tmp_path) -> None:
    report = build_default_kg(FIXTURE, tmp_path / "out", drop_relations=["phenotype_protein"])
    assert report.nodes == 179 and report.edges == 241 - 20 and report.dropped_edges == {"phenotype_protein": 20}
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"nodes.tsv.gz", "edges.tsv.gz", "manifest.json", "ATTRIBUTION.md"}
    attribution = (tmp_path / "out" / "ATTRIBUTION.md").read_text()
    assert "`phenotype_protein`: 20 edges" in attribution and "CC BY 4.0" in attribution
    kg = KnowledgeGraph(index_openkg(tmp_path / "out", tmp_path / "built.sqlite"))
    assert kg.stats()["relations"].get("phenotype_protein") is None and len(kg) == 179
    again = build_default_kg(FIXTURE, tmp_path / "again", drop_relations=["phenotype_protein"])
    assert (tmp_path / "again" / "edges.tsv.gz").read_bytes() == (tmp_path / "out" / "edges.tsv.gz").read_bytes()
    assert again.nodes == report.nodes


def test_build_default_kg_limits(tmp_path) -> None:
    with pytest.raises(ValueError, match="above the 1,000 limit"):
        build_default_kg(FIXTURE, tmp_path / "out", max_bytes=1000)
    noncommercial = tmp_path / "noncommercial" / "kg"
    shutil.copytree(FIXTURE, noncommercial)
    with pytest.raises(ValueError, match="open sources only"):
        build_default_kg(noncommercial, tmp_path / "out2")
