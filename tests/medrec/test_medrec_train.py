"""Med-rec training through Ray Train on the MIMIC-IV demo: best-validation checkpoint, bootstrap test, re-evaluation."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from ehrflow.records.ingest import ingest_path
from ehrflow.training.medrec import MedRecConfig, evaluate_medrec, train_medrec
from ehrflow.training.medrec_data import MedRecDataConfig, build_from_store
from ehrflow.training.ray_utils import META_FILE, checkpoint_dirs


@pytest.fixture(scope="module")
def mimic4_dataset_dir(shared_data, tmp_path_factory):
    """The MIMIC-IV demo cohort built once and saved the way ``prepare_data`` saves it."""
    from ehrflow.records import PatientStore

    root = tmp_path_factory.mktemp("medrec")
    store = PatientStore(root / "patients.db")
    ingest_path(store, "mimic4", shared_data / "ehr" / "mimic4_demo")
    medrec = shared_data / "medrec"
    config = MedRecDataConfig(mapping_dir=medrec, ddi_pairs=medrec / "ddi_atc3_pairs.tsv", top_med=60)
    return build_from_store(store, config).save(root / "dataset")


def test_train_checkpoint_by_val_jaccard_and_bootstrap_test(
    ray_session, mimic4_dataset_dir, small_medrec_config, tmp_path
):
    config = small_medrec_config(tmp_path, "nlammr", dataset_dir=str(mimic4_dataset_dir), evaluate_baselines=True)
    result = train_medrec(config)
    n = sum(result.n_patients.values())
    assert result.n_patients == {
        "train": int(n * 2 / 3),
        "val": (n - int(n * 2 / 3)) // 2,
        "test": result.n_patients["test"],
    }
    assert len(result.seconds_per_epoch) == 2 and all(s > 0 for s in result.seconds_per_epoch)
    kept = checkpoint_dirs(result.checkpoint.parent)
    val_jaccards = [json.loads((p / META_FILE).read_text())["metrics"]["val_jaccard"] for p in kept]
    assert result.validation["jaccard"] == max(val_jaccards)
    assert set(result.test) == {"jaccard", "f1", "prauc", "ddi_rate", "avg_drugs"}
    for summary in result.test.values():
        assert summary.sd >= 0 and not np.isnan(summary.mean)
    assert 0 <= result.test["jaccard"].mean <= 1 and 0 <= result.test["ddi_rate"].mean <= 1
    assert "previous_visit" in result.test_baselines

    again = evaluate_medrec(result.checkpoint)
    assert again["test"] == result.test  # same checkpoint, same seeded bootstrap rounds
    no_interactions = tmp_path / "none.tsv"
    no_interactions.write_text("atc3_a\tatc3_b\n")
    user_ddi = evaluate_medrec(result.checkpoint, ddi_pairs=no_interactions, rounds=3)
    assert user_ddi["test"]["ddi_rate"].mean == 0.0 and user_ddi["test"]["jaccard"].mean > 0


def test_two_workers_gamenet(ray_session, mimic4_dataset_dir, small_medrec_config, tmp_path):
    config = small_medrec_config(tmp_path, "gamenet2", dataset_dir=str(mimic4_dataset_dir), model="gamenet", epochs=1)
    config.ray.num_workers = 2
    result = train_medrec(config)
    assert result.model == "gamenet" and result.checkpoint.is_dir() and result.best_epoch == 0
    assert result.test["avg_drugs"].mean > 0


def test_nlammr_with_gin_molecule_encoder(ray_session, mimic4_dataset_dir, small_medrec_config, tmp_path):
    pytest.importorskip("rdkit")
    config = small_medrec_config(tmp_path, "gin", dataset_dir=str(mimic4_dataset_dir), epochs=1)
    config.representations.molecule_method = "gin"
    config.ray.num_workers = 0
    result = train_medrec(config)
    reps = np.load(config.output_dir / "data" / "representations.npz")
    assert str(reps["molecule_method"]) == "gin" and reps["graph_atoms"].shape[0] > 100
    assert result.test["avg_drugs"].mean > 0
    assert evaluate_medrec(result.checkpoint, rounds=2)["test"]["jaccard"].mean >= 0  # reloads the GIN weights


def test_config_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValidationError, match="exactly one"):
        MedRecConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        MedRecConfig(store_url="x.db", dataset_dir=tmp_path)
    resume = MedRecConfig(dataset_dir=tmp_path, ray={"resume": True, "storage_path": str(tmp_path)})
    with pytest.raises(ValueError, match="does not resume"):
        train_medrec(resume)
