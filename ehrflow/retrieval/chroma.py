"""Chroma clients and collections the ehrflow way: embedded on a laptop, HTTP on a cluster, never its own embedder.

Chroma silently attaches a default ONNX embedding function to collections created without one, and that function
downloads a model on first use, which fails offline. ehrflow therefore always creates collections with
``embedding_function=None`` and passes vectors it computed itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COSINE = {"hnsw:space": "cosine"}


def chroma_client(
    path: str | Path | None = None,
    *,
    host: str | None = None,
    port: int = 8000,
    ssl: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """An HTTP client when ``host`` is given (cluster profile), else a persistent client at ``path`` (default profile).

    ``path`` defaults to ``$EHRFLOW_HOME/chroma`` (``.ehrflow/chroma``). Telemetry is always off.
    """
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if host:
        log.info("connecting to Chroma at %s:%d", host, port)
        return chromadb.HttpClient(host=host, port=port, ssl=ssl, headers=dict(headers or {}), settings=chroma_settings)
    if path is None:
        from ehrflow.config import get_settings

        path = get_settings().home / "chroma"
    Path(path).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


def get_collection(client: Any, name: str, metadata: Mapping[str, Any] | None = None) -> Any:
    """Gets or creates a cosine-space collection that has no embedding function of its own."""
    if not 3 <= len(name) <= 512:
        raise ValueError(f"Chroma collection name {name!r}: must be 3-512 characters")
    try:
        return client.get_collection(name=name, embedding_function=None)
    except Exception as exc:  # chromadb raises NotFoundError (1.x) or ValueError (older) for a missing collection
        if "does not exist" not in str(exc) and type(exc).__name__ != "NotFoundError":
            raise
    return client.create_collection(name=name, embedding_function=None, metadata={**COSINE, **(metadata or {})})


def set_collection_metadata(collection: Any, metadata: Mapping[str, Any]) -> None:
    """Replaces user metadata. ``hnsw:*`` keys are left out: Chroma refuses them after creation, and the distance
    space lives in the collection's configuration anyway."""
    collection.modify(metadata={k: v for k, v in metadata.items() if not k.startswith("hnsw:")})


def add_batched(
    client: Any,
    collection: Any,
    ids: Sequence[str],
    embeddings: np.ndarray,
    metadatas: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[str] | None = None,
) -> int:
    """Upserts in slices no larger than the server accepts (``client.get_max_batch_size()``); returns rows written."""
    if len(ids) != len(embeddings):
        raise ValueError(f"add_batched: {len(ids)} ids but {len(embeddings)} embeddings")
    if metadatas is not None and len(metadatas) != len(ids):
        raise ValueError(f"add_batched: {len(ids)} ids but {len(metadatas)} metadatas")
    if documents is not None and len(documents) != len(ids):
        raise ValueError(f"add_batched: {len(ids)} ids but {len(documents)} documents")
    step = max(1, int(client.get_max_batch_size()))
    for start in range(0, len(ids), step):
        end = start + step
        collection.upsert(
            ids=list(ids[start:end]),
            embeddings=np.asarray(embeddings[start:end], dtype=np.float32),
            metadatas=[dict(m) for m in metadatas[start:end]] if metadatas is not None else None,
            documents=list(documents[start:end]) if documents is not None else None,
        )
    return len(ids)


def all_ids(collection: Any, page: int = 20_000) -> set[str]:
    """Every id in a collection, paged so a large collection is not fetched in one response."""
    ids: set[str] = set()
    offset = 0
    while True:
        got = collection.get(include=[], limit=page, offset=offset)["ids"]
        ids.update(got)
        if len(got) < page:
            return ids
        offset += page


__all__ = ["COSINE", "add_batched", "all_ids", "chroma_client", "get_collection", "set_collection_metadata"]
