"""A CliniQ-style entity retrieval benchmark on open data: MTSamples chunks, ICD-10-CM entity queries.

Corpus: a fixed sample of de-duplicated MTSamples notes (each one a note-only patient, loaded with the notes
loader), chunked and indexed by ``NoteIndex`` exactly as in production. Queries: ICD-10-CM category titles
(parenthesised non-essential modifiers dropped). A chunk is relevant to a query when it mentions the entity, and
the match type is the first that applies, in this order:

- ``string``: the title itself (with or without its parenthesised modifiers);
- ``synonym``: an ICD-10-CM inclusion term or "includes" note of the category;
- ``abbreviation``: an upper-case short form whose dominant sense in the clinical abbreviation inventories
  (Vanderbilt, Stetson, Columbia, Wikipedia lists of the Meta-Inventory) is the title or one of its synonyms;
- ``hyponym``: the title or an inclusion term of a descendant code (the ICD-10-CM hierarchy).

Matching is on ``ehrflow.knowledge.text.normalize`` word sequences; negated and family-history mentions count
(as in CliniQ). ``LABELS`` (also written into the JSON and ``docs/retrieval.md``) says what that favours.
Systems: BM25, dense, hybrid (RRF), hybrid + KG query expansion, BM25 + KG expansion, and the DR.EHR-style
fine-tuned retriever (``ehrflow.training.retriever``, trained here on MTSamples notes disjoint from the evaluation
sample, a bounded number of steps) dense and hybrid, all through ``NoteIndex.search`` over all chunks (CliniQ's
multi-patient setting). Metrics: MRR, nDCG@10, Recall@100, overall and per match type.

Run: ``.venv/bin/python benchmarks/retrieval_clinical.py`` (bounded to about 10 min on 2 busy cores by
subsampling: ``--notes``, ``--queries``, ``--train-steps``, ``--llm-chunks``). Writes
``benchmarks/results/retrieval_clinical.json``.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import logging
import os
import random
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _util import peak_rss_mib, write_result  # noqa: E402
from retrieval_beir import STANDARD_METRICS, evaluate  # noqa: E402

from ehrflow.knowledge.text import normalize  # noqa: E402
from ehrflow.records.errors import ErrorSink  # noqa: E402
from ehrflow.records.loaders.notes import NotesLoader  # noqa: E402
from ehrflow.records.model import Patient  # noqa: E402
from ehrflow.retrieval.chroma import chroma_client  # noqa: E402
from ehrflow.retrieval.embedder import SentenceTransformerEmbedder  # noqa: E402
from ehrflow.retrieval.notes import NoteIndex, patient_chunks  # noqa: E402
from ehrflow.training.ray_utils import RayTrainConfig  # noqa: E402
from ehrflow.training.retriever import (  # noqa: E402
    PairOptions,
    RetrieverDataConfig,
    RetrieverOptim,
    RetrieverTrainConfig,
    train_retriever,
)

log = logging.getLogger("retrieval_clinical")

DATA = Path(os.environ.get("EHRFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MTSAMPLES = DATA / "ehr" / "mtsamples" / "mtsamples_2018-10-14.csv.gz"
ONTOLOGY = DATA / "retrieval" / "ontology"
MATCH_TYPES = ("string", "synonym", "abbreviation", "hyponym")
MAX_SURFACE_WORDS = 6
SEED = 13
_PARENS = re.compile(r"\s*[(\[][^()\[\]]*[)\]]")
_SKIP_TITLE = re.compile(r"^unspecified\b|elsewhere|\bcomplicating\b|\bin diseases\b|\bencounter\b", re.I)
_OTHER_PREFIX = re.compile(r"^other (and unspecified )?", re.I)
_UNSPECIFIED_SUFFIX = re.compile(r",? (unspecified|without complications?)$", re.I)
QUALIFIERS = ("acute", "chronic", "old", "essential", "primary")
"""Leading words an abbreviation's sense may leave out: "MI" names "acute myocardial infarction" too."""
_TOKEN = re.compile(r"\S+")
LABELS = (
    "Silver labels from string matching, not human judgement. A chunk is relevant to an ICD-10-CM category query "
    "when its normalised words contain the title, an ICD-10-CM inclusion term, a child code's title or inclusion "
    "term, or an upper-case abbreviation whose dominant sense (>= 60% of its weight across the Vanderbilt, "
    "Stetson, Columbia and Wikipedia inventories) is one of those. Negated and family-history mentions count. "
    "What this favours: lexical systems (BM25 finds exactly the strings that made the labels; a chunk that only "
    "implies the entity, e.g. 's/p stent' for coronary disease, is never labelled relevant, so the semantic "
    "matches dense retrieval is for earn nothing and count against it as false positives); KG expansion whose "
    "vocabulary overlaps ICD-10-CM (its synonyms and children can hit the same strings). It disfavours dense "
    "retrieval and the fine-tuned retriever, whose training pairs come from another vocabulary (the KG's "
    "DOID/HPO/drug names) and include LLM-implied entities that these labels cannot reward."
)


# ---------------------------------------------------------------------- vocabularies


def surface_forms(text: str) -> set[str]:
    """Normalised forms of a label: as written and without parenthesised modifiers; long ones are dropped."""
    forms = {normalize(text), normalize(_PARENS.sub("", text))}
    return {f for f in forms if f and len(f.split()) <= MAX_SURFACE_WORDS and len(f) >= 4}


def load_icd10(path: Path) -> dict[str, dict[str, Any]]:
    with path.open() as fh:
        return {row["code"]: row for row in map(json.loads, fh)}


def load_abbreviations(root: Path) -> dict[str, set[str]]:
    """Normalised long form -> upper-case short forms whose dominant sense it is (ambiguous short forms dropped)."""
    senses: dict[str, Counter[str]] = defaultdict(Counter)  # short -> Counter(normalised long form -> weight)
    for name in ("vanderbilt_clinic_notes.tsv", "vanderbilt_discharge_sums.tsv"):
        with (root / name).open(encoding="utf-8", errors="replace") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                senses[row["abbreviation"].strip().upper()][normalize(row["sense"])] += float(row["frequency"] or 0)
    with (root / "stetson_sense_distribution_448.tsv").open(encoding="utf-8", errors="replace") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if len(row) >= 3:
                senses[row[0].strip().upper()][normalize(row[1])] += float(row[2] or 0)
    with (root / "columbia_obgyn.txt").open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            short, _, long_form = line.strip().partition(" ")
            if short and long_form:
                senses[short.upper()][normalize(long_form)] += 1.0
    with (root / "wikipedia_abbreviation_database.csv").open(encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            senses[row["abr"].strip().upper()][normalize(row["long_form"])] += 1.0
    by_long: dict[str, set[str]] = defaultdict(set)
    for short, counter in senses.items():
        if not re.fullmatch(r"[A-Z][A-Z0-9]{1,7}", short):
            continue
        total = sum(counter.values())
        best, weight = counter.most_common(1)[0]
        if best and total > 0 and weight / total >= 0.6:
            by_long[best].add(short)
    return by_long


def query_text(title: str) -> str:
    """The title as a clinician would search it: no parenthesised modifiers, no "Other" / ", unspecified"."""
    text = _PARENS.sub("", title).strip()
    text = _UNSPECIFIED_SUFFIX.sub("", _OTHER_PREFIX.sub("", text)).strip()
    return text[:1].upper() + text[1:]


def _descendants(sorted_codes: list[str], prefix: str) -> Iterable[str]:
    """Codes below ``prefix`` in the hierarchy: a contiguous run of the sorted code list."""
    for code in sorted_codes[bisect.bisect_left(sorted_codes, prefix) :]:
        if not code.startswith(prefix):
            return
        if code != prefix:
            yield code


def entity_vocabulary(icd: dict[str, dict[str, Any]], abbreviations: dict[str, set[str]]) -> dict[str, Any]:
    """Per ICD-10-CM code (category or subcategory, one per distinct query text): query and surface forms by type."""
    codes = sorted(icd)
    entities: dict[str, Any] = {}
    seen_queries: set[str] = set()
    for code in sorted(codes, key=lambda c: (len(c), c)):  # the shortest code keeps a repeated query text
        row = icd[code]
        query = query_text(row["desc"])
        if _SKIP_TITLE.search(row["desc"]) or not query or len(query.split()) > MAX_SURFACE_WORDS:
            continue
        if normalize(query) in seen_queries:
            continue
        seen_queries.add(normalize(query))
        string = surface_forms(row["desc"]) | surface_forms(query)
        synonym = set().union(*(surface_forms(t) for t in [*row["inclusion_terms"], *row["includes"]])) - string
        sense_forms = string | synonym
        sense_forms |= {f.split(" ", 1)[1] for f in sense_forms if " " in f and f.split(" ", 1)[0] in QUALIFIERS}
        abbreviation = {a for form in sense_forms for a in abbreviations.get(form, ())}
        hyponym = set()
        prefix = code + "." if "." not in code else code
        for child in _descendants(codes, prefix):
            child_row = icd[child]
            for label in [child_row["desc"], *child_row["inclusion_terms"]]:
                hyponym |= surface_forms(label)
        hyponym -= string | synonym
        entities[code] = {
            "query": query,
            "string": string,
            "synonym": synonym,
            "abbreviation": abbreviation,
            "hyponym": hyponym,
        }
    return entities


# ---------------------------------------------------------------------- labelling


def label_chunks(chunks: dict[str, str], entities: dict[str, Any]) -> dict[str, dict[str, str]]:
    """code -> {chunk id: match type}, the first type in ``MATCH_TYPES`` order that occurs in the chunk."""
    phrase_index: dict[str, list[tuple[str, str]]] = defaultdict(list)  # normalised phrase -> (code, type)
    abbreviation_index: dict[str, list[str]] = defaultdict(list)  # short form -> codes
    longest = 1
    for code, entity in entities.items():
        for kind in ("string", "synonym", "hyponym"):
            for form in entity[kind]:
                phrase_index[form].append((code, kind))
                longest = max(longest, len(form.split()))
        for short in entity["abbreviation"]:
            abbreviation_index[short].append(code)
    rank = {kind: i for i, kind in enumerate(MATCH_TYPES)}
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    for chunk_id, text in chunks.items():
        found: dict[str, str] = {}
        words = normalize(text).split()
        for size in range(1, longest + 1):
            for start in range(len(words) - size + 1):
                for code, kind in phrase_index.get(" ".join(words[start : start + size]), ()):
                    if code not in found or rank[kind] < rank[found[code]]:
                        found[code] = kind
        for token in _abbreviation_tokens(text):
            for code in abbreviation_index.get(token, ()):
                if code not in found or rank["abbreviation"] < rank[found[code]]:
                    found[code] = "abbreviation"
        for code, kind in found.items():
            labels[code][chunk_id] = kind
    return labels


def _abbreviation_tokens(text: str) -> set[str]:
    """Upper-case tokens written among lower-case words: in an all-caps header "HE" is a pronoun, not an abbreviation."""
    tokens = [t.strip(".,;:()[]/\"'") for t in _TOKEN.findall(text)]
    found = set()
    for i, token in enumerate(tokens):
        neighbours = [t for t in tokens[max(0, i - 1) : i] + tokens[i + 1 : i + 2] if any(c.isalpha() for c in t)]
        if token.isupper() and not all(t.isupper() for t in neighbours or [token]):
            found.add(token)
    return found


def sample_queries(labels: dict[str, dict[str, str]], n: int, seed: int) -> list[str]:
    """Up to ``n`` codes with >= 1 relevant chunk, stratified so each match type is represented where it exists."""
    rng = random.Random(seed)
    by_type: dict[str, list[str]] = defaultdict(list)
    for code, chunk_types in sorted(labels.items()):
        for kind in set(chunk_types.values()):
            by_type[kind].append(code)
    chosen: list[str] = []
    per_type = n // len(MATCH_TYPES)
    for kind in ("abbreviation", "hyponym", "synonym", "string"):
        pool = [c for c in by_type[kind] if c not in chosen]
        chosen += rng.sample(pool, min(per_type, len(pool)))
    rest = sorted(c for c in labels if c not in chosen)
    chosen += rng.sample(rest, min(n - len(chosen), len(rest)))
    return sorted(chosen)


# ---------------------------------------------------------------------- corpus


def sample_patients(n: int, n_train: int, seed: int) -> tuple[list[Patient], list[Patient]]:
    """``n`` distinct MTSamples notes for evaluation and ``n_train`` others for retriever training (a fixed sample;
    the loader de-duplicates repeated texts)."""
    patients = list(NotesLoader().load(MTSAMPLES, ErrorSink(skip_invalid=True)))
    rng = random.Random(seed)
    rng.shuffle(patients)
    evaluation = sorted(patients[:n], key=lambda p: p.id)
    return evaluation, patients[n : n + n_train]


def train_benchmark_retriever(patients: list[Patient], home: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A bounded DR.EHR-style fine-tune on training notes only (no evaluation chunk is seen)."""
    config = RetrieverTrainConfig(
        output_dir=home / "retriever",
        data=RetrieverDataConfig(max_chunks=args.train_chunks),
        pairs=PairOptions(llm_stage=args.llm_chunks > 0, llm_max_chunks=args.llm_chunks),
        train=RetrieverOptim(batch_size=16, max_steps=args.train_steps, lr=3e-5, max_seq_length=128, seed=SEED),
        ray=RayTrainConfig(name="retriever-bench", storage_path=home / "runs", num_workers=0),
    )
    result = train_retriever(config, patients)
    return {"result": result, "config": config}


def evaluate_by_type(
    runs: dict[str, list[str]], labels: dict[str, dict[str, str]], codes: Iterable[str]
) -> dict[str, Any]:
    """Overall metrics, then per match type: only that type's chunks are relevant and the query's other relevant
    chunks are removed from its ranking (they neither help nor hurt); queries without that type are skipped."""
    codes = list(codes)
    result: dict[str, Any] = {
        "all": {
            **evaluate(runs, {c: dict.fromkeys(labels[c], 1) for c in codes}, STANDARD_METRICS),
            "queries": len(codes),
        }
    }
    for kind in MATCH_TYPES:
        qrels, typed_runs = {}, {}
        for code in codes:
            wanted = {cid for cid, k in labels[code].items() if k == kind}
            if not wanted:
                continue
            others = set(labels[code]) - wanted
            qrels[code] = dict.fromkeys(wanted, 1)
            typed_runs[code] = [cid for cid in runs.get(code, []) if cid not in others]
        if qrels:
            result[kind] = {**evaluate(typed_runs, qrels, STANDARD_METRICS), "queries": len(qrels)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=300)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--train-notes", type=int, default=400, help="MTSamples notes (disjoint) to mine pairs from")
    parser.add_argument("--train-chunks", type=int, default=800)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--llm-chunks", type=int, default=8, help="chunks sent to the local LLM (stage 2)")
    parser.add_argument("--no-retriever", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()

    patients, train_patients = sample_patients(args.notes, args.train_notes, SEED)
    chunks = {c.id: c.text for p in patients for c in patient_chunks(p)}
    icd = load_icd10(ONTOLOGY / "icd10cm_2026_titles_inclusion_terms.jsonl")
    entities = entity_vocabulary(icd, load_abbreviations(ONTOLOGY / "clinical_abbreviations"))
    labels = label_chunks(chunks, entities)
    codes = sample_queries(labels, args.queries, SEED)
    pair_types = Counter(kind for c in codes for kind in labels[c].values())
    log.info(
        "%d notes, %d chunks, %d queries, %d relevant pairs",
        len(patients),
        len(chunks),
        len(codes),
        sum(pair_types.values()),
    )

    with tempfile.TemporaryDirectory() as home:
        os.environ["EHRFLOW_HOME"] = home
        index = NoteIndex(SentenceTransformerEmbedder(), chroma_client(Path(home) / "chroma"), collection="clinical")
        t0 = time.perf_counter()
        index.index_patients(patients)
        index_s = time.perf_counter() - t0
        systems: dict[str, Any] = {}
        for name, mode, expand in [
            ("bm25", "bm25", False),
            ("dense", "dense", False),
            ("hybrid_rrf", "hybrid", False),
            ("hybrid_rrf_kg_expansion", "hybrid", True),
            ("bm25_kg_expansion", "bm25", True),
        ]:
            t0 = time.perf_counter()
            runs = {
                c: [h.chunk_id for h in index.search(entities[c]["query"], k=100, mode=mode, expand=expand)]
                for c in codes
            }
            seconds = time.perf_counter() - t0
            systems[name] = {
                **evaluate_by_type(runs, labels, codes),
                "ms_per_query": round(1000 * seconds / len(codes), 1),
            }
            log.info("%s: nDCG@10 %.3f", name, systems[name]["all"]["ndcg@10"]["value"])
        fine_tuned: dict[str, Any] = {"included": False, "reason": "--no-retriever"}
        if not args.no_retriever:
            trained = train_benchmark_retriever(train_patients, Path(home), args)
            result, config = trained["result"], trained["config"]
            tuned = NoteIndex(
                SentenceTransformerEmbedder(result.model_dir),
                chroma_client(Path(home) / "chroma"),
                collection="clinical-tuned",
            )
            tuned.index_patients(patients)
            for name, mode in [("fine_tuned_dense", "dense"), ("fine_tuned_hybrid_rrf", "hybrid")]:
                t0 = time.perf_counter()
                runs = {c: [h.chunk_id for h in tuned.search(entities[c]["query"], k=100, mode=mode)] for c in codes}
                seconds = time.perf_counter() - t0
                systems[name] = {
                    **evaluate_by_type(runs, labels, codes),
                    "ms_per_query": round(1000 * seconds / len(codes), 1),
                }
                log.info("%s: nDCG@10 %.3f", name, systems[name]["all"]["ndcg@10"]["value"])
            fine_tuned = {
                "included": True,
                "training_notes": len(train_patients),
                "training_notes_disjoint_from_evaluation": not (
                    {p.id for p in train_patients} & {p.id for p in patients}
                ),
                "pair_report": result.pair_report.model_dump(),
                "steps": result.steps,
                "batch_size": config.train.batch_size,
                "train_loss": [round(x, 4) for x in result.train_loss],
                "train_s": round(result.wall_seconds, 1),
                "llm": "local SmolLM2 GGUF (ehrflow default)" if args.llm_chunks else "stage 2 off",
            }

    payload = {
        "corpus": {
            "source": "MTSamples (de-duplicated by the notes loader), fixed random sample (subsample: bounded runtime)",
            "notes": len(patients),
            "chunks": len(chunks),
            "seed": SEED,
        },
        "queries": {
            "source": "ICD-10-CM FY2026 category titles",
            "count": len(codes),
            "relevant_pairs": sum(pair_types.values()),
            "relevant_pairs_by_type": dict(pair_types),
            "queries_with_type": {k: sum(any(v == k for v in labels[c].values()) for c in codes) for k in MATCH_TYPES},
            "categories_with_any_match": len(labels),
            "examples": [entities[c]["query"] for c in codes[:10]],
        },
        "setting": "multi-patient (rank all chunks); standard nDCG (ideal over all relevant chunks), 95% bootstrap CI",
        "index_s": round(index_s, 1),
        "systems": systems,
        "fine_tuned_retriever": fine_tuned,
        "labels": LABELS,
        "subsampled": f"{len(patients)} evaluation notes and {len(codes)} queries (bounded runtime on 2 cores)",
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(payload, indent=2))
    if not args.no_write:
        write_result("retrieval_clinical", payload, packages=("bm25s", "chromadb", "sentence-transformers"))


if __name__ == "__main__":
    main()
