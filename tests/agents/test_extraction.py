import pytest

from ehrflow.agents.extraction import ExtractionAgent, ExtractionConfig
from ehrflow.agents.negation import is_negated, sentences
from ehrflow.knowledge import KnowledgeGraph
from ehrflow.llm import FakeLLM
from ehrflow.records import Note

CRAFTED = """# History of Present Illness
Patient reports chest pain and cough since Monday. She denies headache or fever.
No evidence of pneumonia on imaging, but there is hyperkalemia.

FAMILY HISTORY: Mother had myocardial infarction at 60.
"""


@pytest.fixture(scope="module")
def kg():
    return KnowledgeGraph.default()


def _by_text(entities):
    return {e.text.lower(): e for e in entities}


def test_lexical_extraction_marks_negated_and_family_mentions(kg):
    agent = ExtractionAgent(kg, config=ExtractionConfig(mode="lexical"))
    found = _by_text(agent([Note(id="n1", text=CRAFTED)]))
    assert {
        "chest pain",
        "cough",
        "headache",
        "fever",
        "pneumonia",
        "hyperkalemia",
        "myocardial infarction",
    } <= found.keys()
    assert not found["chest pain"].negated and not found["cough"].negated
    assert found["headache"].negated and found["fever"].negated and found["pneumonia"].negated
    assert not found["hyperkalemia"].negated  # "but" ends the negation's scope
    assert found["myocardial infarction"].family and found["myocardial infarction"].section == "family history"
    mention = found["chest pain"]
    assert CRAFTED[mention.start : mention.end].lower() == "chest pain"
    assert mention.candidate_node_id and kg.get(mention.candidate_node_id) is not None


def test_llm_additions_must_occur_in_the_note_and_flags_are_applied(kg):
    llm = FakeLLM(
        [
            '{"entities": [{"text": "rattling feeling in the chest", "kind": "symptom"}, {"text": "sepsis", "kind": "disease"}],'
            ' "not_about_patient": ["cough"]}'
        ]
    )
    note = Note(id="n2", text="Complains of cough and a rattling feeling in the chest. Denies chest pain.")
    found = _by_text(ExtractionAgent(kg, llm, ExtractionConfig(mode="hybrid"))([note]))
    assert found["rattling feeling in the chest"].origin == "llm"
    assert "sepsis" not in found  # not in the text: an invention, dropped
    assert "cough" not in found  # flagged by the LLM as not the patient's
    assert found["chest pain"].negated


def test_invalid_llm_output_falls_back_to_lexical(kg):
    llm = FakeLLM(["not json", "still not json", "nope"])
    found = _by_text(ExtractionAgent(kg, llm)([Note(id="n3", text="She has a headache.")]))
    assert "headache" in found and len(llm.requests) == 3  # retried, then reported, lexical kept


def test_sentences_keep_offsets_and_sections():
    text = "HPI: Fever. Cough!\n## Plan\nRest."
    spans = sentences(text)
    assert [text[s.start : s.end] for s in spans] == [s.text for s in spans]
    assert [s.section for s in spans] == ["hpi", "hpi", "plan"]
    s = "no chest pain, however fever persists"
    assert is_negated(s, 3, 13) and not is_negated(s, s.index("fever"), s.index("fever") + 5)


def test_vaccines_screenings_and_procedure_sections_are_not_conditions(kg):
    note = (
        "# Immunizations\nThe patient was given the following immunizations:\n- influenza, seasonal, injectable\n\n"
        "# Procedures\nThe following procedures were conducted:\n- depression screening (procedure)\n\n"
        "# Assessment and Plan\nPatient has influenza and anxiety. Assessment of depression was done.\n"
    )
    found = ExtractionAgent(kg, config=ExtractionConfig(mode="lexical"))([Note(id="n", text=note)])
    assert sorted(e.text.lower() for e in found) == ["anxiety", "influenza"]
    assert all(e.section == "assessment and plan" for e in found)
