import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ehrflow.training.metrics import binary_metrics, bootstrap_ci, min_se_ppv, multilabel_metrics


def test_binary_metrics_on_hand_computed_example():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    m = binary_metrics(y, p)
    # 9 positive/negative pairs, one misordered (0.35 < 0.4)
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["accuracy"] == pytest.approx(5 / 6)  # threshold 0.5: only 0.35 (a positive) is wrong
    assert m["f1"] == pytest.approx(0.8)
    assert m["prevalence"] == pytest.approx(0.5)


def test_min_se_ppv_is_best_threshold_of_min_precision_recall():
    y = np.array([1, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    # threshold 0.9: Se 0.5, P+ 1.0; threshold 0.7: Se 1.0, P+ 2/3 -> best min is 2/3
    assert min_se_ppv(y, p) == pytest.approx(2 / 3)


def test_single_class_gives_nan_not_an_exception():
    m = binary_metrics(np.zeros(5), np.linspace(0, 1, 5))
    assert (
        math.isnan(m["auroc"]) and math.isnan(m["auprc"]) and m["accuracy"] == pytest.approx(0.4)
    )  # 0.5, 0.75, 1 predicted positive


def test_bad_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics(np.array([0, 1]), np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match="length"):
        binary_metrics(np.array([0, 1, 1]), np.array([0.2, 0.3]))


def test_multilabel_macro_skips_single_class_labels_and_micro_pools():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(50, 3))
    y[:, 2] = 0  # never positive: not scorable
    p = rng.random((50, 3))
    m = multilabel_metrics(y, p)
    expected_macro = np.mean([roc_auc_score(y[:, j], p[:, j]) for j in (0, 1)])
    assert m["auroc_macro"] == pytest.approx(expected_macro)
    assert m["auroc_micro"] == pytest.approx(roc_auc_score(y.ravel(), p.ravel()))
    assert m["n_labels_scored"] == 2


def test_bootstrap_interval_brackets_the_point_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    ci = bootstrap_ci(binary_metrics, y, p, n_resamples=200, seed=3)
    auroc = ci["auroc"]
    assert auroc["low"] < auroc["value"] < auroc["high"]
    assert auroc["n_valid"] == 200
    again = bootstrap_ci(binary_metrics, y, p, n_resamples=200, seed=3)
    assert again["auroc"] == auroc  # seeded: reproducible


def test_numpy_metrics_agree_with_scikit_learn_including_ties():
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, (40, 4))
    p = np.round(rng.random((40, 4)), 1)  # many ties
    for j in range(4):
        m = binary_metrics(y[:, j], p[:, j])
        assert m["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert m["auprc"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        precision, recall, _ = precision_recall_curve(y[:, j], p[:, j])
        assert m["min_se_ppv"] == pytest.approx(np.max(np.minimum(precision, recall)))
        assert m["f1"] == pytest.approx(f1_score(y[:, j], p[:, j] >= 0.5))
    ml = multilabel_metrics(y, p)
    assert ml["f1_macro"] == pytest.approx(f1_score(y, p >= 0.5, average="macro"))
    assert ml["f1_micro"] == pytest.approx(f1_score(y, p >= 0.5, average="micro"))
