"""Embedders, Chroma collections and entity grounding against the knowledge graph."""

from ehrflow.retrieval.chroma import chroma_client, get_collection
from ehrflow.retrieval.embedder import Embedder, SentenceTransformerEmbedder
from ehrflow.retrieval.entity_index import EntityIndex, GroundingConfig, GroundingMatch

__all__ = [
    "Embedder",
    "EntityIndex",
    "GroundingConfig",
    "GroundingMatch",
    "SentenceTransformerEmbedder",
    "chroma_client",
    "get_collection",
]
