"""End-to-end fusion training through Ray Train on a PhysioNet 2012 subset (few steps, CPU)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ehrflow.records.model import Note
from ehrflow.training.fusion import (
    FusionTrainConfig,
    ModalityError,
    evaluate_fusion,
    train_fusion,
    train_fusion_from_file,
)
from ehrflow.training.ray_utils import checkpoint_dirs, load_state


@pytest.fixture(scope="module")
def physionet_subset(physionet_stays):
    return physionet_stays(160)


def _config(tmp_path, name: str, **overrides) -> FusionTrainConfig:
    base = {
        "split": {"fractions": [0.6, 0.2, 0.2], "seed": 5},  # 11 / 5 / 4 deaths
        "model": {"hidden": 16, "heads": 2},
        "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 2, "patience": 5},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "runs"), "name": name},
        "n_bootstrap": 20,
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return FusionTrainConfig.model_validate(base)


class HashEncoder:
    """A deterministic stand-in for the sentence encoder (the real one is tested in retrieval)."""

    def encode(self, texts):
        return np.array(
            [np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype=np.uint8) / 255.0 for t in texts],
            dtype=np.float32,
        )


def test_one_worker_trains_checkpoints_and_resumes(ray_session, physionet_subset, tmp_path):
    config = _config(tmp_path, "one")
    result = train_fusion(config, physionet_subset)
    assert result.epochs_run == 2
    assert result.checkpoint.name == "checkpoint_epoch_0001"
    assert "val/mortality/auroc" in result.val_metrics
    assert 0 <= result.test_metrics["mortality"]["auroc"]["value"] <= 1
    assert result.test_metrics["mortality"]["auroc"]["low"] <= result.test_metrics["mortality"]["auroc"]["high"]
    card = json.loads(result.model_card.read_text())
    assert card["data"]["sizes"] == {"train": 96, "val": 32, "test": 32}
    assert "mortality" in card["baseline"]["metrics"]
    assert {p.name for p in result.plots} == {"mortality_roc.png", "mortality_pr.png", "mortality_calibration.png"}
    first_epoch = result.run_dir / "checkpoint_epoch_0000" / "state.pt"
    first_mtime = first_epoch.stat().st_mtime_ns

    with pytest.raises(FileExistsError, match="resume"):
        train_fusion(config, physionet_subset)

    # a resume must rebuild the checkpoint's model: a changed setting is refused before Ray starts
    with pytest.raises(ValueError, match="hidden: checkpoint 16, now 32"):
        train_fusion(_config(tmp_path, "one", model={"hidden": 32}, ray={"resume": True}))
    # a checkpoint from before the trajectory statistics (no layout in its meta) meets today's default
    meta_file = result.checkpoint / "meta.json"
    written = meta_file.read_text()
    legacy = json.loads(written)
    del legacy["model_config"]["stats_layout"]
    meta_file.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="stats_layout: checkpoint 'summary', now 'summary\\+trajectory'"):
        train_fusion(_config(tmp_path, "one", ray={"resume": True}))
    meta_file.write_text(written)
    assert [p.name for p in checkpoint_dirs(result.run_dir)] == ["checkpoint_epoch_0000", "checkpoint_epoch_0001"]

    resumed = train_fusion(_config(tmp_path, "one", train={"epochs": 3}, ray={"resume": True}))
    assert resumed.checkpoint.name == "checkpoint_epoch_0002" and resumed.epochs_run == 3
    assert first_epoch.stat().st_mtime_ns == first_mtime  # epochs 0 and 1 were not run again
    state, meta = load_state(resumed.checkpoint)
    assert meta["epoch"] == 2 and set(state) == {"model", "optimizer", "best_model"}


def test_two_workers(ray_session, physionet_subset, tmp_path):
    config = _config(tmp_path, "two", train={"epochs": 1}, ray={"num_workers": 2}, n_bootstrap=0)
    result = train_fusion(config, physionet_subset)
    assert result.epochs_run == 1 and result.checkpoint.is_dir()
    assert "val/mortality/auroc" in result.val_metrics


def test_local_mode_medfuse_with_text_then_evaluate_new_patients(physionet_subset, tmp_path):
    torch.set_num_threads(1)
    patients = [p.model_copy(deep=True) for p in physionet_subset[:120]]
    for i, patient in enumerate(patients[::2]):
        adm = patient.admissions[0]
        adm.notes.append(Note(id=f"n{i}", time=adm.admit_time, text=f"nursing note {i}: stable overnight"))
    summaries = {p.id: f"summary {i}" for i, p in enumerate(patients[::3])}
    config = _config(
        tmp_path,
        "local",
        modalities=["timeseries", "static", "stats", "notes", "summary"],
        model={"variant": "medfuse", "hidden": 16, "heads": 2},
        train={"epochs": 1, "pretrain_epochs": 1},
        ray={"num_workers": 0},
    )
    result = train_fusion(config, patients, summaries=summaries, text_encoder=HashEncoder())
    assert [p.name for p in checkpoint_dirs(result.run_dir)] == ["checkpoint_epoch_0000", "checkpoint_epoch_0001"]
    assert result.feature_report.stays_with_notes == 60 and result.feature_report.stays_with_summary == 40
    _, meta = load_state(result.checkpoint)
    assert meta["phase"] == "supervised" and meta["model_config"]["text_dim"] == 16

    evaluation = evaluate_fusion(
        result.checkpoint,
        physionet_subset[120:],
        text_encoder=HashEncoder(),
        output_dir=tmp_path / "eval-new",
        n_bootstrap=10,
    )
    assert evaluation["n"] == 40 and "mortality" in evaluation["metrics"]
    assert (tmp_path / "eval-new" / "model_card.json").is_file()


def test_missing_modality_fails_before_training(physionet_subset, tmp_path):
    config = _config(tmp_path, "notes", modalities=["timeseries", "notes"])
    with pytest.raises(ModalityError, match="notes"):
        train_fusion(config, physionet_subset[:40])
    assert not checkpoint_dirs(config.ray.run_dir)
    config = _config(tmp_path, "readm", tasks=["readmission"])
    with pytest.raises(ModalityError, match="readmission"):
        train_fusion(config, physionet_subset[:40])
    # notes only on stays without measurements (dropped at featurisation) do not make a notes modality
    patients = [p.model_copy(deep=True) for p in physionet_subset[:40]]
    for i, patient in enumerate(patients):
        adm = patient.admissions[0]
        adm.notes.append(Note(id=f"n{i}", time=adm.admit_time, text="note on an empty stay"))
        adm.measurements.clear()
        if i == 30:
            break
    with pytest.raises(ModalityError, match="notes"):
        train_fusion(_config(tmp_path, "empty-notes", modalities=["timeseries", "notes"]), patients)


def test_config_loads_from_yaml_and_rejects_unknown_modalities(tmp_path):
    path = tmp_path / "fusion.yaml"
    path.write_text(
        "modalities: [timeseries, static, stats]\n"
        "tasks: [mortality, phenotypes]\n"
        "model: {variant: medfuse, encoder: transformer, mi_weight: 0.05}\n"
        "split: {file: /data/splits.csv, column: split2}\n"
        "ray: {num_workers: 2, name: nightly}\n"
    )
    config = FusionTrainConfig.from_yaml(path)
    assert config.model.variant == "medfuse" and config.model.mi_weight == 0.05
    assert config.monitor == "val/mortality/auroc" and config.ray.num_workers == 2
    path.write_text("modalities: [timeseries, images]\n")
    with pytest.raises(ValidationError, match="images"):
        FusionTrainConfig.from_yaml(path)


def test_train_from_yaml_reads_the_patient_store_then_resumes(physionet_subset, store, tmp_path):
    """The CLI path: a YAML file without a data section trains on the settings' patient store."""
    store.ingest(physionet_subset[:60])
    path = tmp_path / "fusion.yaml"
    path.write_text(
        "split: {fractions: [0.6, 0.2, 0.2], seed: 5}\n"
        "model: {hidden: 8, heads: 2}\n"
        "train: {epochs: 1, batch_size: 32, max_steps_per_epoch: 1}\n"
        f"ray: {{num_workers: 0, storage_path: {tmp_path / 'runs'}, name: cli}}\n"
        "n_bootstrap: 0\n"
    )
    result = train_fusion_from_file(path, default_store_url=str(store.url))
    assert result.model_card.is_file() and result.epochs_run == 1
    assert sum(result.feature_report.labels_known.values()) > 0
    with pytest.raises(FileExistsError):
        train_fusion_from_file(path, default_store_url=str(store.url))
    path.write_text(path.read_text().replace("epochs: 1,", "epochs: 2,"))
    resumed = train_fusion_from_file(path, resume=True, default_store_url=str(store.url))
    assert resumed.checkpoint.name == "checkpoint_epoch_0001"
