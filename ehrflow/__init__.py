"""ehrflow: multimodal EHR AI with LLM agents, a knowledge graph, fusion and medication models,
dense retrieval, and Ray for training and serving."""

__version__ = "0.1.0"
