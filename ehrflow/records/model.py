"""The EHR data model every stage of ehrflow reads.

Times are timezone-aware. Sources with real (date-shifted) clock times (MIMIC, Synthea, FHIR)
are read as UTC. Sources that only give offsets (PhysioNet 2012: hours since ICU admission)
set ``Admission.time_basis = "relative"`` and anchor the admission at ``RELATIVE_EPOCH``, so
``measurement.time - admission.admit_time`` is the offset the source gave.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Annotated, Any, Literal, overload

import numpy as np
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

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


_MEASUREMENT_FIELDS = ("time", "variable", "value", "text_value", "unit", "source_code")
_new_measurement = Measurement.__new__
_set_attr = object.__setattr__


class CodedColumn(Sequence[Any]):
    """A column of values repeated across rows (times, item names, codes): per row, an index into a table of values
    built once each. Slices share the table and view the indices, so splitting a batch per admission copies nothing."""

    __slots__ = ("indices", "table")

    def __init__(self, indices: np.ndarray, table: Sequence[Any]) -> None:
        self.indices = indices
        self.table = table

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> CodedColumn: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return CodedColumn(self.indices[index], self.table)
        return self.table[self.indices[index]]

    def __iter__(self) -> Iterator[Any]:
        return map(self.table.__getitem__, self.indices.tolist())

    def __reduce__(self) -> tuple[type[CodedColumn], tuple[np.ndarray, list[Any]]]:
        """Pickled (e.g. one patient sent to a Ray worker) with only the table entries its rows use."""
        used, indices = np.unique(self.indices, return_inverse=True)
        return CodedColumn, (indices, [self.table[i] for i in used.tolist()])


class Measurements(Sequence[Measurement]):
    """An admission's measurements, held as columns; each item is a ``Measurement`` built on access.

    Measurements are the bulk of EHR data (817k in the MIMIC-III demo, ~360M in full MIMIC-III), and
    one pydantic object per value cost more than parsing the CSV it came from and several times the
    memory of the columns. Items come out as fresh objects: to change a value, build a new
    ``Measurement`` and store a new sequence. Validated on the way in (``append``, ``extend``, pydantic
    validation of a list); loaders that checked whole columns themselves use ``from_checked_columns``.
    """

    __slots__ = ("_columns",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, items: Iterable[Measurement] = ()) -> None:
        self._columns: tuple[Sequence[Any], ...] = tuple([] for _ in _MEASUREMENT_FIELDS)
        self.extend(items)

    @classmethod
    def from_checked_columns(
        cls,
        time: Sequence[dt.datetime],
        variable: Sequence[str],
        value: Sequence[float | None],
        text_value: Sequence[str | None],
        unit: Sequence[str | None],
        source_code: Sequence[Code | None],
    ) -> Measurements:
        """Columns (lists, or ``CodedColumn``s) whose rows already satisfy every ``Measurement`` validator: the
        caller checked them. They are kept, not copied."""
        columns = (time, variable, value, text_value, unit, source_code)
        if len({len(c) for c in columns}) > 1:
            raise ValueError(f"measurement columns differ in length: {[len(c) for c in columns]}")
        out = cls.__new__(cls)
        out._columns = columns
        return out

    @classmethod
    def of(cls, items: Iterable[Measurement]) -> Measurements:
        """``items`` itself when it already is a ``Measurements`` (e.g. a list set by ``model_copy(update=...)``
        is not), else a validated copy."""
        return items if isinstance(items, cls) else cls(items)

    def column(self, name: str) -> Sequence[Any]:
        """One field of every row, in order, without building items (for bulk readers; do not modify it)."""
        try:
            return self._columns[_MEASUREMENT_FIELDS.index(name)]
        except ValueError:
            raise KeyError(f"no measurement field {name!r}; fields: {', '.join(_MEASUREMENT_FIELDS)}") from None

    def _lists(self) -> tuple[list[Any], ...]:
        """The columns as lists, converted once before the first change."""
        if not all(type(c) is list for c in self._columns):
            self._columns = tuple(list(c) for c in self._columns)
        return self._columns  # type: ignore[return-value]

    def append(self, item: Measurement) -> None:
        self.extend((item,))

    def extend(self, items: Iterable[Measurement]) -> None:
        """Add validated ``Measurement`` objects (anything else is a ``TypeError``)."""
        rows = []
        for item in items:
            if not isinstance(item, Measurement):
                raise TypeError(f"expected a Measurement, got {type(item).__name__}")
            rows.append(item.__dict__)
        for column, name in zip(self._lists(), _MEASUREMENT_FIELDS, strict=True):
            column.extend([row[name] for row in rows])

    def clear(self) -> None:
        self._columns = tuple([] for _ in _MEASUREMENT_FIELDS)

    def __len__(self) -> int:
        return len(self._columns[0])

    @staticmethod
    def _build(
        time: dt.datetime,
        variable: str,
        value: float | None,
        text_value: str | None,
        unit: str | None,
        source_code: Code | None,
    ) -> Measurement:
        """One item without re-running the validators: the columns hold only values that passed them."""
        m = _new_measurement(Measurement)
        _set_attr(
            m,
            "__dict__",
            {
                "time": time,
                "variable": variable,
                "value": value,
                "text_value": text_value,
                "unit": unit,
                "source_code": source_code,
            },
        )
        _set_attr(m, "__pydantic_fields_set__", set(_MEASUREMENT_FIELDS))
        _set_attr(m, "__pydantic_extra__", None)
        _set_attr(m, "__pydantic_private__", None)
        return m

    @overload
    def __getitem__(self, index: int) -> Measurement: ...
    @overload
    def __getitem__(self, index: slice) -> Measurements: ...
    def __getitem__(self, index: int | slice) -> Measurement | Measurements:
        if isinstance(index, slice):
            return Measurements.from_checked_columns(*(c[index] for c in self._columns))
        return self._build(*(c[index] for c in self._columns))

    def __iter__(self) -> Iterator[Measurement]:
        return map(self._build, *self._columns)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Measurements):
            return len(self) == len(other) and all(
                list(a) == list(b) for a, b in zip(self._columns, other._columns, strict=True)
            )
        if isinstance(other, list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Measurements({len(self)} values)"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        """Validated from a list of measurements, or from the column form ``PatientStore`` writes (an existing
        ``Measurements`` passes as is); serialised as a list of measurements, or as columns when the serialisation
        context has ``{"measurement_columns": True}``."""
        rows = core_schema.no_info_after_validator_function(cls, handler.generate_schema(list[Measurement]))
        columns = core_schema.no_info_after_validator_function(
            _checked_columns, handler.generate_schema(_MeasurementColumns)
        )

        def validate(value: Any, validate_rows: core_schema.ValidatorFunctionWrapHandler) -> Measurements:
            if isinstance(value, cls):
                return value
            if isinstance(value, dict):
                try:
                    return _checked_columns(_MeasurementColumns.model_validate(value))
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"measurement columns: {where}: {first['msg']}") from None
            return validate_rows(value)

        def serialize(value: Iterable[Measurement], info: core_schema.SerializationInfo) -> Any:
            data = Measurements.of(value)._columns  # a plain list, set by assignment or model_copy(update=), too
            if info.context and info.context.get("measurement_columns"):
                return {name: list(column) for name, column in zip(_MEASUREMENT_FIELDS, data, strict=True)}
            return [dict(zip(_MEASUREMENT_FIELDS, row, strict=True)) for row in zip(*data, strict=True)]

        return core_schema.json_or_python_schema(
            # JSON is validated in Rust without first becoming Python objects: a union, not the wrapper
            json_schema=core_schema.union_schema([(rows, "rows"), (columns, "columns")]),
            python_schema=core_schema.no_info_wrap_validator_function(validate, rows),
            serialization=core_schema.plain_serializer_function_ser_schema(serialize, info_arg=True),
        )


class _MeasurementColumns(_Record):
    time: list[AwareDatetime]
    variable: list[Annotated[str, Field(min_length=1)]]
    value: list[float | None]
    text_value: list[str | None]
    unit: list[str | None]
    source_code: list[Code | None]


def _checked_columns(columns: _MeasurementColumns) -> Measurements:
    """The column form, checked as a whole: what ``Measurement``'s validators check per item, per column."""
    lengths = {name: len(getattr(columns, name)) for name in _MEASUREMENT_FIELDS}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"measurement columns differ in length: {lengths}")
    for row, (value, text) in enumerate(zip(columns.value, columns.text_value, strict=True)):
        if value is None:
            if not text:
                raise ValueError(f"measurement {row} ({columns.variable[row]!r}) has neither value nor text_value")
        elif not math.isfinite(value):
            raise ValueError(f"measurement {row}: value must be finite (got {value!r})")
    return Measurements.from_checked_columns(*(getattr(columns, name) for name in _MEASUREMENT_FIELDS))


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
    measurements: Measurements = Field(default_factory=Measurements)
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
    "CodedColumn",
    "ICUStay",
    "Measurement",
    "Measurements",
    "MedicationOrder",
    "Note",
    "Outcomes",
    "Patient",
    "Sex",
]
