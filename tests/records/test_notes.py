"""Note corpora loader: de-duplication against an independent count, format detection, bad rows."""

from __future__ import annotations

import csv
import gzip
import hashlib
from pathlib import Path

import pytest

from ehrflow.records import CohortFilter, ErrorSink, RecordError, ingest_path
from ehrflow.records.loaders.notes import NotesLoader


def _distinct_texts(paths: list[Path], column: str) -> set[str]:
    """Distinct texts after whitespace normalisation, read with plain csv (independent of the loader)."""
    texts: set[str] = set()
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            texts.update(" ".join(row[column].split()) for row in csv.DictReader(fh))
    return texts


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_mtsamples_deduplicates_to_distinct_texts(shared_data, store):
    path = shared_data / "ehr" / "mtsamples" / "mtsamples_2018-10-14.csv.gz"
    expected = _distinct_texts([path], "transcription")
    report = ingest_path(store, "notes", path)
    summary = store.summary()
    assert report.result.inserted == summary["patients"] == summary["notes"] == len(expected)
    assert len(expected) < 4999  # the corpus does repeat texts; otherwise this test would not test de-duplication
    assert summary["by_source"] == {"mtsamples": len(expected)}
    [first] = store.iter_patients(CohortFilter(limit=1))
    assert first.notes[0].category and first.admissions == []


def test_mts_dialog_folder_deduplicates_section_texts(shared_data, store):
    folder = shared_data / "ehr" / "mts_dialog"
    files = sorted(folder.glob("*.csv"))
    ingest_path(store, "notes", folder)
    summary = store.summary()
    assert summary["patients"] == len(_distinct_texts(files, "section_text"))
    assert summary["by_source"] == {"mts_dialog": summary["patients"]}


def test_duplicates_differing_in_whitespace_are_one_patient(tmp_path):
    text = "HISTORY: Chest pain.\nPLAN: ECG."
    path = _write_csv(
        tmp_path / "notes.csv",
        ["ID", "section_header", "section_text", "dialogue"],
        [
            ["1", "GENHX", text, "Doctor: hi"],
            ["2", "CC", "  HISTORY:  Chest pain. PLAN: ECG.\n", "x"],
            ["3", "CC", "Other.", "y"],
        ],
    )
    patients = list(NotesLoader().load(path, ErrorSink()))
    digest = hashlib.sha256(b"HISTORY: Chest pain. PLAN: ECG.").hexdigest()[:16]
    assert [p.id for p in patients][0] == f"note-{digest}"
    assert len(patients) == 2
    assert [(p.source, p.notes[0].category, p.notes[0].text) for p in patients] == [
        ("mts_dialog", "GENHX", text),
        ("mts_dialog", "CC", "Other."),
    ]


def test_unknown_header_names_file_and_missing_column(tmp_path, store):
    path = _write_csv(tmp_path / "odd.csv", ["medical_specialty", "body"], [["Surgery", "text"]])
    with pytest.raises(RecordError) as info:
        ingest_path(store, "notes", path)
    assert (info.value.source, info.value.location, info.value.field) == (str(path), "line 1", "transcription")
    assert "odd.csv" in str(info.value)
    assert store.summary()["patients"] == 0


def test_empty_text_is_reported_with_line_and_field(tmp_path, store):
    header = ["sample_id", "medical_specialty", "transcription"]
    rows = [["1", "Surgery", "Multi-line\nreport one."], ["2", "Radiology", "   "], ["3", "Urology", "Report three."]]
    path = _write_csv(tmp_path / "mt.csv", header, rows)
    with pytest.raises(RecordError) as info:
        ingest_path(store, "notes", path)
    assert (info.value.location, info.value.field) == ("line 4", "transcription")
    assert store.summary()["patients"] == 0
    report = ingest_path(store, "notes", path, skip_invalid=True)
    assert report.result.inserted == 2 and [r.location for r in report.rejected] == ["line 4"]
