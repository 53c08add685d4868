"""The patient-job workflow on real parts: KG, Chroma, SQLite checkpoints and the local LLM."""

from __future__ import annotations

import dataclasses

import pytest

from ehrflow.graph.checkpoint import open_checkpointer
from ehrflow.graph.patient_job import NODES, build_patient_job, run_patient_job
from tests.graph.conftest import CRAFTED_ID


def _cited_ids_exist(state, deps) -> None:
    chunk_ids = {c.chunk_id for c in state.evidence}
    stored = set(deps.note_index.collection.get(ids=sorted(chunk_ids))["ids"]) if chunk_ids else set()
    assert stored == chunk_ids
    for statement in state.summary.statements:
        assert statement.citations, statement.text
        for cited in statement.citations:
            assert cited in chunk_ids or cited in deps.kg, cited


def test_real_local_model_end_to_end_on_a_demo_patient(workflow_deps, synthea_patient_id, tmp_path):
    calls_before = workflow_deps.llm.usage.calls + workflow_deps.llm.usage.cache_hits
    graph = build_patient_job(workflow_deps, open_checkpointer(tmp_path / "ckpt.sqlite"))
    state = run_patient_job(graph, synthea_patient_id, "mortality")

    assert workflow_deps.llm.usage.calls + workflow_deps.llm.usage.cache_hits > calls_before  # the LLM took part
    assert [r.node for r in state.runs if r.node in ("ground", "retrieve", "summarize", "report")] == [
        "ground",
        "retrieve",
        "summarize",
        "report",
    ]
    assert {r.node for r in state.runs} == set(NODES)
    assert all(r.status in ("ok", "skipped") for r in state.runs)
    assert state.note_entities and state.grounded and state.evidence
    _cited_ids_exist(state, workflow_deps)
    assert all(g.node_id in workflow_deps.kg for g in state.grounded)
    assert state.report and synthea_patient_id in state.report


def test_negated_and_family_mentions_are_not_grounded(workflow_deps, tmp_path):
    graph = build_patient_job(workflow_deps, open_checkpointer(tmp_path / "ckpt.sqlite"))
    state = run_patient_job(graph, CRAFTED_ID, "general")

    mentions = {e.text.lower(): e for e in state.note_entities}
    assert mentions["chest pain"].negated and mentions["diabetes mellitus"].negated
    assert mentions["breast cancer"].family
    names = {g.node_name.lower() for g in state.grounded}
    assert not any(n in names for n in ("chest pain", "diabetes mellitus", "breast cancer"))
    assert "hyperkalemia" in names and "pneumonia" in names
    # hyperkalemia is also an abnormal time-series finding (6.4 mmol/L)
    assert any(f.phenotype_node_id == "HP:0002153" for f in state.findings)
    _cited_ids_exist(state, workflow_deps)


class _Crash(RuntimeError):
    pass


def test_a_job_interrupted_after_extraction_resumes_without_redoing_it(workflow_deps, database_url):
    """On a SQLite file and on PostgreSQL (the cluster's checkpoint store)."""
    extraction_calls = []

    def counting_extraction(notes):
        extraction_calls.append(1)
        return workflow_deps.extraction(notes)

    def crashing_grounding(entities, findings):
        raise _Crash("killed after extraction")

    checkpoints = database_url
    crashing = dataclasses.replace(workflow_deps, extraction=counting_extraction, grounding=crashing_grounding)
    with pytest.raises(_Crash):
        run_patient_job(build_patient_job(crashing, open_checkpointer(checkpoints)), CRAFTED_ID, "mortality")
    assert len(extraction_calls) == 1

    # a new process (or a replica on another node) would open the same checkpoint store: so does this graph
    healthy = dataclasses.replace(workflow_deps, extraction=counting_extraction)
    graph = build_patient_job(healthy, open_checkpointer(checkpoints))
    assert graph.get_state({"configurable": {"thread_id": f"{CRAFTED_ID}:mortality"}}).next == ("ground",)
    state = run_patient_job(graph, CRAFTED_ID, "mortality")

    assert len(extraction_calls) == 1
    assert [r.node for r in state.runs].count("extract_notes") == 1
    assert state.summary is not None and state.report
    # a finished job returns its stored result
    assert run_patient_job(graph, CRAFTED_ID, "mortality").report == state.report
    assert len(extraction_calls) == 1


def test_a_patient_without_notes_completes_with_the_branch_skipped(workflow_deps, tmp_path):
    from ehrflow.records.model import Patient

    workflow_deps.store.ingest([Patient(id="no-notes-1", source="test", sex="M", age=50)])
    state = run_patient_job(build_patient_job(workflow_deps), "no-notes-1", "readmission")
    statuses = {r.node: r.status for r in state.runs}
    assert statuses["extract_notes"] == "skipped" and statuses["extract_timeseries"] == "skipped"
    assert state.summary is not None and state.grounded == []


def test_an_unknown_patient_is_a_clear_error(workflow_deps):
    from ehrflow.graph.deps import PatientNotFound

    with pytest.raises(PatientNotFound, match="no-such-patient"):
        run_patient_job(build_patient_job(workflow_deps), "no-such-patient")


def test_replicas_opening_one_checkpoint_store_together_all_get_it(database_url):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        savers = list(pool.map(lambda _: open_checkpointer(database_url), range(4)))
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    assert all(saver.get_tuple(config) is None for saver in savers)


def test_an_unsupported_checkpoint_location_names_itself():
    with pytest.raises(ValueError, match="scheme 'mysql': expected a file path") as error:
        open_checkpointer("mysql://ehrflow:secret@db/ehrflow")
    assert "secret" not in str(error.value)


def test_an_unreachable_checkpoint_database_is_named_without_its_password():
    pytest.importorskip("langgraph.checkpoint.postgres")
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1/ehrflow: no connection within 1 s") as error:
        open_checkpointer("postgresql+psycopg://ehrflow:secret@127.0.0.1:1/ehrflow", connect_timeout_s=1)
    assert "secret" not in str(error.value)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_checkpoint_connection_the_server_dropped_is_replaced(database_url):
    import sqlalchemy as sa

    saver = open_checkpointer(database_url)
    config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    assert saver.get_tuple(config) is None
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        dropped = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    admin.dispose()
    assert dropped >= 1
    assert saver.get_tuple(config) is None  # answered on a new connection
