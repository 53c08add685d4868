"""PhysioNet 2012 loader: the real set A end to end, and bad input on small tarballs written here."""

from __future__ import annotations

import csv
import io
import logging
import tarfile
from pathlib import Path

import pytest

from ehrflow.records import CohortFilter, ErrorSink, Measurement, RecordError, ingest_path
from ehrflow.records.loaders.physionet2012 import RELATIVE_EPOCH, VARIABLE_UNITS, PhysioNet2012Loader

DESCRIPTOR_NAMES = {"RecordID", "Age", "Gender", "Height", "ICUType"}
OUTCOMES_HEADER = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"


def _record(record_id: int, rows: list[str], header: str = "Time,Parameter,Value") -> str:
    descriptors = [
        f"00:00,RecordID,{record_id}",
        "00:00,Age,61",
        "00:00,Gender,1",
        "00:00,Height,-1",
        "00:00,ICUType,3",
        "00:00,Weight,80.5",
    ]
    return "\n".join([header, *descriptors, *rows]) + "\n"


GOOD_ROWS = ["00:07,HR,73", "00:07,Temp,36.6", "01:30,K,4.2", "47:59,Weight,81"]


def _write_set(tmp_path: Path, records: dict[str, str], *, outcomes: str | None = None, letter: str = "a") -> Path:
    """A set-x.tar.gz holding ``{member file name: text}``, plus Outcomes-x.txt when given."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"set-{letter}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in records.items():
            data = text.encode()
            info = tarfile.TarInfo(f"set-{letter}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if outcomes is not None:
        (tmp_path / f"Outcomes-{letter}.txt").write_text(OUTCOMES_HEADER + outcomes)
    return path


def _good_set(tmp_path: Path, n: int = 5) -> Path:
    records = {f"{900000 + i}.txt": _record(900000 + i, GOOD_ROWS) for i in range(n)}
    outcomes = "".join(f"{900000 + i},10,3,{i + 2},-1,{i % 2}\n" for i in range(n))
    return _write_set(tmp_path, records, outcomes=outcomes)


def test_set_a_loads_all_4000_stays_with_554_deaths(shared_data, store):
    set_a = shared_data / "ehr" / "physionet2012" / "set-a.tar.gz"
    report = ingest_path(store, "physionet2012", set_a)
    assert report.rejected == [] and report.result.inserted == 4000

    # Observations counted independently: every data row except the descriptors and missing initial weights.
    expected_measurements = 0
    with tarfile.open(set_a) as tar:
        for member in tar:
            if member.isfile():
                rows = list(csv.reader(io.TextIOWrapper(tar.extractfile(member), encoding="utf-8")))[1:]
                expected_measurements += sum(
                    1
                    for t, p, v in rows
                    if p not in DESCRIPTOR_NAMES and not (p == "Weight" and t == "00:00" and v == "-1")
                )
    with (shared_data / "ehr" / "physionet2012" / "Outcomes-a.txt").open() as fh:
        deaths_in_outcomes = sum(row["In-hospital_death"] == "1" for row in csv.DictReader(fh))

    summary = store.summary(CohortFilter(source="physionet2012"))
    assert summary["patients"] == summary["admissions"] == 4000
    assert summary["patients_died_in_hospital"] == deaths_in_outcomes == 554
    assert summary["measurements"] == expected_measurements
    assert len(store.ids(CohortFilter(source="physionet2012", died_in_hospital=False))) == 4000 - 554
    assert store.ids(CohortFilter(source="physionet2012", has_measurements=False)) == [
        "p12-140501",
        "p12-140936",
        "p12-141264",
    ]
    empty = store.get("p12-140501")
    assert empty.admissions[0].measurements == [] and empty.admissions[0].outcomes.in_hospital_death is not None

    first = store.get("p12-132539")  # first record: 54-year-old woman, SICU, survived, 5 days' stay
    assert (first.sex, first.age, first.source) == ("F", 54.0, "physionet2012")
    adm = first.admissions[0]
    assert adm.time_basis == "relative" and adm.admit_time == RELATIVE_EPOCH
    assert adm.static["ICUType"] == 4 and adm.static["Height"] is None and adm.static["Weight"] is None
    assert adm.icu_stays[0].unit == "SICU"
    assert (adm.outcomes.in_hospital_death, adm.outcomes.length_of_stay_days) == (False, 5)
    gcs = adm.measurements[0]
    assert (gcs.variable, gcs.value, gcs.unit) == ("GCS", 15.0, "score")
    assert (gcs.time - adm.admit_time).total_seconds() == 7 * 60


def test_units_of_the_data_folder_are_its_tarballs(shared_data):
    units = PhysioNet2012Loader().units(shared_data / "ehr" / "physionet2012")
    assert [u.name for u in units] == ["set-a.tar.gz", "set-b.tar.gz"]


def test_units_table_covers_the_37_variables():
    assert len(VARIABLE_UNITS) == 37 and VARIABLE_UNITS["HR"] == "bpm" and VARIABLE_UNITS["Temp"] == "°C"


def test_record_fields_outcomes_and_fast_measurements(tmp_path):
    path = _good_set(tmp_path, n=2)
    patients = list(PhysioNet2012Loader().load(path, ErrorSink()))
    assert [p.id for p in patients] == ["p12-900000", "p12-900001"]
    second = patients[1]
    adm = second.admissions[0]
    assert (second.sex, second.age) == ("M", 61.0)
    assert adm.static == {"Height": None, "ICUType": 3.0, "Weight": 80.5, "SAPS-I": 10.0, "SOFA": 3.0}
    assert adm.outcomes.in_hospital_death is True and adm.outcomes.length_of_stay_days == 3
    assert [(m.variable, m.value, m.unit) for m in adm.measurements] == [
        ("Weight", 80.5, "kg"),
        ("HR", 73.0, "bpm"),
        ("Temp", 36.6, "°C"),
        ("K", 4.2, "mEq/L"),
        ("Weight", 81.0, "kg"),
    ]
    assert (adm.measurements[-1].time - RELATIVE_EPOCH).total_seconds() == (47 * 60 + 59) * 60
    for m in adm.measurements:  # built without validators: must equal validated construction
        validated = Measurement.model_validate(m.model_dump(exclude_unset=True))
        assert validated == m and validated.model_fields_set == m.model_fields_set


def test_ingest_is_idempotent(tmp_path, store):
    path = _good_set(tmp_path)
    first = ingest_path(store, "physionet2012", path)
    again = ingest_path(store, "physionet2012", path)
    assert (first.result.inserted, again.result.inserted, again.result.updated, again.result.unchanged) == (5, 0, 0, 5)


def test_empty_parameter_rows_are_warned_not_kept(tmp_path, store):
    path = _write_set(tmp_path, {"900100.txt": _record(900100, ["00:10,HR,80", "10:45,,1.9"])})
    report = ingest_path(store, "physionet2012", path)
    assert report.rejected == []
    [warning] = report.warnings
    assert warning.source.endswith("set-a.tar.gz:set-a/900100.txt")
    assert (warning.location, warning.field) == ("line 9", "Parameter")
    assert [m.variable for m in store.get("p12-900100").admissions[0].measurements] == ["Weight", "HR"]


def test_missing_outcomes_file_means_unknown_outcomes(tmp_path, caplog):
    path = _write_set(tmp_path, {"900200.txt": _record(900200, GOOD_ROWS)})
    with caplog.at_level(logging.INFO, logger="ehrflow.records.loaders.physionet2012"):
        [patient] = PhysioNet2012Loader().load(path, ErrorSink())
    assert patient.admissions[0].outcomes.in_hospital_death is None
    assert "outcomes unknown" in caplog.text and "900200" not in caplog.text


BAD_RECORDS = {
    "wrong header": (_record(900300, GOOD_ROWS, header="Time,Param,Value"), "line 1", "header"),
    "bad time": (_record(900300, ["00:07,HR,73", "7:5x,HR,74"]), "line 9", "Time"),
    "minutes over 59": (_record(900300, ["00:61,HR,73"]), "line 8", "Time"),
    "non-numeric value": (_record(900300, ["00:07,HR,73", "00:08,HR,high"]), "line 9", "Value"),
    "unknown parameter": (_record(900300, ["00:07,HR,73", "00:08,HeartRate,74"]), "line 9", "Parameter"),
    "missing RecordID": (_record(900300, GOOD_ROWS).replace("00:00,RecordID,900300\n", ""), None, "RecordID"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_names_member_line_and_field_and_leaves_store_unchanged(case, tmp_path, store):
    ingest_path(store, "physionet2012", _good_set(tmp_path / "good"))
    before = store.summary()
    text, location, field = BAD_RECORDS[case]
    bad_dir = tmp_path / "bad"
    path = _write_set(bad_dir, {"900299.txt": _record(900299, GOOD_ROWS), "900300.txt": text})
    with pytest.raises(RecordError) as info:
        ingest_path(store, "physionet2012", path)
    err = info.value
    assert err.source == f"{path}:set-a/900300.txt"
    assert (err.location, err.field) == (location, field)
    assert "set-a/900300.txt" in str(err) and repr(field) in str(err)
    assert store.summary() == before and "p12-900299" not in store


def test_skip_invalid_leaves_out_only_the_bad_record(tmp_path, store):
    text = _record(900300, ["00:07,HR,73", "00:08,HR,high"])
    path = _write_set(tmp_path, {"900299.txt": _record(900299, GOOD_ROWS), "900300.txt": text})
    report = ingest_path(store, "physionet2012", path, skip_invalid=True)
    assert store.ids() == ["p12-900299"]
    assert [(r.location, r.field) for r in report.rejected] == [("line 9", "Value")]


def test_truncated_tarball_names_the_archive_and_leaves_store_unchanged(tmp_path, store):
    ingest_path(store, "physionet2012", _good_set(tmp_path / "good"))
    before = store.summary()
    bad_dir = tmp_path / "bad"
    # Distinct random-ish values so gzip cannot shrink the members to nothing.
    records = {
        f"{910000 + i}.txt": _record(
            910000 + i, [f"{h:02d}:{i % 60:02d},HR,{(i * 7919 + h * 104729) % 997}" for h in range(48)]
        )
        for i in range(60)
    }
    path = _write_set(bad_dir, records)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError) as info:
        ingest_path(store, "physionet2012", path)
    err = info.value
    assert err.source == str(path) and err.location.startswith("member set-a/91")
    assert "truncated or corrupt tarball" in str(err)
    assert store.summary() == before


def test_extracted_folder_is_a_unit_unless_its_tarball_is_beside_it(tmp_path):
    tarball = _good_set(tmp_path, n=3)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path, filter="data")
    loader = PhysioNet2012Loader()
    assert loader.units(tmp_path) == [tarball]
    tarball.unlink()
    [folder] = loader.units(tmp_path)
    assert folder == tmp_path / "set-a"
    patients = list(loader.load(folder, ErrorSink()))
    assert [p.id for p in patients] == ["p12-900000", "p12-900001", "p12-900002"]
    assert patients[1].admissions[0].outcomes.in_hospital_death is True
