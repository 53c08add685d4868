import datetime as dt

import pytest
from pydantic import ValidationError

from ehrflow.records import Admission, CohortFilter, Measurement, Note, Outcomes, Patient, PatientStore, derive_outcomes

UTC = dt.UTC


def _patient(pid: str, *, died: bool = False, notes: int = 0, source: str = "test") -> Patient:
    adm = Admission(
        id=f"{pid}-a1",
        admit_time=dt.datetime(2100, 1, 1, tzinfo=UTC),
        discharge_time=dt.datetime(2100, 1, 5, tzinfo=UTC),
        measurements=[Measurement(time=dt.datetime(2100, 1, 1, 3, tzinfo=UTC), variable="K", value=4.1, unit="mEq/L")],
        notes=[Note(id=f"{pid}-n{i}", text=f"note {i}") for i in range(notes)],
        outcomes=Outcomes(in_hospital_death=died),
    )
    return Patient(id=pid, source=source, sex="F", age=70, admissions=[adm])


def test_upsert_is_idempotent_and_detects_changes(store):
    first = store.ingest([_patient("p1"), _patient("p2")])
    assert (first.inserted, first.updated, first.unchanged) == (2, 0, 0)
    again = store.ingest([_patient("p1"), _patient("p2")])
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    changed = store.ingest([_patient("p1", notes=1)])
    assert (changed.inserted, changed.updated) == (0, 1)
    assert len(store.get("p1").all_notes()) == 1


def test_failed_ingest_rolls_back_the_whole_file(store):
    store.ingest([_patient("keep")])

    def bad_stream():
        yield _patient("new1")
        yield _patient("keep", notes=3)
        raise ValueError("line 3: broken")

    with pytest.raises(ValueError, match="broken"):
        store.ingest(bad_stream(), batch_size=1)
    assert store.ids() == ["keep"]
    assert store.get("keep").all_notes() == []


def test_cohort_filters_and_summary(store):
    store.ingest([_patient("a", died=True, notes=2), _patient("b"), _patient("c", source="other")])
    assert store.ids(CohortFilter(died_in_hospital=True)) == ["a"]
    assert store.ids(CohortFilter(has_notes=True)) == ["a"]
    assert store.ids(CohortFilter.parse("source=test,limit=1")) == ["a"]
    summary = store.summary(CohortFilter(source="test"))
    assert summary["patients"] == 2 and summary["notes"] == 2 and summary["patients_died_in_hospital"] == 1
    assert summary["by_source"] == {"test": 2}
    assert [p.id for p in store.iter_patients(batch_size=2)] == ["a", "b", "c"]
    assert store.get("missing") is None and "missing" not in store and "a" in store


@pytest.mark.parametrize("text", ["nope=1", "died_in_hospital=maybe", "source"])
def test_cohort_filter_rejects_bad_terms(text):
    with pytest.raises(ValueError, match="cohort filter"):
        CohortFilter.parse(text)


def test_store_reopens_from_disk(database_url):
    PatientStore(database_url).ingest([_patient("x")])
    reopened = PatientStore(database_url).get("x")
    assert reopened.admissions[0].measurements[0].value == 4.1
    assert reopened.admissions[0].admit_time == dt.datetime(2100, 1, 1, tzinfo=UTC)


def test_plain_path_is_a_sqlite_file(tmp_path):
    PatientStore(tmp_path / "sub" / "s.db").ingest([_patient("x")])
    assert PatientStore(tmp_path / "sub" / "s.db").get("x") is not None


def test_model_rejects_naive_times_nonfinite_values_and_reversed_stays():
    with pytest.raises(ValidationError, match="timezone-aware"):
        Measurement(time=dt.datetime(2100, 1, 1), variable="K", value=4.0)
    with pytest.raises(ValidationError, match="finite"):
        Measurement(time=dt.datetime(2100, 1, 1, tzinfo=UTC), variable="K", value=float("nan"))
    with pytest.raises(ValidationError, match="before admit_time"):
        Admission(
            id="a", admit_time=dt.datetime(2100, 1, 2, tzinfo=UTC), discharge_time=dt.datetime(2100, 1, 1, tzinfo=UTC)
        )


def test_readmission_and_death_labels():
    def adm(aid, start, end, death=None, inpatient=True):
        return Admission(
            id=aid,
            admit_time=dt.datetime(2100, 1, start, tzinfo=UTC),
            discharge_time=dt.datetime(2100, 1, end, tzinfo=UTC),
            inpatient=inpatient,
            outcomes=Outcomes(in_hospital_death=death),
        )

    p = Patient(
        id="p",
        source="t",
        admissions=[
            adm("a1", 1, 3),
            adm("clinic", 4, 4, inpatient=False),
            adm("a2", 20, 22),
            adm("a3", 25, 27, death=True),
        ],
    )
    derive_outcomes(p)
    out = {a.id: a.outcomes for a in p.admissions}
    assert out["a1"].readmission_30d is True  # a2 starts 17 days after a1 ends
    assert out["a2"].readmission_30d is True  # a3 starts 3 days later (death there does not matter)
    assert out["a3"].readmission_30d is None  # died: excluded
    assert out["clinic"].readmission_30d is None  # not inpatient: unlabelled
    assert out["a1"].length_of_stay_days == pytest.approx(2.0)
    assert out["a1"].in_hospital_death is False
