"""Classification metrics used by every ehrflow trainer, with bootstrap confidence intervals.

Implemented in numpy (checked against scikit-learn in the tests) because a bootstrap calls them
thousands of times and scikit-learn's input validation dominates at that scale.

Metrics that are undefined on the data at hand (AUROC with one class present) come back as
``nan`` rather than raising, so one degenerate bootstrap resample or phenotype does not abort a
whole evaluation; the bootstrap skips such resamples and counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def _two_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < y.sum() < y.size


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    if not _two_classes(y_true):
        return math.nan
    positives = y_true == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    ranks = rankdata(y_score)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _pr_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest threshold first."""
    order = np.argsort(-y_score, kind="mergesort")
    scores, labels = y_score[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(labels)[last_of_tie]
    predicted = last_of_tie + 1
    return tp / predicted, tp / labels.sum()


def auprc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve, as scikit-learn computes it)."""
    if not _two_classes(y_true):
        return math.nan
    precision, recall = _pr_curve(y_true, y_score)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def min_se_ppv(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """PhysioNet 2012 event-1 score: the best, over thresholds, of min(sensitivity, positive predictive value)."""
    if not _two_classes(y_true):
        return math.nan
    precision, recall = _pr_curve(y_true, y_score)
    return float(np.max(np.minimum(precision, recall)))


def _f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    tp = float(np.sum((y_pred == 1) & (y_true == 1)))
    denominator = float(np.sum(y_pred == 1) + np.sum(y_true == 1))
    return 2 * tp / denominator if denominator else 0.0


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC, min(Se, P+), accuracy and F1 (at ``threshold``) of one binary task."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"labels and scores differ in length: {y_true.shape} vs {y_score.shape}")
    if not np.isfinite(y_score).all():
        raise ValueError("scores contain NaN or inf")
    y_pred = (y_score >= threshold).astype(np.int64)
    empty = y_true.size == 0
    return {
        "auroc": auroc(y_true, y_score),
        "auprc": auprc(y_true, y_score),
        "min_se_ppv": min_se_ppv(y_true, y_score),
        "accuracy": math.nan if empty else float(np.mean(y_true == y_pred)),
        "f1": math.nan if empty else _f1(y_true, y_pred),
        "n": float(y_true.size),
        "prevalence": math.nan if empty else float(y_true.mean()),
    }


def multilabel_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Macro and micro AUROC/AUPRC/F1 and element-wise accuracy for multi-label tasks (phenotypes).

    Macro AUROC/AUPRC skip labels with a single class in ``y_true`` (counted in ``n_labels_scored``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"expected two (samples, labels) arrays of one shape, got {y_true.shape} and {y_score.shape}")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    y_pred = (y_score >= threshold).astype(np.int64)
    scored = [j for j in range(y_true.shape[1]) if _two_classes(y_true[:, j])]
    flat_true, flat_score = y_true.ravel(), y_score.ravel()
    return {
        "auroc_macro": float(np.mean([auroc(y_true[:, j], y_score[:, j]) for j in scored])) if scored else math.nan,
        "auroc_micro": auroc(flat_true, flat_score),
        "auprc_macro": float(np.mean([auprc(y_true[:, j], y_score[:, j]) for j in scored])) if scored else math.nan,
        "auprc_micro": auprc(flat_true, flat_score),
        "f1_macro": float(np.mean([_f1(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])])),
        "f1_micro": _f1(flat_true, y_pred.ravel()),
        "accuracy": float((y_true == y_pred).mean()),
        "n": float(y_true.shape[0]),
        "n_labels_scored": float(len(scored)),
    }


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap over samples: ``{metric: {value, low, high, n_valid}}``.

    ``value`` is the metric on the full set; resamples where a metric is undefined are dropped
    and ``n_valid`` says how many remained.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    point = metric_fn(y_true, y_score)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        for key, value in metric_fn(y_true[idx], y_score[idx]).items():
            if math.isfinite(value):
                draws[key].append(value)
    out: dict[str, dict[str, float]] = {}
    for key, value in point.items():
        samples = np.asarray(draws[key])
        low, high = (
            (float(np.quantile(samples, alpha / 2)), float(np.quantile(samples, 1 - alpha / 2)))
            if samples.size
            else (math.nan, math.nan)
        )
        out[key] = {"value": value, "low": low, "high": high, "n_valid": float(samples.size)}
    return out


__all__ = ["auprc", "auroc", "binary_metrics", "bootstrap_ci", "min_se_ppv", "multilabel_metrics"]
