import datetime as dt

import numpy as np
import pytest

from ehrflow.records.model import RELATIVE_EPOCH, Admission, Code, Measurement, Note, Outcomes, Patient
from ehrflow.training.features import (
    CachedTextEncoder,
    FeatureConfig,
    FeatureReport,
    Normalizer,
    extract_stays,
)


def _h(hours: float) -> dt.datetime:
    return RELATIVE_EPOCH + dt.timedelta(hours=hours)


def _patient(pid: str, series: dict[str, list[tuple[float, float]]], **kw) -> Patient:
    measurements = [Measurement(time=_h(t), variable=v, value=x) for v, obs in series.items() for t, x in obs]
    adm = Admission(
        id=pid,
        admit_time=RELATIVE_EPOCH,
        time_basis="relative",
        measurements=measurements,
        static=kw.get("static", {"ICUType": 2.0, "Height": 170.0}),
        outcomes=Outcomes(in_hospital_death=kw.get("died", False)),
        diagnoses=kw.get("diagnoses", []),
        notes=kw.get("notes", []),
    )
    return Patient(id=pid, source="test", sex=kw.get("sex", "F"), age=kw.get("age", 60.0), admissions=[adm])


def _fit(patients, config=None):
    config = config or FeatureConfig(hours=4, clip_quantiles=(0.0, 1.0))
    report = FeatureReport()
    records = extract_stays(patients, config, report)
    return Normalizer.fit(records, config, report), records, report


def test_bins_mask_time_since_last_and_statistics():
    p = _patient("a", {"HR": [(0.2, 80), (0.7, 100), (2.5, 120)], "Na": [(1.0, 140)]})
    q = _patient("b", {"HR": [(0.5, 60)], "Na": [(3.0, 130)]})
    norm, records, report = _fit([p, q])
    fs = norm.transform(records, report)
    assert norm.variables == ["HR", "Na"]  # both in 2/2 stays; ties broken by name
    hr_mean, hr_sd = norm.mean[0], norm.std[0]
    assert hr_mean == pytest.approx(np.mean([80, 100, 120, 60]))
    z = lambda v: (v - hr_mean) / hr_sd  # noqa: E731
    # hour 0 holds the mean of 80 and 100; hour 2 holds 120; hours 1 and 3 unobserved
    np.testing.assert_allclose(fs.values[0, :, 0], [z(90), 0, z(120), 0], rtol=1e-5, atol=1e-6)
    assert fs.mask[0, :, 0].tolist() == [True, False, True, False]
    delta = fs.time_since_last(1.0)
    assert delta[0, :, 0].tolist() == [0, 1, 2, 1]
    assert delta[0, :, 1].tolist() == [0, 1, 1, 2]  # Na first seen in hour 1
    stats = fs.stats.reshape(2, 2, 6)[0, 0]  # HR of stay a: min, max, mean, first, last, count
    np.testing.assert_allclose(stats, [z(80), z(120), z(100), z(80), z(120), 3], rtol=1e-5)
    assert report.values_used == 6 and report.stays_kept == 2


def test_normaliser_is_fitted_on_training_stays_only():
    train = [_patient("a", {"HR": [(0, 80)]}), _patient("b", {"HR": [(0, 100)]})]
    test = [_patient("c", {"HR": [(0, 1000)]})]
    norm, _, report = _fit(train)
    test_records = extract_stays(test, norm.config, report)
    fs = norm.transform(test_records, report)
    assert norm.mean[0] == pytest.approx(90)
    # 1000 is clipped to the training range [80, 100] before scaling: no out-of-range inputs
    assert fs.values[0, 0, 0] == pytest.approx((100 - 90) / norm.std[0])


def test_bad_input_is_counted_never_silent():
    good = _patient("a", {"HR": [(0, 80), (1, 90)], "Na": [(0, 140)]})
    empty = _patient("e", {})
    late = _patient("l", {"HR": [(10, 70)]})  # outside the 4 h window: an empty stay too
    nan_value = Measurement.model_construct(time=_h(1), variable="Na", value=float("nan"), text_value=None)
    good.admissions[0].measurements.append(nan_value)
    good.admissions[0].measurements.append(Measurement(time=_h(1), variable="Culture", text_value="positive"))
    config = FeatureConfig(hours=4, variables=["HR", "Na", "Lactate"])
    norm, records, report = _fit([good, empty, late], config)
    fs = norm.transform(records, report)
    assert len(fs) == 1 and report.stays_dropped_empty == 2 and report.stays_without_measurements == 2
    assert report.values_nonfinite == 1 and report.values_non_numeric == 1 and report.values_outside_window == 1
    assert report.variables_never_observed_in_training == ["Lactate"]
    assert any("Lactate" in w for w in report.warnings)
    assert not fs.mask[..., 2].any() and np.isfinite(fs.values).all() and np.isfinite(fs.static).all()


def test_static_features_exclude_outcome_scores_and_one_hot_icu_type():
    p = _patient("a", {"HR": [(0, 80)]}, static={"ICUType": 1.0, "Height": 180.0, "SOFA": 9.0}, sex="M", age=70)
    q = _patient("b", {"HR": [(0, 80)]}, static={"ICUType": 3.0, "Height": None, "SAPS-I": 20.0})
    norm, records, report = _fit([p, q])
    cols = norm.static_columns
    assert not any(c.startswith(("SOFA", "SAPS-I")) for c in cols)
    assert "ICUType=1" in cols and "ICUType=3" in cols
    fs = norm.transform(records, report)
    row = dict(zip(cols, fs.static[1], strict=True))
    assert row["sex=F"] == 1 and row["Height:missing"] == 1 and row["ICUType=3"] == 1 and row["ICUType=1"] == 0


def test_phenotypes_from_icd_codes_and_unknown_without_codes():
    coded = _patient(
        "a",
        {"HR": [(0, 80)]},
        diagnoses=[Code(system="ICD9CM", code="428.0"), Code(system="ICD10CM", code="N17.9")],
    )
    uncoded = _patient("b", {"HR": [(0, 70)]})
    norm, records, report = _fit([coded, uncoded])
    fs = norm.transform(records, report)
    names = list(norm.config.phenotype_groups)
    positives = {names[j] for j in np.flatnonzero(fs.phenotypes[0])}
    assert positives == {"heart_failure", "acute_kidney_failure"}
    assert fs.phenotypes_mask.tolist() == [True, False]


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += len(texts)
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)


def test_text_embeddings_are_cached_and_notes_after_the_window_left_out(tmp_path):
    notes = [
        Note(id="n1", time=_h(1), text="a patient with sepsis"),
        Note(id="n2", time=_h(30), text="discharge summary: died"),
    ]
    p = _patient("a", {"HR": [(0, 80)]}, notes=notes)
    q = _patient("b", {"HR": [(0, 70)]})
    config = FeatureConfig(hours=4)
    report = FeatureReport()
    records = extract_stays([p, q], config, report, summaries={"b": "summary of b"})
    assert report.notes_after_window == 1
    norm = Normalizer.fit(records, config, report)
    inner = CountingEncoder()
    encoder = CachedTextEncoder(inner, "counting", tmp_path)
    fs = norm.transform(records, report, encoder)
    assert fs.notes_mask.tolist() == [True, False] and fs.summary_mask.tolist() == [False, True]
    assert fs.notes[0, 0] == len("a patient with sepsis")
    assert inner.calls == 2
    again = CachedTextEncoder(inner, "counting", tmp_path)
    fs2 = norm.transform(records, FeatureReport(), again)
    assert inner.calls == 2 and again.hits == 2  # served from disk
    np.testing.assert_array_equal(fs.notes, fs2.notes)


@pytest.fixture(scope="module")
def physionet_subset(physionet_stays):
    return physionet_stays(120)


def test_real_physionet_stays_featurise(physionet_subset, tmp_path):
    config = FeatureConfig()
    report = FeatureReport()
    records = extract_stays(physionet_subset, config, report)
    norm = Normalizer.fit(records[:80], config, report)
    assert {"HR", "GCS", "Creatinine", "Urine"} <= set(norm.variables) and len(norm.variables) <= 37
    fs = norm.transform(records[80:], report)
    assert fs.values.shape[1:] == (48, len(norm.variables))
    assert np.isfinite(fs.values).all() and fs.mask.any(axis=(1, 2)).all()
    assert fs.mortality_mask.all() and 0 < fs.mortality.sum() < len(fs)
    assert all(pid.startswith("p12-") for pid in fs.patient_ids)
    path = fs.save(tmp_path / "f.npz")
    loaded = type(fs).load(path)
    np.testing.assert_array_equal(loaded.values, fs.values)
    assert loaded.stay_ids.tolist() == fs.stay_ids.tolist()
