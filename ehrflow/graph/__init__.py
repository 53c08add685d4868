"""LangGraph workflows: the patient job (EMERGE pipeline) and the chat agent."""

from ehrflow.graph.chat import ChatAnswer, ChatConfig, ask, build_chat
from ehrflow.graph.checkpoint import open_checkpointer
from ehrflow.graph.cohort import WorkflowResultStore, run_cohort
from ehrflow.graph.deps import PatientNotFound, WorkflowDeps
from ehrflow.graph.patient_job import PatientJobState, build_patient_job, render_report, run_patient_job

__all__ = [
    "ChatAnswer",
    "ChatConfig",
    "PatientJobState",
    "PatientNotFound",
    "WorkflowDeps",
    "WorkflowResultStore",
    "ask",
    "build_chat",
    "build_patient_job",
    "render_report",
    "run_cohort",
    "run_patient_job",
    "open_checkpointer",
]
