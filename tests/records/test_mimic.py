"""MIMIC-III / MIMIC-IV loaders: demo counts, the fast measurement path, bad input, idempotency."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest

from ehrflow.records import ErrorSink, Patient, PatientStore, RecordError, derive_outcomes, ingest_path
from ehrflow.records.loaders.mimic import Mimic3Loader, Mimic4Loader

# A tiny synthetic MIMIC-III dump (made-up values in the demo's layout): 2 patients, 3 admissions.
TINY3 = {
    "PATIENTS.csv": [
        "row_id,subject_id,gender,dob,dod,dod_hosp,dod_ssn,expire_flag",
        "1,101,F,2080-01-01 00:00:00,2150-02-01 00:00:00,,,1",
        "2,102,M,2070-05-05 00:00:00,,,,0",
    ],
    "ADMISSIONS.csv": [
        "row_id,subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,hospital_expire_flag",
        "11,101,1001,2150-01-01 10:00:00,2150-01-05 12:00:00,,EMERGENCY,0",
        "12,101,1002,2150-01-20 08:00:00,2150-02-01 00:00:00,2150-02-01 00:00:00,URGENT,1",
        "13,102,1003,2140-03-03 03:00:00,2140-03-10 09:30:00,,ELECTIVE,0",
    ],
    "ICUSTAYS.csv": [
        "row_id,subject_id,hadm_id,icustay_id,first_careunit,intime,outtime",
        "21,101,1001,5001,MICU,2150-01-01 11:00:00,2150-01-03 11:00:00",
    ],
    "DIAGNOSES_ICD.csv": [
        "row_id,subject_id,hadm_id,seq_num,icd9_code",
        "31,101,1001,1,0389",
        "32,101,1001,2,4280",
        "33,102,1003,1,41401",
    ],
    "D_ICD_DIAGNOSES.csv": [
        "row_id,icd9_code,short_title,long_title",
        '1,0389,Septicemia NOS,"Unspecified septicemia"',
        "2,4280,CHF NOS,Congestive heart failure unspecified",
    ],
    "PRESCRIPTIONS.csv": [
        "row_id,subject_id,hadm_id,startdate,enddate,drug,ndc,dose_val_rx,dose_unit_rx,route",
        "41,101,1001,2150-01-01 00:00:00,2150-01-03 00:00:00,Heparin,00641040025,5000,UNIT,SC",
        "42,102,1003,2140-03-03 00:00:00,,Aspirin,0,81,mg,PO",
    ],
    "D_LABITEMS.csv": ["row_id,itemid,label,fluid,category", "1,50912,Creatinine,Blood,Chemistry"],
    "LABEVENTS.csv": [
        "row_id,subject_id,hadm_id,itemid,charttime,value,valuenum,valueuom,flag",
        "51,101,1001,50912,2150-01-01 12:00:00,1.2,1.2,mg/dL,",
        "52,101,,50912,2149-12-01 12:00:00,1.0,1.0,mg/dL,",
        "53,102,1003,50912,2140-03-04 06:00:00,HEMOLYZED,,,",
    ],
    "D_ITEMS.csv": ["row_id,itemid,label", "1,220045,Heart Rate"],
    "CHARTEVENTS.csv": [
        "row_id,subject_id,hadm_id,icustay_id,itemid,charttime,value,valuenum,valueuom,error",
        "61,101,,5001,220045,2150-01-01 11:30:00,88,88,bpm,0",
        "62,101,1001,5001,220045,2150-01-01 11:45:00,300,300,bpm,1",
    ],
}


def write_tables(folder: Path, tables: dict[str, list[str]], gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in tables.items():
        data = ("\n".join(lines) + "\n").encode()
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def with_rows(tables: dict[str, list[str]], name: str, lines: list[str]) -> dict[str, list[str]]:
    return {**tables, name: lines}


def load(
    loader: Mimic3Loader | Mimic4Loader, path: Path, skip_invalid: bool = False
) -> tuple[list[Patient], ErrorSink]:
    sink = ErrorSink(skip_invalid=skip_invalid)
    return list(loader.load(path, sink)), sink


def snapshot(store: PatientStore) -> dict[str, str]:
    import sqlalchemy as sa

    from ehrflow.records.store import PATIENTS

    with store.engine.connect() as conn:
        return dict(conn.execute(sa.select(PATIENTS.c.id, PATIENTS.c.content_hash)).all())


# -- the demos ------------------------------------------------------------------------------


def test_mimic3_demo_outcomes_without_events(shared_data: Path, tmp_path: Path) -> None:
    """The demo's counts and labels, fast: every table but the two big event tables (linked, not copied)."""
    demo = shared_data / "ehr" / "mimic3_demo"
    folder = tmp_path / "mimic3"
    folder.mkdir()
    for path in demo.glob("*.csv.gz"):
        if not path.name.upper().startswith(("CHARTEVENTS", "LABEVENTS")):
            (folder / path.name).symlink_to(path)
    patients, sink = load(Mimic3Loader(), folder)
    assert not sink.rejected and len(patients) == 100
    admissions = [a for p in map(derive_outcomes, patients) for a in p.admissions]
    assert len(admissions) == 129
    assert sum(a.outcomes.in_hospital_death is True for a in admissions) == 40
    labelled = [a.outcomes.readmission_30d for a in admissions if a.outcomes.readmission_30d is not None]
    assert (len(labelled), sum(labelled)) == (89, 11)
    assert sum(len(a.diagnoses) for a in admissions) == 1761
    assert sum(len(a.medications) for a in admissions) == 10398
    assert not any(p.all_measurements() or p.all_notes() for p in patients)


@pytest.fixture(scope="module")
def mimic3_ingested(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PatientStore, list[Patient]]]:
    store = PatientStore(tmp_path_factory.mktemp("mimic3") / "patients.db")
    report = ingest_path(store, "mimic3", shared_data / "ehr" / "mimic3_demo")
    assert report.result.inserted == 100 and not report.rejected
    yield store, list(store.iter_patients())


@pytest.mark.slow
def test_mimic3_demo_counts_and_outcomes(mimic3_ingested: tuple[PatientStore, list[Patient]]) -> None:
    store, patients = mimic3_ingested
    summary = store.summary()
    assert summary["patients"] == 100 and summary["admissions"] == 129
    assert all(p.id.startswith("mimic3-") and p.source == "mimic3" for p in patients)
    admissions = [a for p in patients for a in p.admissions]
    assert sum(a.outcomes.in_hospital_death is True for a in admissions) == 40
    labelled = [a for a in admissions if a.outcomes.readmission_30d is not None]
    assert len(labelled) == 89
    assert sum(a.outcomes.readmission_30d for a in labelled) == 11
    assert sum(len(a.icu_stays) for a in admissions) == 136
    assert sum(len(a.diagnoses) for a in admissions) == 1761
    assert sum(len(a.medications) for a in admissions) == 10398
    assert summary["notes"] == 0  # the demo's NOTEEVENTS is header-only


@pytest.mark.slow
def test_mimic3_demo_content(mimic3_ingested: tuple[PatientStore, list[Patient]]) -> None:
    _, patients = mimic3_ingested
    first = next(p for p in patients if p.id == "mimic3-10006")
    assert first.sex == "F" and str(first.birth_date) == "2094-03-05"
    assert first.deceased_time is not None and first.deceased_time.utcoffset().total_seconds() == 0
    adm = next(a for a in first.admissions if a.id == "142345")
    assert adm.admission_type == "EMERGENCY"
    sepsis = next(c for c in adm.diagnoses if c.code == "99591")
    assert sepsis.system == "ICD9CM" and sepsis.description == "Sepsis"
    assert all(c.system == "ICD9PCS" for p in patients for a in p.admissions for c in a.procedures)
    variables = {m.variable for m in adm.measurements}
    assert {"Lactate", "Heart Rate"} <= variables  # one lab (D_LABITEMS), one chart item (D_ITEMS)
    lactate = next(m for m in adm.measurements if m.variable == "Lactate")
    assert lactate.unit == "mmol/L" and lactate.source_code is not None and lactate.source_code.system == "MIMIC_ITEMID"
    assert any(m.value is None and m.text_value for m in adm.measurements)
    times = [m.time for m in adm.measurements]
    assert times == sorted(times)
    meds = [m for a in first.admissions for m in a.medications]
    assert any(m.ndc for m in meds) and all(m.ndc != "0" for m in meds)


def test_mimic4_demo_counts(shared_data: Path) -> None:
    patients, sink = load(Mimic4Loader(), shared_data / "ehr" / "mimic4_demo")
    assert not sink.rejected
    assert len(patients) == 100 and {p.source for p in patients} == {"mimic4"}
    admissions = [a for p in patients for a in p.admissions]
    assert len(admissions) == 275
    assert sum(len(a.measurements) for a in admissions) > 0  # labevents (no icu/chartevents in the demo)
    assert sum(len(a.medications) for a in admissions) > 0
    assert sum(len(a.icu_stays) for a in admissions) == 140
    assert {c.system for a in admissions for c in a.diagnoses} == {"ICD9CM", "ICD10CM"}
    assert all(c.description for a in admissions for c in a.diagnoses[:1])
    assert not any(p.all_notes() for p in patients)
    assert all(p.age is not None and p.birth_date is None for p in patients)
    assert sum(a.outcomes.in_hospital_death is True for a in admissions) > 0


# -- the tiny synthetic dump --------------------------------------------------------------------


def test_tiny_mapping(tmp_path: Path) -> None:
    patients, sink = load(Mimic3Loader(), write_tables(tmp_path / "m3", TINY3))
    assert not sink.rejected
    by_id = {p.id: p for p in patients}
    assert set(by_id) == {"mimic3-101", "mimic3-102"}
    a1001 = by_id["mimic3-101"].admissions[0]
    assert a1001.id == "1001" and a1001.icu_stays[0].id == "5001" and a1001.icu_stays[0].unit == "MICU"
    assert [c.description for c in a1001.diagnoses] == [
        "Unspecified septicemia",
        "Congestive heart failure unspecified",
    ]
    assert a1001.medications[0].ndc == "00641040025" and a1001.medications[0].dose == "5000"
    # the lab row without hadm_id is dropped; the chart row reaches its admission through icustay_id;
    # the chart row flagged error=1 is dropped
    assert [(m.variable, m.value, m.unit) for m in a1001.measurements] == [
        ("Heart Rate", 88.0, "bpm"),
        ("Creatinine", 1.2, "mg/dL"),
    ]
    a1003 = by_id["mimic3-102"].admissions[0]
    assert a1003.medications[0].ndc is None  # NDC 0 means none
    assert a1003.measurements[0].value is None and a1003.measurements[0].text_value == "HEMOLYZED"
    assert by_id["mimic3-101"].admissions[1].outcomes.in_hospital_death is True


def test_fast_measurements_equal_validated(tmp_path: Path) -> None:
    """The measurement fast path builds objects identical to full pydantic validation of the same data."""
    patients, _ = load(Mimic3Loader(), write_tables(tmp_path / "m3", TINY3))
    for patient in patients:
        assert Patient.model_validate_json(patient.model_dump_json()) == patient
        for m in patient.all_measurements():
            assert type(m).model_validate(m.model_dump()) == m


@pytest.mark.parametrize("spread", [1000, 10**12], ids=["lookup", "sorted"])
def test_item_codes_match_numpy_unique(spread: int) -> None:
    """Item keys get the codes ``np.unique`` would give, whether they fit a lookup table or not."""
    import numpy as np

    from ehrflow.records.loaders.mimic import _dense_codes

    keys = np.random.default_rng(0).integers(0, spread, 5000)
    distinct, codes = _dense_codes(keys)
    expected_distinct, expected_codes = np.unique(keys, return_inverse=True)
    assert distinct.tolist() == expected_distinct.tolist() and codes.tolist() == expected_codes.tolist()


def test_staging_in_memory_or_in_a_file_gives_the_same_patients(tmp_path: Path, monkeypatch) -> None:
    import duckdb

    databases: list[str] = []
    connect = duckdb.connect
    monkeypatch.setattr(
        duckdb, "connect", lambda database, *a, **k: databases.append(database) or connect(database, *a, **k)
    )
    path = write_tables(tmp_path / "m3", TINY3)
    in_memory, _ = load(Mimic3Loader(), path)
    on_disk, _ = load(Mimic3Loader(in_memory_below_bytes=0, workdir=tmp_path), path)
    assert databases[0] == ":memory:" and databases[1].endswith("stage.duckdb")
    assert on_disk == in_memory and sum(len(p.all_measurements()) for p in on_disk) == 3


def test_uppercase_headers_and_plain_csv(tmp_path: Path) -> None:
    upper = {name: [lines[0].upper(), *lines[1:]] for name, lines in TINY3.items()}
    patients, sink = load(Mimic3Loader(), write_tables(tmp_path / "m3", upper, gz=False))
    assert not sink.rejected and len(patients) == 2
    assert sum(len(p.all_measurements()) for p in patients) == 3


def test_ingest_is_idempotent(store: PatientStore, tmp_path: Path) -> None:
    path = write_tables(tmp_path / "m3", TINY3)
    first = ingest_path(store, "mimic3", path)
    assert first.result.inserted == 2
    second = ingest_path(store, "mimic3", path)
    assert second.result.unchanged == 2 and second.result.inserted == second.result.updated == 0
    readmitted = store.get("mimic3-101").admissions[0].outcomes.readmission_30d
    assert readmitted is True  # 1002 starts 15 days after 1001 ends (derived by ingest_path)


# -- bad input -----------------------------------------------------------------------------------


def _bad_ingest(store: PatientStore, tmp_path: Path, tables: dict[str, list[str]], fmt: str = "mimic3") -> RecordError:
    """Ingest a good dump, then a bad one: the failure must leave the store exactly as it was."""
    good = write_tables(tmp_path / "good", TINY3)
    ingest_path(store, "mimic3", good)
    before = snapshot(store)
    bad = write_tables(tmp_path / "bad", tables)
    with pytest.raises(RecordError) as info:
        ingest_path(store, fmt, bad)
    assert snapshot(store) == before
    return info.value


def test_truncated_gzip(store: PatientStore, tmp_path: Path) -> None:
    tables = with_rows(TINY3, "ADMISSIONS.csv", TINY3["ADMISSIONS.csv"] + [TINY3["ADMISSIONS.csv"][1]] * 2000)
    folder = write_tables(tmp_path / "bad", tables)
    path = folder / "ADMISSIONS.csv.gz"
    path.write_bytes(path.read_bytes()[:-40])
    good = write_tables(tmp_path / "good", TINY3)
    ingest_path(store, "mimic3", good)
    before = snapshot(store)
    with pytest.raises(RecordError) as info:
        ingest_path(store, "mimic3", folder)
    assert snapshot(store) == before
    assert "ADMISSIONS.csv.gz" in str(info.value) and "truncated or corrupt" in str(info.value)
    assert info.value.location is not None and info.value.location.startswith("line ")


def test_missing_column(store: PatientStore, tmp_path: Path) -> None:
    admissions = [
        "row_id,subject_id,admittime,dischtime,admission_type,hospital_expire_flag",
        "11,101,2150-01-01 10:00:00,2150-01-05 12:00:00,EMERGENCY,0",
    ]
    err = _bad_ingest(store, tmp_path, with_rows(TINY3, "ADMISSIONS.csv", admissions))
    assert err.source.endswith("ADMISSIONS.csv.gz") and err.field == "hadm_id"
    assert "missing" in err.message


def test_missing_required_table(tmp_path: Path) -> None:
    tables = {k: v for k, v in TINY3.items() if k != "PATIENTS.csv"}
    with pytest.raises(RecordError, match="PATIENTS") as info:
        load(Mimic3Loader(), write_tables(tmp_path / "m3", tables))
    assert "required table" in info.value.message


def test_bad_date(store: PatientStore, tmp_path: Path) -> None:
    admissions = [*TINY3["ADMISSIONS.csv"]]
    admissions[2] = admissions[2].replace("2150-01-20 08:00:00", "2150-13-45 08:00:00")
    err = _bad_ingest(store, tmp_path, with_rows(TINY3, "ADMISSIONS.csv", admissions))
    assert err.source.endswith("ADMISSIONS.csv.gz") and err.location == "line 3" and err.field == "admittime"


def test_non_numeric_value(store: PatientStore, tmp_path: Path) -> None:
    labs = [*TINY3["LABEVENTS.csv"]]
    labs[1] = labs[1].replace(",1.2,mg/dL", ",abc,mg/dL")
    err = _bad_ingest(store, tmp_path, with_rows(TINY3, "LABEVENTS.csv", labs))
    assert err.source.endswith("LABEVENTS.csv.gz") and err.location == "line 2" and err.field == "valuenum"


def test_discharge_before_admission(tmp_path: Path) -> None:
    admissions = [*TINY3["ADMISSIONS.csv"]]
    admissions[3] = admissions[3].replace("2140-03-10 09:30:00", "2140-03-01 09:30:00")
    with pytest.raises(RecordError) as info:
        load(Mimic3Loader(), write_tables(tmp_path / "m3", with_rows(TINY3, "ADMISSIONS.csv", admissions)))
    assert info.value.location == "row_id 13" and "discharge_time" in str(info.value)


def test_skip_invalid_lists_and_keeps_the_rest(tmp_path: Path) -> None:
    admissions = [*TINY3["ADMISSIONS.csv"]]
    admissions[2] = admissions[2].replace("2150-01-20 08:00:00", "yesterday")
    labs = [*TINY3["LABEVENTS.csv"]]
    labs[1] = labs[1].replace(",1.2,mg/dL", ",inf,mg/dL")
    tables = with_rows(with_rows(TINY3, "ADMISSIONS.csv", admissions), "LABEVENTS.csv", labs)
    patients, sink = load(Mimic3Loader(), write_tables(tmp_path / "m3", tables), skip_invalid=True)
    assert sorted((r.location, r.field) for r in sink.rejected) == [("line 3", "admittime"), ("row_id 51", "valuenum")]
    assert sum(len(p.admissions) for p in patients) == 2
    assert [m.variable for m in patients[0].admissions[0].measurements] == ["Heart Rate"]


def test_errors_of_both_measurement_tables_are_reported_in_table_order(store: PatientStore, tmp_path: Path) -> None:
    """CHARTEVENTS is staged beside the other tables; its errors still come after LABEVENTS', as before."""
    labs = [*TINY3["LABEVENTS.csv"]]
    labs[3] = labs[3].replace("2140-03-04 06:00:00", "2140-03-04 99:00:00")
    chart = [*TINY3["CHARTEVENTS.csv"]]
    chart[1] = chart[1].replace(",88,bpm", ",fast,bpm")
    tables = with_rows(with_rows(TINY3, "LABEVENTS.csv", labs), "CHARTEVENTS.csv", chart)
    _, sink = load(Mimic3Loader(), write_tables(tmp_path / "m3", tables), skip_invalid=True)
    assert [(Path(r.source).name, r.location, r.field) for r in sink.rejected] == [
        ("LABEVENTS.csv.gz", "line 4", "charttime"),
        ("CHARTEVENTS.csv.gz", "line 2", "valuenum"),
    ]
    err = _bad_ingest(store, tmp_path, tables)  # strict: the first of them, and the store unchanged
    assert err.source.endswith("LABEVENTS.csv.gz") and err.location == "line 4"
    err = _bad_ingest(store, tmp_path / "chart", with_rows(TINY3, "CHARTEVENTS.csv", chart))
    assert err.source.endswith("CHARTEVENTS.csv.gz") and err.location == "line 2" and err.field == "valuenum"


TINY4 = {
    "hosp/patients.csv": [
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
        "201,F,60,2150,2011 - 2013,",
    ],
    "hosp/admissions.csv": [
        "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,hospital_expire_flag",
        "201,2001,2153-01-01 10:00:00,2153-01-04 10:00:00,,URGENT,0",
    ],
    "hosp/diagnoses_icd.csv": [
        "subject_id,hadm_id,seq_num,icd_code,icd_version",
        "201,2001,1,I509,10",
        "201,2001,2,4280,11",
    ],
}


def test_mimic4_tiny_and_unknown_icd_version(store: PatientStore, tmp_path: Path) -> None:
    good = {**TINY4, "hosp/diagnoses_icd.csv": TINY4["hosp/diagnoses_icd.csv"][:2]}
    patients, _ = load(Mimic4Loader(), write_tables(tmp_path / "good4", good))
    assert patients[0].age == 63 and patients[0].admissions[0].diagnoses[0].system == "ICD10CM"
    folder = write_tables(tmp_path / "bad4", TINY4)
    with pytest.raises(RecordError) as info:
        ingest_path(store, "mimic4", folder)
    err = info.value
    assert err.source.endswith("diagnoses_icd.csv.gz") and err.field == "icd_version"
    assert err.location == "hadm_id 2001, seq_num 2" and "11" in err.message
    assert store.ids() == []
