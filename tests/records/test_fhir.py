"""FHIR R4 bundle loader: the 4 Synthea bundles, and bad input written into tmp_path."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from pathlib import Path

import pytest

from ehrflow.records import RecordError, ingest_path

NOTE_TEXT = "# Chief Complaint\nShortness of breath.\n"


@pytest.fixture
def fhir_dir(shared_data: Path) -> Path:
    return shared_data / "ehr" / "synthea" / "fhir"


def _raw_counts(fhir_dir: Path) -> dict[str, object]:
    """What the bundles hold, counted straight from the JSON, to compare the loader against."""
    counts: dict[str, object] = {"conditions": 0, "procedures": 0, "medications": 0, "measurements": 0}
    deceased: dict[str, str] = {}
    note_texts: dict[str, set[bytes]] = {}
    inpatient_encounters = 0
    for path in sorted(fhir_dir.glob("*.json")):
        resources = [e["resource"] for e in json.loads(path.read_text())["entry"]]
        pid = next(f"fhir-{r['id']}" for r in resources if r["resourceType"] == "Patient")
        note_texts[pid] = set()
        for r in resources:
            kind = r["resourceType"]
            if kind == "Patient" and "deceasedDateTime" in r:
                deceased[pid] = r["deceasedDateTime"]
            elif kind == "Encounter" and r["class"]["code"] == "IMP":
                inpatient_encounters += 1
            elif kind == "Condition":
                counts["conditions"] += 1
            elif kind == "Procedure":
                counts["procedures"] += 1
            elif kind == "MedicationRequest":
                counts["medications"] += 1
            elif kind == "Observation":
                has_value = any(k.startswith("value") for k in r)
                counts["measurements"] += int(has_value) + len(r.get("component", []))
            elif kind == "DocumentReference":
                note_texts[pid].update(base64.b64decode(c["attachment"]["data"]) for c in r["content"])
            elif kind == "DiagnosticReport":
                note_texts[pid].update(base64.b64decode(f["data"]) for f in r.get("presentedForm", []))
    counts.update(deceased=deceased, note_texts=note_texts, inpatient_encounters=inpatient_encounters)
    return counts


def _readable(text: str) -> bool:
    return all(ch.isprintable() or ch in "\n\r\t" for ch in text)


def test_synthea_bundles_load_with_notes_codes_and_deaths(store, fhir_dir):
    report = ingest_path(store, "fhir", fhir_dir)
    raw = _raw_counts(fhir_dir)

    assert report.units == 4 and report.result.inserted == 4 and not report.rejected
    patients = list(store.iter_patients())
    assert sorted(p.id for p in patients) == sorted(raw["note_texts"])
    adms = [a for p in patients for a in p.admissions]
    assert sum(len(a.diagnoses) for a in adms) == raw["conditions"] > 0
    assert sum(len(a.procedures) for a in adms) == raw["procedures"] > 0
    assert sum(len(a.medications) for a in adms) == raw["medications"] > 0
    assert sum(len(a.measurements) for a in adms) == raw["measurements"] > 0
    assert sum(a.inpatient for a in adms) == raw["inpatient_encounters"] > 0
    assert all(a.admission_type == "IMP" for a in adms if a.inpatient)

    for p in patients:
        notes = p.all_notes()
        # Synthea writes each note as a DiagnosticReport and a DocumentReference: kept once.
        assert len(notes) == len(raw["note_texts"][p.id]) > 0
        assert {n.text.encode() for n in notes} == raw["note_texts"][p.id]
        assert all("Chief Complaint" in n.text and _readable(n.text) and n.time.tzinfo for n in notes)
        assert p.source == "fhir" and p.sex in {"M", "F"} and p.birth_date is not None
        times = [m.time for a in p.admissions for m in a.measurements] + [a.admit_time for a in p.admissions]
        assert all(t.utcoffset() == dt.timedelta(0) for t in times)

    deceased = {p.id: p.deceased_time for p in patients if p.deceased_time}
    assert len(deceased) == 2
    assert deceased == {pid: dt.datetime.fromisoformat(t) for pid, t in raw["deceased"].items()}

    bp = [m for a in adms for m in a.measurements if m.source_code and m.source_code.code in {"8480-6", "8462-4"}]
    assert bp and all(m.unit == "mm[Hg]" and m.value is not None and m.source_code.system == "LOINC" for m in bp)
    smoking = [m for a in adms for m in a.measurements if m.source_code and m.source_code.code == "72166-2"]
    assert smoking and all(m.text_value and m.value is None for m in smoking)
    meds = [m for a in adms for m in a.medications]
    assert all(m.rxnorm and m.name and m.start for m in meds)


def test_ingesting_twice_changes_nothing(store, fhir_dir):
    ingest_path(store, "fhir", fhir_dir)
    again = ingest_path(store, "fhir", fhir_dir).result
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 4)


# -- bad input -------------------------------------------------------------------------------


def _bundle() -> dict:
    """A small valid bundle in Synthea's transaction shape (our own made-up content)."""
    subject = {"reference": "urn:uuid:pat-1"}
    encounter = {"reference": "urn:uuid:enc-1"}
    loinc = {"system": "http://loinc.org", "code": "2823-3", "display": "Potassium"}
    resources = [
        {"resourceType": "Patient", "id": "pat-1", "gender": "female", "birthDate": "1950-02-03"},
        {
            "resourceType": "Encounter",
            "id": "enc-1",
            "class": {"code": "IMP"},
            "subject": subject,
            "period": {"start": "2020-01-01T08:00:00-05:00", "end": "2020-01-04T10:00:00-05:00"},
        },
        {
            "resourceType": "Condition",
            "id": "cond-1",
            "subject": subject,
            "encounter": encounter,
            "code": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "38341003"},
                    {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10", "display": "Hypertension"},
                ]
            },
        },
        {
            "resourceType": "Observation",
            "id": "obs-1",
            "subject": subject,
            "encounter": encounter,
            "code": {"coding": [loinc], "text": "Potassium"},
            "effectiveDateTime": "2020-01-02",
            "valueQuantity": {"value": 4.2, "unit": "mmol/L"},
        },
        {
            "resourceType": "DocumentReference",
            "id": "doc-1",
            "subject": subject,
            "type": {"coding": [{"system": "http://loinc.org", "code": "34117-2", "display": "History and physical"}]},
            "date": "2020-01-01T09:00:00-05:00",
            "content": [
                {"attachment": {"contentType": "text/plain", "data": base64.b64encode(NOTE_TEXT.encode()).decode()}}
            ],
        },
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


def _resource(bundle: dict, rid: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == rid)


def _write(path: Path, bundle: dict) -> Path:
    path.write_text(json.dumps(bundle))
    return path


def _snapshot(store) -> dict[str, str]:
    return {p.id: p.model_dump_json() for p in store.iter_patients()}


def test_small_bundle_maps_codes_times_and_notes(store, tmp_path):
    ingest_path(store, "fhir", _write(tmp_path / "b.json", _bundle()))
    patient = store.get("fhir-pat-1")
    (adm,) = patient.admissions
    assert adm.inpatient and adm.admit_time == dt.datetime(2020, 1, 1, 13, tzinfo=dt.UTC)
    assert adm.outcomes.length_of_stay_days == pytest.approx(3 + 2 / 24)
    assert [(c.system, c.code) for c in adm.diagnoses] == [("ICD10CM", "I10")]
    (k,) = adm.measurements
    assert (k.variable, k.value, k.unit, k.time) == ("Potassium", 4.2, "mmol/L", dt.datetime(2020, 1, 2, tzinfo=dt.UTC))
    (note,) = patient.notes  # no encounter: a patient-level note
    assert (note.id, note.category, note.text) == ("doc-1", "History and physical", NOTE_TEXT)


def _bad_observation_without_subject(bundle: dict) -> None:
    del _resource(bundle, "obs-1")["subject"]


def _bad_date(bundle: dict) -> None:
    _resource(bundle, "obs-1")["effectiveDateTime"] = "2020-02-30T10:00:00Z"


def _unknown_code_system(bundle: dict) -> None:
    _resource(bundle, "cond-1")["code"]["coding"] = [{"system": "http://example.org/made-up", "code": "X1"}]


def _bad_base64(bundle: dict) -> None:
    _resource(bundle, "doc-1")["content"][0]["attachment"]["data"] = "not base64!"


@pytest.mark.parametrize(
    ("corrupt", "where", "field"),
    [
        (_bad_observation_without_subject, "Observation/obs-1", "subject"),
        (_bad_date, "Observation/obs-1", "effectiveDateTime"),
        (_unknown_code_system, "Condition/cond-1", "code.coding"),
        (_bad_base64, "DocumentReference/doc-1", "content[0].attachment.data"),
    ],
)
def test_bad_resource_names_file_resource_and_field_and_leaves_store_as_before(store, tmp_path, corrupt, where, field):
    ingest_path(store, "fhir", _write(tmp_path / "good.json", _bundle()))
    before = _snapshot(store)

    bad_bundle = _bundle()
    _resource(bad_bundle, "pat-1")["gender"] = "male"  # a change that must not be written
    corrupt(bad_bundle)
    bad = _write(tmp_path / "bad.json", bad_bundle)
    with pytest.raises(RecordError) as info:
        ingest_path(store, "fhir", bad)
    message = str(info.value)
    assert str(bad) in message and where in message and f"field {field!r}" in message
    assert _snapshot(store) == before


def test_truncated_file_and_non_bundle_are_reported_with_the_file(store, tmp_path):
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(_bundle())[:300])
    with pytest.raises(RecordError, match=r"truncated\.json, line 1, column \d+: invalid JSON"):
        ingest_path(store, "fhir", truncated)

    not_bundle = _write(tmp_path / "patient.json", _resource(_bundle(), "pat-1"))
    with pytest.raises(
        RecordError, match=r"patient\.json, field 'resourceType': expected a FHIR Bundle, got 'Patient'"
    ):
        ingest_path(store, "fhir", not_bundle)
    assert store.ids() == []


def test_skip_invalid_keeps_valid_records_and_lists_the_rejected(store, tmp_path):
    bundle = _bundle()
    second = copy.deepcopy(_resource(bundle, "obs-1"))
    second.update(id="obs-2", effectiveDateTime="yesterday")
    bundle["entry"].append({"fullUrl": "urn:uuid:obs-2", "resource": second})
    truncated = tmp_path / "truncated.json"
    _write(tmp_path / "b.json", bundle)
    truncated.write_text("{")

    report = ingest_path(store, "fhir", tmp_path, skip_invalid=True)
    assert report.units == 2 and report.result.inserted == 1
    rejected = {(Path(r.source).name, r.location, r.field) for r in report.rejected}
    assert rejected == {
        ("b.json", "Observation/obs-2", "effectiveDateTime"),
        ("truncated.json", "line 1, column 2", None),
    }
    (adm,) = store.get("fhir-pat-1").admissions
    assert [m.value for m in adm.measurements] == [4.2]


def test_rejected_encounter_is_reported_once_and_its_resources_left_out(store, tmp_path):
    bundle = _bundle()
    _resource(bundle, "enc-1")["period"]["end"] = "2019-12-31T00:00:00Z"  # ends before it starts
    report = ingest_path(store, "fhir", _write(tmp_path / "b.json", bundle), skip_invalid=True)
    assert [(r.location, r.field) for r in report.rejected] == [("Encounter/enc-1", "period.end")]
    patient = store.get("fhir-pat-1")
    assert patient.admissions == [] and [n.id for n in patient.notes] == ["doc-1"]
