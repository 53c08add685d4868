import datetime as dt
import json

from ehrflow.agents.summary import SummaryAgent, SummaryConfig, validate
from ehrflow.agents.types import Entity, EvidenceChunk, Finding, GroundedEntity, HealthSummary, NodeFacts, Statement
from ehrflow.llm import FakeLLM

T0 = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def _inputs():
    finding = Finding(
        analyte="potassium",
        variable="K",
        direction="high",
        value=6.1,
        unit="mmol/L",
        critical=False,
        z_reference=3.2,
        z_series=None,
        abnormal_count=2,
        total_count=5,
        first_time=T0,
        last_time=T0,
        phenotype_node_id="HP:0002153",
        text="potassium high (6.1 mmol/L)",
    )
    grounded = [
        GroundedEntity(
            entity=Entity(text=finding.text, kind="finding", origin="timeseries"),
            node_id="HP:0002153",
            node_name="Hyperkalemia",
            node_type="effect/phenotype",
            score=1.0,
            match="reference_range",
        ),
        GroundedEntity(
            entity=Entity(text="CHF", kind="disease", note_id="n1"),
            node_id="DOID:6000",
            node_name="congestive heart failure",
            node_type="disease",
            score=1.0,
            match="abbreviation",
        ),
    ]
    facts = [
        NodeFacts(
            node_id="DOID:6000",
            name="congestive heart failure",
            type="disease",
            definition="A heart disease in which the heart cannot pump enough blood. More text.",
            relations=["congestive heart failure — has phenotype — Dyspnea"],
            related_ids=["HP:0002094"],
        )
    ]
    evidence = [EvidenceChunk(chunk_id="p1/n1#0", note_id="n1", text="Known CHF, on furosemide.", score=0.9)]
    return finding, grounded, facts, evidence


def test_structured_summary_cites_every_statement():
    finding, grounded, facts, evidence = _inputs()
    summary = SummaryAgent(config=SummaryConfig(rewrite_with_llm=False))(
        "mortality", [finding], grounded, facts, evidence
    )
    texts = [s.text for s in summary.statements]
    assert any("potassium high (6.1 mmol/L), consistent with Hyperkalemia" in t for t in texts)
    assert any(t.startswith("Documented condition: congestive heart failure") for t in texts)
    assert any("cannot pump enough blood" in t and "More text" not in t for t in texts)
    allowed = {"HP:0002153", "DOID:6000", "HP:0002094", "p1/n1#0"}
    assert all(s.citations and set(s.citations) <= allowed for s in summary.statements)
    assert summary.dropped_uncited == 0 and not summary.rewritten_by_llm
    assert "in-hospital mortality" in summary.statements[0].text


def test_validate_drops_uncited_and_unknown_citations():
    s = HealthSummary(
        task="general",
        statements=[
            Statement(text="a", citations=["X:1"]),
            Statement(text="b"),
            Statement(text="c", citations=["X:9"]),
        ],
    )
    out = validate(s, {"X:1"})
    assert [st.text for st in out.statements] == ["a"] and out.dropped_uncited == 2


def test_llm_rewrite_accepted_only_when_it_keeps_every_citation():
    finding, grounded, facts, evidence = _inputs()
    agent = SummaryAgent()
    base = agent.structured("general", [finding], grounded, facts, evidence)
    needed = sorted({c for s in base.statements for c in s.citations})
    good = json.dumps({"statements": [{"text": "Rewritten, all facts kept.", "citations": needed}]})
    lossy = json.dumps({"statements": [{"text": "Only one fact.", "citations": ["DOID:6000"]}]})
    invented = json.dumps({"statements": [{"text": "Has sepsis.", "citations": needed + ["DOID:0000000"]}]})
    assert SummaryAgent(FakeLLM([good]))("general", [finding], grounded, facts, evidence).rewritten_by_llm
    for answer in (lossy, invented, "not json at all"):
        llm = FakeLLM([answer] * 3)
        out = SummaryAgent(llm)("general", [finding], grounded, facts, evidence)
        assert not out.rewritten_by_llm and out.statements == base.statements
