"""Cohort runs on the session's Ray instance: results stored, finished patients skipped, failures reported."""

from __future__ import annotations

from ehrflow.graph.cohort import WorkflowResultStore, run_cohort
from tests.graph.conftest import CRAFTED_ID


def test_cohort_run_on_ray_actors_is_resumable(ray_session, workflow_settings, synthea_patient_id):
    # lexical extraction keeps the actors' work small; the LLM path is covered by test_patient_job
    settings = workflow_settings.model_copy(
        update={"extraction": workflow_settings.extraction.model_copy(update={"mode": "lexical"})}
    )
    ids = [CRAFTED_ID, synthea_patient_id, "not-in-the-store"]

    first = run_cohort(settings, ids, task="readmission", num_workers=1, cpus_per_worker=0.5, progress=False)
    assert (first.done, first.skipped, first.failed) == (2, 0, 1)
    assert "PatientNotFound" in first.errors["not-in-the-store"]

    results = WorkflowResultStore(settings.patient_store_url)
    assert results.done("readmission") == {CRAFTED_ID, synthea_patient_id}
    stored = results.get(CRAFTED_ID, "readmission")
    assert stored.summary is not None and stored.summary.task == "readmission"
    assert "Hyperkalemia" in results.summaries("readmission")[CRAFTED_ID]

    again = run_cohort(settings, ids, task="readmission", num_workers=1, cpus_per_worker=0.5, progress=False)
    assert (again.done, again.skipped, again.failed) == (0, 2, 1)
