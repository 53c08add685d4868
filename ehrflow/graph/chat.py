"""The chat workflow: a clinician's question about one patient, answered from cited evidence.

    START ─ retrieve ─ knowledge ─ answer ─ END

``retrieve`` searches the patient's note chunks (hybrid dense + BM25 with KG query expansion) and
keeps only chunks with real support: when the question names KG concepts, chunks that name one of
them (directly, or by synonym, abbreviation or child concept); otherwise chunks whose dense
similarity reaches ``min_dense_score``.
With no support the answer says no evidence was found, without asking the LLM to guess.
``answer`` asks the LLM with the evidence ids in the prompt; its citations are the ids it wrote
that exist in the evidence. When a small model cites nothing valid, the answer still lists the
evidence it was given, and ``cited_by_model`` is False, so nobody mistakes one for the other.
Multi-turn memory is the checkpointer's: one thread per (patient, conversation id).
"""

from __future__ import annotations

import operator
import re
from typing import Annotated, Any, Literal

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from ehrflow.agents.prompts import render
from ehrflow.agents.types import EvidenceChunk, NodeFacts
from ehrflow.graph.deps import WorkflowDeps

MAX_QUESTION_CHARS = 2000
_CITATION = re.compile(r"\[([^\[\]]{3,200})\]")


class ChatConfig(BaseModel):
    max_chunks: int = Field(4, gt=0)
    min_dense_score: float = 0.45
    history_turns: int = Field(4, ge=0)
    max_tokens: int = Field(200, gt=0)
    expand: bool = True


class ChatTurn(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    citations: list[str] = Field(default_factory=list)


class ChatState(BaseModel):
    patient_id: str
    question: str = ""
    history: Annotated[list[ChatTurn], operator.add] = Field(default_factory=list)
    evidence: list[EvidenceChunk] = Field(default_factory=list)
    knowledge: list[NodeFacts] = Field(default_factory=list)
    answer: str = ""
    citations: list[str] = Field(default_factory=list)
    cited_by_model: bool = False
    no_evidence: bool = False


class ChatAnswer(BaseModel):
    answer: str
    citations: list[str]
    evidence: list[EvidenceChunk]
    no_evidence: bool
    cited_by_model: bool


def build_chat(deps: WorkflowDeps, checkpointer=None, config: ChatConfig | None = None):  # noqa: ANN001, ANN201
    cfg = config or ChatConfig()

    def retrieve(state: ChatState) -> dict[str, Any]:
        if deps.note_index is None:
            return {"evidence": []}
        index = deps.note_index
        q, pid = state.question, state.patient_id
        index.index_patient(deps.patient(pid))  # incremental: a no-op when the notes are already indexed
        hits = index.search(q, patient_id=pid, k=cfg.max_chunks * 2, mode="hybrid", expand=cfg.expand)
        expansion = index.expander().expand(q)
        if expansion.mentions:
            # The question names KG concepts: a chunk supports an answer only if it names one of them
            # (as asked, or by a synonym, abbreviation or child concept). Similarity alone is not evidence.
            forms = [*expansion.mentions, *expansion.texts]
            pattern = re.compile("|".join(rf"\b{re.escape(f)}\b" for f in forms), re.IGNORECASE)
            supported = [h for h in hits if pattern.search(h.text)]
        else:
            dense = {
                h.chunk_id
                for h in index.search(q, patient_id=pid, k=cfg.max_chunks * 2, mode="dense")
                if h.score >= cfg.min_dense_score
            }
            supported = [h for h in hits if h.chunk_id in dense]
        return {
            "evidence": [
                EvidenceChunk(chunk_id=h.chunk_id, note_id=h.note_id, text=h.text, score=h.score)
                for h in supported[: cfg.max_chunks]
            ]
        }

    def knowledge(state: ChatState) -> dict[str, Any]:
        from ehrflow.agents.types import Entity

        mentions = deps.extraction.lexical_mentions(state.question)
        grounded = deps.grounding(
            [Entity(text=m.text, kind=m.kind, candidate_node_id=m.candidate_node_id) for m in mentions], []
        )
        return {"knowledge": deps.retrieval.facts(grounded)[:4]}

    def answer(state: ChatState) -> dict[str, Any]:
        user_turn = ChatTurn(role="user", content=state.question)
        if not state.evidence:
            text = "No evidence was found in this patient's record to answer that question."
            return {
                "answer": text,
                "citations": [],
                "cited_by_model": False,
                "no_evidence": True,
                "history": [user_turn, ChatTurn(role="assistant", content=text)],
            }
        evidence = "\n".join(f"[{c.chunk_id}] {' '.join(c.text.split())}" for c in state.evidence)
        facts = "\n".join(f"[{f.node_id}] {f.name}: {f.definition or ''}".strip() for f in state.knowledge) or "(none)"
        history = "\n".join(f"{t.role}: {t.content}" for t in state.history[-2 * cfg.history_turns :]) or "(none)"
        messages = render("chat", evidence=evidence, knowledge=facts, history=history, question=state.question)
        text = deps.llm.chat(messages, max_tokens=cfg.max_tokens).strip()
        known = {c.chunk_id for c in state.evidence} | {f.node_id for f in state.knowledge}
        cited = [c for c in dict.fromkeys(_CITATION.findall(text)) if c in known]
        citations = cited or [c.chunk_id for c in state.evidence]
        return {
            "answer": text or "The model returned no text; see the cited evidence.",
            "citations": citations,
            "cited_by_model": bool(cited),
            "no_evidence": False,
            "history": [user_turn, ChatTurn(role="assistant", content=text, citations=citations)],
        }

    builder = StateGraph(ChatState)
    builder.add_node("retrieve", retrieve)
    builder.add_node("knowledge", knowledge)
    builder.add_node("answer", answer)
    builder.add_edge(START, "retrieve")
    builder.add_edge("retrieve", "knowledge")
    builder.add_edge("knowledge", "answer")
    builder.add_edge("answer", END)
    return builder.compile(checkpointer=checkpointer)


def ask(graph, patient_id: str, conversation_id: str, message: str) -> ChatAnswer:  # noqa: ANN001
    """One turn of a conversation. The checkpointer keeps earlier turns under the same ids."""
    question = message.strip()
    if not question:
        raise ValueError("message: the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"message: the question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    config = {"configurable": {"thread_id": f"chat:{patient_id}:{conversation_id}"}}
    out = ChatState.model_validate(graph.invoke({"patient_id": patient_id, "question": question}, config))
    return ChatAnswer(
        answer=out.answer,
        citations=out.citations,
        evidence=out.evidence,
        no_evidence=out.no_evidence,
        cited_by_model=out.cited_by_model,
    )
