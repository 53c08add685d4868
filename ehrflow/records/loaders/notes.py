"""Note corpora (MTSamples, MTS-Dialog) as note-only patients.

Each distinct note text becomes one patient ``note-<first 16 hex of sha256(normalised text)>``
with one patient-level ``Note``. The corpora repeat texts (MTSamples lists most reports under
two specialties: ~2,400 distinct texts in 4,999 rows), so rows are de-duplicated by that hash;
the first row's category wins. Normalising collapses runs of whitespace and strips the ends,
so layout-only variants count as one text. The format is detected from the CSV header.

MTS-Dialog rows pair a note section with a dialogue; only the note section is kept.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.model import Note, Patient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoteFormat:
    source: str
    text_column: str
    category_column: str
    required: tuple[str, ...]


FORMATS = (
    NoteFormat("mtsamples", "transcription", "medical_specialty", ("medical_specialty", "transcription")),
    NoteFormat("mts_dialog", "section_text", "section_header", ("ID", "section_header", "section_text", "dialogue")),
)


def normalise(text: str) -> str:
    """The text de-duplication compares: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def note_patient_id(text: str) -> str:
    return "note-" + hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def detect_format(path: Path, header: list[str]) -> NoteFormat:
    """The format whose required columns the header has; else an error naming the closest format's gap."""
    present = set(header)
    for fmt in FORMATS:
        if all(c in present for c in fmt.required):
            return fmt
    closest = max(FORMATS, key=lambda f: sum(c in present for c in f.required))
    missing = [c for c in closest.required if c not in present]
    expected = "; ".join(f"{f.source}: {', '.join(f.required)}" for f in FORMATS)
    raise RecordError(
        path, "line 1", missing[0], f"unknown note corpus header: no column {missing[0]!r} (expected {expected})"
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


class NotesLoader:
    """Streams note corpora CSV files (plain or gzip) into note-only patients."""

    def units(self, path: Path) -> list[Path]:
        path = Path(path)
        if path.is_file():
            return [path]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".csv", ".csv.gz")))
        if not files:
            raise RecordError(path, None, None, "no .csv or .csv.gz note files found")
        return files

    def load(self, unit: Path, sink: ErrorSink) -> Iterator[Patient]:
        unit = Path(unit)
        seen: set[str] = set()
        duplicates = 0
        with _open_text(unit) as fh:
            reader = csv.DictReader(fh)
            fmt = detect_format(unit, list(reader.fieldnames or []))
            row_start = 2
            for row in reader:
                line = row_start
                row_start = reader.line_num + 1
                text = row.get(fmt.text_column) or ""
                if not text.strip():
                    sink.report(RecordError(unit, f"line {line}", fmt.text_column, "empty note text"))
                    continue
                patient_id = note_patient_id(text)
                if patient_id in seen:
                    duplicates += 1
                    continue
                seen.add(patient_id)
                category = (row.get(fmt.category_column) or "").strip() or "note"
                try:
                    patient = Patient(
                        id=patient_id,
                        source=fmt.source,
                        notes=[Note(id=f"{patient_id}:note", category=category, text=text)],
                    )
                except ValidationError as exc:
                    sink.report(RecordError.from_validation(unit, f"line {line}", exc))
                    continue
                yield patient
        log.info("%s (%s): %d distinct notes, %d duplicate rows left out", unit.name, fmt.source, len(seen), duplicates)


__all__ = ["FORMATS", "NoteFormat", "NotesLoader", "detect_format", "normalise", "note_patient_id"]
