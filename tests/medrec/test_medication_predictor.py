"""MedicationPredictor: a medrec checkpoint scores one patient exactly as training encoded that patient."""

import json
import shutil

import numpy as np
import pytest
import torch

from ehrflow.config import ModelSettings
from ehrflow.models.medrec import collate
from ehrflow.training.medrec import (
    _restore_model,
    build_model,
    checkpoint_drug_names,
    evaluate_medrec,
    load_prepared,
    load_trained_medrec,
)
from ehrflow.training.predictor import MedicationPredictor, PatientPredictor, PredictionUnavailable
from ehrflow.training.ray_utils import META_FILE


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


def test_a_checkpoint_serves_without_the_runs_prepared_data(tiny_medrec, tmp_path):
    """Serving reads the vocabularies and DDI pairs from the checkpoint, never ``output_dir/data`` (every training
    visit): a copy whose recorded data folder does not exist scores exactly like the original."""
    store, checkpoint, config = tiny_medrec
    moved = shutil.copytree(checkpoint, tmp_path / "checkpoint")
    meta = json.loads((moved / META_FILE).read_text())
    meta["data_dir"] = str(tmp_path / "gone")
    (moved / META_FILE).write_text(json.dumps(meta))
    dataset, _, _ = load_prepared(config.output_dir / "data")
    trained = load_trained_medrec(moved)
    assert (trained.diag_vocab, trained.med_vocab) == (dataset.diag_vocab, dataset.med_vocab)
    assert np.array_equal(trained.ddi, dataset.ddi) and trained.ddi.any()
    names = checkpoint_drug_names(moved)
    assert list(names) == dataset.med_vocab and all(names[m] == dataset.drug_names[m][:3] for m in names)
    assert all(names[m] for m in dataset.med_vocab[2:])  # every drug but the padding and OOV slots was ordered
    patient = store.get(dataset.patient_ids[0])
    original = MedicationPredictor.from_checkpoint(checkpoint)
    assert np.array_equal(
        MedicationPredictor.from_checkpoint(moved).probabilities(patient), original.probabilities(patient)
    )

    del meta["vocabularies"]
    (moved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="predates self-contained checkpoints"):
        load_trained_medrec(moved)


@pytest.mark.parametrize("name", ["nlammr", "gamenet", "mlp", "logreg"])
def test_every_model_is_restored_from_its_state_alone(tiny_medrec, name):
    _, _, config = tiny_medrec
    dataset, reps, split = load_prepared(config.output_dir / "data")
    torch.manual_seed(3)
    built = build_model(name, dataset, reps, split["train"], dim=config.dim, dropout=0.0).eval()
    sizes = (len(dataset.diag_vocab), len(dataset.proc_vocab), len(dataset.med_vocab))
    restored = _restore_model(config.model_copy(update={"model": name, "dropout": 0.0}), built.state_dict(), sizes)
    batch = collate(dataset.visits[:4], len(dataset.med_vocab))
    with torch.no_grad():
        assert torch.equal(restored(batch), built(batch))
