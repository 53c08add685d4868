"""The EHR data model, loaders, validation and the SQLite patient store."""

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.ingest import IngestReport, ingest_path
from ehrflow.records.labels import derive_outcomes
from ehrflow.records.loaders import FORMATS, get_loader
from ehrflow.records.model import (
    RELATIVE_EPOCH,
    Admission,
    Code,
    ICUStay,
    Measurement,
    Measurements,
    MedicationOrder,
    Note,
    Outcomes,
    Patient,
)
from ehrflow.records.store import CohortFilter, IngestResult, PatientStore

__all__ = [
    "FORMATS",
    "RELATIVE_EPOCH",
    "Admission",
    "Code",
    "CohortFilter",
    "ErrorSink",
    "ICUStay",
    "IngestReport",
    "IngestResult",
    "Measurement",
    "Measurements",
    "MedicationOrder",
    "Note",
    "Outcomes",
    "Patient",
    "PatientStore",
    "RecordError",
    "derive_outcomes",
    "get_loader",
    "ingest_path",
]
