"""MedicationPredictor: a medrec checkpoint scores one patient exactly as training encoded that patient."""

import numpy as np
import pytest
import torch

from ehrflow.config import ModelSettings
from ehrflow.models.medrec import collate
from ehrflow.training.medrec import evaluate_medrec, load_prepared
from ehrflow.training.predictor import MedicationPredictor, PatientPredictor, PredictionUnavailable


def test_predictor_matches_the_training_encoding(tiny_medrec):
    store, checkpoint, config = tiny_medrec
    predictor = MedicationPredictor.from_checkpoint(checkpoint)
    dataset, _, _ = load_prepared(config.output_dir / "data")

    compared = recommended_total = 0
    for index, patient_id in enumerate(dataset.patient_ids):
        patient = store.get(patient_id)
        latest = max((a for a in patient.admissions if a.diagnoses), key=lambda a: a.admit_time)
        if not latest.medications:
            continue  # the dataset's last visit is another admission; the predictor scores this one
        with torch.no_grad():
            logits = predictor.model(collate([dataset.visits[index]], len(dataset.med_vocab)))
        expected = torch.sigmoid(logits)[0, -1].numpy()
        assert np.allclose(predictor.probabilities(patient), expected, atol=1e-6)

        out = predictor(patient)
        recommended = {k.removeprefix("medication:"): v for k, v in out.items() if k.startswith("medication:")}
        assert out["medications_recommended"] == len(recommended)
        assert recommended == {
            dataset.med_vocab[i]: pytest.approx(float(p)) for i, p in enumerate(expected) if p >= config.threshold
        }
        assert list(recommended.values()) == sorted(recommended.values(), reverse=True)
        recommended_total += len(recommended)
        compared += 1
        if compared == 3:
            break
    assert compared == 3 and recommended_total > 0


def test_earlier_visits_change_the_recommendation_and_a_patient_without_diagnoses_is_refused(tiny_medrec):
    store, checkpoint, config = tiny_medrec
    predictor = MedicationPredictor.from_checkpoint(checkpoint)
    dataset, _, _ = load_prepared(config.output_dir / "data")
    patient = store.get(dataset.patient_ids[0])
    latest = max((a for a in patient.admissions if a.diagnoses), key=lambda a: a.admit_time)

    with_history = predictor(patient)
    alone = predictor(patient.model_copy(update={"admissions": [latest]}))
    assert with_history != alone  # the drugs of earlier admissions feed the repeat terms and the attention

    no_codes = patient.model_copy(
        update={"admissions": [a.model_copy(update={"diagnoses": []}) for a in patient.admissions]}
    )
    with pytest.raises(PredictionUnavailable, match="no admission with diagnosis codes"):
        predictor(no_codes)

    combined = PatientPredictor.from_settings(ModelSettings(medrec_checkpoint=checkpoint))
    assert combined(patient) == with_history
    with pytest.raises(PredictionUnavailable, match="no admission with diagnosis codes"):
        combined(no_codes)
    assert PatientPredictor.from_settings(ModelSettings()) is None

    guarded = MedicationPredictor.from_checkpoint(checkpoint)
    guarded.config = config.model_copy(update={"ddi_guard": 0.0, "threshold": 0.2})
    recommended = [k.removeprefix("medication:") for k in guarded(patient) if k.startswith("medication:")]
    index = [guarded.med_index[d] for d in recommended]
    assert len(index) > 1 and not guarded.ddi[np.ix_(index, index)].any()  # no interacting pair is recommended


def test_evaluation_with_a_ddi_guard_recommends_no_interacting_pair(tiny_medrec):
    _, checkpoint, _ = tiny_medrec
    plain = evaluate_medrec(checkpoint, rounds=3)
    strict = evaluate_medrec(checkpoint, rounds=3, ddi_guard=0.0)
    assert plain["test"]["ddi_rate"].mean > 0  # the model alone recommends interacting pairs here
    assert strict["test"]["ddi_rate"].mean == 0.0
    assert strict["test"]["avg_drugs"].mean < plain["test"]["avg_drugs"].mean
