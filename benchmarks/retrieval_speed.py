"""Retrieval speed: query latency over 100k chunks, indexing throughput against the bare embedder, and the
ONNX Runtime backends against torch (with a quality check on a SciFact subset).

1. Indexing: ``NoteIndex.index_patients`` on MTSamples chunks (real embedder) in chunks/s, against the same
   embedder encoding the same texts alone (sentences/s), in the same run. Goal: ratio >= 0.8.
2. Backends: torch, ehrflow's ONNX Runtime export (``backend="onnx"``), and that export dynamically quantised to
   int8 (``backend="onnx-int8"``, ONNX Runtime's ``quantize_dynamic``), on the same texts; quality = SciFact nDCG@10 on a subset (all test-relevant abstracts
   plus random others) for each backend. sentence-transformers' own ONNX backend needs ``optimum-onnx``, which
   cannot be installed beside transformers 5; the run records the error it gives.
3. Latency: 100k chunks in Chroma whose vectors are *stored* (real vectors of the MTSamples chunks, replicated
   with small noise, so nothing is re-embedded) written through ``NoteIndex.index_patients``; then p50/p95 of
   ``NoteIndex.search`` per mode, corpus-wide and scoped to one patient, over 100 queries.

Run: ``.venv/bin/python benchmarks/retrieval_speed.py`` (about 10 min on 2 cores). Writes
``benchmarks/results/retrieval_speed.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _util import peak_rss_mib, write_result  # noqa: E402
from retrieval_beir import STANDARD_METRICS, dense_rankings, evaluate, load_scifact  # noqa: E402
from retrieval_clinical import SEED, sample_patients  # noqa: E402

from ehrflow.records.model import Note, Patient  # noqa: E402
from ehrflow.retrieval.chroma import chroma_client  # noqa: E402
from ehrflow.retrieval.embedder import Embedder, SentenceTransformerEmbedder  # noqa: E402
from ehrflow.retrieval.notes import NoteIndex, patient_chunks  # noqa: E402

log = logging.getLogger("retrieval_speed")

QUERIES = [
    "history of myocardial infarction",
    "shortness of breath",
    "type 2 diabetes mellitus",
    "chest pain on exertion",
    "hypertension",
    "allergic to penicillin",
    "status post appendectomy",
    "atrial fibrillation on anticoagulation",
    "chronic obstructive pulmonary disease exacerbation",
    "knee pain after a fall",
]


class StoredVectorEmbedder:
    """Returns stored vectors for known texts (no model work) and falls back to a real embedder for queries."""

    def __init__(self, vectors: dict[str, np.ndarray], fallback: Embedder):
        self.vectors = vectors
        self.fallback = fallback
        self.name = fallback.name
        self.dim = fallback.dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        known = sum(t in self.vectors for t in texts)
        if known == len(texts):
            return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        if known:  # a chunk the setup did not foresee: embedding it would time the model, not the index
            raise KeyError(f"{len(texts) - known} of {len(texts)} texts have no stored vector")
        return self.fallback.encode(texts, batch_size)  # queries


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
    }


def timed_encode(embedder: Embedder, texts: list[str]) -> float:
    """Texts per second of one ``encode`` call after a warm-up batch."""
    embedder.encode(texts[:16])
    started = time.perf_counter()
    embedder.encode(texts)
    return len(texts) / (time.perf_counter() - started)


def sentence_transformers_onnx_status(model_path: Path) -> str:
    try:
        from sentence_transformers import SentenceTransformer

        SentenceTransformer(str(model_path), backend="onnx", device="cpu", local_files_only=True)
    except Exception as exc:  # any failure is the finding being recorded
        return f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return "available"


def scifact_subset_quality(embedders: dict[str, Any], extra_docs: int) -> dict[str, Any]:
    corpus, queries, qrels = load_scifact()
    relevant = {d for rel in qrels.values() for d in rel}
    others = sorted(set(corpus) - relevant)
    doc_ids = sorted(relevant) + random.Random(SEED).sample(others, extra_docs)
    query_ids = list(qrels)
    out: dict[str, Any] = {"documents": len(doc_ids), "queries": len(query_ids)}
    reference = None
    for name, embedder in embedders.items():
        started = time.perf_counter()
        doc_vectors = embedder.encode([corpus[d] for d in doc_ids], 32)
        seconds = time.perf_counter() - started
        query_vectors = embedder.encode([queries[q] for q in query_ids], 32)
        rankings = dense_rankings(doc_ids, doc_vectors, query_vectors, 100)
        runs = {q: [d for d, _ in r] for q, r in zip(query_ids, rankings, strict=True)}
        metrics = evaluate(runs, qrels, STANDARD_METRICS)
        entry = {
            "ndcg@10": metrics["ndcg@10"],
            "recall@100": metrics["recall@100"],
            "docs_per_s": round(len(doc_ids) / seconds, 1),
        }
        if reference is None:
            reference = doc_vectors
        else:
            entry["mean_cosine_to_torch"] = round(float(np.mean(np.sum(reference * doc_vectors, axis=1))), 5)
        out[name] = entry
    return out


def latency_over_stored_vectors(
    texts: list[str], vectors: np.ndarray, fallback: Embedder, total: int, per_patient: int, home: Path
) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    stored: dict[str, np.ndarray] = {}
    patients: list[Patient] = []
    copies = -(-total // len(texts))
    n = 0
    source: dict[tuple[str, str], int] = {}  # (patient id, note id) -> the text it copies
    for copy in range(copies):
        for i, text in enumerate(texts):
            if n >= total:
                break
            patient_index = n // per_patient
            if patient_index == len(patients):
                patients.append(Patient(id=f"synthetic-{patient_index:06d}", source="bench"))
            note_id = f"n{n % per_patient}"
            patients[-1].notes.append(Note(id=note_id, text=f"{text} copy{copy}"))
            source[(patients[-1].id, note_id)] = i
            n += 1
    for patient in patients:  # key the vectors by the chunk texts the index will cut (a note may split)
        for chunk in patient_chunks(patient):
            noisy = vectors[source[(patient.id, str(chunk.metadata["note_id"]))]]
            noisy = noisy + rng.normal(0, 0.02, vectors.shape[1]).astype(np.float32)
            stored[chunk.text] = noisy / np.linalg.norm(noisy)
    embedder = StoredVectorEmbedder(stored, fallback)
    index = NoteIndex(embedder, chroma_client(home / "chroma"), collection="speed", bm25_dir=home / "bm25")
    started = time.perf_counter()
    chunks = index.index_patients(patients)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    index.corpus_bm25()
    bm25_build_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "chunks": index.count(),
        "patients": len(patients),
        "vectors": f"real MTSamples chunk vectors x{copies} with N(0, 0.02) noise, re-normalised",
        "write_chunks_per_s_without_embedding": round(chunks / write_s, 1),
        "bm25_corpus_build_s": round(bm25_build_s, 1),
    }
    queries = [f"{q}" for q in QUERIES] * 10
    fallback.encode(queries[:10])
    scope_rng = random.Random(SEED)
    for mode in ("dense", "bm25", "hybrid"):
        for scope in ("corpus", "patient"):
            samples = []
            for query in queries:
                patient_id = scope_rng.choice(patients).id if scope == "patient" else None
                t0 = time.perf_counter()
                index.search(query, patient_id=patient_id, k=10, mode=mode)
                samples.append(1000 * (time.perf_counter() - t0))
            result[f"{mode}_{scope}"] = percentiles(samples)
    samples = []
    for query in queries:
        t0 = time.perf_counter()
        index.search(query, k=10, mode="hybrid", expand=True)
        samples.append(1000 * (time.perf_counter() - t0))
    result["hybrid_expand_corpus"] = percentiles(samples[1:])  # the first call opens the default KG
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=500, help="MTSamples chunks for the throughput parts")
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--scifact-extra-docs", type=int, default=700)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()

    chunks = [c for p in sample_patients(300, 0, SEED)[0] for c in patient_chunks(p)]
    chunks = random.Random(SEED).sample(chunks, min(args.texts, len(chunks)))
    texts = [c.text for c in chunks]
    torch_embedder = SentenceTransformerEmbedder()
    payload: dict[str, Any] = {
        "texts": len(texts),
        "mean_words_per_text": round(np.mean([len(t.split()) for t in texts]), 1),
    }

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["EHRFLOW_HOME"] = str(home)
        bare = timed_encode(torch_embedder, texts)
        index = NoteIndex(torch_embedder, chroma_client(home / "chroma-ratio"), collection="ratio")
        patients = [Patient(id=f"p{i}", source="bench", notes=[Note(id="n", text=t)]) for i, t in enumerate(texts)]
        t0 = time.perf_counter()
        written = index.index_patients(patients)
        indexing = written / (time.perf_counter() - t0)
        payload["indexing"] = {
            "bare_embedder_sentences_per_s": round(bare, 1),
            "note_index_chunks_per_s": round(indexing, 1),
            "ratio": round(indexing / bare, 3),
            "goal": ">= 0.8",
        }
        log.info("indexing %s", payload["indexing"])
        save(payload, args, complete=False)

        onnx_embedder = SentenceTransformerEmbedder(backend="onnx", onnx_cache=home / "onnx")
        int8 = SentenceTransformerEmbedder(backend="onnx-int8", onnx_cache=home / "onnx")
        speeds = {"torch": bare, "onnx": timed_encode(onnx_embedder, texts), "onnx_int8": timed_encode(int8, texts)}
        payload["backends"] = {
            "sentences_per_s": {k: round(v, 1) for k, v in speeds.items()},
            "speedup_vs_torch": {k: round(v / bare, 2) for k, v in speeds.items()},
            "goal": "3x torch",
            "sentence_transformers_onnx_backend": sentence_transformers_onnx_status(torch_embedder.model_path),
            "scifact_subset_quality": scifact_subset_quality(
                {"torch": torch_embedder, "onnx": onnx_embedder, "onnx_int8": int8}, args.scifact_extra_docs
            ),
        }
        log.info("backends %s", payload["backends"]["speedup_vs_torch"])
        save(payload, args, complete=False)

        vectors = torch_embedder.encode(texts)
        payload["latency"] = latency_over_stored_vectors(texts, vectors, torch_embedder, args.chunks, 40, home)
        log.info("latency %s", payload["latency"])

    payload["wall_s"] = round(time.perf_counter() - started, 1)
    payload["digest_of_texts"] = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    print(json.dumps(payload, indent=2))
    save(payload, args, complete=True)


def save(payload: dict[str, Any], args: argparse.Namespace, complete: bool) -> None:
    """Written after every stage, so a run cut short keeps the stages it finished."""
    if not args.no_write:
        payload["complete"] = complete
        payload["peak_rss_mib"] = round(peak_rss_mib(), 1)
        write_result("retrieval_speed", payload, packages=("bm25s", "chromadb", "onnxruntime", "sentence-transformers"))


if __name__ == "__main__":
    main()
