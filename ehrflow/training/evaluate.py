"""Evaluation artefacts: per-task metrics with bootstrap confidence intervals, ROC / PR /
calibration plots (PNG, matplotlib Agg) and a JSON model card.

Used by the fusion trainer and meant for the other trainers too: everything here takes plain
arrays, not models.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ehrflow.training.metrics import binary_metrics, bootstrap_ci, multilabel_metrics

BINARY_TASKS = ("mortality", "readmission")


def task_metrics(
    task: str,
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Point metrics of one task, with 95 % bootstrap intervals when ``n_bootstrap`` > 0."""
    fn = multilabel_metrics if y_true.ndim == 2 else binary_metrics
    if n_bootstrap <= 0:
        return {k: {"value": v} for k, v in fn(y_true, y_score).items()}
    return bootstrap_ci(fn, y_true, y_score, n_resamples=n_bootstrap, seed=seed)


def evaluate_predictions(
    labels: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    *,
    n_bootstrap: int = 0,
    seed: int = 0,
    phenotype_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics per task over the samples whose label is known (``masks``); tasks with none are skipped."""
    out: dict[str, Any] = {}
    for task, score in scores.items():
        known = masks[task].astype(bool)
        if not known.any():
            continue
        out[task] = task_metrics(task, labels[task][known], score[known], n_bootstrap=n_bootstrap, seed=seed)
        if task == "phenotypes" and phenotype_names:
            per_label = {}
            for j, name in enumerate(phenotype_names):
                m = binary_metrics(labels[task][known][:, j], score[known][:, j])
                per_label[name] = {"auroc": m["auroc"], "auprc": m["auprc"], "prevalence": m["prevalence"]}
            out[task]["per_label"] = per_label
    return out


def flat_values(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{"<prefix>/<task>/<metric>": value}`` for reporting (non-finite values dropped)."""
    flat: dict[str, float] = {}
    for task, values in metrics.items():
        for name, entry in values.items():
            if isinstance(entry, Mapping) and "value" in entry and math.isfinite(entry["value"]):
                flat[f"{prefix}/{task}/{name}"] = float(entry["value"])
    return flat


def plot_binary(y_true: np.ndarray, y_score: np.ndarray, out_dir: str | Path, name: str) -> list[Path]:
    """ROC, precision-recall and calibration (10 quantile bins) curves as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true).astype(int)
    if y_true.min() == y_true.max():
        return []
    paths = []
    fpr, tpr, _ = roc_curve(y_true, y_score)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(y_true, y_score):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=f"ROC: {name}")
    ax.legend(loc="lower right")
    paths.append(_save(fig, out_dir / f"{name}_roc.png"))

    precision, recall, _ = precision_recall_curve(y_true, y_score)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(recall, precision, label=f"AUPRC {average_precision_score(y_true, y_score):.3f}")
    ax.axhline(y_true.mean(), color="k", ls="--", lw=0.8, label=f"prevalence {y_true.mean():.3f}")
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (P+)", title=f"Precision-recall: {name}")
    ax.legend(loc="upper right")
    paths.append(_save(fig, out_dir / f"{name}_pr.png"))

    frac_pos, mean_pred = calibration_curve(y_true, y_score, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(mean_pred, frac_pos, "o-", label="model")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.set(xlabel="Mean predicted probability", ylabel="Observed fraction", title=f"Calibration: {name}")
    ax.legend(loc="upper left")
    paths.append(_save(fig, out_dir / f"{name}_calibration.png"))
    return paths


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_model_card(
    path: str | Path,
    *,
    model: str,
    data: Mapping[str, Any],
    split: Mapping[str, Any],
    metrics: Mapping[str, Any],
    config: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    plots: Sequence[Path] = (),
    limitations: Sequence[str] = (),
) -> Path:
    """A JSON model card: what was trained on what, how it was split, how it scored, with what config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = {
        "model": model,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": dict(data),
        "split": dict(split),
        "metrics": dict(metrics),
        "baseline": dict(baseline) if baseline is not None else None,
        "config": dict(config),
        "plots": [str(p) for p in plots],
        "limitations": list(limitations),
    }
    path.write_text(json.dumps(card, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["evaluate_predictions", "flat_values", "plot_binary", "task_metrics", "write_model_card"]
