"""Boosted trees exported to arrays, and the fusion network blended with them (train, evaluate, predict)."""

import json

import numpy as np
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from ehrflow.models.trees import TreeEnsemble
from ehrflow.training.features import TRAJECTORY_STAT_NAMES, FeatureSet, trajectory_stats
from ehrflow.training.fusion import evaluate_fusion, load_fusion_model, predict, to_tensors, train_fusion
from ehrflow.training.predictor import FusionPredictor
from ehrflow.training.tree_blend import BLEND_DIR, WEIGHT_GRID, TreeBlend, tree_features


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 8))
    x[rng.random(x.shape) < 0.25] = np.nan  # trees route missing values; the export must too
    y = (np.nan_to_num(x[:, 0]) - np.nan_to_num(x[:, 3]) + rng.normal(size=len(x)) > 0).astype(int)
    model = HistGradientBoostingClassifier(max_iter=60, max_leaf_nodes=15, early_stopping=False, random_state=0)
    x_new = rng.normal(size=(400, 8))
    x_new[rng.random(x_new.shape) < 0.3] = np.nan
    return model.fit(x, y), x_new


def test_exported_trees_score_like_scikit_learn(fitted, tmp_path):
    model, x = fitted
    trees = TreeEnsemble.from_sklearn(model)
    assert trees.n_trees == 60
    np.testing.assert_allclose(trees.predict_proba(x), model.predict_proba(x)[:, 1], rtol=0, atol=1e-12)
    after_20 = list(model.staged_predict_proba(x))[19][:, 1]
    np.testing.assert_allclose(TreeEnsemble.from_sklearn(model, 20).predict_proba(x), after_20, rtol=0, atol=1e-12)
    trees.save(tmp_path / "trees.npz")
    np.testing.assert_array_equal(TreeEnsemble.load(tmp_path / "trees.npz").predict_proba(x), trees.predict_proba(x))
    with pytest.raises(ValueError, match="rows of 8 features"):
        trees.predict_proba(x[:, :5])


def test_loading_refuses_other_files_and_never_unpickles(fitted, tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved tree ensemble"):
        TreeEnsemble.load(tmp_path / "other.npz")
    TreeEnsemble.from_sklearn(fitted[0]).save(tmp_path / "trees.npz")
    with np.load(tmp_path / "trees.npz") as saved:
        arrays = dict(saved)
    arrays["value"] = np.array([{"code": "never run"}], dtype=object)  # stored as a pickle inside the npz
    np.savez(tmp_path / "objects.npz", **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        TreeEnsemble.load(tmp_path / "objects.npz")


def test_fusion_run_with_trees_blends_in_evaluation_and_prediction(physionet_stays, tiny_fusion_config, tmp_path):
    torch.set_num_threads(1)
    patients = physionet_stays(160)
    config = tiny_fusion_config(
        tmp_path,
        split={"fractions": [0.6, 0.2, 0.2], "seed": 5},  # 11 / 5 / 4 deaths
        trees={"enabled": True, "max_iter": 30},
        n_bootstrap=10,
    )
    result = train_fusion(config, patients)
    blend = TreeBlend.load(result.checkpoint)
    assert blend is not None and (result.checkpoint / BLEND_DIR / "mortality.npz").is_file()
    assert set(result.tree_blend) == {"mortality"}
    assert result.tree_blend["mortality"]["network_weight"] in WEIGHT_GRID
    assert 1 <= result.tree_blend["mortality"]["boosting_rounds"] <= 30

    test = FeatureSet.load(result.run_dir / "data" / "test.npz")
    model, _ = load_fusion_model(result.checkpoint)
    network = predict(model, to_tensors(test, model.cfg), ["mortality"])["mortality"]
    w = blend.network_weight["mortality"]
    expected = (1 - w) * blend.trees["mortality"].predict_proba(tree_features(test)) + w * network

    evaluation = evaluate_fusion(result.checkpoint, n_bootstrap=10, output_dir=tmp_path / "eval")
    assert evaluation["tree_blend"] == result.tree_blend
    assert set(evaluation["network_metrics"]) == set(evaluation["metrics"]) == {"mortality"}
    card = json.loads((tmp_path / "eval" / "model_card.json").read_text())
    assert "blended with boosted trees" in card["model"] and card["config"]["tree_blend"] == result.tree_blend

    predictor = FusionPredictor.from_checkpoint(result.checkpoint)
    by_id = {p.id: p for p in patients}
    for pid, probability in zip(test.patient_ids[:8], expected[:8], strict=True):
        assert predictor(by_id[pid])["mortality"] == pytest.approx(float(probability), abs=1e-5)


def test_trajectory_statistics_by_hand():
    # one stay, 8 bins, variable 0 seen at bins 1, 3 and 7; variable 1 never seen
    values = np.zeros((1, 8, 2), dtype=np.float32)
    mask = np.zeros((1, 8, 2), dtype=bool)
    values[0, [1, 3, 7], 0] = [1.0, 2.0, 6.0]
    mask[0, [1, 3, 7], 0] = True
    stats = trajectory_stats(values, mask).reshape(len(TRAJECTORY_STAT_NAMES), 2)
    seen = dict(zip(TRAJECTORY_STAT_NAMES, stats[:, 0], strict=True))
    unseen = dict(zip(TRAJECTORY_STAT_NAMES, stats[:, 1], strict=True))
    assert seen["std"] == pytest.approx(np.std([1.0, 2.0, 6.0]))
    assert seen["mean_first_half"] == pytest.approx(1.5)
    assert seen["mean_second_half"] == seen["mean_last_quarter"] == pytest.approx(6.0)
    assert seen["slope_per_bin"] == pytest.approx(np.polyfit([1, 3, 7], [1.0, 2.0, 6.0], 1)[0])
    assert seen["bins_since_last"] == 0 and seen["bins_observed"] == 3
    assert unseen["bins_observed"] == 0
    assert all(np.isnan(unseen[name]) for name in TRAJECTORY_STAT_NAMES if name != "bins_observed")


def test_a_blend_fitted_on_other_features_is_refused(fitted, tmp_path):
    TreeBlend({"mortality": TreeEnsemble.from_sklearn(fitted[0])}, {"mortality": 0.5}).save(tmp_path)
    blend_json = tmp_path / BLEND_DIR / "blend.json"
    assert TreeBlend.load(tmp_path).network_weight == {"mortality": 0.5}
    blend_json.write_text(json.dumps({"network_weight": {"mortality": 0.5}}))  # written before trajectory stats
    with pytest.raises(ValueError, match="blend.json: trees fitted on features None"):
        TreeBlend.load(tmp_path)
