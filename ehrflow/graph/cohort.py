"""Cohort runs: the patient-job workflow over many patients as Ray actors.

Each actor builds its ``WorkflowDeps`` once (KG, indexes, LLM) and runs jobs one after another;
the same code runs on 2 local cores or on a cluster (``settings.ray.address``). Runs are
resumable: patients with a stored result for the task are skipped. Results go to the
``workflow_results`` table beside the patient store, which the trainers read for the summary
modality.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from tqdm import tqdm

from ehrflow.config import Settings

log = logging.getLogger(__name__)

_META = sa.MetaData()
RESULTS = sa.Table(
    "workflow_results",
    _META,
    sa.Column("patient_id", sa.String(128), primary_key=True),
    sa.Column("task", sa.String(32), primary_key=True),
    sa.Column("summary_text", sa.Text, nullable=False),
    sa.Column("state_json", sa.Text, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
)


class WorkflowResultStore:
    """Per-patient workflow outputs (extraction, grounding, summary) keyed by (patient, task)."""

    def __init__(self, url: str):
        self.engine = sa.create_engine(url, future=True)
        _META.create_all(self.engine)

    def done(self, task: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(RESULTS.c.patient_id).where(RESULTS.c.task == task)).scalars())

    def put(self, state) -> None:  # noqa: ANN001
        row = {
            "patient_id": state.patient_id,
            "task": state.task,
            "summary_text": state.summary.text if state.summary else "",
            "state_json": state.model_dump_json(),
            "seconds": sum(r.seconds for r in state.runs),
            "finished_at": dt.datetime.now(dt.UTC),
        }
        with self.engine.begin() as conn:
            conn.execute(
                sa.delete(RESULTS).where((RESULTS.c.patient_id == row["patient_id"]) & (RESULTS.c.task == row["task"]))
            )
            conn.execute(RESULTS.insert(), [row])

    def get(self, patient_id: str, task: str):  # noqa: ANN201
        from ehrflow.graph.patient_job import PatientJobState

        with self.engine.connect() as conn:
            raw = conn.execute(
                sa.select(RESULTS.c.state_json).where((RESULTS.c.patient_id == patient_id) & (RESULTS.c.task == task))
            ).scalar_one_or_none()
        return None if raw is None else PatientJobState.model_validate_json(raw)

    def summaries(self, task: str) -> dict[str, str]:
        """patient id -> summary text, for the fusion trainer's summary modality."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(RESULTS.c.patient_id, RESULTS.c.summary_text).where(RESULTS.c.task == task))
            return dict(rows.all())


class PatientJobWorker:
    """Ray actor body: one set of dependencies, many jobs."""

    def __init__(self, settings: Settings):
        from ehrflow.graph.deps import WorkflowDeps
        from ehrflow.graph.patient_job import build_patient_job

        self.deps = WorkflowDeps.from_settings(settings)
        self.graph = build_patient_job(self.deps)

    def run(self, patient_id: str, task: str) -> tuple[str, str | None, str | None]:
        """Returns (patient id, state JSON or None, error or None): one failure never stops a cohort."""
        from ehrflow.graph.patient_job import run_patient_job

        try:
            state = run_patient_job(self.graph, patient_id, task)
        except Exception as err:  # noqa: BLE001 - reported per patient, the run goes on
            return patient_id, None, f"{type(err).__name__}: {err}"
        return patient_id, state.model_dump_json(), None


@dataclass
class CohortRunReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    errors: dict[str, str] | None = None


def run_cohort(
    settings: Settings,
    patient_ids: Iterable[str],
    task: str = "general",
    num_workers: int = 2,
    cpus_per_worker: float = 1.0,
    progress: bool = True,
) -> CohortRunReport:
    """Run the workflow for every patient not yet done for ``task``, on ``num_workers`` Ray actors."""
    import ray
    from ray.util import ActorPool

    from ehrflow.graph.patient_job import PatientJobState

    results = WorkflowResultStore(settings.patient_store_url)
    ids = list(patient_ids)
    finished = results.done(task)
    pending = [pid for pid in ids if pid not in finished]
    report = CohortRunReport(skipped=len(ids) - len(pending), errors={})
    if not pending:
        return report
    # Index the pending patients' notes here, batched, before the actors start: their own index step
    # then finds nothing to write, so an embedded (single-process) Chroma sees one writer at a time.
    from ehrflow.graph.deps import open_note_index
    from ehrflow.records.store import PatientStore

    store = PatientStore(settings.patient_store_url)
    open_note_index(settings).index_patients((store.get(pid) for pid in pending if pid in store), progress=progress)
    settings.ray.ensure_initialized()
    actor = ray.remote(num_cpus=cpus_per_worker)(PatientJobWorker)
    pool = ActorPool([actor.remote(settings) for _ in range(max(1, min(num_workers, len(pending))))])
    bar = tqdm(total=len(pending), desc=f"patient jobs ({task})", unit=" patients", disable=not progress)
    for pid, state_json, error in pool.map_unordered(lambda a, pid: a.run.remote(pid, task), pending):
        if error is None:
            results.put(PatientJobState.model_validate_json(state_json))
            report.done += 1
        else:
            report.failed += 1
            report.errors[pid] = error
            log.warning("patient job failed: %s", error.split(":")[0])
        bar.update(1)
    bar.close()
    return report
