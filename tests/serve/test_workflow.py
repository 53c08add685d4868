"""How a job's task list maps to workflow runs, and how their states become the job result."""

from __future__ import annotations

from ehrflow.serve.workflow import job_result, workflow_tasks


def test_workflow_tasks():
    assert workflow_tasks(["summary", "phenotypes"]) == ["general"]
    assert workflow_tasks(["phenotypes", "medications"]) == ["general"]
    assert workflow_tasks(["mortality", "summary", "mortality", "readmission"]) == [
        "mortality",
        "general",
        "readmission",
    ]


def test_job_result_keeps_citations_and_drops_negated_phenotypes():
    from ehrflow.agents.types import Entity, GroundedEntity, HealthSummary, NodeRun, Statement
    from ehrflow.graph.patient_job import PatientJobState

    def grounded(node_id: str, node_type: str, negated: bool = False) -> GroundedEntity:
        entity = Entity(text=node_id, negated=negated)
        return GroundedEntity(
            entity=entity, node_id=node_id, node_name=node_id, node_type=node_type, score=1, match="exact"
        )

    general = PatientJobState(
        patient_id="p",
        summary=HealthSummary(task="general", statements=[Statement(text="potassium high", citations=["HP:0002153"])]),
        grounded=[
            grounded("HP:0002153", "effect/phenotype"),
            grounded("MONDO:1", "disease", negated=True),
            grounded("DB:1", "drug"),
        ],
        runs=[NodeRun(node="report", status="ok", seconds=0.1)],
    )
    mortality = PatientJobState(patient_id="p", task="mortality", predictions={"mortality": 0.25})
    result = job_result(
        ["summary", "mortality", "phenotypes", "medications"], {"general": general, "mortality": mortality}
    )
    assert result["summary"]["statements"][0]["citations"] == ["HP:0002153"]
    assert result["mortality"] == {"summary": None, "probability": 0.25, "available": True}
    assert result["phenotypes"] == [{"node_id": "HP:0002153", "name": "HP:0002153", "type": "effect/phenotype"}]
    assert result["medications"] == {"available": False, "recommended": []}
    assert result["runs"]["general"]["nodes"][0]["node"] == "report"

    general.predictions = {"medication:N02B": 0.6, "medication:C07A": 0.9, "medications_recommended": 2.0}
    medications = job_result(["medications"], {"general": general}, {"N02B": ["Acetaminophen"]})["medications"]
    assert medications == {
        "available": True,
        "recommended": [
            {"drug": "C07A", "names": [], "probability": 0.9},
            {"drug": "N02B", "names": ["Acetaminophen"], "probability": 0.6},
        ],
    }
