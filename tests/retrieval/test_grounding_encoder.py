"""Grounding encoder: synonym pairs from the KG's dense scope, a few Ray Train steps, the export used for grounding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ehrflow.knowledge import KnowledgeGraph
from ehrflow.knowledge.build import index_openkg
from ehrflow.knowledge.text import casefold_key
from ehrflow.retrieval import EntityIndex, SentenceTransformerEmbedder, chroma_client
from ehrflow.retrieval.entity_index import DEFAULT_ID_PREFIXES, DEFAULT_NODE_TYPES, scope_labels
from ehrflow.training.grounding_encoder import (
    GroundingEncoderConfig,
    group_similar_nodes,
    synonym_pairs,
    train_grounding_encoder,
)
from ehrflow.training.ray_utils import RayTrainConfig
from ehrflow.training.retriever import MAX_QUERY_CHARS, RetrieverOptim, batch_order

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kg_tiny"


def _config(tmp_path: Path, name: str, epochs: int, num_workers: int) -> GroundingEncoderConfig:
    return GroundingEncoderConfig(
        output_dir=tmp_path / name,
        train=RetrieverOptim(epochs=epochs, batch_size=16, lr=1e-4, max_seq_length=32),
        ray=RayTrainConfig(name=name, storage_path=tmp_path / "runs", num_workers=num_workers),
    )


@pytest.fixture(scope="module")
def kg(tmp_path_factory) -> KnowledgeGraph:
    return KnowledgeGraph(index_openkg(FIXTURE, tmp_path_factory.mktemp("kg") / "tiny.sqlite"))


def test_synonym_pairs_join_labels_of_one_node_within_the_scope(kg):
    labels = scope_labels(kg, DEFAULT_NODE_TYPES, DEFAULT_ID_PREFIXES)
    node_labels: dict[str, set[str]] = {}
    for text, meta in labels.values():
        node_labels.setdefault(meta["node_id"], set()).add(text)
    pairs = synonym_pairs(labels, max_pairs_per_node=2)

    assert pairs, "the fixture's DOID/HPO/drug nodes have synonyms"
    for pair in pairs:
        assert pair.chunk_id == pair.node_id and pair.node_id.startswith(DEFAULT_ID_PREFIXES)
        assert {pair.query, pair.text} <= node_labels[pair.node_id]
        assert casefold_key(pair.query) != casefold_key(pair.text)
        assert max(len(pair.query), len(pair.text)) <= MAX_QUERY_CHARS
    per_node = {n: sum(p.node_id == n for p in pairs) for n in {p.node_id for p in pairs}}
    assert max(per_node.values()) <= 2
    # every node with two or more short labels gives pairs; ICD-10 codes (out of the dense scope) give none
    expected = {n for n, texts in node_labels.items() if sum(len(t) <= MAX_QUERY_CHARS for t in texts) >= 2}
    assert set(per_node) == expected
    assert synonym_pairs(labels, max_pairs_per_node=2) == pairs  # seeded


def test_grouped_batches_put_nodes_with_similar_names_together(kg, tmp_path):
    pairs = synonym_pairs(scope_labels(kg, DEFAULT_NODE_TYPES, DEFAULT_ID_PREFIXES), max_pairs_per_node=4)
    grouped = group_similar_nodes(pairs, kg, GroundingEncoderConfig(output_dir=tmp_path / "unused", group_nodes=3))

    assert [p.model_copy(update={"group": None}) for p in grouped] == pairs  # only the tag is added
    group_of = {p.node_id: p.group for p in grouped}
    assert all(p.group == group_of[p.node_id] for p in grouped) and len(set(group_of.values())) > 2
    # the groups follow the base encoder's geometry: names within a group are closer than names across groups
    node_ids = sorted(group_of)
    vectors = SentenceTransformerEmbedder().encode([kg.get(n).name for n in node_ids])
    cosine = vectors @ vectors.T
    same = np.array([[group_of[a] == group_of[b] for b in node_ids] for a in node_ids]) & ~np.eye(
        len(node_ids), dtype=bool
    )
    different = np.array([[group_of[a] != group_of[b] for b in node_ids] for a in node_ids])
    assert cosine[same].mean() > cosine[different].mean() + 0.05

    # an epoch's order runs group after group, so a batch holds whole groups; without groups it is a plain shuffle
    order = batch_order([p.model_dump() for p in grouped], random.Random(0))
    assert sorted(order) == list(range(len(grouped)))
    sequence = [grouped[i].group for i in order]
    runs = [g for k, g in enumerate(sequence) if k == 0 or sequence[k - 1] != g]
    assert len(runs) == len(set(sequence))
    plain = batch_order([p.model_dump() for p in pairs], random.Random(0))
    assert plain == random.Random(0).sample(range(len(pairs)), len(pairs))


def test_train_grounding_encoder_pulls_synonyms_together_and_grounds(ray_session, kg, tmp_path, monkeypatch):
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    config = _config(tmp_path, "grounding-mini", epochs=3, num_workers=1)
    result = train_grounding_encoder(config, kg=kg)

    assert result.pairs > 16 and result.nodes > 8
    assert len(result.train_loss) == 3 and all(np.isfinite(result.train_loss))
    assert json.loads((result.model_dir / "ehrflow_retriever.json").read_text())["pairs"] == result.pairs

    pairs = synonym_pairs(scope_labels(kg, config.node_types, config.id_prefixes), config.max_pairs_per_node)
    queries, targets = [p.query for p in pairs], [p.text for p in pairs]

    def pair_cosine(embedder: SentenceTransformerEmbedder) -> float:
        q, t = embedder.encode(queries), embedder.encode(targets)
        return float(np.mean(np.sum(q * t, axis=1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(t, axis=1))))

    tuned = SentenceTransformerEmbedder(result.model_dir)
    assert pair_cosine(tuned) > pair_cosine(SentenceTransformerEmbedder()) + 0.02

    index = EntityIndex(kg, tuned, chroma_client(tmp_path / "chroma"), collection="tuned")
    index.build(progress=False)
    query, node_id = pairs[0].query, pairs[0].node_id
    assert index.ground([query], mode="dense", top_k=3, threshold=-1.0)[0][0].node.id == node_id

    with pytest.raises(FileExistsError, match="already there"):
        train_grounding_encoder(config.model_copy(update={"ray": config.ray.model_copy(update={"name": "again"})}), kg)


def test_two_workers_train_the_grounding_encoder(ray_session, kg, tmp_path, monkeypatch):
    """Two Ray Train workers: the model runs twice per step and its pooler gets no gradient (plain DDP failed here)."""
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    config = _config(tmp_path, "grounding-two", epochs=1, num_workers=2)
    result = train_grounding_encoder(config, kg=kg)

    assert len(result.train_loss) == 1 and np.isfinite(result.train_loss[0])
    pairs_per_worker = -(-result.pairs // 2)
    assert result.steps == -(-pairs_per_worker // 16)  # each worker stepped through its half of the pairs
    SentenceTransformerEmbedder(result.model_dir).encode(["fever"])


def test_local_mode_keeps_the_whole_loss_curve(ray_session, kg, tmp_path, monkeypatch):
    """Ray Train's local mode (0 workers, as the benchmarks run) keeps no metrics history; the checkpoint does."""
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    config = _config(tmp_path, "grounding-local", epochs=2, num_workers=0).model_copy(update={"group_nodes": 4})
    result = train_grounding_encoder(config, kg=kg)  # grouped batches, so that path trains end to end too

    assert len(result.train_loss) == 2 and all(np.isfinite(result.train_loss))
    assert json.loads((result.model_dir / "ehrflow_retriever.json").read_text())["train_loss"] == result.train_loss
