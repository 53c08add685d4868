"""BEIR SciFact with ehrflow's retrieval pieces: BM25, dense and hybrid (RRF) nDCG@10 and Recall@100 in one run.

The harness must first reproduce the published BM25 figure (Anserini flat 0.6789 / BEIR paper multifield 0.665,
so nDCG@10 in 0.665-0.679); only when that check passes are the dense and hybrid numbers computed and recorded.
Dense retrieval here is exact (brute-force cosine over all abstracts with the same embedder ``NoteIndex`` uses),
so it measures the embedder, not Chroma's HNSW approximation; hybrid fuses the top 100 of each with RRF (k=60),
exactly as ``NoteIndex.search(mode="hybrid")`` does.

Run: ``.venv/bin/python benchmarks/retrieval_beir.py`` (about 6-15 min on 2 cores, most of it embedding 5,183
abstracts; the vectors are cached under ``$EHRFLOW_HOME/bench``). Writes ``benchmarks/results/retrieval_beir.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _util import peak_rss_mib, write_result  # noqa: E402

from ehrflow.retrieval.bm25 import DEFAULT_B, DEFAULT_K1, BM25Index  # noqa: E402
from ehrflow.retrieval.embedder import Embedder, SentenceTransformerEmbedder  # noqa: E402
from ehrflow.retrieval.hybrid import RRF_K, reciprocal_rank_fusion  # noqa: E402

log = logging.getLogger("retrieval_beir")

SCIFACT = Path(os.environ.get("EHRFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SCIFACT = SCIFACT / "retrieval" / "scifact"
PUBLISHED_BM25_RANGE = (0.665, 0.679)
PUBLISHED = {
    "bm25_anserini_flat": {"ndcg@10": 0.6789, "recall@100": 0.9253},
    "bm25_beir_paper_multifield": {"ndcg@10": 0.6647, "recall@100": 0.9076},
    "bge_base_en_v1.5": {"ndcg@10": 0.7408, "recall@100": 0.9667},
}
DEPTH = 100

Ranking = list[tuple[str, float]]
Qrels = dict[str, dict[str, int]]


# ---------------------------------------------------------------------- IR metrics (standard, pytrec_eval-like)


def ndcg_at(ranked: Sequence[str], relevant: dict[str, int], k: int = 10) -> float:
    """Standard nDCG@k with graded gains and the ideal DCG over *all* judged-relevant documents."""
    dcg = sum(relevant.get(doc, 0) / np.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def recall_at(ranked: Sequence[str], relevant: dict[str, int], k: int = 100) -> float:
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr(ranked: Sequence[str], relevant: dict[str, int]) -> float:
    for i, doc in enumerate(ranked):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def bootstrap_mean(values: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean with a 95% percentile bootstrap interval over queries."""
    array = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), (n_resamples, len(array)))].mean(axis=1)
    return {
        "value": round(float(array.mean()), 4),
        "ci95_low": round(float(np.percentile(means, 2.5)), 4),
        "ci95_high": round(float(np.percentile(means, 97.5)), 4),
    }


def evaluate(runs: dict[str, list[str]], qrels: Qrels, metrics: dict[str, Callable[..., float]]) -> dict[str, Any]:
    """Mean (with bootstrap CI) of each metric over the queries in ``qrels``; unretrieved queries score 0."""
    per_query = {name: [fn(runs.get(q, []), rel) for q, rel in qrels.items()] for name, fn in metrics.items()}
    return {name: bootstrap_mean(values) for name, values in per_query.items()}


STANDARD_METRICS: dict[str, Callable[..., float]] = {
    "ndcg@10": lambda r, rel: ndcg_at(r, rel, 10),
    "recall@100": lambda r, rel: recall_at(r, rel, 100),
    "mrr": mrr,
}


# ---------------------------------------------------------------------- retrieval


def dense_rankings(doc_ids: Sequence[str], doc_vectors: np.ndarray, query_vectors: np.ndarray, depth: int) -> list:
    """Exact top-``depth`` by cosine (vectors are L2-normalised)."""
    scores = query_vectors @ doc_vectors.T
    out = []
    for row in scores:
        top = np.argpartition(-row, min(depth, len(row) - 1))[:depth]
        top = top[np.argsort(-row[top], kind="stable")]
        out.append([(doc_ids[i], float(row[i])) for i in top])
    return out


def fuse(dense: Ranking, bm25: Ranking, k: int = DEPTH) -> list[str]:
    return [doc for doc, _ in reciprocal_rank_fusion([[d for d, _ in dense], [d for d, _ in bm25]], k=RRF_K)[:k]]


def cached_vectors(
    embedder: Embedder, key: str, texts: Sequence[str], batch_size: int = 32
) -> tuple[np.ndarray, float]:
    """Embeds ``texts`` once per (embedder, key); returns (vectors, seconds spent embedding now, 0 if cached)."""
    cache = Path(os.environ.get("EHRFLOW_HOME", ".ehrflow")) / "bench" / f"{key}.{embedder.name}.npy"
    if cache.is_file():
        vectors = np.load(cache)
        if vectors.shape == (len(texts), embedder.dim):
            return vectors, 0.0
    started = time.perf_counter()
    vectors = embedder.encode(list(texts), batch_size=batch_size)
    seconds = time.perf_counter() - started
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors, seconds


def load_scifact(root: Path = SCIFACT) -> tuple[dict[str, str], dict[str, str], Qrels]:
    """(corpus id -> "title text", query id -> text, test qrels)."""
    corpus = {}
    with (root / "corpus.jsonl").open() as fh:
        for line in fh:
            doc = json.loads(line)
            corpus[doc["_id"]] = f"{doc.get('title', '')} {doc['text']}".strip()
    queries = {q["_id"]: q["text"] for q in map(json.loads, (root / "queries.jsonl").open())}
    qrels: Qrels = {}
    with (root / "qrels" / "test.tsv").open() as fh:
        next(fh)
        for line in fh:
            query_id, doc_id, score = line.split("\t")
            qrels.setdefault(query_id, {})[doc_id] = int(score)
    return corpus, queries, qrels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="embedder backend")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    corpus, queries, qrels = load_scifact()
    doc_ids = list(corpus)
    test_queries = {q: queries[q] for q in qrels}
    log.info("SciFact: %d abstracts, %d test queries, %d qrels", len(corpus), len(qrels), sum(map(len, qrels.values())))

    started = time.perf_counter()
    bm25 = BM25Index.build(doc_ids, [corpus[d] for d in doc_ids])
    bm25_build_s = time.perf_counter() - started
    bm25_runs = {q: bm25.search(text, DEPTH) for q, text in test_queries.items()}
    bm25_metrics = evaluate({q: [d for d, _ in r] for q, r in bm25_runs.items()}, qrels, STANDARD_METRICS)
    measured = bm25_metrics["ndcg@10"]["value"]
    low, high = PUBLISHED_BM25_RANGE
    check = {
        "published_range_ndcg@10": [low, high],
        "published": PUBLISHED,
        "measured_ndcg@10": measured,
        "measured_recall@100": bm25_metrics["recall@100"]["value"],
        "passed": bool(low <= measured <= high),
        "settings": {"k1": DEFAULT_K1, "b": DEFAULT_B, "method": "bm25s lucene", "analyser": "ehrflow.retrieval.bm25"},
    }
    log.info("BM25 reproduction check: nDCG@10 %.4f in [%.3f, %.3f]: %s", measured, low, high, check["passed"])
    payload: dict[str, Any] = {
        "dataset": {"name": "BEIR SciFact (test)", "documents": len(corpus), "queries": len(qrels)},
        "bm25_reproduction_check": check,
        "systems": {"bm25": {**bm25_metrics, "index_build_s": round(bm25_build_s, 2)}},
    }
    if not check["passed"]:
        payload["note"] = "BM25 did not reproduce the published figure: dense and hybrid were not run"
    else:
        embedder = SentenceTransformerEmbedder(backend=args.backend)
        doc_vectors, embed_s = cached_vectors(embedder, "scifact_corpus", [corpus[d] for d in doc_ids])
        query_ids = list(test_queries)
        query_vectors = embedder.encode([test_queries[q] for q in query_ids])
        dense = dict(zip(query_ids, dense_rankings(doc_ids, doc_vectors, query_vectors, DEPTH), strict=True))
        dense_runs = {q: [d for d, _ in r] for q, r in dense.items()}
        hybrid_runs = {q: fuse(dense[q], bm25_runs[q]) for q in query_ids}
        payload["systems"]["dense"] = {
            **evaluate(dense_runs, qrels, STANDARD_METRICS),
            "embedder": embedder.name,
            "backend": args.backend,
            "corpus_embedding_s": round(embed_s, 1) if embed_s else "cached",
        }
        payload["systems"]["hybrid_rrf"] = {**evaluate(hybrid_runs, qrels, STANDARD_METRICS), "rrf_k": RRF_K}
    payload["peak_rss_mib"] = round(peak_rss_mib(), 1)
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(payload, indent=2))
    if not args.no_write:
        path = write_result("retrieval_beir", payload, packages=("bm25s", "PyStemmer", "sentence-transformers"))
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
