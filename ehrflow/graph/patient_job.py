"""The patient-job workflow (EMERGE pipeline) as a LangGraph ``StateGraph``.

    START ─┬─ extract_notes ──────┬─ ground ─ retrieve ─ summarize ─ predict ─ report ─ END
           └─ extract_timeseries ─┘

The notes and time-series branches run in parallel. A checkpointer (SQLite, or PostgreSQL) saves the state
after every node, keyed by the job's thread id, so a killed job resumes from its last finished
node. Every node records its wall time and outcome in ``state.runs``; a patient without notes or
without measurements still completes, with the missing branch marked ``skipped``.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from typing import Annotated, Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from ehrflow.agents.summary import Task
from ehrflow.agents.types import (
    Entity,
    EvidenceChunk,
    Finding,
    GroundedEntity,
    HealthSummary,
    NodeFacts,
    NodeRun,
)
from ehrflow.graph.deps import WorkflowDeps

log = logging.getLogger(__name__)

NODES = ("extract_notes", "extract_timeseries", "ground", "retrieve", "summarize", "predict", "report")


class PatientJobState(BaseModel):
    patient_id: str
    task: Task = "general"
    note_entities: list[Entity] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    grounded: list[GroundedEntity] = Field(default_factory=list)
    facts: list[NodeFacts] = Field(default_factory=list)
    evidence: list[EvidenceChunk] = Field(default_factory=list)
    summary: HealthSummary | None = None
    predictions: dict[str, float] = Field(default_factory=dict)
    report: str | None = None
    runs: Annotated[list[NodeRun], operator.add] = Field(default_factory=list)


def _node(name: str, fn: Callable[[PatientJobState], dict[str, Any]]) -> Callable[[PatientJobState], dict[str, Any]]:
    """Time a node and record its outcome. Exceptions propagate: the job stops there and a
    later run resumes from the last checkpoint."""

    def run(state: PatientJobState) -> dict[str, Any]:
        start = time.perf_counter()
        update = fn(state)
        status = update.pop("_status", "ok")
        message = update.pop("_message", None)
        update["runs"] = [NodeRun(node=name, status=status, seconds=time.perf_counter() - start, message=message)]
        log.info("patient job node %s: %s in %.2f s", name, status, time.perf_counter() - start)
        return update

    return run


def build_patient_job(deps: WorkflowDeps, checkpointer: BaseCheckpointSaver | None = None):  # noqa: ANN201
    """Compile the workflow over ``deps`` (stores, KG, indexes, LLM, agents)."""

    def extract_notes(state: PatientJobState) -> dict[str, Any]:
        notes = deps.patient(state.patient_id).all_notes()
        if not notes:
            return {"_status": "skipped", "_message": "patient has no notes"}
        entities = deps.extraction(notes)
        negated = sum(e.negated or e.family for e in entities)
        return {"note_entities": entities, "_message": f"{len(entities)} mentions, {negated} negated or family"}

    def extract_timeseries(state: PatientJobState) -> dict[str, Any]:
        measurements = deps.patient(state.patient_id).all_measurements()
        if not measurements:
            return {"_status": "skipped", "_message": "patient has no measurements"}
        findings = deps.timeseries(measurements)
        return {"findings": findings, "_message": f"{len(findings)} abnormal findings from {len(measurements)} values"}

    def ground(state: PatientJobState) -> dict[str, Any]:
        grounded = deps.grounding(state.note_entities, state.findings)
        return {"grounded": grounded, "_message": f"{len(grounded)} KG nodes"}

    def retrieve(state: PatientJobState) -> dict[str, Any]:
        if deps.note_index is not None:
            deps.note_index.index_patient(deps.patient(state.patient_id))  # incremental: unchanged notes are skipped
        facts = deps.retrieval.facts(state.grounded)
        evidence = deps.retrieval.evidence(state.patient_id, state.grounded, state.task)
        return {"facts": facts, "evidence": evidence, "_message": f"{len(facts)} node contexts, {len(evidence)} chunks"}

    def summarize(state: PatientJobState) -> dict[str, Any]:
        summary = deps.summary(state.task, state.findings, state.grounded, state.facts, state.evidence)
        return {
            "summary": summary,
            "_message": f"{len(summary.statements)} cited statements, {summary.dropped_uncited} dropped"
            + (", LLM rewrite accepted" if summary.rewritten_by_llm else ""),
        }

    def predict(state: PatientJobState) -> dict[str, Any]:
        if deps.predictor is None:
            return {"_status": "skipped", "_message": "no trained model configured"}
        from ehrflow.training.predictor import PredictionUnavailable

        try:
            preds = deps.predictor(deps.patient(state.patient_id), state.summary)
        except PredictionUnavailable as err:
            return {"_status": "skipped", "_message": str(err)}
        return {"predictions": preds, "_message": ", ".join(f"{k} {v:.2f}" for k, v in preds.items())}

    def report(state: PatientJobState) -> dict[str, Any]:
        return {"report": render_report(state)}

    builder = StateGraph(PatientJobState)
    for name, fn in (
        ("extract_notes", extract_notes),
        ("extract_timeseries", extract_timeseries),
        ("ground", ground),
        ("retrieve", retrieve),
        ("summarize", summarize),
        ("predict", predict),
        ("report", report),
    ):
        builder.add_node(name, _node(name, fn))
    builder.add_edge(START, "extract_notes")
    builder.add_edge(START, "extract_timeseries")
    builder.add_edge(["extract_notes", "extract_timeseries"], "ground")
    builder.add_edge("ground", "retrieve")
    builder.add_edge("retrieve", "summarize")
    builder.add_edge("summarize", "predict")
    builder.add_edge("predict", "report")
    builder.add_edge("report", END)
    return builder.compile(checkpointer=checkpointer)


def run_patient_job(graph, patient_id: str, task: Task = "general", thread_id: str | None = None) -> PatientJobState:  # noqa: ANN001
    """Run (or resume) one job. With a checkpointer, a thread that stopped part-way continues
    from its last finished node; a finished thread returns its stored result."""
    config = {"configurable": {"thread_id": thread_id or f"{patient_id}:{task}"}}
    if graph.checkpointer is not None:
        snapshot = graph.get_state(config)
        if snapshot.values and not snapshot.next:
            return PatientJobState.model_validate(snapshot.values)
        if snapshot.values and snapshot.next:
            log.info("resuming patient job at %s", ", ".join(snapshot.next))
            return PatientJobState.model_validate(graph.invoke(None, config))
    return PatientJobState.model_validate(graph.invoke(PatientJobState(patient_id=patient_id, task=task), config))


def render_report(state: PatientJobState) -> str:
    """A readable report: summary with citations, predictions, and per-node timings."""
    lines = [f"Patient job: {state.patient_id} (task: {state.task})", ""]
    if state.summary and state.summary.statements:
        lines.append(
            "Summary" + (" (rewritten by the LLM, citations checked)" if state.summary.rewritten_by_llm else "") + ":"
        )
        lines += [f"  - {s.text}  [{', '.join(s.citations)}]" for s in state.summary.statements]
        if state.summary.dropped_uncited:
            lines.append(f"  ({state.summary.dropped_uncited} uncited statement(s) dropped)")
    else:
        lines.append("Summary: nothing grounded for this patient.")
    negated = [e for e in state.note_entities if e.negated or e.family]
    if negated:
        lines.append(f"Excluded mentions (negated or family history): {len(negated)}")
    if state.predictions:
        lines.append("Predictions: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(state.predictions.items())))
    lines.append("")
    lines.append("Nodes: " + "; ".join(f"{r.node} {r.status} {r.seconds:.2f}s" for r in state.runs))
    return "\n".join(lines)
