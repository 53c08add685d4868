"""A workflow home shared by the graph tests: the demo cohort, a crafted patient, the real local LLM.

Grounding runs in lexical mode here: the dense KG index takes minutes to build on 2 cores, and
its own tests (tests/retrieval/test_entity_index.py) cover it on a small KG.
"""

from __future__ import annotations

import datetime as dt

import pytest

NEGATION_NOTE = (
    "HISTORY OF PRESENT ILLNESS: The patient denies chest pain. No history of diabetes mellitus.\n"
    "FAMILY HISTORY: Mother had breast cancer.\n"
    "ASSESSMENT: Hyperkalemia and pneumonia. Started on ceftriaxone."
)
CRAFTED_ID = "crafted-negation-1"


def crafted_patient():
    from ehrflow.records.model import Admission, Measurement, Note, Patient

    t0 = dt.datetime(2020, 1, 1, 8, tzinfo=dt.UTC)
    return Patient(
        id=CRAFTED_ID,
        source="test",
        sex="F",
        age=70,
        admissions=[
            Admission(
                id="adm-1",
                admit_time=t0,
                discharge_time=t0 + dt.timedelta(days=3),
                notes=[Note(id="n1", time=t0, category="discharge summary", text=NEGATION_NOTE)],
                measurements=[
                    Measurement(time=t0 + dt.timedelta(hours=h), variable="Potassium", value=v, unit="mmol/L")
                    for h, v in ((1, 6.4), (6, 6.1), (12, 5.2))
                ],
            )
        ],
    )


@pytest.fixture(scope="session")
def workflow_settings(tmp_path_factory):
    from ehrflow.config import get_settings
    from ehrflow.demo import demo_data_dir
    from ehrflow.records import PatientStore, ingest_path

    home = tmp_path_factory.mktemp("workflow-home")
    # one attempt per structured call: greedy retries of the 135M model rarely validate and cost minutes
    settings = get_settings(home=home, grounding={"mode": "lexical"}, llm={"retries": 0})
    store = PatientStore(settings.patient_store_url)
    ingest_path(store, "fhir", demo_data_dir() / "fhir")
    store.ingest([crafted_patient()])
    return settings


@pytest.fixture(scope="session")
def workflow_deps(workflow_settings):
    """Real KG, Chroma, embedder and the default local LLM (SmolLM2 through llama.cpp)."""
    from ehrflow.graph.deps import WorkflowDeps

    return WorkflowDeps.from_settings(workflow_settings)


@pytest.fixture(scope="session")
def synthea_patient_id(workflow_deps):
    """The demo patient with the least note text among those with documented conditions (keeps the test short)."""
    from ehrflow.agents.extraction import ExtractionAgent, ExtractionConfig

    lexical = ExtractionAgent(workflow_deps.kg, None, ExtractionConfig(mode="lexical"))
    candidates = []
    for pid in workflow_deps.store.ids():
        notes = workflow_deps.store.get(pid).all_notes() if pid.startswith("fhir-") else []
        if any(not e.negated and not e.family for e in lexical(notes)):
            candidates.append((sum(len(n.text) for n in notes), pid))
    return min(candidates)[1]
