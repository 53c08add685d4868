"""Abnormal findings from lab and vital time series, rendered as short text and linked to HPO phenotypes.

An LLM reads "potassium high (6.1 mmol/L)" far more reliably than a table of numbers, and the phenotype id
(HP:0002153 hyperkalemia) lets the summary cite a KG node. Each analyte yields at most one finding per direction:
its most extreme abnormal value, with how often and over which span it was abnormal.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from ehrflow.knowledge.reference_ranges import ReferenceRange, reference_for, to_canonical

Direction = Literal["high", "low"]


class _Code(Protocol):
    system: str
    code: str


class MeasurementLike(Protocol):
    """The fields of ``ehrflow.records.Measurement`` used here (``knowledge`` does not import ``records``)."""

    time: dt.datetime
    variable: str
    value: float | None
    unit: str | None
    source_code: _Code | None


_UNITLESS = {"", "ph", "score", "{score}", "fraction", "ratio", "{inr}", "[ph]", "units"}


class Finding(BaseModel):
    """One abnormal analyte in one direction; ``value``/``unit`` are as measured, comparisons use canonical units."""

    model_config = ConfigDict(frozen=True)

    analyte: str
    variable: str
    """The source variable name of the most extreme value (e.g. "K", "Potassium")."""
    direction: Direction
    value: float
    unit: str
    critical: bool
    z_reference: float | None
    """Distance from the range's centre, taking the range as mean +/- 2 SD; ``None`` for one-sided ranges."""
    z_series: float | None
    """Distance from the patient's own mean for this analyte (needs >= 3 values that vary)."""
    abnormal_count: int
    total_count: int
    first_time: dt.datetime
    last_time: dt.datetime
    """Time span of the abnormal values in this direction."""
    phenotype_node_id: str | None
    text: str


@dataclass
class FindingsReport:
    """Findings plus what could not be assessed, so callers can see how much of the record was used."""

    findings: list[Finding] = field(default_factory=list)
    assessed: int = 0
    unknown_variables: Counter[str] = field(default_factory=Counter)
    unconvertible_units: Counter[str] = field(default_factory=Counter)
    """``"variable [unit]"`` -> count of values whose unit has no conversion to the analyte's unit."""
    without_range: Counter[str] = field(default_factory=Counter)
    non_numeric: int = 0


@dataclass
class _Value:
    canonical: float
    value: float
    unit: str
    variable: str
    time: dt.datetime


def assess_measurements(measurements: Iterable[MeasurementLike], include_critical_only: bool = False) -> FindingsReport:
    """Compares every numeric measurement with its reference range; unknown variables are counted, not guessed."""
    report = FindingsReport()
    series: dict[str, tuple[ReferenceRange, list[_Value]]] = {}
    for m in measurements:
        loinc = m.source_code.code if m.source_code is not None and m.source_code.system == "LOINC" else None
        ref = reference_for(m.variable, loinc)
        if ref is None:
            report.unknown_variables[m.variable] += 1
            continue
        if not ref.assessed():
            report.without_range[ref.analyte] += 1
            continue
        if m.value is None:
            report.non_numeric += 1
            continue
        converted = to_canonical(ref, m.value, m.unit, m.variable)
        if converted is None:
            report.unconvertible_units[f"{m.variable} [{m.unit}]"] += 1
            continue
        canonical, unit = converted
        series.setdefault(ref.analyte, (ref, []))[1].append(_Value(canonical, m.value, unit, m.variable, m.time))
        report.assessed += 1
    for ref, values in series.values():
        for direction in ("high", "low"):
            finding = _finding(ref, values, direction)
            if finding is not None and (finding.critical or not include_critical_only):
                report.findings.append(finding)
    report.findings.sort(key=lambda f: (not f.critical, -abs(f.z_reference or 0.0), f.analyte, f.direction))
    return report


def abnormal_findings(measurements: Iterable[MeasurementLike], include_critical_only: bool = False) -> list[Finding]:
    """The abnormal findings of a set of measurements (see ``assess_measurements`` for what was skipped)."""
    return assess_measurements(measurements, include_critical_only).findings


def findings_text(findings: Iterable[Finding]) -> str:
    """One line per finding, for a prompt."""
    return "\n".join(f.text for f in findings)


def _finding(ref: ReferenceRange, values: list[_Value], direction: Direction) -> Finding | None:
    if direction == "high":
        abnormal = [v for v in values if ref.high is not None and v.canonical > ref.high]
        extreme = max(abnormal, key=lambda v: v.canonical, default=None)
        critical_bound, phenotype = ref.critical_high, ref.high_phenotype
    else:
        abnormal = [v for v in values if ref.low is not None and v.canonical < ref.low]
        extreme = min(abnormal, key=lambda v: v.canonical, default=None)
        critical_bound, phenotype = ref.critical_low, ref.low_phenotype
    if extreme is None:
        return None
    critical = critical_bound is not None and (
        extreme.canonical >= critical_bound if direction == "high" else extreme.canonical <= critical_bound
    )
    times = [v.time for v in abnormal]
    return Finding(
        analyte=ref.analyte,
        variable=extreme.variable,
        direction=direction,
        value=extreme.value,
        unit=extreme.unit,
        critical=critical,
        z_reference=_z_reference(ref, extreme.canonical),
        z_series=_z_series([v.canonical for v in values], extreme.canonical),
        abnormal_count=len(abnormal),
        total_count=len(values),
        first_time=min(times),
        last_time=max(times),
        phenotype_node_id=phenotype,
        text=_text(ref.analyte, direction, critical, extreme.value, extreme.unit),
    )


def _z_reference(ref: ReferenceRange, value: float) -> float | None:
    if ref.low is None or ref.high is None or ref.high <= ref.low:
        return None
    centre, sd = (ref.low + ref.high) / 2, (ref.high - ref.low) / 4
    return round((value - centre) / sd, 2)


def _z_series(values: list[float], value: float) -> float | None:
    if len(values) < 3:
        return None
    sd = statistics.pstdev(values)
    if sd == 0 or not math.isfinite(sd):
        return None
    return round((value - statistics.fmean(values)) / sd, 2)


def _text(analyte: str, direction: Direction, critical: bool, value: float, unit: str) -> str:
    amount = f"{value:.4g}"
    if unit.strip().casefold() not in _UNITLESS:
        amount += f" {unit.strip()}"
    level = f"critically {direction}" if critical else direction
    return f"{analyte} {level} ({amount})"


__all__ = ["Finding", "FindingsReport", "MeasurementLike", "abnormal_findings", "assess_measurements", "findings_text"]
