"""Embedders, Chroma collections, entity grounding against the knowledge graph, and note search."""

from ehrflow.retrieval.chroma import chroma_client, get_collection
from ehrflow.retrieval.embedder import Embedder, SentenceTransformerEmbedder
from ehrflow.retrieval.entity_index import EntityIndex, GroundingConfig, GroundingMatch
from ehrflow.retrieval.notes import Hit, NoteIndex

__all__ = [
    "Embedder",
    "EntityIndex",
    "GroundingConfig",
    "GroundingMatch",
    "Hit",
    "NoteIndex",
    "SentenceTransformerEmbedder",
    "chroma_client",
    "get_collection",
]
