"""LLM agents of the patient-job workflow: pure functions of the workflow state; prompts in ``prompts/``."""

from ehrflow.agents.extraction import ExtractionAgent, ExtractionConfig
from ehrflow.agents.grounding import GroundingAgent
from ehrflow.agents.retrieval import RetrievalAgent, RetrievalConfig
from ehrflow.agents.summary import SummaryAgent, SummaryConfig
from ehrflow.agents.timeseries import TimeSeriesFindings
from ehrflow.agents.types import (
    Entity,
    EvidenceChunk,
    Finding,
    GroundedEntity,
    HealthSummary,
    NodeFacts,
    NodeRun,
    Statement,
)

__all__ = [
    "Entity",
    "EvidenceChunk",
    "ExtractionAgent",
    "ExtractionConfig",
    "Finding",
    "GroundedEntity",
    "GroundingAgent",
    "HealthSummary",
    "NodeFacts",
    "NodeRun",
    "RetrievalAgent",
    "RetrievalConfig",
    "Statement",
    "SummaryAgent",
    "SummaryConfig",
    "TimeSeriesFindings",
]
