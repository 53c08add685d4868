"""The work behind the API: patient jobs and chat turns over the real LangGraph workflows.

:class:`WorkflowBackend` is what the app needs; :class:`LocalWorkflow` runs it in-process (one
Ray Serve ``Workflow`` replica holds one). Tests pass a lightweight backend instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ehrflow.config import Settings
from ehrflow.training.outputs import MEDICATION_PREFIX, MEDICATIONS_RECOMMENDED

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
WORKFLOW_TASK = {"summary": "general", "mortality": "mortality", "readmission": "readmission"}
PHENOTYPE_TYPES = {"effect/phenotype", "disease"}


class JobInputError(ValueError):
    """The job cannot succeed however often it is retried (e.g. its patient is gone)."""


class WorkflowBackend(Protocol):
    def run_job(self, job_id: str, patient_id: str, tasks: list[str], progress: ProgressFn) -> dict[str, Any]: ...

    def chat(self, patient_id: str, conversation_id: str, message: str) -> dict[str, Any]: ...

    def usage(self) -> dict[str, int]: ...


def workflow_tasks(tasks: list[str]) -> list[str]:
    """The LangGraph runs a job needs: one per summary/prediction task; phenotypes and
    medications reuse the first run's grounded entities and predictions."""
    runs = list(dict.fromkeys(WORKFLOW_TASK[t] for t in tasks if t in WORKFLOW_TASK))
    return runs or ["general"]


def job_result(
    tasks: list[str], states: dict[str, Any], drug_names: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The JSON result of a job from its finished ``PatientJobState`` objects (by workflow task); ``drug_names``
    (the medication checkpoint's order names per drug) label the recommended drugs."""
    first = next(iter(states.values()))
    result: dict[str, Any] = {"runs": {}}
    for wf_task, state in states.items():
        result["runs"][wf_task] = {
            "summary": state.summary.model_dump() if state.summary else None,
            "predictions": state.predictions,
            "report": state.report,
            "nodes": [r.model_dump() for r in state.runs],
        }
    if "summary" in tasks:
        result["summary"] = result["runs"]["general"]["summary"]
    for target in ("mortality", "readmission"):
        if target in tasks:
            state = states[target]
            result[target] = {
                "summary": result["runs"][target]["summary"],
                "probability": state.predictions.get(target),
                "available": target in state.predictions,
            }
    if "phenotypes" in tasks:
        seen: dict[str, dict[str, Any]] = {}
        for g in first.grounded:
            if g.node_type in PHENOTYPE_TYPES and not (g.entity.negated or g.entity.family):
                seen.setdefault(g.node_id, {"node_id": g.node_id, "name": g.node_name, "type": g.node_type})
        result["phenotypes"] = list(seen.values())
    if "medications" in tasks:
        recommended = [
            {"drug": drug, "names": (drug_names or {}).get(drug, []), "probability": v}
            for k, v in first.predictions.items()
            if k.startswith(MEDICATION_PREFIX) and (drug := k.removeprefix(MEDICATION_PREFIX))
        ]
        result["medications"] = {
            "available": MEDICATIONS_RECOMMENDED in first.predictions,
            "recommended": sorted(recommended, key=lambda r: -r["probability"]),
        }
    return result


class LocalWorkflow:
    """The real workflows on :class:`WorkflowDeps` built from ``settings``.

    One lock serialises the LLM-using work of this process: llama.cpp models are not thread-safe.
    Scale out with more ``Workflow`` replicas, not threads.
    """

    def __init__(self, settings: Settings, deps: Any = None):
        from ehrflow.graph import WorkflowDeps, build_chat, build_patient_job, open_checkpointer

        self.deps = deps if deps is not None else WorkflowDeps.from_settings(settings)
        checkpointer = open_checkpointer(settings.checkpoint_location)
        self.job_graph = build_patient_job(self.deps, checkpointer)
        self.chat_graph = build_chat(self.deps, checkpointer)
        self._lock = threading.Lock()
        self.drug_names: dict[str, list[str]] = {}
        if settings.models.medrec_checkpoint is not None:
            from ehrflow.training.medrec import checkpoint_drug_names

            self.drug_names = checkpoint_drug_names(settings.models.medrec_checkpoint)

    def run_job(self, job_id: str, patient_id: str, tasks: list[str], progress: ProgressFn) -> dict[str, Any]:
        from ehrflow.graph import PatientNotFound
        from ehrflow.graph.patient_job import NODES

        runs = workflow_tasks(tasks)
        total = len(NODES) * len(runs)
        states: dict[str, Any] = {}
        with self._lock:
            if self.deps.store.get(patient_id) is None:
                raise JobInputError(f"patient_id: {patient_id!r} is not in the patient store")
            for i, wf_task in enumerate(runs):
                try:
                    states[wf_task] = self._run_one(
                        job_id, patient_id, wf_task, lambda n, i=i: progress(i * len(NODES) + n, total)
                    )
                except PatientNotFound as exc:
                    raise JobInputError(str(exc)) from exc
        progress(total, total)
        return job_result(tasks, states, self.drug_names)

    def _run_one(self, job_id: str, patient_id: str, wf_task: str, on_nodes: Callable[[int], None]) -> Any:
        """Run or resume one workflow; thread id ``<job id>/<task>`` ties it to its checkpoint."""
        from ehrflow.graph.patient_job import PatientJobState

        config = {"configurable": {"thread_id": f"{job_id}/{wf_task}"}}
        snapshot = self.job_graph.get_state(config)
        if snapshot.values and not snapshot.next:
            return PatientJobState.model_validate(snapshot.values)
        start = None if snapshot.values else PatientJobState(patient_id=patient_id, task=wf_task)  # type: ignore[arg-type]
        if snapshot.values:
            log.info("job %s: resuming at %s", job_id, ", ".join(snapshot.next))
        done = len(snapshot.values.get("runs", [])) if snapshot.values else 0
        for update in self.job_graph.stream(start, config, stream_mode="updates"):
            done += len(update)  # one entry per node that finished in this step
            on_nodes(done)
        return PatientJobState.model_validate(self.job_graph.get_state(config).values)

    def chat(self, patient_id: str, conversation_id: str, message: str) -> dict[str, Any]:
        from ehrflow.graph import ask

        with self._lock:
            return ask(self.chat_graph, patient_id, conversation_id, message).model_dump()

    def usage(self) -> dict[str, int]:
        u = getattr(self.deps.llm, "usage", None)
        if u is None:
            return {}
        return {"calls": u.calls, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}
