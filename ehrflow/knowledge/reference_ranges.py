"""Adult reference ranges for common labs and vitals, keyed by analyte, reachable by variable name or LOINC code.

Values are conventional adult ranges from standard clinical references (e.g. Harrison's / MedlinePlus lab pages);
sex- and age-specific ranges are collapsed into one inclusive range, because the finding is a prompt for the LLM,
not a diagnosis. Each analyte names the HPO phenotype that an abnormal value in each direction suggests, so a
finding links straight into the KG (ids checked against the open KG in the tests).

Sources of variable names: the 37 PhysioNet/CinC 2012 time series, MIMIC-III/IV ``D_LABITEMS``/``D_ITEMS`` labels,
and LOINC codes/display names as FHIR R4 and Synthea observations carry them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ehrflow.knowledge.text import normalize


@dataclass(frozen=True)
class ReferenceRange:
    """Normal range of one analyte in its canonical ``unit``; ``None`` bounds are open-ended."""

    analyte: str
    """Canonical key and display name, e.g. "potassium"."""
    unit: str
    low: float | None
    high: float | None
    critical_low: float | None = None
    critical_high: float | None = None
    low_phenotype: str | None = None
    high_phenotype: str | None = None
    aliases: tuple[str, ...] = ()
    loinc: tuple[str, ...] = ()
    conversions: tuple[tuple[str, float, float], ...] = ()
    """(unit, scale, offset): canonical = value * scale + offset, for units other than ``unit``."""
    synonymous_units: tuple[str, ...] = ()
    """Spellings equal to ``unit`` (mEq/L for monovalent ions, 10*3/uL for cells/nL ...)."""

    def assessed(self) -> bool:
        return self.low is not None or self.high is not None


# Unit spellings: UCUM (FHIR/Synthea: "mm[Hg]", "Cel", "10*3/uL"), MIMIC ("?F", "K/uL"), PhysioNet ("cells/nL").
MMOL = ("mEq/L", "mmol/l")
CELLS = ("cells/nL", "10*3/uL", "10^3/uL", "K/uL", "x10E3/uL", "10^9/L", "10*9/L", "thou/uL")
PER_MIN = ("bpm", "/min", "beats/min", "{beats}/min", "breaths/min", "{breaths}/min", "insp/min", "per min")
MMHG = ("mm[Hg]", "mm Hg")
PERCENT = ("percent", "%")

_RANGES: tuple[ReferenceRange, ...] = (
    # ---- electrolytes and renal
    ReferenceRange(
        "potassium", "mmol/L", 3.5, 5.0, 2.5, 6.5, "HP:0002900", "HP:0002153",
        aliases=("K", "Potassium", "Potassium, Whole Blood", "Serum potassium"),
        loinc=("2823-3", "6298-4", "77142-8"), synonymous_units=MMOL,
    ),
    ReferenceRange(
        "sodium", "mmol/L", 135, 145, 120, 160, "HP:0002902", "HP:0003228",
        aliases=("Na", "Sodium", "Sodium, Whole Blood", "Serum sodium"),
        loinc=("2951-2", "2947-0", "77139-4"), synonymous_units=MMOL,
    ),
    ReferenceRange(
        "chloride", "mmol/L", 98, 107, 80, 120, "HP:0003113", "HP:0011423",
        aliases=("Cl", "Chloride", "Chloride, Whole Blood"), loinc=("2075-0", "2069-3"), synonymous_units=MMOL,
    ),
    ReferenceRange(
        "bicarbonate", "mmol/L", 22, 29, 10, 40, "HP:0032066", "HP:0032067",
        aliases=("HCO3", "Bicarbonate", "Carbon Dioxide", "Total CO2", "Calculated Total CO2", "TCO2"),
        loinc=("1963-8", "1960-4", "2028-9", "20565-8"), synonymous_units=MMOL,
    ),
    ReferenceRange(
        "blood urea nitrogen", "mg/dL", 7, 20, None, 100, None, "HP:0003138",
        aliases=("BUN", "Urea Nitrogen", "Blood Urea Nitrogen"),
        loinc=("3094-0", "6299-2"), conversions=(("mmol/L", 2.801, 0.0),),
    ),
    ReferenceRange(
        "creatinine", "mg/dL", 0.6, 1.3, None, 10.0, None, "HP:0003259",
        aliases=("Creatinine", "Serum creatinine"), loinc=("2160-0", "38483-4"),
        conversions=(("umol/L", 1 / 88.42, 0.0),),
    ),
    ReferenceRange(
        "glucose", "mg/dL", 70, 140, 40, 500, "HP:0001943", "HP:0003074",
        aliases=("Glucose", "Glucose, Whole Blood", "Blood glucose", "Fingerstick Glucose", "Glucose finger stick"),
        loinc=("2345-7", "2339-0", "41653-7", "2341-6"), conversions=(("mmol/L", 18.016, 0.0),),
    ),  # random (non-fasting) glucose: most inpatient values are not fasting
    ReferenceRange(
        "calcium", "mg/dL", 8.5, 10.5, 6.0, 13.0, "HP:0002901", "HP:0003072",
        aliases=("Calcium", "Calcium, Total", "Ca"), loinc=("17861-6", "49765-1"),
        conversions=(("mmol/L", 4.008, 0.0),),
    ),
    ReferenceRange(
        "magnesium", "mg/dL", 1.7, 2.4, 1.0, 4.8, "HP:0002917", "HP:0002918",
        aliases=("Mg", "Magnesium"), loinc=("19123-9", "2601-3"),
        conversions=(("mmol/L", 2.431, 0.0), ("mEq/L", 1.2155, 0.0)),
    ),
    ReferenceRange(
        "phosphate", "mg/dL", 2.5, 4.5, 1.0, 9.0, "HP:0002148", "HP:0002905",
        aliases=("Phosphate", "Phosphorus", "Phosphorus, Inorganic"), loinc=("2777-1",),
        conversions=(("mmol/L", 3.097, 0.0),),
    ),
    ReferenceRange(
        "anion gap", "mmol/L", 8, 16, None, 25, None, None, aliases=("Anion Gap",), loinc=("33037-3", "1863-0"),
        synonymous_units=MMOL,
    ),
    # ---- blood count and coagulation
    ReferenceRange(
        "hemoglobin", "g/dL", 12.0, 17.5, 7.0, 20.0, "HP:0001903", "HP:0001900",
        aliases=("Hemoglobin", "Hgb", "HGB", "Hemoglobin, Blood"), loinc=("718-7", "30313-1", "20509-6"),
        conversions=(("g/L", 0.1, 0.0), ("mmol/L", 1.611, 0.0)),
    ),
    ReferenceRange(
        "hematocrit", "%", 36, 50, 20, 60, "HP:0031851", "HP:0001899",
        aliases=("HCT", "Hematocrit", "Hematocrit, Calculated"), loinc=("4544-3", "20570-8"),
        synonymous_units=PERCENT,
    ),
    ReferenceRange(
        "white blood cell count", "10^3/uL", 4.0, 11.0, 1.0, 30.0, "HP:0001882", "HP:0001974",
        aliases=("WBC", "White Blood Cells", "WBC Count", "Leukocytes", "White blood cell count"),
        loinc=("6690-2", "26464-8", "804-5"), synonymous_units=CELLS,
    ),
    ReferenceRange(
        "platelet count", "10^3/uL", 150, 400, 20, 1000, "HP:0001873", "HP:0001894",
        aliases=("Platelets", "Platelet Count", "PLT"), loinc=("777-3", "26515-7"), synonymous_units=CELLS,
    ),
    ReferenceRange(
        "INR", "", 0.8, 1.2, None, 5.0, None, "HP:0008151", aliases=("INR(PT)", "INR", "PT INR"),
        loinc=("6301-6", "34714-6"), synonymous_units=("{INR}", "ratio"),
    ),
    # ---- liver, lipids, cardiac, metabolic
    ReferenceRange(
        "lactate", "mmol/L", 0.5, 2.0, None, 4.0, None, "HP:0002151",
        aliases=("Lactate", "Lactic Acid"), loinc=("2524-7", "32693-4", "2518-9"),
        conversions=(("mg/dL", 0.111, 0.0),), synonymous_units=MMOL,
    ),
    ReferenceRange(
        "albumin", "g/dL", 3.5, 5.0, 1.5, None, "HP:0003073", None, aliases=("Albumin",), loinc=("1751-7", "2862-1"),
        conversions=(("g/L", 0.1, 0.0),),
    ),
    ReferenceRange(
        "total bilirubin", "mg/dL", 0.1, 1.2, None, 15.0, None, "HP:0002904",
        aliases=("Bilirubin", "Bilirubin, Total", "Total bilirubin"), loinc=("1975-2", "42719-5"),
        conversions=(("umol/L", 1 / 17.1, 0.0),),
    ),
    ReferenceRange(
        "alkaline phosphatase", "U/L", 44, 147, None, None, None, "HP:0003155",
        aliases=("ALP", "Alkaline Phosphatase"), loinc=("6768-6",), synonymous_units=("IU/L",),
    ),
    ReferenceRange(
        "alanine aminotransferase", "U/L", 7, 55, None, None, None, "HP:0031964",
        aliases=("ALT", "Alanine Aminotransferase (ALT)", "ALT (SGPT)"), loinc=("1742-6", "1743-4"),
        synonymous_units=("IU/L",),
    ),
    ReferenceRange(
        "aspartate aminotransferase", "U/L", 10, 40, None, None, None, "HP:0031956",
        aliases=("AST", "Asparate Aminotransferase (AST)", "Aspartate Aminotransferase (AST)", "AST (SGOT)"),
        loinc=("1920-8", "30239-8"), synonymous_units=("IU/L",),
    ),
    ReferenceRange(
        "total cholesterol", "mg/dL", None, 200, None, None, None, "HP:0003124",
        aliases=("Cholesterol", "Cholesterol, Total", "Total Cholesterol"), loinc=("2093-3",),
        conversions=(("mmol/L", 38.67, 0.0),),
    ),
    ReferenceRange(
        "troponin I", "ng/mL", None, 0.04, None, None, None, "HP:0410173",
        aliases=("TroponinI", "Troponin I", "Troponin I, cardiac"), loinc=("10839-9", "42757-5"),
        synonymous_units=("ug/L", "μg/L", "µg/L"), conversions=(("ng/L", 0.001, 0.0), ("pg/mL", 0.001, 0.0)),
    ),
    ReferenceRange(
        "troponin T", "ng/mL", None, 0.01, None, None, None, "HP:0410174",
        aliases=("TroponinT", "Troponin T"), loinc=("6598-7", "67151-1"),
        synonymous_units=("ug/L", "μg/L", "µg/L"), conversions=(("ng/L", 0.001, 0.0), ("pg/mL", 0.001, 0.0)),
    ),
    ReferenceRange(
        "hemoglobin A1c", "%", None, 5.6, None, None, None, "HP:0040217",
        aliases=("Hemoglobin A1c", "HbA1c", "% Hemoglobin A1c"), loinc=("4548-4", "17856-6"),
        synonymous_units=PERCENT,
    ),
    # ---- blood gases
    ReferenceRange(
        "pH", "", 7.35, 7.45, 7.2, 7.6, "HP:0001941", "HP:0001948",
        aliases=("pH", "Arterial pH", "PH (Arterial)"), loinc=("2744-1", "11558-4", "2753-2"),
        synonymous_units=("pH", "[pH]", "units"),
    ),
    ReferenceRange(
        "PaCO2", "mmHg", 35, 45, 20, 70, "HP:0012417", "HP:0012416",
        aliases=("PaCO2", "pCO2", "Arterial PaCO2", "PCO2"), loinc=("2019-8", "11557-6"), synonymous_units=MMHG,
    ),
    ReferenceRange(
        "PaO2", "mmHg", 75, None, 50, None, "HP:0012418", None,
        aliases=("PaO2", "pO2", "Arterial PaO2", "PO2"), loinc=("2703-7", "11556-8"), synonymous_units=MMHG,
    ),  # no upper bound: a high PaO2 reflects supplemental oxygen, not a phenotype
    ReferenceRange(
        "oxygen saturation", "%", 94, None, 88, None, "HP:0012418", None,
        aliases=("SaO2", "SpO2", "O2 saturation pulseoxymetry", "Oxygen saturation", "O2 Saturation", "SaO2 (arterial)"),
        loinc=("2708-6", "59408-5", "20564-1", "59417-6"), synonymous_units=PERCENT,
    ),  # BTS target range 94-98 %
    # ---- vitals
    ReferenceRange(
        "heart rate", "bpm", 60, 100, 40, 150, "HP:0001662", "HP:0001649",
        aliases=("HR", "Heart Rate", "Heart rate", "Pulse"), loinc=("8867-4",), synonymous_units=PER_MIN,
    ),
    ReferenceRange(
        "respiratory rate", "breaths/min", 12, 20, 8, 35, "HP:0046507", "HP:0002789",
        aliases=("RespRate", "Respiratory Rate", "Resp Rate", "Respiratory Rate (Total)"), loinc=("9279-1",),
        synonymous_units=PER_MIN,
    ),
    ReferenceRange(
        "temperature", "°C", 36.0, 38.0, 32.0, 40.0, "HP:0002045", "HP:0001945",
        aliases=(
            "Temp", "Temperature", "Temperature Celsius", "Body temperature", "Temperature C",
            "Temperature Fahrenheit", "Temperature F",
        ),
        loinc=("8310-5", "8331-1"), synonymous_units=("Cel", "C", "degC", "deg C", "celsius", "?C"),
        conversions=tuple((u, 5 / 9, -32 * 5 / 9) for u in ("°F", "[degF]", "degF", "F", "?F", "fahrenheit")),
    ),
    ReferenceRange(
        "systolic blood pressure", "mmHg", 90, 140, 70, 200, "HP:0002615", "HP:0004421",
        aliases=(
            "SysABP", "NISysABP", "Systolic Blood Pressure", "Arterial Blood Pressure systolic",
            "Non Invasive Blood Pressure systolic", "Arterial BP [Systolic]", "NBP [Systolic]", "NBPs", "ABPs",
        ),
        loinc=("8480-6", "76215-3", "8459-0"), synonymous_units=MMHG,
    ),
    ReferenceRange(
        "diastolic blood pressure", "mmHg", 60, 90, 40, 120, "HP:0002615", "HP:0005117",
        aliases=(
            "DiasABP", "NIDiasABP", "Diastolic Blood Pressure", "Arterial Blood Pressure diastolic",
            "Non Invasive Blood Pressure diastolic", "Arterial BP [Diastolic]", "NBP [Diastolic]", "NBPd", "ABPd",
        ),
        loinc=("8462-4", "76213-8", "8453-3"), synonymous_units=MMHG,
    ),
    ReferenceRange(
        "mean arterial pressure", "mmHg", 65, 110, 50, 140, "HP:0002615", "HP:0000822",
        aliases=(
            "MAP", "NIMAP", "Mean Arterial Pressure", "Arterial Blood Pressure mean", "Non Invasive Blood Pressure mean",
            "Arterial BP Mean", "NBP Mean", "NBPm", "ABPm",
        ),
        loinc=("8478-0", "76214-6"), synonymous_units=MMHG,
    ),
    ReferenceRange(
        "Glasgow coma scale", "", 15, 15, 8, None, "HP:0004372", None,
        aliases=("GCS", "GCS Total", "Glasgow coma scale", "Glasgow Coma Scale Total"), loinc=("9269-2",),
        synonymous_units=("score", "{score}", "points"),
    ),
    # ---- known variables without a range: recognised so they are not counted as unknown
    ReferenceRange("FiO2", "fraction", None, None, aliases=("FiO2", "Inspired O2 Fraction"), loinc=("3150-0", "19996-8")),
    ReferenceRange("mechanical ventilation", "0/1", None, None, aliases=("MechVent",)),
    ReferenceRange("urine output", "mL", None, None, aliases=("Urine", "Urine output", "Urine Out Foley"), loinc=("9187-6",)),
    ReferenceRange("body weight", "kg", None, None, aliases=("Weight", "Body Weight", "Daily Weight"), loinc=("29463-7",)),
    ReferenceRange("body height", "cm", None, None, aliases=("Height", "Body Height"), loinc=("8302-2",)),
)  # fmt: skip

UNIT_CORRECTIONS: dict[tuple[str, str], str] = {
    # PhysioNet 2012 documents Mg in mmol/L, but its values (median 2.0, 5th-95th percentile 1.5-2.8 in set-a)
    # are mg/dL: serum Mg in mmol/L is 0.7-1.0. Taking the documented unit would flag nearly every patient.
    ("mg", "mmol/l"): "mg/dL",
    # MIMIC charts Fahrenheit temperatures under their own label, sometimes without a unit
    ("temperature fahrenheit", ""): "°F",
    ("temperature f", ""): "°F",
}
"""(normalised variable, normalised stated unit) -> the unit the values are really in."""


@dataclass
class _Tables:
    by_analyte: dict[str, ReferenceRange] = field(default_factory=dict)
    by_alias: dict[str, ReferenceRange] = field(default_factory=dict)
    by_loinc: dict[str, ReferenceRange] = field(default_factory=dict)


def _build_tables() -> _Tables:
    tables = _Tables()
    for ref in _RANGES:
        if ref.analyte in tables.by_analyte:
            raise ValueError(f"reference ranges: analyte {ref.analyte!r} defined twice")
        tables.by_analyte[ref.analyte] = ref
        for alias in (ref.analyte, *ref.aliases):
            key = normalize(alias)
            other = tables.by_alias.setdefault(key, ref)
            if other is not ref:
                raise ValueError(f"reference ranges: alias {alias!r} names both {other.analyte!r} and {ref.analyte!r}")
        for code in ref.loinc:
            tables.by_loinc[code] = ref
    return tables


_TABLES = _build_tables()
_UNIT_SPACES = re.compile(r"\s+")


def unit_key(unit: str | None) -> str:
    """Compares unit spellings: case, spaces and micro signs ignored ("μg/L" == "ug/l", "mm Hg" == "mmhg")."""
    if not unit:
        return ""
    return _UNIT_SPACES.sub("", unit).replace("μ", "u").replace("µ", "u").casefold()


def reference_ranges() -> tuple[ReferenceRange, ...]:
    return _RANGES


def reference_for(variable: str, loinc: str | None = None) -> ReferenceRange | None:
    """The analyte a measurement is of: by LOINC code first, then by variable name (case/punctuation-insensitive)."""
    if loinc and loinc in _TABLES.by_loinc:
        return _TABLES.by_loinc[loinc]
    return _TABLES.by_alias.get(normalize(variable))


def to_canonical(ref: ReferenceRange, value: float, unit: str | None, variable: str = "") -> tuple[float, str] | None:
    """``value`` in ``ref.unit`` and the unit the value was really in; ``None`` when the unit is not convertible.

    A missing unit is taken as the canonical one.
    """
    stated = unit_key(unit)
    corrected = UNIT_CORRECTIONS.get((normalize(variable), stated))
    if corrected is not None:
        stated, unit = unit_key(corrected), corrected
    if stated in ("", unit_key(ref.unit)) or stated in {unit_key(u) for u in ref.synonymous_units}:
        return value, unit or ref.unit
    for other, scale, offset in ref.conversions:
        if stated == unit_key(other):
            return value * scale + offset, unit or other
    return None


__all__ = ["UNIT_CORRECTIONS", "ReferenceRange", "reference_for", "reference_ranges", "to_canonical", "unit_key"]
