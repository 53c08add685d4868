"""Gradient-boosted trees held as plain arrays: saved without pickle, evaluated with numpy.

scikit-learn's ``HistGradientBoostingClassifier`` fits the trees (it is the strongest simple model on summary
statistics of ICU stays); a checkpoint keeps only each node's feature, threshold, missing-value direction,
children and leaf value, so loading one never runs code from the file and serving needs no scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_FIELDS = ("feature", "threshold", "missing_left", "left", "right", "value", "is_leaf", "roots")


@dataclass(frozen=True)
class TreeEnsemble:
    """A binary classifier's boosted trees: raw score = ``baseline`` + the leaf value each tree reaches.

    Nodes of every tree share the arrays; ``left``/``right`` are indices into them and ``roots`` holds each tree's
    root. A numeric split sends a value ``<= threshold`` left and a missing one (NaN) where training sent it.
    """

    baseline: float
    n_features: int
    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    is_leaf: np.ndarray
    roots: np.ndarray

    @classmethod
    def from_sklearn(cls, model: Any, n_trees: int | None = None) -> TreeEnsemble:
        """The first ``n_trees`` boosting rounds (default all) of a fitted binary ``HistGradientBoostingClassifier``."""
        if getattr(model, "n_trees_per_iteration_", None) != 1:
            raise ValueError("only binary classifiers (one tree per boosting round) can be exported")
        rounds = model._predictors[: n_trees if n_trees is not None else len(model._predictors)]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _FIELDS}
        offset = 0
        for (predictor,) in rounds:
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                raise ValueError("trees with categorical splits cannot be exported")
            leaf = nodes["is_leaf"].astype(bool)
            parts["feature"].append(np.where(leaf, 0, nodes["feature_idx"]).astype(np.int32))
            parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
            parts["missing_left"].append(nodes["missing_go_to_left"].astype(bool))
            # a leaf points at itself, so every sample can take the same number of steps
            own = np.arange(offset, offset + len(nodes), dtype=np.int64)
            parts["left"].append(np.where(leaf, own, nodes["left"].astype(np.int64) + offset))
            parts["right"].append(np.where(leaf, own, nodes["right"].astype(np.int64) + offset))
            parts["value"].append(nodes["value"].astype(np.float64))
            parts["is_leaf"].append(leaf)
            parts["roots"].append(np.array([offset], dtype=np.int64))
            offset += len(nodes)
        arrays = {name: np.concatenate(chunks) if chunks else np.zeros(0) for name, chunks in parts.items()}
        return cls(
            baseline=float(np.ravel(model._baseline_prediction)[0]),
            n_features=int(model.n_features_in_),
            **arrays,
        )

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Raw scores (log-odds) for rows of ``features`` (NaN = missing)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got an array of shape {x.shape}")
        node = np.broadcast_to(self.roots, (len(x), self.n_trees)).copy()
        rows = np.arange(len(x))[:, None]
        while not self.is_leaf[node].all():
            value = x[rows, self.feature[node]]
            go_left = np.where(np.isnan(value), self.missing_left[node], value <= self.threshold[node])
            node = np.where(go_left, self.left[node], self.right[node])
        return self.baseline + self.value[node].sum(axis=1)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of the positive class per row."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(features)))

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            baseline=np.float64(self.baseline),
            n_features=np.int64(self.n_features),
            **{name: getattr(self, name) for name in _FIELDS},
        )

    @classmethod
    def load(cls, path: str | Path) -> TreeEnsemble:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("baseline", "n_features", *_FIELDS) if name not in data.files]
            if missing:
                raise ValueError(f"{path}: not a saved tree ensemble (missing {', '.join(missing)})")
            return cls(
                baseline=float(data["baseline"]),
                n_features=int(data["n_features"]),
                **{name: data[name] for name in _FIELDS},
            )


__all__ = ["TreeEnsemble"]
