"""Loaders from the standard EHR shapes into ``Patient`` records, by format name.

Every loader streams: memory stays flat however large the input. A loader splits its input
path into *units* (a file, or a directory for table dumps such as MIMIC) and each unit is
ingested in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ehrflow.records.errors import ErrorSink
from ehrflow.records.model import Patient


class Loader(Protocol):
    def units(self, path: Path) -> list[Path]:
        """The independently ingestible pieces of ``path`` (each one transaction)."""
        ...

    def load(self, unit: Path, sink: ErrorSink) -> Iterator[Patient]:
        """Stream the patients of one unit; report bad records to ``sink``."""
        ...


def get_loader(fmt: str) -> Loader:
    from ehrflow.records.loaders import fhir, mimic, notes, physionet2012, synthea_csv

    registry: dict[str, Loader] = {
        "mimic3": mimic.Mimic3Loader(),
        "mimic4": mimic.Mimic4Loader(),
        "fhir": fhir.FhirLoader(),
        "synthea-csv": synthea_csv.SyntheaCsvLoader(),
        "physionet2012": physionet2012.PhysioNet2012Loader(),
        "notes": notes.NotesLoader(),
    }
    if fmt not in registry:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(sorted(registry))}")
    return registry[fmt]


FORMATS = ("mimic3", "mimic4", "fhir", "synthea-csv", "physionet2012", "notes")

__all__ = ["FORMATS", "Loader", "get_loader"]
