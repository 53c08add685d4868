"""The knowledge graph (PrimeKG layout or the shipped open default) and code vocabularies."""

from ehrflow.knowledge.graph import Edge, KGFormatError, KnowledgeGraph, LexicalMatch, Node, NodeNotFound
from ehrflow.knowledge.text import normalize

__all__ = ["Edge", "KGFormatError", "KnowledgeGraph", "LexicalMatch", "Node", "NodeNotFound", "normalize"]
