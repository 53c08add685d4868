"""PhysioNet/CinC Challenge 2012 loader: one ICU stay per record, times relative to ICU admission.

Input: ``set-x.tar.gz`` tarballs (or extracted ``set-x/`` folders) of per-record CSV files
``Time,Parameter,Value`` with ``Time`` as ``HH:MM`` since ICU admission, and ``Outcomes-x.txt``
beside them. Records are read one at a time straight from the tarball, so memory stays flat.

Each record becomes a patient ``p12-<RecordID>`` with one admission anchored at
``RELATIVE_EPOCH``. The general descriptors (RecordID, Age, Gender, Height, ICUType and the
initial 00:00 Weight; -1 = missing) fill the patient and ``Admission.static``; the initial
Weight is also kept as a measurement when present, so the Weight series starts at admission.
In lenient mode a record with any bad row is left out whole: a half-read record would look
complete but not be.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.model import RELATIVE_EPOCH, Admission, ICUStay, Measurements, Outcomes, Patient

log = logging.getLogger(__name__)

SOURCE = "physionet2012"

VARIABLE_UNITS: dict[str, str] = {
    "ALP": "IU/L",
    "ALT": "IU/L",
    "AST": "IU/L",
    "Albumin": "g/dL",
    "BUN": "mg/dL",
    "Bilirubin": "mg/dL",
    "Cholesterol": "mg/dL",
    "Creatinine": "mg/dL",
    "DiasABP": "mmHg",
    "FiO2": "fraction",
    "GCS": "score",
    "Glucose": "mg/dL",
    "HCO3": "mmol/L",
    "HCT": "%",
    "HR": "bpm",
    "K": "mEq/L",
    "Lactate": "mmol/L",
    "MAP": "mmHg",
    "MechVent": "0/1",
    "Mg": "mmol/L",
    "NIDiasABP": "mmHg",
    "NIMAP": "mmHg",
    "NISysABP": "mmHg",
    "Na": "mEq/L",
    "PaCO2": "mmHg",
    "PaO2": "mmHg",
    "Platelets": "cells/nL",
    "RespRate": "breaths/min",
    "SaO2": "%",
    "SysABP": "mmHg",
    "Temp": "°C",
    "TroponinI": "μg/L",
    "TroponinT": "μg/L",
    "Urine": "mL",
    "WBC": "cells/nL",
    "Weight": "kg",
    "pH": "pH",
}
"""Units of the 37 time-series variables, as the challenge documentation gives them."""

DESCRIPTORS = frozenset({"RecordID", "Age", "Gender", "Height", "ICUType"})
ICU_TYPES = {1: "CCU", 2: "CSRU", 3: "MICU", 4: "SICU"}
"""ICUType codes: coronary care, cardiac surgery recovery, medical and surgical ICU."""

HEADER = ["Time", "Parameter", "Value"]
OUTCOME_COLUMNS = ("RecordID", "SAPS-I", "SOFA", "Length_of_stay", "Survival", "In-hospital_death")
_SET_NAME = re.compile(r"^set-([A-Za-z0-9]+)(?:\.tar\.gz|\.tgz|\.tar)?$")
_MISSING = -1.0

_time_cache: dict[str, dt.datetime] = {}
_MAX_CACHED_HOURS = 100


def _offset_time(text: str) -> dt.datetime | None:
    """``HH:MM`` since admission -> RELATIVE_EPOCH + offset; None when malformed.

    Fills ``_time_cache`` (looked up by the caller first): all records share the same few thousand times.
    """
    hours, sep, minutes = text.partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2 or int(minutes) >= 60:
        return None
    h = int(hours)
    time = RELATIVE_EPOCH + dt.timedelta(hours=h, minutes=int(minutes))
    if h < _MAX_CACHED_HOURS:
        _time_cache[text] = time
    return time


_ZERO_TIME = RELATIVE_EPOCH


@dataclass(frozen=True)
class _OutcomeRow:
    saps_i: float | None
    sofa: float | None
    length_of_stay_days: float | None
    survival_days: float | None
    in_hospital_death: bool


def _set_letter(unit: Path) -> str | None:
    match = _SET_NAME.match(unit.name)
    return match.group(1) if match else None


def _optional(value: float) -> float | None:
    return None if value == _MISSING else value


class PhysioNet2012Loader:
    """Streams PhysioNet 2012 records from tarballs or extracted set folders."""

    def units(self, path: Path) -> list[Path]:
        path = Path(path)
        if path.is_file():
            if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
                raise RecordError(path, None, None, "expected a set-x.tar.gz tarball or a folder holding them")
            return [path]
        tarballs = sorted(p for p in path.glob("set-*.tar.gz") if p.is_file())
        packed = {_set_letter(p) for p in tarballs}
        folders = []
        for folder in sorted(p for p in path.glob("set-*") if p.is_dir()):
            if _set_letter(folder) in packed:
                log.info("%s: using the tarball of the same set, not the extracted folder", folder)
            else:
                folders.append(folder)
        units = tarballs + folders
        if not units:
            raise RecordError(path, None, None, "no set-*.tar.gz tarball or set-*/ folder found")
        return units

    def load(self, unit: Path, sink: ErrorSink) -> Iterator[Patient]:
        unit = Path(unit)
        outcomes = self._read_outcomes(unit, sink)
        for source, data in self._record_files(unit, sink):
            patient = self._parse_record(source, data, outcomes, sink)
            if patient is not None:
                yield patient

    def _read_outcomes(self, unit: Path, sink: ErrorSink) -> dict[str, _OutcomeRow] | None:
        """``Outcomes-x.txt`` beside the unit, by RecordID; None when there is none (outcomes unknown)."""
        letter = _set_letter(unit)
        path = unit.parent / f"Outcomes-{letter}.txt" if letter else None
        if path is None or not path.is_file():
            log.info("%s: no Outcomes file beside it (looked for %s); outcomes unknown", unit.name, path and path.name)
            return None
        rows: dict[str, _OutcomeRow] = {}
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            missing = [c for c in OUTCOME_COLUMNS if c not in header]
            if missing:
                sink.report(RecordError(path, "line 1", missing[0], f"outcomes header lacks column {missing[0]!r}"))
                return None
            index = [header.index(c) for c in OUTCOME_COLUMNS]
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                parsed = self._outcome_row(path, line_no, row, index, sink)
                if parsed is not None:
                    rows[parsed[0]] = parsed[1]
        return rows

    @staticmethod
    def _outcome_row(
        path: Path, line_no: int, row: list[str], index: list[int], sink: ErrorSink
    ) -> tuple[str, _OutcomeRow] | None:
        values: list[float] = []
        for column, i in zip(OUTCOME_COLUMNS, index, strict=True):
            try:
                values.append(float(row[i]))
            except (IndexError, ValueError):
                sink.report(RecordError(path, f"line {line_no}", column, "missing or non-numeric value"))
                return None
        record_id, saps, sofa, los, survival, death = values
        if death not in (0.0, 1.0):
            sink.report(RecordError(path, f"line {line_no}", "In-hospital_death", f"expected 0 or 1, got {death:g}"))
            return None
        return str(int(record_id)), _OutcomeRow(
            saps_i=_optional(saps),
            sofa=_optional(sofa),
            length_of_stay_days=los if los >= 0 else None,
            survival_days=survival if survival >= 0 else None,
            in_hospital_death=death == 1.0,
        )

    @staticmethod
    def _record_files(unit: Path, sink: ErrorSink) -> Iterator[tuple[str, bytes]]:
        """(source label, bytes) per record file, read sequentially (tar stream mode: flat memory)."""
        if unit.is_dir():
            for file in sorted(unit.glob("*.txt")):
                yield str(file), file.read_bytes()
            return
        current: str | None = None
        try:
            with tarfile.open(unit, "r|*") as tar:
                for member in tar:
                    current = member.name
                    if not member.isfile() or not member.name.endswith(".txt"):
                        continue
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    data = handle.read()
                    yield f"{unit}:{member.name}", data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            location = f"member {current}" if current else "start of archive"
            sink.report(RecordError(unit, location, None, f"truncated or corrupt tarball: {exc}"))

    def _parse_record(
        self, source: str, data: bytes, outcomes: dict[str, _OutcomeRow] | None, sink: ErrorSink
    ) -> Patient | None:
        def reject(line: int | None, field: str | None, message: str) -> None:
            sink.report(RecordError(source, None if line is None else f"line {line}", field, message))

        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            reject(None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            return None
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        if header != HEADER:
            got = ",".join(header)[:60] if header else "nothing"
            reject(1, "header", f"expected 'Time,Parameter,Value', got {got!r}")
            return None

        descriptors: dict[str, float] = {}
        initial_weight: float | None = None
        # measurement columns: every row is checked below (aware time, known variable, finite value)
        times: list[dt.datetime] = []
        variables: list[str] = []
        values: list[float] = []
        units_col: list[str] = []
        units = VARIABLE_UNITS
        time_cache = _time_cache
        offset_time = _offset_time
        isfinite = math.isfinite
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 3:
                if not row:
                    continue
                reject(line_no, "row", f"expected 3 fields (Time,Parameter,Value), got {len(row)}")
                return None
            time_text, parameter, value_text = row
            time = time_cache.get(time_text) or offset_time(time_text)
            if time is None:
                reject(line_no, "Time", f"expected HH:MM since ICU admission, got {time_text[:20]!r}")
                return None
            if not parameter:
                sink.warn(RecordError(source, f"line {line_no}", "Parameter", "empty parameter name; row left out"))
                continue
            try:
                value = float(value_text)
            except ValueError:
                reject(line_no, "Value", f"{parameter}: expected a number, got {value_text[:20]!r}")
                return None
            if not isfinite(value):
                reject(line_no, "Value", f"{parameter}: expected a finite number, got {value_text[:20]!r}")
                return None
            unit = units.get(parameter)
            if unit is not None:
                if initial_weight is None and parameter == "Weight" and time == _ZERO_TIME:
                    initial_weight = value
                    if value == _MISSING:
                        continue
                times.append(time)
                variables.append(parameter)
                values.append(value)
                units_col.append(unit)
            elif parameter in DESCRIPTORS:
                if parameter in descriptors and descriptors[parameter] != value:
                    reject(line_no, parameter, "descriptor given twice with different values")
                    return None
                if parameter == "Gender" and value not in (0.0, 1.0, _MISSING):
                    reject(line_no, "Gender", f"expected 0 (female), 1 (male) or -1 (missing), got {value:g}")
                    return None
                descriptors[parameter] = value
            else:
                reject(line_no, "Parameter", f"unknown parameter name {parameter[:40]!r}")
                return None

        record_value = descriptors.get("RecordID")
        if record_value is None or record_value != int(record_value) or record_value < 0:
            reject(None, "RecordID", "record has no valid RecordID line")
            return None
        record_id = str(int(record_value))
        absent = [None] * len(times), [None] * len(times)  # no text values, no source codes
        measurements = Measurements.from_checked_columns(times, variables, values, absent[0], units_col, absent[1])
        return self._patient(source, record_id, descriptors, initial_weight, measurements, outcomes, sink)

    @staticmethod
    def _patient(
        source: str,
        record_id: str,
        descriptors: dict[str, float],
        initial_weight: float | None,
        measurements: Measurements,
        outcomes: dict[str, _OutcomeRow] | None,
        sink: ErrorSink,
    ) -> Patient | None:
        sex = {0.0: "F", 1.0: "M"}.get(descriptors.get("Gender", _MISSING), "U")
        icu_type = _optional(descriptors.get("ICUType", _MISSING))
        outcome = outcomes.get(record_id) if outcomes is not None else None
        static: dict[str, float | str | None] = {
            "Height": _optional(descriptors.get("Height", _MISSING)),
            "ICUType": icu_type,
            "Weight": None if initial_weight is None else _optional(initial_weight),
        }
        discharge_time = deceased_time = None
        if outcome is not None:
            static["SAPS-I"] = outcome.saps_i
            static["SOFA"] = outcome.sofa
            if outcome.length_of_stay_days is not None:
                discharge_time = RELATIVE_EPOCH + dt.timedelta(days=outcome.length_of_stay_days)
            if outcome.survival_days is not None:
                deceased_time = RELATIVE_EPOCH + dt.timedelta(days=outcome.survival_days)
        patient_id = f"p12-{record_id}"
        try:
            admission = Admission(
                id=patient_id,
                admit_time=RELATIVE_EPOCH,
                discharge_time=discharge_time,
                time_basis="relative",
                admission_type="ICU",
                icu_stays=[
                    ICUStay(
                        id=patient_id,
                        intime=RELATIVE_EPOCH,
                        unit=ICU_TYPES.get(int(icu_type)) if icu_type is not None else None,
                    )
                ],
                outcomes=Outcomes(
                    in_hospital_death=outcome.in_hospital_death if outcome else None,
                    length_of_stay_days=outcome.length_of_stay_days if outcome else None,
                ),
                static=static,
            )
            admission.measurements = measurements  # checked row by row while parsing
            return Patient(
                id=patient_id,
                source=SOURCE,
                sex=sex,
                age=_optional(descriptors.get("Age", _MISSING)),
                deceased_time=deceased_time,
                admissions=[admission],
            )
        except ValidationError as exc:
            sink.report(RecordError.from_validation(source, f"RecordID {record_id}", exc))
            return None


__all__ = ["SOURCE", "VARIABLE_UNITS", "PhysioNet2012Loader"]
