"""Synthea CSV export loader: the 59-patient export, and small exports written into tmp_path."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ehrflow.records import RecordError, ingest_path


@pytest.fixture(scope="module")
def loaded(shared_data: Path, tmp_path_factory):
    """The staged export ingested once (about 2 s) and shared by the read-only tests."""
    from ehrflow.records import PatientStore

    store = PatientStore(tmp_path_factory.mktemp("synthea") / "patients.db")
    report = ingest_path(store, "synthea-csv", shared_data / "ehr" / "synthea" / "csv")
    return store, report


def test_export_loads_patients_deaths_and_encounter_classes(loaded):
    store, report = loaded
    # Counts from the data's PROVENANCE.md (59 patients, 9 with DEATHDATE, 94 inpatient + 98 emergency).
    assert report.units == 1 and report.result.inserted == 59 and not report.rejected
    patients = list(store.iter_patients())
    assert len(patients) == 59 and all(p.id.startswith("synthea-") and p.source == "synthea" for p in patients)
    deceased = [p for p in patients if p.deceased_time]
    assert len(deceased) == 9 and all(p.deceased_time.tzinfo and p.deceased_time.hour == 0 for p in deceased)

    adms = [a for p in patients for a in p.admissions]
    assert len(adms) == 2590
    assert sum(a.inpatient for a in adms) == 94
    assert {a.admission_type for a in adms if a.inpatient} == {"inpatient"}
    assert sum(a.admission_type == "emergency" for a in adms) == 98
    assert all(a.outcomes.length_of_stay_days is not None for a in adms if a.inpatient)
    assert all(a.outcomes.length_of_stay_days is None for a in adms if not a.inpatient)

    assert sum(len(a.diagnoses) for a in adms) == 1534
    assert sum(len(a.procedures) for a in adms) == 4637
    assert sum(len(a.medications) for a in adms) == 1772
    # 21,697 observations, of which 1,512 (QALY/DALY/QOLS) have no encounter and are left out with a warning.
    assert sum(len(a.measurements) for a in adms) == 21697 - 1512
    (warning,) = report.warnings
    assert warning.field == "ENCOUNTER" and warning.message.startswith("1512 rows")
    assert {c.system for a in adms for c in a.diagnoses + a.procedures} == {"SNOMEDCT"}
    measurements = [m for a in adms for m in a.measurements]
    assert {m.source_code.system for m in measurements} == {"LOINC"}
    assert any(m.text_value and m.value is None for m in measurements)
    assert all(m.rxnorm and m.start.tzinfo for a in adms for m in a.medications)
    assert all(p.all_notes() == [] for p in patients)


def test_ingesting_twice_changes_nothing(loaded, shared_data):
    store, _ = loaded
    again = ingest_path(store, "synthea-csv", shared_data / "ehr" / "synthea" / "csv").result
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 59)


# -- small exports of our own ------------------------------------------------------------------

TABLES = {
    "patients.csv": [
        "Id,BIRTHDATE,DEATHDATE,GENDER",
        "p1,1950-01-01,,F",
        "p2,1960-06-15,2020-03-05,M",
    ],
    "encounters.csv": [
        "Id,START,STOP,PATIENT,ENCOUNTERCLASS,CODE,DESCRIPTION",
        "e1,2020-01-01T08:00:00Z,2020-01-01T08:15:00Z,p1,wellness,1,Well visit",
        "e2,2020-03-01T08:00:00Z,2020-03-05T12:00:00Z,p2,inpatient,2,Encounter Inpatient",
    ],
    "conditions.csv": [
        "START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION",
        "2020-03-01,,p2,e2,SNOMED-CT,38341003,Hypertension",
    ],
    "observations.csv": [
        "DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE",
        "2020-01-01T08:00:00Z,p1,e1,vital-signs,8302-2,Body Height,160.0,cm,numeric",
        "2020-03-02T08:00:00Z,p2,e2,laboratory,2823-3,Potassium,4.2,mmol/L,numeric",
        "2020-03-02T08:00:00Z,p2,,,QALY,QALY,30.0,a,numeric",
    ],
    "medications.csv": [
        "START,STOP,PATIENT,PAYER,ENCOUNTER,CODE,DESCRIPTION",
        "2020-03-01T09:00:00Z,2020-03-05T09:00:00Z,p2,x,e2,313782,Acetaminophen 325 MG Oral Tablet",
    ],
    "procedures.csv": [
        "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION",
        "2020-03-01T09:00:00Z,2020-03-01T10:00:00Z,p2,e2,80146002,Appendectomy",
    ],
}


def _export(root: Path, *changes: tuple[str, int, str, str]) -> Path:
    """Write the tables, applying ``(file, line_index, old, new)`` text replacements."""
    root.mkdir(parents=True, exist_ok=True)
    tables = {name: list(lines) for name, lines in TABLES.items()}
    for name, index, old, new in changes:
        assert old in tables[name][index], f"{old!r} not in {name} line {index + 1}"
        tables[name][index] = tables[name][index].replace(old, new)
    for name, lines in tables.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _snapshot(store) -> dict[str, str]:
    return {p.id: p.model_dump_json() for p in store.iter_patients()}


def test_small_export_maps_fields(store, tmp_path):
    report = ingest_path(store, "synthea-csv", _export(tmp_path / "export"))
    assert report.result.inserted == 2 and [w.field for w in report.warnings] == ["ENCOUNTER"]
    p2 = store.get("synthea-p2")
    assert (p2.sex, p2.deceased_time) == ("M", dt.datetime(2020, 3, 5, tzinfo=dt.UTC))
    (adm,) = p2.admissions
    assert adm.inpatient and adm.outcomes.in_hospital_death is True  # derived from DEATHDATE by derive_outcomes
    assert [(c.system, c.code) for c in adm.diagnoses] == [("SNOMEDCT", "38341003")]
    assert [(m.variable, m.value, m.unit) for m in adm.measurements] == [("Potassium", 4.2, "mmol/L")]
    assert adm.medications[0].rxnorm == "313782" and adm.medications[0].stop == dt.datetime(
        2020, 3, 5, 9, tzinfo=dt.UTC
    )
    assert not store.get("synthea-p1").admissions[0].inpatient


@pytest.mark.parametrize(
    ("change", "line", "field"),
    [
        (("encounters.csv", 0, ",ENCOUNTERCLASS", ",CLASS"), 1, "ENCOUNTERCLASS"),
        (("observations.csv", 2, "2020-03-02T08:00:00Z", "2020-03-32T08:00:00Z"), 3, "DATE"),
        (("patients.csv", 2, "1960-06-15", "15/06/1960"), 3, "BIRTHDATE"),
        (("conditions.csv", 1, "SNOMED-CT", "MADE-UP"), 2, "SYSTEM"),
        (("observations.csv", 2, "2823-3", "K+"), 3, "CODE"),
        (("medications.csv", 1, "p2,x,e2", "p9,x,e2"), 2, "PATIENT"),
        (("encounters.csv", 2, "2020-03-05T12:00:00Z", "2020-02-05T12:00:00Z"), 3, "STOP"),
        (("observations.csv", 2, ",4.2,mmol/L,numeric", ",4.2"), 3, None),  # a truncated row
    ],
)
def test_bad_row_names_file_line_and_field_and_leaves_store_as_before(store, tmp_path, change, line, field):
    ingest_path(store, "synthea-csv", _export(tmp_path / "good"))
    before = _snapshot(store)

    # p1 (streamed first) changes too: its new version must not be written when p2's rows fail.
    bad = _export(tmp_path / "bad", ("patients.csv", 1, "1950-01-01", "1951-01-01"), change)
    with pytest.raises(RecordError) as info:
        ingest_path(store, "synthea-csv", bad)
    named_field = f", field {field!r}" if field else ""
    assert str(info.value).startswith(f"{bad / change[0]}, line {line}{named_field}: ")
    assert _snapshot(store) == before


def test_not_an_export_directory(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match=r"patients\.csv: missing table"):
        ingest_path(store, "synthea-csv", tmp_path / "empty")
    assert store.ids() == []


def test_skip_invalid_keeps_valid_records_and_lists_the_rejected(store, tmp_path):
    bad = _export(tmp_path / "export", ("observations.csv", 2, ",4.2,", ",high,"))
    report = ingest_path(store, "synthea-csv", bad, skip_invalid=True)
    assert report.result.inserted == 2
    assert [(Path(r.source).name, r.location, r.field) for r in report.rejected] == [
        ("observations.csv", "line 3", "VALUE")
    ]
    (adm,) = store.get("synthea-p2").admissions
    assert adm.measurements == [] and len(adm.diagnoses) == 1 and len(adm.medications) == 1
    assert len(store.get("synthea-p1").admissions[0].measurements) == 1
