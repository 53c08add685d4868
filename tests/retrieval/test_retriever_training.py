"""Retriever training: pair mining on real notes, LLM entities grounded or dropped, a few Ray Train steps, and the
exported model loaded by ``SentenceTransformerEmbedder`` / ``NoteIndex`` for search."""

from __future__ import annotations

import json

import numpy as np
import torch

from ehrflow.llm import FakeLLM
from ehrflow.retrieval import NoteIndex, SentenceTransformerEmbedder, chroma_client
from ehrflow.retrieval.notes import patient_chunks
from ehrflow.training.ray_utils import RayTrainConfig
from ehrflow.training.retriever import (
    PairMiner,
    PairOptions,
    RetrieverDataConfig,
    RetrieverOptim,
    RetrieverTrainConfig,
    in_batch_loss,
    train_retriever,
)

from .test_notes import mtsamples_patients
from .test_search import kg  # noqa: F401  - the tiny MI KG fixture

MI_NOTE = "Cardiology follow-up. Status post heart attack in 2015, treated with a stent. No chest pain since."


def test_stage_one_pairs_name_and_parent_of_a_kg_match(kg):  # noqa: F811
    miner = PairMiner(kg, PairOptions(llm_stage=False))
    found = miner.knowledge_queries(MI_NOTE)
    queries = {(q, source) for q, source, _ in found}
    assert ("myocardial infarction", "name") in queries  # "heart attack" is a synonym of DOID:5844
    assert ("coronary artery disease", "parent") in queries
    # The tiny KG's HPO term hangs under no "Phenotypic abnormality": a modifier, so it gives no pairs.
    assert "HP:0001658" not in {node_id for _, _, node_id in found}


def test_stage_two_keeps_only_llm_entities_that_ground_to_the_kg(kg):  # noqa: F811
    llm = FakeLLM(['{"entities": ["acute myocardial infarction", "glorbitis", "Heart attack"]}'])
    miner = PairMiner(kg, PairOptions(llm_max_chunks=1), llm=llm)
    pairs, report = miner.mine([("p/n#0", MI_NOTE)])
    assert report.llm_chunks == 1 and report.llm_entities == 3
    assert report.llm_dropped == 1  # "glorbitis" names no KG node
    assert report.llm_already_known == 1  # "Heart attack" grounds to the node stage 1 already paired
    assert [p.query for p in pairs if p.source == "llm"] == ["acute myocardial infarction"]
    assert report.pairs == len(pairs)


def test_in_batch_loss_masks_items_sharing_the_chunk():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # the second query's chunk equals the first's
    shared = in_batch_loss(q, d, ["c1", "c1"], ["a", "b"], scale=20.0)
    distinct = in_batch_loss(q, d, ["c1", "c2"], ["a", "b"], scale=20.0)
    assert shared.item() < 1e-3  # each row has only its own positive left
    assert distinct.item() > shared.item()


def test_train_retriever_few_steps_through_ray_then_search(ray_session, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    patients = mtsamples_patients(shared_data, 6)
    config = RetrieverTrainConfig(
        output_dir=tmp_path / "dr-ehr-mini",
        data=RetrieverDataConfig(max_chunks=24),
        pairs=PairOptions(llm_max_chunks=2),
        train=RetrieverOptim(batch_size=4, max_steps=2, lr=5e-5, max_seq_length=64),
        ray=RayTrainConfig(name="retriever-test", storage_path=tmp_path / "runs", num_workers=1),
    )
    llm = FakeLLM(['{"entities": ["hypertension", "not a real disease"]}', '{"entities": []}'])
    result = train_retriever(config, patients, llm=llm)

    assert result.steps == 2 and len(result.train_loss) == 1 and np.isfinite(result.train_loss[0])
    assert result.pair_report.llm_chunks == 2 and result.pair_report.llm_dropped >= 1
    assert result.pair_report.pairs_by_source.get("name", 0) > 0
    saved = json.loads((result.model_dir / "ehrflow_retriever.json").read_text())
    assert saved["pair_report"]["pairs_by_source"] == result.pair_report.pairs_by_source

    tuned = SentenceTransformerEmbedder(result.model_dir)
    base = SentenceTransformerEmbedder()
    probe = ["history of hypertension treated with lisinopril"]
    assert tuned.name.startswith("dr-ehr-mini-")  # directory name + weights hash
    assert not np.allclose(tuned.encode(probe), base.encode(probe), atol=1e-4)  # the weights did change

    index = NoteIndex(tuned, chroma_client(tmp_path / "chroma"), collection="tuned")
    chunks = [c for p in patients[:3] for c in patient_chunks(p)]
    assert index.index_patients(patients[:3]) == len(chunks)
    target = chunks[len(chunks) // 2]
    hits = index.search(target.text[:200], k=3, mode="dense")
    assert hits[0].chunk_id == target.id
