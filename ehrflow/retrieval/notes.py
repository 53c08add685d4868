"""Note retrieval: ~100-word chunks of every patient's notes in a Chroma collection, searched densely, with BM25,
or with both fused by reciprocal rank fusion, optionally with KG query expansion.

CliniQ finds BM25 a strong baseline for entity queries over EHR notes and lexical+dense fusion better still, so
``hybrid`` is the default. Chunks follow CliniQ's unit (~100 words) but end on sentence boundaries, and keep
character offsets into the note so a summary can cite the exact span.

BM25 scoped to one patient is built on the fly from that patient's chunks (a few ms). Corpus-wide BM25 is kept on
disk beside Chroma's data and rebuilt when the collection's ``revision`` (changed by every write through this
class) differs from the one it was built from.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ehrflow.records.errors import RecordError
from ehrflow.records.model import Note, Patient
from ehrflow.retrieval.bm25 import BM25Index, analyze
from ehrflow.retrieval.chroma import add_batched, get_collection, set_collection_metadata
from ehrflow.retrieval.embedder import Embedder
from ehrflow.retrieval.hybrid import RRF_K, reciprocal_rank_fusion

log = logging.getLogger(__name__)

SearchMode = Literal["dense", "bm25", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("dense", "bm25", "hybrid")
MAX_QUERY_CHARS = 2000
CHUNK_WORDS = 100
FUSION_DEPTH = 100
"""Candidates taken from each ranking before fusion (at least ``k``)."""
INDEX_SCHEMA = "1"

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n|\n(?=\s*[A-Z][A-Z /&]{2,}:)")
"""Ends of sentences: after . ! ? and whitespace, at blank lines, and before an upper-case section header."""
_WORD = re.compile(r"\S+")


class Hit(BaseModel):
    model_config = ConfigDict(frozen=True)

    chunk_id: str
    patient_id: str
    note_id: str
    text: str
    score: float
    """Cosine similarity (dense), BM25 score (bm25) or RRF score (hybrid): compare within one mode only."""
    start: int
    end: int


@dataclass(frozen=True)
class Chunk:
    """A span ``note.text[start:end]`` of about ``CHUNK_WORDS`` words."""

    id: str
    text: str
    start: int
    end: int
    metadata: dict[str, str | int]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, whitespace trimmed; texts without punctuation give one span."""
    spans: list[tuple[int, int]] = []
    position = 0
    for boundary in _SENTENCE_END.finditer(text):
        spans.append((position, boundary.start()))
        position = boundary.end()
    spans.append((position, len(text)))
    trimmed = []
    for start, end in spans:
        piece = text[start:end]
        if piece.strip():
            left = len(piece) - len(piece.lstrip())
            trimmed.append((start + left, start + len(piece.rstrip())))
    return trimmed


def chunk_spans(text: str, words: int = CHUNK_WORDS) -> list[tuple[int, int]]:
    """Character spans of ~``words``-word chunks ending on sentence boundaries.

    Sentences are packed until the next one would pass ``words``; a sentence longer than ``words`` is cut at word
    boundaries. A last chunk shorter than a quarter of ``words`` joins the one before it.
    """
    if words < 1:
        raise ValueError(f"chunk size must be >= 1 word, got {words}")
    pieces: list[tuple[int, int, int]] = []  # (start, end, word count)
    for start, end in sentence_spans(text):
        matches = list(_WORD.finditer(text, start, end))
        for i in range(0, len(matches), words):
            part = matches[i : i + words]
            pieces.append((part[0].start(), part[-1].end(), len(part)))
    chunks: list[list[int]] = []  # [start, end, words]
    for start, end, count in pieces:
        if chunks and chunks[-1][2] + count <= words:
            chunks[-1][1:] = [end, chunks[-1][2] + count]
        else:
            chunks.append([start, end, count])
    if len(chunks) > 1 and chunks[-1][2] < words // 4:
        last = chunks.pop()
        chunks[-1][1:] = [last[1], chunks[-1][2] + last[2]]
    return [(start, end) for start, end, _ in chunks]


def chunk_id(patient_id: str, note_id: str, n: int) -> str:
    return f"{patient_id}/{note_id}#{n}"


def patient_chunks(patient: Patient, words: int = CHUNK_WORDS) -> list[Chunk]:
    """Every chunk of every note of ``patient`` (patient-level notes first, then by admission); blank notes none."""
    chunks: list[Chunk] = []
    seen_notes: set[str] = set()
    for admission_id, note in _notes_with_admission(patient):
        if note.id in seen_notes:
            raise RecordError(f"patient {patient.id}", f"note {note.id}", "id", "note id is used twice in one patient")
        seen_notes.add(note.id)
        for n, (start, end) in enumerate(chunk_spans(note.text, words)):
            metadata: dict[str, str | int] = {
                "patient_id": patient.id,
                "admission_id": admission_id,
                "note_id": note.id,
                "time": note.time.isoformat() if note.time else "",
                "category": note.category,
                "start": start,
                "end": end,
            }
            chunks.append(Chunk(chunk_id(patient.id, note.id, n), note.text[start:end], start, end, metadata))
    return chunks


def _notes_with_admission(patient: Patient) -> Iterator[tuple[str, Note]]:
    for note in patient.notes:
        yield "", note
    for admission in patient.admissions:
        for note in admission.notes:
            yield admission.id, note


class NoteIndex:
    """Chunks, embeds and searches patients' notes in one Chroma collection.

    ``kg`` is used for ``expand=True`` only; without one, the KG shipped with ehrflow is opened on first use.
    ``bm25_dir`` holds the corpus-wide BM25 index; by default ``$EHRFLOW_HOME/bm25/<collection id>``.
    """

    def __init__(
        self,
        embedder: Embedder,
        client: Any,
        collection: str = "notes",
        kg: Any = None,
        *,
        chunk_words: int = CHUNK_WORDS,
        batch_size: int = 64,
        bm25_dir: str | Path | None = None,
    ):
        self.embedder = embedder
        self.client = client
        self.collection_name = collection
        self.kg = kg
        self.chunk_words = chunk_words
        self.batch_size = batch_size
        self.collection = get_collection(client, collection)
        self._check_embedder()
        self._bm25_dir = Path(bm25_dir) if bm25_dir else None
        self._bm25: tuple[str, BM25Index] | None = None
        self._bm25_lock = threading.Lock()
        self._expander: Any = None

    # ------------------------------------------------------------------ collection bookkeeping

    def _check_embedder(self) -> None:
        meta = self.collection.metadata or {}
        built_with = meta.get("embedder")
        if built_with not in (None, self.embedder.name):
            raise ValueError(
                f"Chroma collection {self.collection_name!r} holds vectors of embedder {built_with!r}, not "
                f"{self.embedder.name!r}: use another collection name or delete this one and re-index"
            )

    def _metadata(self) -> dict[str, Any]:
        """Fresh collection metadata (another process may have written since this object was made)."""
        return dict(get_collection(self.client, self.collection_name).metadata or {})

    def revision(self) -> str:
        """Changes with every write through a ``NoteIndex``; the corpus-wide BM25 index is keyed by it."""
        return str(self._metadata().get("revision", ""))

    def _bump_revision(self) -> None:
        set_collection_metadata(
            self.collection,
            {"embedder": self.embedder.name, "schema": INDEX_SCHEMA, "revision": uuid.uuid4().hex},
        )

    # ------------------------------------------------------------------ writing

    def index_patient(self, patient: Patient) -> int:
        """Upserts all chunks of ``patient``'s notes and removes its stale ones; returns the number of chunks."""
        return self.index_patients([patient])

    def index_patients(self, patients: Iterable[Patient], progress: bool = False, flush_chunks: int = 1024) -> int:
        """Indexes many patients, encoding chunks of several patients in shared batches; returns chunks written.

        Only chunks whose text changed are embedded again; chunks a patient no longer has are deleted.
        """
        from tqdm.auto import tqdm

        self._bump_revision()  # a crash mid-write must not leave a BM25 index that looks current
        pending: list[Chunk] = []
        total = 0
        with tqdm(desc="indexing notes", unit="patient", disable=not progress) as bar:
            for patient in patients:
                changed, count = self._changed_chunks(patient)
                pending.extend(changed)
                total += count
                if len(pending) >= flush_chunks:
                    self._write(pending)
                    pending = []
                bar.update(1)
            self._write(pending)
        self._bump_revision()
        return total

    def _changed_chunks(self, patient: Patient) -> tuple[list[Chunk], int]:
        """(the patient's chunks that need embedding, its chunk count); deletes its stale chunks and refreshes
        the metadata of unchanged texts in place."""
        chunks = patient_chunks(patient, self.chunk_words)
        existing = self.collection.get(where={"patient_id": patient.id}, include=["documents", "metadatas"])
        old = {
            i: (doc, meta)
            for i, doc, meta in zip(existing["ids"], existing["documents"], existing["metadatas"], strict=True)
        }
        wanted = {c.id for c in chunks}
        stale = [i for i in old if i not in wanted]
        if stale:
            self.collection.delete(ids=stale)
        changed: list[Chunk] = []
        relabel: list[Chunk] = []
        for chunk in chunks:
            previous = old.get(chunk.id)
            if previous is None or previous[0] != chunk.text:
                changed.append(chunk)
            elif previous[1] != chunk.metadata:
                relabel.append(chunk)
        if relabel:
            self.collection.update(ids=[c.id for c in relabel], metadatas=[c.metadata for c in relabel])
        log.debug("patient %s: %d chunks, %d to embed, %d stale", patient.id, len(chunks), len(changed), len(stale))
        return changed, len(chunks)

    def _write(self, chunks: Sequence[Chunk]) -> None:
        if not chunks:
            return
        vectors = self.embedder.encode([c.text for c in chunks], batch_size=self.batch_size)
        add_batched(
            self.client,
            self.collection,
            [c.id for c in chunks],
            vectors,
            metadatas=[c.metadata for c in chunks],
            documents=[c.text for c in chunks],
        )

    def delete_patient(self, patient_id: str) -> int:
        """Removes every chunk of ``patient_id``; returns how many there were (0 for an unknown patient)."""
        ids = self.collection.get(where={"patient_id": patient_id}, include=[])["ids"]
        if ids:
            self._bump_revision()
            self.collection.delete(ids=ids)
            self._bump_revision()
        return len(ids)

    def count(self) -> int:
        return int(self.collection.count())

    # ------------------------------------------------------------------ search

    def search(
        self,
        query: str,
        patient_id: str | None = None,
        k: int = 10,
        mode: SearchMode = "hybrid",
        expand: bool = False,
    ) -> list[Hit]:
        """The ``k`` best chunks for ``query``, over one patient's notes or all of them.

        ``expand`` adds the KG synonyms, abbreviations and child concepts of what the query names as rankings of
        their own beside the query's: BM25 over the query's tokens plus theirs, and dense search scoring each chunk by
        its best similarity to the query or to any expansion term. All rankings are fused by RRF, so a chunk that
        matches the query's own words keeps its place (replacing the query by its expansion cost exact-string
        matches) while chunks that only an expansion term finds still come up. An unknown patient gives no hits.
        """
        _check_query(query)
        if mode not in SEARCH_MODES:
            raise ValueError(f"search mode {mode!r}: expected one of {SEARCH_MODES}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        terms = self.expander().expand(query).texts if expand else []
        depth = k if mode != "hybrid" and not terms else max(k, FUSION_DEPTH)
        rankings: list[list[tuple[str, float]]] = []
        if mode in ("dense", "hybrid"):
            rankings.extend(self._dense(query, terms, patient_id, depth))
        if mode in ("bm25", "hybrid"):
            rankings.append(self._bm25_search(query, [], patient_id, depth))
            if terms:
                rankings.append(self._bm25_search(query, terms, patient_id, depth))
        if len(rankings) > 1:
            ranked = reciprocal_rank_fusion([[cid for cid, _ in r] for r in rankings], k=RRF_K)[:k]
        else:
            ranked = rankings[0][:k]
        return self._hits(ranked)

    def expander(self) -> Any:
        from ehrflow.retrieval.expansion import QueryExpander

        if self._expander is None:
            if self.kg is None:
                from ehrflow.knowledge.graph import KnowledgeGraph

                self.kg = KnowledgeGraph.default()
            self._expander = QueryExpander(self.kg)
        return self._expander

    def _dense(
        self, query: str, terms: Sequence[str], patient_id: str | None, depth: int
    ) -> list[list[tuple[str, float]]]:
        """The query's ranking, then (with ``terms``) each chunk's best similarity to the query or any term."""
        count = self.collection.count()
        if count == 0:
            return [[]]
        vectors = self.embedder.encode([query, *terms], batch_size=self.batch_size)
        where = {"patient_id": patient_id} if patient_id is not None else None
        result = self.collection.query(
            query_embeddings=vectors, n_results=min(depth, count), where=where, include=["distances"]
        )
        per_text = [
            [(cid, 1.0 - float(distance)) for cid, distance in zip(ids, distances, strict=True)]
            for ids, distances in zip(result["ids"], result["distances"], strict=True)
        ]
        if not terms:
            return per_text[:1]
        best: dict[str, float] = {}
        for ranking in per_text:
            for cid, similarity in ranking:
                if similarity > best.get(cid, -2.0):
                    best[cid] = similarity
        return [per_text[0], sorted(best.items(), key=lambda item: -item[1])[:depth]]

    def _bm25_search(
        self, query: str, terms: Sequence[str], patient_id: str | None, depth: int
    ) -> list[tuple[str, float]]:
        tokens = analyze(query) + [t for term in terms for t in analyze(term)]
        if patient_id is not None:
            got = self.collection.get(where={"patient_id": patient_id}, include=["documents"])
            index = BM25Index.build(got["ids"], got["documents"])
        else:
            index = self.corpus_bm25()
        return index.search_tokens(tokens, depth)

    def corpus_bm25(self) -> BM25Index:
        """The corpus-wide BM25 index: from memory or disk when current, else rebuilt from the collection."""
        revision = self.revision()
        with self._bm25_lock:
            if self._bm25 is not None and self._bm25[0] == revision:
                return self._bm25[1]
            directory = self._bm25_dir or _default_bm25_dir(self.collection)
            loaded = BM25Index.load(directory)
            if loaded is not None and loaded[1].get("revision") == revision and revision:
                index = loaded[0]
            else:
                ids, documents = _all_documents(self.collection)
                index = BM25Index.build(ids, documents)
                index.save(directory, {"revision": revision, "collection": self.collection_name})
                log.info("rebuilt corpus BM25 index of %r: %d chunks", self.collection_name, len(ids))
            self._bm25 = (revision, index)
            return index

    def _hits(self, ranked: Sequence[tuple[str, float]]) -> list[Hit]:
        if not ranked:
            return []
        got = self.collection.get(ids=[cid for cid, _ in ranked], include=["documents", "metadatas"])
        rows = {cid: (doc, meta) for cid, doc, meta in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}
        hits = []
        for cid, score in ranked:
            if cid not in rows:  # deleted between ranking and fetching
                continue
            document, meta = rows[cid]
            hits.append(
                Hit(
                    chunk_id=cid,
                    patient_id=str(meta["patient_id"]),
                    note_id=str(meta["note_id"]),
                    text=document or "",
                    score=float(score),
                    start=int(meta["start"]),
                    end=int(meta["end"]),
                )
            )
        return hits


def _check_query(query: str) -> None:
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}")


def _default_bm25_dir(collection: Any) -> Path:
    from ehrflow.config import get_settings

    return get_settings().home / "bm25" / str(collection.id)


def _all_documents(collection: Any, page: int = 5000) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    documents: list[str] = []
    offset = 0
    while True:
        got = collection.get(include=["documents"], limit=page, offset=offset)
        ids.extend(got["ids"])
        documents.extend(d or "" for d in got["documents"])
        if len(got["ids"]) < page:
            return ids, documents
        offset += page


__all__ = [
    "CHUNK_WORDS",
    "MAX_QUERY_CHARS",
    "SEARCH_MODES",
    "Chunk",
    "Hit",
    "NoteIndex",
    "SearchMode",
    "chunk_id",
    "chunk_spans",
    "patient_chunks",
    "sentence_spans",
]
