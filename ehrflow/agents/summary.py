"""SummaryAgent: the EMERGE-style, task-focused health summary, where every statement cites.

The summary is first built deterministically from the grounded facts: abnormal features,
likely diseases and symptoms, their definitions, their relations, and note evidence, each
statement citing the KG node ids or note chunk ids it rests on. An LLM may rewrite it for
readability, but the rewrite is accepted only if it validates, cites only ids the workflow
saw, and keeps every citation of the structured form. Otherwise the structured form stands.
Statements that cite nothing, or ids the workflow never produced, are dropped and counted.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ehrflow.agents.prompts import render
from ehrflow.agents.types import EvidenceChunk, Finding, GroundedEntity, HealthSummary, NodeFacts, Statement

log = logging.getLogger(__name__)

Task = Literal["mortality", "readmission", "general"]
_TASK_FOCUS = {
    "mortality": "in-hospital mortality risk",
    "readmission": "30-day readmission risk",
    "general": "overall health status",
}


class SummaryConfig(BaseModel):
    rewrite_with_llm: bool = True
    max_definition_chars: int = Field(240, gt=0)
    max_evidence_chars: int = Field(240, gt=0)
    llm_max_tokens: int = Field(400, gt=0)


class _Rewrite(BaseModel):
    statements: list[_RewriteStatement] = Field(default_factory=list, max_length=12)


class _RewriteStatement(BaseModel):
    text: str = Field(max_length=300)
    citations: list[Annotated[str, Field(max_length=80)]] = Field(default_factory=list, max_length=6)


_Rewrite.model_rebuild()


def _first_sentence(text: str, limit: int) -> str:
    head = text.split(". ")[0].strip().rstrip(".")
    return (head[: limit - 3] + "...") if len(head) > limit else head


class SummaryAgent:
    def __init__(self, llm=None, config: SummaryConfig | None = None):  # noqa: ANN001
        self.llm = llm
        self.config = config or SummaryConfig()

    def __call__(
        self,
        task: Task,
        findings: list[Finding],
        grounded: list[GroundedEntity],
        facts: list[NodeFacts],
        evidence: list[EvidenceChunk],
    ) -> HealthSummary:
        structured = self.structured(task, findings, grounded, facts, evidence)
        allowed = _known_ids(grounded, facts, evidence)
        summary = validate(structured, allowed)
        if self.config.rewrite_with_llm and self.llm is not None and summary.statements:
            rewritten = self._rewrite(summary, allowed)
            if rewritten is not None:
                return rewritten
        return summary

    def structured(
        self,
        task: Task,
        findings: list[Finding],
        grounded: list[GroundedEntity],
        facts: list[NodeFacts],
        evidence: list[EvidenceChunk],
    ) -> HealthSummary:
        """The deterministic summary: one statement per fact, each with its citations."""
        out: list[Statement] = []
        by_finding = {g.entity.text: g for g in grounded if g.entity.origin == "timeseries"}
        for f in findings:
            g = by_finding.get(f.text)
            if g:
                out.append(Statement(text=f"Abnormal {f.text}, consistent with {g.node_name}", citations=[g.node_id]))
            else:
                out.append(Statement(text=f"Abnormal {f.text}", citations=[]))
        for label, kinds in (
            ("Documented condition", {"disease"}),
            ("Symptom or sign", {"symptom"}),
            ("Medication", {"medication"}),
        ):
            for g in grounded:
                if g.entity.origin != "timeseries" and g.entity.kind in kinds:
                    out.append(
                        Statement(text=f'{label}: {g.node_name} (noted as "{g.entity.text}")', citations=[g.node_id])
                    )
        for fact in facts:
            if fact.definition:
                definition = _first_sentence(fact.definition, self.config.max_definition_chars)
                out.append(Statement(text=f"{fact.name}: {definition}", citations=[fact.node_id]))
            for rel, other in zip(fact.relations, fact.related_ids, strict=False):
                out.append(Statement(text=rel, citations=[fact.node_id, other]))
        for chunk in evidence:
            excerpt = " ".join(chunk.text.split())[: self.config.max_evidence_chars]
            out.append(Statement(text=f'Note evidence: "{excerpt}"', citations=[chunk.chunk_id]))
        head = Statement(
            text=f"Summary focused on {_TASK_FOCUS[task]}: {len(findings)} abnormal finding(s), "
            f"{len({g.node_id for g in grounded})} grounded concept(s), {len(evidence)} note excerpt(s)",
            citations=sorted({g.node_id for g in grounded})[:6] or [c.chunk_id for c in evidence][:1],
        )
        return HealthSummary(task=task, statements=[head, *out])

    def _rewrite(self, summary: HealthSummary, allowed: set[str]) -> HealthSummary | None:
        from ehrflow.llm import LLMContextError, LLMOutputError

        facts = "\n".join(f"- {s.text} [{', '.join(s.citations)}]" for s in summary.statements)
        try:
            answer = self.llm.structured(
                render("summary", task=_TASK_FOCUS[summary.task], facts=facts),
                _Rewrite,
                max_tokens=self.config.llm_max_tokens,
            )
        except (LLMOutputError, LLMContextError) as err:
            log.info("summary rewrite rejected (%s); keeping the structured summary", type(err).__name__)
            return None
        candidate = validate(
            HealthSummary(
                task=summary.task, statements=[Statement(text=s.text, citations=s.citations) for s in answer.statements]
            ),
            allowed,
        )
        needed = {c for s in summary.statements for c in s.citations}
        kept = {c for s in candidate.statements for c in s.citations}
        if candidate.dropped_uncited or not needed <= kept:
            log.info("summary rewrite lost citations or cited unknown ids; keeping the structured summary")
            return None
        candidate.rewritten_by_llm = True
        return candidate


def _known_ids(grounded: list[GroundedEntity], facts: list[NodeFacts], evidence: list[EvidenceChunk]) -> set[str]:
    ids = {g.node_id for g in grounded} | {f.node_id for f in facts} | {c.chunk_id for c in evidence}
    ids |= {other for f in facts for other in f.related_ids}
    return ids


def validate(summary: HealthSummary, allowed: set[str]) -> HealthSummary:
    """Drop statements that cite nothing or cite ids outside ``allowed``; count them."""
    kept = [s for s in summary.statements if s.citations and set(s.citations) <= allowed]
    return summary.model_copy(
        update={"statements": kept, "dropped_uncited": summary.dropped_uncited + len(summary.statements) - len(kept)}
    )
