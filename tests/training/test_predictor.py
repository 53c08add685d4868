"""FusionPredictor on a tiny checkpoint trained in Ray Train local mode on real PhysioNet 2012 stays."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrflow.agents.types import HealthSummary, Statement
from ehrflow.training.features import TRAJECTORY_STAT_NAMES, FeatureSet
from ehrflow.training.fusion import load_fusion_model, predict, to_tensors, train_fusion
from ehrflow.training.predictor import FusionPredictor, PredictionUnavailable
from ehrflow.training.ray_utils import META_FILE


class HashEncoder:
    """A deterministic stand-in for the sentence encoder."""

    def encode(self, texts):
        return np.array(
            [np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype=np.uint8) / 255.0 for t in texts],
            dtype=np.float32,
        )


def _summary(text: str) -> HealthSummary:
    return HealthSummary(task="general", statements=[Statement(text=text, citations=["m1"])])


@pytest.fixture(scope="module")
def trained(physionet_stays, tiny_fusion_config, tmp_path_factory):
    torch.set_num_threads(1)
    patients = physionet_stays(80)
    summaries = {p.id: _summary(f"patient summary {i}") for i, p in enumerate(patients[::2])}
    root = tmp_path_factory.mktemp("predictor")
    config = tiny_fusion_config(root, modalities=["timeseries", "static", "stats", "summary"])
    texts = {pid: s.text for pid, s in summaries.items()}
    result = train_fusion(config, patients, summaries=texts, text_encoder=HashEncoder())
    return result, patients, summaries


def test_predictions_match_the_evaluation_path(trained):
    result, patients, summaries = trained
    test_split = FeatureSet.load(result.run_dir / "data" / "test.npz")
    model, _ = load_fusion_model(result.checkpoint)
    scores = predict(model, to_tensors(test_split, model.cfg), ["mortality"])["mortality"]
    expected = dict(zip(test_split.patient_ids, scores, strict=True))
    shutil.rmtree(result.run_dir / "data")  # the checkpoint carries its own normalizer
    predictor = FusionPredictor.from_checkpoint(result.checkpoint, text_encoder=HashEncoder())
    assert predictor.outputs == ["mortality"]
    by_id = {p.id: p for p in patients}
    checked_with_summary = 0
    for pid, probability in expected.items():
        got = predictor(by_id[pid], summaries.get(pid))
        assert set(got) == {"mortality"}
        assert got["mortality"] == pytest.approx(float(probability), abs=1e-5)
        checked_with_summary += pid in summaries
    assert 0 < checked_with_summary < len(expected)

    pid = next(pid for pid in expected if pid in summaries)
    assert predictor(by_id[pid], None)["mortality"] != pytest.approx(float(expected[pid]), abs=1e-7)


def test_unscorable_patients_raise_a_clear_error(trained):
    result, patients, _ = trained
    predictor = FusionPredictor.from_checkpoint(result.checkpoint, text_encoder=HashEncoder())
    admission = patients[0].admissions[0]
    no_measurements = patients[0].model_copy(update={"admissions": [admission.model_copy(update={"measurements": []})]})
    with pytest.raises(PredictionUnavailable, match="no measurement in its first 48 h"):
        predictor(no_measurements, None)
    outpatient = patients[0].model_copy(update={"admissions": [admission.model_copy(update={"inpatient": False})]})
    with pytest.raises(PredictionUnavailable, match="no inpatient admission"):
        predictor(outpatient, None)
    with pytest.raises(ValueError, match="text encoder is required"):
        FusionPredictor(predictor.model, predictor.normalizer, [], text_encoder=None)


def test_the_statistics_branch_reads_trajectory_statistics_and_old_checkpoints_keep_their_layout(
    trained, physionet_stays, tiny_fusion_config, tmp_path
):
    result, _, _ = trained
    model, _ = load_fusion_model(result.checkpoint)
    assert model.cfg.stats_layout == "summary+trajectory"
    assert model.cfg.n_stats == (6 + len(TRAJECTORY_STAT_NAMES)) * model.cfg.n_variables

    # a checkpoint written before the layout existed was trained on the six statistics and carries no layout field
    torch.set_num_threads(1)
    config = tiny_fusion_config(
        tmp_path,
        modalities=["timeseries", "static", "stats"],
        model={"hidden": 8, "heads": 2, "stats_layout": "summary"},
    )
    old = train_fusion(config, physionet_stays(60))
    meta_file = Path(old.checkpoint) / META_FILE
    meta = json.loads(meta_file.read_text())
    del meta["model_config"]["stats_layout"]
    meta_file.write_text(json.dumps(meta))
    model, _ = load_fusion_model(old.checkpoint)
    assert model.cfg.stats_layout == "summary" and model.cfg.n_stats == 6 * model.cfg.n_variables
    test_split = FeatureSet.load(old.run_dir / "data" / "test.npz")
    scores = predict(model, to_tensors(test_split, model.cfg), ["mortality"])["mortality"]
    assert len(scores) == len(test_split) and np.all((scores > 0) & (scores < 1))
