"""The full open KG in ``../shared/data/kg/openkg`` against the KG shipped in the package.

The shipped KG is built from the shared open KG with nothing dropped, so the fast test compares the two file by file
(counts, and every node's type, name and definition) instead of re-indexing 190k nodes; the slow test opens the shared
directory itself through ``KnowledgeGraph.open`` (2.5 minutes to index on the loaded 2-core development box).
"""

from __future__ import annotations

import gzip
import json

import pytest

from ehrflow.knowledge import KnowledgeGraph
from ehrflow.knowledge.context import node_context
from ehrflow.knowledge.graph import default_kg_dir


def read_nodes(path) -> dict[str, tuple[str, str, str]]:
    """node id -> (type, name, definition) of an open-layout nodes table; the build strips stray spaces."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header = next(fh).rstrip("\n").split("\t")
        assert header[:4] == ["node_id", "node_type", "node_name", "definition"], f"{path}: header {header}"
        return {
            row[0]: (row[1], row[2].strip(), row[3].strip())
            for row in (line.rstrip("\n").split("\t", 4) for line in fh)
        }


def test_shipped_kg_is_the_full_shared_open_kg(shared_data) -> None:
    shared = json.loads((shared_data / "kg" / "openkg" / "stats.json").read_text())
    stats = KnowledgeGraph.default().stats()
    for key in ("nodes", "edges", "node_types", "relations"):
        assert stats[key] == shared[key], key
    shared_nodes = read_nodes(shared_data / "kg" / "openkg" / "nodes.tsv.gz")
    shipped_nodes = read_nodes(default_kg_dir() / "nodes.tsv.gz")
    assert shipped_nodes == shared_nodes


@pytest.mark.slow
def test_open_the_shared_open_kg_directory(shared_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path))  # the index is cached under the test's tmp dir
    kg = KnowledgeGraph.open(shared_data / "kg" / "openkg")
    shared = json.loads((shared_data / "kg" / "openkg" / "stats.json").read_text())
    assert len(kg) == shared["nodes"] and kg.stats()["edges"] == shared["edges"]
    assert [m.node.id for m in kg.lexical_lookup("hyperkalemia", types=["effect/phenotype"])] == ["HP:0002153"]
    [context] = node_context(kg, ["HP:0002153"], max_relations=2)
    assert context.relations[0].other_id == "HP:0011042"
