"""The chat agent on real parts: Chroma note index, KG expansion, SQLite memory, the local LLM."""

from __future__ import annotations

import pytest

from ehrflow.graph.chat import MAX_QUESTION_CHARS, ask, build_chat
from ehrflow.graph.checkpoint import open_checkpointer
from tests.graph.conftest import CRAFTED_ID


@pytest.fixture(scope="module")
def chat_graph(workflow_deps, tmp_path_factory):
    return build_chat(workflow_deps, open_checkpointer(tmp_path_factory.mktemp("chat") / "chat.sqlite"))


def test_real_local_model_answers_a_demo_patient_question_citing_existing_chunks(
    chat_graph, workflow_deps, synthea_patient_id
):
    notes = workflow_deps.store.get(synthea_patient_id).all_notes()
    condition = next(
        e.text
        for e in workflow_deps.extraction.lexical_mentions(" ".join(n.text for n in notes))
        if e.kind == "disease"
    )
    answer = ask(chat_graph, synthea_patient_id, "c1", f"Does the patient have a history of {condition}?")

    assert not answer.no_evidence and answer.answer
    evidence_ids = {c.chunk_id for c in answer.evidence}
    assert answer.citations and set(answer.citations) <= evidence_ids
    stored = workflow_deps.note_index.collection.get(ids=answer.citations)
    assert sorted(stored["ids"]) == sorted(answer.citations)
    assert all(m["patient_id"] == synthea_patient_id for m in stored["metadatas"])


def test_no_evidence_is_said_without_asking_the_llm(chat_graph, workflow_deps):
    calls = workflow_deps.llm.usage.calls + workflow_deps.llm.usage.cache_hits
    answer = ask(chat_graph, CRAFTED_ID, "c2", "Does the patient have a history of hypertension?")
    assert answer.no_evidence and answer.citations == [] and "No evidence" in answer.answer
    assert workflow_deps.llm.usage.calls + workflow_deps.llm.usage.cache_hits == calls


def test_evidence_must_name_the_asked_concept(chat_graph):
    answer = ask(chat_graph, CRAFTED_ID, "c3", "Is there hyperkalemia?")
    assert not answer.no_evidence
    assert all("hyperkalemia" in c.text.lower() for c in answer.evidence)


def test_turns_are_remembered_per_conversation(chat_graph):
    ask(chat_graph, CRAFTED_ID, "memory", "Does the patient have a history of hypertension?")
    ask(chat_graph, CRAFTED_ID, "memory", "Any history of asthma?")
    ask(chat_graph, CRAFTED_ID, "other", "Any history of asthma?")
    history = chat_graph.get_state({"configurable": {"thread_id": f"chat:{CRAFTED_ID}:memory"}}).values["history"]
    assert [t.role for t in history] == ["user", "assistant", "user", "assistant"]
    assert history[2].content == "Any history of asthma?"
    other = chat_graph.get_state({"configurable": {"thread_id": f"chat:{CRAFTED_ID}:other"}}).values["history"]
    assert len(other) == 2


@pytest.mark.parametrize(
    ("message", "expected"),
    [("   ", "question is empty"), ("x" * (MAX_QUESTION_CHARS + 1), "characters; the limit")],
)
def test_bad_questions_are_refused_clearly(chat_graph, message, expected):
    with pytest.raises(ValueError, match=expected):
        ask(chat_graph, CRAFTED_ID, "bad", message)


def test_unknown_patient_is_a_clear_error(chat_graph):
    from ehrflow.graph.deps import PatientNotFound

    with pytest.raises(PatientNotFound, match="nobody"):
        ask(chat_graph, "nobody", "c", "Any history of asthma?")
