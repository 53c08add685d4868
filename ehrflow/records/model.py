"""The EHR data model every stage of ehrflow reads.

Times are timezone-aware. Sources with real (date-shifted) clock times (MIMIC, Synthea, FHIR)
are read as UTC. Sources that only give offsets (PhysioNet 2012: hours since ICU admission)
set ``Admission.time_basis = "relative"`` and anchor the admission at ``RELATIVE_EPOCH``, so
``measurement.time - admission.admit_time`` is the offset the source gave.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RELATIVE_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
"""Anchor for sources whose times are offsets from ICU/hospital admission."""

CodeSystem = Literal[
    "ICD9CM",
    "ICD10CM",
    "ICD9PCS",
    "ICD10PCS",
    "SNOMEDCT",
    "LOINC",
    "RXNORM",
    "NDC",
    "ATC",
    "CPT",
    "HCPCS",
    "MIMIC_ITEMID",
    "PHYSIONET2012",
    "LOCAL",
]
CODE_SYSTEMS: tuple[str, ...] = CodeSystem.__args__  # type: ignore[attr-defined]

Sex = Literal["F", "M", "U"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False)


def _require_aware(value: dt.datetime | None, field: str) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{field} must be timezone-aware (got naive {value.isoformat()})")
    return value


class Code(_Record):
    """A coded concept: diagnosis, procedure, lab item, drug."""

    system: CodeSystem
    code: str = Field(min_length=1)
    description: str | None = None

    @field_validator("code")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("code is empty")
        return v


class MedicationOrder(_Record):
    name: str = Field(min_length=1)
    ndc: str | None = None
    rxnorm: str | None = None
    atc: str | None = None
    dose: str | None = None
    dose_unit: str | None = None
    route: str | None = None
    start: dt.datetime | None = None
    stop: dt.datetime | None = None

    @field_validator("start", "stop")
    @classmethod
    def _aware(cls, v: dt.datetime | None, info) -> dt.datetime | None:  # noqa: ANN001
        return _require_aware(v, info.field_name)


class Measurement(_Record):
    """One observed value of a lab test or vital sign, with its unit and source code."""

    time: dt.datetime
    variable: str = Field(min_length=1)
    value: float | None = None
    text_value: str | None = None
    unit: str | None = None
    source_code: Code | None = None

    @field_validator("time")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        return _require_aware(v, "time")  # type: ignore[return-value]

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"value must be finite (got {v!r})")
        return v

    @model_validator(mode="after")
    def _has_value(self) -> Measurement:
        if self.value is None and not self.text_value:
            raise ValueError(f"measurement of {self.variable!r} has neither value nor text_value")
        return self


class Note(_Record):
    id: str = Field(min_length=1)
    time: dt.datetime | None = None
    category: str = "note"
    text: str

    @field_validator("time")
    @classmethod
    def _aware(cls, v: dt.datetime | None) -> dt.datetime | None:
        return _require_aware(v, "time")


class ICUStay(_Record):
    id: str
    intime: dt.datetime | None = None
    outtime: dt.datetime | None = None
    unit: str | None = None


class Outcomes(_Record):
    """Derived labels. ``None`` means unknown, never "no"."""

    in_hospital_death: bool | None = None
    readmission_30d: bool | None = None
    length_of_stay_days: float | None = None


class Admission(_Record):
    id: str = Field(min_length=1)
    admit_time: dt.datetime | None = None
    discharge_time: dt.datetime | None = None
    time_basis: Literal["absolute", "relative"] = "absolute"
    admission_type: str | None = None
    inpatient: bool = True
    """False for ambulatory/wellness encounters (FHIR, Synthea): they get no outcome labels and
    do not count as readmissions."""
    icu_stays: list[ICUStay] = Field(default_factory=list)
    diagnoses: list[Code] = Field(default_factory=list)
    procedures: list[Code] = Field(default_factory=list)
    medications: list[MedicationOrder] = Field(default_factory=list)
    measurements: list[Measurement] = Field(default_factory=list)
    notes: list[Note] = Field(default_factory=list)
    outcomes: Outcomes = Field(default_factory=Outcomes)
    static: dict[str, float | str | None] = Field(default_factory=dict)
    """Source-specific static descriptors (e.g. PhysioNet ICUType, Height)."""

    @field_validator("admit_time", "discharge_time")
    @classmethod
    def _aware(cls, v: dt.datetime | None, info) -> dt.datetime | None:  # noqa: ANN001
        return _require_aware(v, info.field_name)

    @model_validator(mode="after")
    def _ordered(self) -> Admission:
        if self.admit_time and self.discharge_time and self.discharge_time < self.admit_time:
            raise ValueError(
                f"admission {self.id}: discharge_time {self.discharge_time.isoformat()} "
                f"is before admit_time {self.admit_time.isoformat()}"
            )
        return self


class Patient(_Record):
    id: str = Field(min_length=1)
    source: str
    sex: Sex = "U"
    birth_date: dt.date | None = None
    age: float | None = Field(default=None, ge=0, le=130)
    """Age in years at the first admission, where the source gives age rather than birth date."""
    deceased_time: dt.datetime | None = None
    admissions: list[Admission] = Field(default_factory=list)
    notes: list[Note] = Field(default_factory=list)
    """Notes not tied to an admission (note corpora, FHIR documents without an encounter)."""

    def all_notes(self) -> list[Note]:
        return [*self.notes, *(n for a in self.admissions for n in a.notes)]

    def all_measurements(self) -> list[Measurement]:
        return [m for a in self.admissions for m in a.measurements]


__all__ = [
    "CODE_SYSTEMS",
    "RELATIVE_EPOCH",
    "Admission",
    "Code",
    "CodeSystem",
    "ICUStay",
    "Measurement",
    "MedicationOrder",
    "Note",
    "Outcomes",
    "Patient",
    "Sex",
]
