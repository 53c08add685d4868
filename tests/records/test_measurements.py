"""``Measurements``: an admission's measurements held as columns, items built on access."""

import copy
import datetime as dt
import json
import pickle
import zlib

import numpy as np
import pytest
import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError

from ehrflow.records import Admission, Code, Measurement, Measurements, Patient, PatientStore
from ehrflow.records.model import CodedColumn

T0 = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def _rows() -> list[Measurement]:
    return [
        Measurement(
            time=T0, variable="Potassium", value=6.1, unit="mmol/L", source_code=Code(system="LOINC", code="2823-3")
        ),
        Measurement(time=T0 + dt.timedelta(hours=1), variable="Culture", text_value="positive"),
        Measurement(time=T0 + dt.timedelta(hours=2), variable="Potassium", value=5.2, unit="mmol/L"),
    ]


def test_items_equal_the_validated_measurements_they_were_built_from() -> None:
    rows = _rows()
    held = Admission(id="a", measurements=rows).measurements
    assert isinstance(held, Measurements) and len(held) == 3
    assert list(held) == rows and held == rows and held[1] == rows[1] and held[-1] == rows[-1]
    assert [m.variable for m in held[1:]] == ["Culture", "Potassium"] and isinstance(held[1:], Measurements)
    for item in held:  # built without validators: each must equal validation of its own fields
        assert Measurement.model_validate(item.model_dump()) == item
    item = held[0]
    item.value = 9.9  # items are fresh objects: changing one leaves the column alone
    assert held[0].value == 6.1


def test_public_json_is_one_object_per_measurement_as_before() -> None:
    rows = _rows()
    admission = Admission(id="a", measurements=rows)
    as_list = json.loads(TypeAdapter(list[Measurement]).dump_json(rows))
    assert json.loads(admission.model_dump_json())["measurements"] == as_list
    assert admission.model_dump()["measurements"][0]["source_code"] == {
        "system": "LOINC",
        "code": "2823-3",
        "description": None,
    }


def test_column_form_round_trips_and_is_checked_like_the_items() -> None:
    admission = Admission(id="a", measurements=_rows())
    columns = json.loads(admission.model_dump_json(context={"measurement_columns": True}))["measurements"]
    assert columns["variable"] == ["Potassium", "Culture", "Potassium"] and columns["value"] == [6.1, None, 5.2]
    assert Admission.model_validate_json(json.dumps({"id": "a", "measurements": columns})) == admission
    assert Admission.model_validate({"id": "a", "measurements": columns}) == admission

    def rejected(change: dict, match: str) -> None:
        bad = {**columns, **change}
        for validate in (
            lambda: Admission.model_validate({"id": "a", "measurements": bad}),
            lambda: Admission.model_validate_json(json.dumps({"id": "a", "measurements": bad})),
        ):
            with pytest.raises(ValidationError, match=match):
                validate()

    rejected({"time": ["2100-01-01T00:00:00", *columns["time"][1:]]}, "timezone")
    rejected({"value": [6.1, None, None], "text_value": [None, "positive", None]}, "measurement 2 .* neither value")
    rejected({"unit": ["mmol/L"]}, "differ in length")
    rejected({"variable": ["Potassium", "", "Potassium"]}, "variable")


def test_rows_are_validated_and_errors_name_the_item() -> None:
    with pytest.raises(ValidationError, match="measurements.1.time") as err:
        Admission(id="a", measurements=[_rows()[0], {"time": "2100-01-01T01:00:00", "variable": "K", "value": 4}])
    assert "timezone-aware" in str(err.value)
    with pytest.raises(ValidationError, match="finite"):
        Admission(id="a", measurements=[{"time": T0, "variable": "K", "value": float("nan")}])
    with pytest.raises(TypeError, match="expected a Measurement, got dict"):
        Measurements().append({"time": T0, "variable": "K", "value": 4.0})  # type: ignore[arg-type]


def test_coded_columns_share_their_table_and_become_lists_on_change() -> None:
    codes = [Code(system="MIMIC_ITEMID", code="50971"), Code(system="MIMIC_ITEMID", code="220045")]
    names = ["Potassium", "Heart Rate"]
    items = np.array([0, 1, 1, 0])
    held = Measurements.from_checked_columns(
        [T0 + dt.timedelta(hours=h) for h in range(4)],
        CodedColumn(items, names),
        [4.1, 80.0, 82.0, 4.3],
        [None] * 4,
        [None] * 4,
        CodedColumn(items, codes),
    )
    tail = held[2:]
    assert tail.column("variable").table is names and [m.variable for m in tail] == ["Heart Rate", "Potassium"]
    assert held[1].source_code is codes[1]
    middle = held[1:3]  # both rows are heart rates: only that table entry travels when pickled
    shipped = pickle.loads(pickle.dumps(middle))
    assert shipped == middle and shipped.column("variable").table == ["Heart Rate"]
    held.append(Measurement(time=T0, variable="Sodium", value=140))
    assert type(held.column("variable")) is list and [m.variable for m in held][-2:] == ["Potassium", "Sodium"]
    assert len(tail) == 2  # the slice taken before the change is its own sequence
    with pytest.raises(ValueError, match="differ in length"):
        Measurements.from_checked_columns([T0], ["K"], [1.0, 2.0], [None], [None], [None])
    with pytest.raises(KeyError, match="no measurement field 'values'"):
        held.column("values")


def test_copies_pickles_and_equality() -> None:
    admission = Admission(id="a", measurements=_rows())
    assert pickle.loads(pickle.dumps(admission)) == admission
    assert copy.deepcopy(admission) == admission and admission.model_copy(deep=True) == admission
    assert Admission(id="a").measurements == [] and Admission(id="a").measurements != admission.measurements
    plain = admission.model_copy(update={"measurements": _rows()[:1]})  # model_copy(update=) skips validation
    assert Measurements.of(plain.measurements) == _rows()[:1]
    assert Admission.model_validate_json(plain.model_dump_json()) == Admission(id="a", measurements=_rows()[:1])
    assert Measurements.of(admission.measurements) is admission.measurements
    admission.measurements.clear()
    assert len(admission.measurements) == 0


def test_store_writes_columns_and_still_reads_documents_written_as_rows(tmp_path) -> None:
    store = PatientStore(tmp_path / "patients.db")
    patient = Patient(id="p1", source="test", admissions=[Admission(id="a1", measurements=_rows())])
    store.ingest([patient])
    with store.engine.connect() as conn:
        doc = conn.execute(sa.text("SELECT document FROM patients WHERE id = 'p1'")).scalar_one()
    assert isinstance(json.loads(zlib.decompress(doc))["admissions"][0]["measurements"], dict)
    rows_form = zlib.compress(patient.model_dump_json().encode())  # what stores written before columns hold
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE patients SET document = :doc WHERE id = 'p1'"), {"doc": rows_form})
    assert store.get("p1") == patient
