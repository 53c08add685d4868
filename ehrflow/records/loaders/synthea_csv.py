"""Synthea CSV exports (``patients.csv``, ``encounters.csv``, ...) into ``Patient`` records.

One export directory is one unit. Memory stays flat however large the export: DuckDB sorts each
table by patient id (spilling to a temporary directory past ``memory_limit``) and the sorted
streams are merged patient by patient, so only one patient's rows are held in Python at a time.

Mapping decisions:

- Patients get id ``synthea-<Id>``; ``DEATHDATE`` (a date) becomes ``deceased_time`` at midnight
  UTC. Clock times in the export are UTC (``...Z``).
- ``inpatient`` is True only for ``ENCOUNTERCLASS`` ``inpatient``. Synthea ``emergency``
  encounters are emergency-department visits (a few hours; an admission from the ED is its own
  ``inpatient`` encounter), and wellness, ambulatory, outpatient, urgentcare, home, virtual,
  snf and hospice encounters are not acute hospital stays.
- Codes: conditions and procedures are SNOMED CT, observations LOINC, medications RxNorm, unless
  the table has a ``SYSTEM`` column (newer Synthea), which then decides. A code that does not
  look like a code of its system is bad input.
- Rows without an ``ENCOUNTER`` (Synthea's QALY/DALY/QOLS simulation metrics in
  ``observations.csv``) have no place in the model, which keeps measurements per admission:
  they are left out and counted in one warning per table. Synthea CSV has no notes, and no
  explicit in-hospital death flag (``derive_outcomes`` works it out from ``DEATHDATE``).
- Bad values are reported with the file, its line and the column; the line is looked up in the
  file only when there is an error to report.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
from pydantic import ValidationError

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.loaders.fhir import SYSTEM_URLS
from ehrflow.records.model import Admission, Code, CodeSystem, Measurement, MedicationOrder, Patient

SOURCE = "synthea"
INPATIENT_CLASSES = frozenset({"inpatient"})
DUCKDB_MEMORY_LIMIT = "1GB"

SYSTEM_NAMES: dict[str, CodeSystem] = {
    "SNOMED-CT": "SNOMEDCT",
    "SNOMED": "SNOMEDCT",
    "SNOMEDCT": "SNOMEDCT",
    "LOINC": "LOINC",
    "RXNORM": "RXNORM",
    "NDC": "NDC",
    "CPT": "CPT",
    "HCPCS": "HCPCS",
    "ICD-10-CM": "ICD10CM",
    "ICD10CM": "ICD10CM",
    "ICD-9-CM": "ICD9CM",
    "ICD9CM": "ICD9CM",
    **{url.upper(): system for url, system in SYSTEM_URLS.items()},
}
"""Values of Synthea's ``SYSTEM`` columns (matched case-insensitively) to the model's CodeSystem."""

CODE_PATTERNS: dict[str, re.Pattern[str]] = {
    "SNOMEDCT": re.compile(r"^\d{6,18}$"),
    "LOINC": re.compile(r"^\d{1,7}-\d$"),
    "RXNORM": re.compile(r"^\d{1,9}$"),
    "NDC": re.compile(r"^\d[\d-]{8,12}\d$"),
    "ICD10CM": re.compile(r"^[A-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?$"),
    "ICD9CM": re.compile(r"^[0-9EV]\d{2}(\.?\d{1,2})?$"),
}


@dataclass(frozen=True)
class _TableSpec:
    name: str
    key: str
    columns: tuple[str, ...]
    optional_columns: tuple[str, ...] = ()
    default_system: CodeSystem | None = None


PATIENTS = _TableSpec("patients.csv", "Id", ("Id", "BIRTHDATE", "DEATHDATE", "GENDER"))
ENCOUNTERS = _TableSpec("encounters.csv", "PATIENT", ("Id", "START", "STOP", "PATIENT", "ENCOUNTERCLASS"))
CONDITIONS = _TableSpec(
    "conditions.csv", "PATIENT", ("START", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"), ("SYSTEM",), "SNOMEDCT"
)
PROCEDURES = _TableSpec(
    "procedures.csv", "PATIENT", ("START", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"), ("SYSTEM",), "SNOMEDCT"
)
OBSERVATIONS = _TableSpec(
    "observations.csv",
    "PATIENT",
    ("DATE", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION", "VALUE", "UNITS"),
    ("TYPE", "SYSTEM"),
    "LOINC",
)
MEDICATIONS = _TableSpec(
    "medications.csv",
    "PATIENT",
    ("START", "STOP", "PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"),
    ("SYSTEM",),
    "RXNORM",
)
CHILD_TABLES = (CONDITIONS, PROCEDURES, OBSERVATIONS, MEDICATIONS)
"""Tables read if present: an export configured without them just has none of those records."""

Row = dict[str, str | None]


class _SortedTable:
    """One CSV table streamed in key order, grouped by key."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, spec: _TableSpec):
        self.path = path
        self.spec = spec
        header = _header(path)
        missing = [c for c in spec.columns if c not in header]
        if missing:
            raise RecordError(path, "line 1", missing[0], f"missing column (header has {len(header)} columns)")
        self.columns = [*spec.columns, *(c for c in spec.optional_columns if c in header)]
        select = ", ".join(f'"{c}"' for c in self.columns)
        query = (
            f"SELECT {select} FROM read_csv(?, columns=?, header=true, auto_detect=false, "
            f"delim=',', quote='\"', escape='\"') ORDER BY \"{spec.key}\" NULLS FIRST"
        )
        try:
            self.cursor = con.cursor().execute(query, [str(path), dict.fromkeys(header, "VARCHAR")])
        except duckdb.Error as exc:
            raise _csv_error(path, exc) from None
        self.groups = self._groups()
        self.head: tuple[str | None, list[Row]] | None = next(self.groups, None)

    def _groups(self) -> Iterator[tuple[str | None, list[Row]]]:
        key_index = self.columns.index(self.spec.key)
        current: list[Row] = []
        current_key: str | None = None
        while True:
            try:
                chunk = self.cursor.fetchmany(4096)
            except duckdb.Error as exc:
                raise _csv_error(self.path, exc) from None
            if not chunk:
                break
            for values in chunk:
                key = values[key_index]
                if current and key != current_key:
                    yield current_key, current
                    current = []
                current_key = key
                current.append(dict(zip(self.columns, values, strict=True)))
        if current:
            yield current_key, current

    def take(self, key: str) -> list[Row]:
        """The rows of ``key`` if the next group is that key's (call ``skip_below`` first)."""
        if self.head is not None and self.head[0] == key:
            rows = self.head[1]
            self.head = next(self.groups, None)
            return rows
        return []

    def skip_below(self, key: str | None) -> Iterator[list[Row]]:
        """Groups whose key sorts before ``key`` (None: all that remain): rows of unknown patients."""
        while self.head is not None and (key is None or self.head[0] is None or self.head[0] < key):
            yield self.head[1]
            self.head = next(self.groups, None)


def _csv_error(path: Path, exc: duckdb.Error) -> RecordError:
    """DuckDB's parse error as a RecordError naming the line (e.g. a row with a missing field)."""
    text = str(exc)
    line = re.search(r"Line: (\d+)", text)
    detail = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)
    message = f"expected {detail[1]} columns, found {detail[2]}" if detail else text.splitlines()[0]
    return RecordError(path, f"line {line[1]}" if line else None, None, f"unreadable CSV row: {message}")


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh), [])


def _line_of(path: Path, row: Row) -> str:
    """The line of ``row`` in ``path``, found by re-reading the file (only done to report an error)."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        index = {name: i for i, name in enumerate(header)}
        wanted = {index[c]: (v or "") for c, v in row.items() if c in index}
        for record in reader:
            if all(i < len(record) and record[i] == v for i, v in wanted.items()):
                return f"line {reader.line_num}"
    return "line ?"


class SyntheaCsvLoader:
    """Loads a Synthea CSV export directory (``exporter.csv.export = true``)."""

    def units(self, path: Path) -> list[Path]:
        path = Path(path)
        if not path.is_dir():
            raise RecordError(path, None, None, "expected a Synthea CSV export directory (with patients.csv)")
        return [path]

    def load(self, unit: Path, sink: ErrorSink) -> Iterator[Patient]:
        unit = Path(unit)
        with tempfile.TemporaryDirectory(prefix="ehrflow-synthea-") as spill:
            con = duckdb.connect(
                ":memory:",
                config={
                    "memory_limit": DUCKDB_MEMORY_LIMIT,
                    "temp_directory": spill,
                    "preserve_insertion_order": False,
                },
            )
            try:
                yield from _ExportReader(unit, con, sink).patients()
            finally:
                con.close()


class _ExportReader:
    def __init__(self, unit: Path, con: duckdb.DuckDBPyConnection, sink: ErrorSink):
        self.unit = unit
        self.con = con
        self.sink = sink
        self.no_encounter: dict[str, int] = {}

    def patients(self) -> Iterator[Patient]:
        try:
            patients = _SortedTable(self.con, self._path(PATIENTS, required=True), PATIENTS)
            encounters = _SortedTable(self.con, self._path(ENCOUNTERS, required=True), ENCOUNTERS)
            children = [_SortedTable(self.con, p, s) for s in CHILD_TABLES if (p := self._path(s, required=False))]
        except RecordError as err:
            self.sink.report(err)
            return
        tables = [encounters, *children]
        try:
            for key, rows in _all_groups(patients):
                for table in tables:
                    for orphan_rows in table.skip_below(key):
                        self._orphans(table, orphan_rows)
                patient = self._patient(patients, key, rows)
                parts = [(table, table.take(key)) for table in tables] if key is not None else []
                if patient is not None:
                    self._fill(patient, parts)
                    yield patient
            for table in tables:
                for orphan_rows in table.skip_below(None):
                    self._orphans(table, orphan_rows)
        except RecordError as err:  # an unreadable file part-way: the unit cannot be read on
            self.sink.report(err)
            return
        for table_name, count in self.no_encounter.items():
            self.sink.warn(
                RecordError(
                    self.unit / table_name,
                    None,
                    "ENCOUNTER",
                    f"{count} rows have no encounter (e.g. Synthea QALY/DALY/QOLS); the model keeps these per "
                    "admission, left out",
                )
            )

    def _path(self, spec: _TableSpec, *, required: bool) -> Path | None:
        path = self.unit / spec.name
        if path.is_file():
            return path
        if required:
            raise RecordError(path, None, None, "missing table: not a Synthea CSV export directory")
        return None

    def _error(self, table: _SortedTable, row: Row, column: str | None, message: str) -> None:
        self.sink.report(RecordError(table.path, _line_of(table.path, row), column, message))

    def _orphans(self, table: _SortedTable, rows: list[Row]) -> None:
        row = rows[0]
        key = row[table.spec.key]
        message = "missing" if key is None else f"references no patient in patients.csv ({len(rows)} rows)"
        self._error(table, row, table.spec.key, message)

    def _patient(self, table: _SortedTable, key: str | None, rows: list[Row]) -> Patient | None:
        row = rows[0]
        if key is None:
            self._error(table, row, "Id", "missing")
            return None
        if len(rows) > 1:
            self._error(table, rows[1], "Id", "duplicate patient id")
            return None
        try:
            gender = row["GENDER"] or "U"
            if gender not in ("M", "F", "U"):
                raise _BadValue("GENDER", f"not M or F: {gender!r}")
            birth = _date(row, "BIRTHDATE") if row["BIRTHDATE"] else None
            death = _date(row, "DEATHDATE") if row["DEATHDATE"] else None
            deceased = None if death is None else dt.datetime(death.year, death.month, death.day, tzinfo=dt.UTC)
            return Patient(id=f"synthea-{key}", source=SOURCE, sex=gender, birth_date=birth, deceased_time=deceased)
        except _BadValue as bad:
            self._error(table, row, bad.column, bad.message)
        except ValidationError as exc:
            self._error(table, row, _validation_field(exc), exc.errors()[0]["msg"])
        return None

    def _fill(self, patient: Patient, parts: list[tuple[_SortedTable, list[Row]]]) -> None:
        admissions: dict[str, Admission] = {}
        for table, rows in parts:
            for row in rows:
                try:
                    if table.spec is ENCOUNTERS:
                        adm = _admission(row)
                        admissions[adm.id] = adm
                    else:
                        self._child(table, row, admissions)
                except _BadValue as bad:
                    self._error(table, row, bad.column, bad.message)
                except ValidationError as exc:
                    self._error(table, row, _validation_field(exc), exc.errors()[0]["msg"])
        patient.admissions = sorted(admissions.values(), key=lambda a: (a.admit_time, a.id))

    def _child(self, table: _SortedTable, row: Row, admissions: dict[str, Admission]) -> None:
        spec = table.spec
        if not row["ENCOUNTER"]:
            self.no_encounter[spec.name] = self.no_encounter.get(spec.name, 0) + 1
            return
        adm = admissions.get(row["ENCOUNTER"])
        if adm is None:
            raise _BadValue("ENCOUNTER", "references no encounter of this patient in encounters.csv")
        code = _code(row, spec)
        if spec is not OBSERVATIONS:
            _time(row, "START")  # unused by the model, but a bad date means a corrupt row
        if spec is CONDITIONS:
            adm.diagnoses.append(code)
        elif spec is PROCEDURES:
            adm.procedures.append(code)
        elif spec is MEDICATIONS:
            adm.medications.append(
                MedicationOrder(
                    name=row["DESCRIPTION"] or code.code,
                    rxnorm=code.code if code.system == "RXNORM" else None,
                    ndc=code.code if code.system == "NDC" else None,
                    start=_time(row, "START"),
                    stop=_time(row, "STOP") if row["STOP"] else None,
                )
            )
        elif spec is OBSERVATIONS:
            adm.measurements.append(_measurement(row, code))


class _BadValue(Exception):
    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column
        self.message = message


def _all_groups(table: _SortedTable) -> Iterator[tuple[str | None, list[Row]]]:
    while table.head is not None:
        key, rows = table.head
        table.head = next(table.groups, None)
        yield key, rows


def _validation_field(exc: ValidationError) -> str | None:
    return ".".join(str(p) for p in exc.errors()[0]["loc"]) or None


def _date(row: Row, column: str) -> dt.date:
    value = row[column] or ""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise _BadValue(column, f"not a date: {value!r}") from None


def _time(row: Row, column: str) -> dt.datetime:
    """A Synthea time (``2021-08-23T03:26:50Z``) or date (midnight UTC), as an aware UTC datetime."""
    value = row[column]
    if not value:
        raise _BadValue(column, "missing")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _BadValue(column, f"not a date or time: {value!r}") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def _admission(row: Row) -> Admission:
    klass = (row["ENCOUNTERCLASS"] or "").strip().lower()
    if not klass:
        raise _BadValue("ENCOUNTERCLASS", "missing")
    if not row["Id"]:
        raise _BadValue("Id", "missing")
    admit = _time(row, "START")
    discharge = _time(row, "STOP") if row["STOP"] else None
    if discharge is not None and discharge < admit:
        raise _BadValue("STOP", f"{row['STOP']} is before START {row['START']}")
    return Admission(
        id=row["Id"],
        admit_time=admit,
        discharge_time=discharge,
        admission_type=klass,
        inpatient=klass in INPATIENT_CLASSES,
    )


def _code(row: Row, spec: _TableSpec) -> Code:
    system = spec.default_system
    if "SYSTEM" in row and row["SYSTEM"]:
        system = SYSTEM_NAMES.get(row["SYSTEM"].strip().upper())
        if system is None:
            raise _BadValue("SYSTEM", f"unknown code system {row['SYSTEM']!r}")
    assert system is not None, f"{spec.name} has no default code system"
    code = (row["CODE"] or "").strip()
    pattern = CODE_PATTERNS.get(system)
    if not code or (pattern is not None and not pattern.match(code)):
        raise _BadValue("CODE", f"not a {system} code: {code!r}")
    return Code(system=system, code=code, description=row["DESCRIPTION"])


def _measurement(row: Row, code: Code) -> Measurement:
    raw = row["VALUE"]
    if raw is None or not raw.strip():
        raise _BadValue("VALUE", "missing")
    kind = (row.get("TYPE") or "").strip().lower()
    number: float | None = None
    if kind == "numeric" or not kind:
        try:
            number = float(raw)
        except ValueError:
            if kind:
                raise _BadValue("VALUE", f"TYPE is numeric but VALUE is {raw!r}") from None
    return Measurement(
        time=_time(row, "DATE"),
        variable=row["DESCRIPTION"] or code.code,
        value=number,
        text_value=None if number is not None else raw,
        unit=row["UNITS"] if number is not None else None,
        source_code=code,
    )


__all__ = ["INPATIENT_CLASSES", "SYSTEM_NAMES", "SyntheaCsvLoader"]
