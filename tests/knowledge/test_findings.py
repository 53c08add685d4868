"""Abnormal findings: reference ranges, units, z-scores, text and HPO links (checked against the open KG)."""

from __future__ import annotations

import datetime as dt
import gzip

import pytest

from ehrflow.knowledge.findings import abnormal_findings, assess_measurements, findings_text
from ehrflow.knowledge.reference_ranges import reference_for, reference_ranges, to_canonical
from ehrflow.records.model import Code, Measurement

T0 = dt.datetime(2024, 1, 1, 8, tzinfo=dt.UTC)

PHYSIONET_2012 = [
    "ALP",
    "ALT",
    "AST",
    "Albumin",
    "BUN",
    "Bilirubin",
    "Cholesterol",
    "Creatinine",
    "DiasABP",
    "FiO2",
    "GCS",
    "Glucose",
    "HCO3",
    "HCT",
    "HR",
    "K",
    "Lactate",
    "MAP",
    "MechVent",
    "Mg",
    "NIDiasABP",
    "NIMAP",
    "NISysABP",
    "Na",
    "PaCO2",
    "PaO2",
    "Platelets",
    "RespRate",
    "SaO2",
    "SysABP",
    "Temp",
    "TroponinI",
    "TroponinT",
    "Urine",
    "WBC",
    "Weight",
    "pH",
]
MIMIC_LABELS = [
    "Potassium", "Sodium", "Creatinine", "Hemoglobin", "White Blood Cells", "Platelet Count", "Glucose", "Lactate",
    "Bicarbonate", "Chloride", "Urea Nitrogen", "Heart Rate", "Respiratory Rate", "Temperature Fahrenheit",
    "O2 saturation pulseoxymetry", "Arterial Blood Pressure systolic", "Arterial Blood Pressure mean",
]  # fmt: skip


def m(variable: str, value: float, unit: str | None = None, hours: float = 0, loinc: str | None = None) -> Measurement:
    code = Code(system="LOINC", code=loinc) if loinc else None
    return Measurement(time=T0 + dt.timedelta(hours=hours), variable=variable, value=value, unit=unit, source_code=code)


def test_high_potassium_gives_text_and_hyperkalemia():
    (finding,) = abnormal_findings([m("K", 4.2, "mmol/L"), m("K", 6.1, "mmol/L", hours=6), m("K", 5.4, "mmol/L", 12)])
    assert finding.text == "potassium high (6.1 mmol/L)"
    assert finding.phenotype_node_id == "HP:0002153"
    assert (finding.direction, finding.value, finding.unit, finding.critical) == ("high", 6.1, "mmol/L", False)
    assert (finding.abnormal_count, finding.total_count) == (2, 3)
    assert (finding.first_time, finding.last_time) == (T0 + dt.timedelta(hours=6), T0 + dt.timedelta(hours=12))
    assert finding.z_reference == pytest.approx((6.1 - 4.25) / 0.375, abs=0.01)
    assert finding.z_series is not None and finding.z_series > 1


def test_normal_values_give_no_finding():
    normal = [m("K", 4.0, "mEq/L"), m("Na", 140, "mEq/L"), m("HR", 72, "bpm"), m("Temp", 37.0, "°C")]
    report = assess_measurements(normal)
    assert report.findings == [] and report.assessed == 4


def test_units_are_kept_and_converted_for_comparison():
    findings = abnormal_findings(
        [
            m("Temperature Fahrenheit", 102.2, "°F"),  # 39 °C
            m("Glucose", 2.5, "mmol/L"),  # 45 mg/dL
            m("Sodium", 118, "mEq/L", loinc="2951-2"),
            m("Creatinine", 80, "umol/L"),  # 0.9 mg/dL: normal
        ]
    )
    texts = {f.analyte: f.text for f in findings}
    assert texts == {
        "temperature": "temperature high (102.2 °F)",
        "glucose": "glucose low (2.5 mmol/L)",
        "sodium": "sodium critically low (118 mEq/L)",
    }
    phenotypes = {f.analyte: f.phenotype_node_id for f in findings}
    assert phenotypes == {"temperature": "HP:0001945", "glucose": "HP:0001943", "sodium": "HP:0002902"}
    assert findings[0].analyte == "sodium"  # critical findings come first


def test_loinc_code_wins_over_display_text():
    (finding,) = abnormal_findings([m("Potassium [Moles/volume] in Serum or Plasma", 2.9, "mmol/L", loinc="2823-3")])
    assert finding.text == "potassium low (2.9 mmol/L)" and finding.phenotype_node_id == "HP:0002900"


def test_unknown_variables_and_units_are_counted_not_guessed():
    report = assess_measurements(
        [m("Mystery score", 99), m("Mystery score", 98), m("K", 9.9, "g/L"), m("Weight", 80, "kg"), m("K", 4, None)]
    )
    assert report.findings == []
    assert report.unknown_variables == {"Mystery score": 2}
    assert report.unconvertible_units == {"K [g/L]": 1}
    assert report.without_range == {"body weight": 1}
    assert report.assessed == 1  # a missing unit is taken as the canonical one


def test_both_directions_and_the_most_extreme_value_are_reported():
    findings = abnormal_findings([m("Glucose", v, "mg/dL", hours=i) for i, v in enumerate([45, 60, 120, 310, 250])])
    # order is by severity, so compare as a set
    assert sorted(findings_text(findings).splitlines()) == ["glucose high (310 mg/dL)", "glucose low (45 mg/dL)"]


def test_physionet_magnesium_is_read_as_mg_per_dl_despite_its_documented_unit():
    assert to_canonical(reference_for("Mg"), 2.0, "mmol/L", "Mg") == (2.0, "mg/dL")
    assert abnormal_findings([m("Mg", 2.0, "mmol/L")]) == []
    (low,) = abnormal_findings([m("Mg", 1.2, "mmol/L")])
    assert low.text == "magnesium low (1.2 mg/dL)"


def test_every_physionet_2012_variable_and_common_mimic_label_is_known():
    assert len(PHYSIONET_2012) == 37
    missing = [v for v in PHYSIONET_2012 + MIMIC_LABELS if reference_for(v) is None]
    assert missing == []


def test_phenotype_ids_exist_in_the_open_kg(shared_data):
    wanted = {
        node_id
        for ref in reference_ranges()
        for node_id in (ref.low_phenotype, ref.high_phenotype)
        if node_id is not None
    }
    assert {"HP:0002153", "HP:0002902"} <= wanted
    found: dict[str, str] = {}
    with gzip.open(shared_data / "kg" / "openkg" / "nodes.tsv.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            node_id, node_type, *_ = line.split("\t", 2)
            if node_id in wanted:
                found[node_id] = node_type
    assert set(found) == wanted
    assert set(found.values()) == {"effect/phenotype"}
