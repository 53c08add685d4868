"""Blend a fusion network with gradient-boosted trees on the stays' summary statistics.

On PhysioNet 2012 boosted trees on per-variable statistics beat every network alone, and a weighted mean of the
two beats both (``benchmarks/physionet2012.py``): the trees read the statistics well, the network the
trajectories. The trees see the six summary statistics (min, max, mean, first, last, count) and the static
columns, plus seven trajectory statistics per variable from the hourly bins (spread, mean of each half and of the
last quarter of the window, slope, bins since the last observation, bins observed): on the benchmark's validation
splits those lifted the trees' AUROC on every fold (the network's statistics branch now reads them too). With
``trees.enabled`` a fusion run fits the trees on the training split after the network, chooses on the validation
split the number of boosting rounds and, per binary task, the weight of the network, and saves both beside the
checkpoint's weights. Evaluation and the predictor then score with the blend. Phenotypes (multi-label) stay the
network's alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from ehrflow.models.trees import TreeEnsemble
from ehrflow.training.features import FeatureSet, trajectory_stats
from ehrflow.training.metrics import auroc

log = logging.getLogger(__name__)

BLEND_DIR = "tree_blend"
BLEND_TASKS = ("mortality", "readmission")
WEIGHT_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2).tolist())


class TreeBlendOptions(BaseModel):
    """Boosted trees beside the network; the defaults are those of the PhysioNet 2012 benchmark."""

    enabled: bool = False
    learning_rate: float = Field(0.05, gt=0)
    max_iter: int = Field(400, ge=1)
    """Most boosting rounds; the number used is chosen on the validation split."""
    max_leaf_nodes: int = Field(15, ge=2)
    min_samples_leaf: int = Field(40, ge=1)
    l2_regularization: float = Field(1.0, ge=0)
    seed: int = 0


TREE_FEATURES = "stats+static+trajectory"
"""The layout ``tree_features`` builds, recorded with a saved blend so another layout is refused, not misread."""


def tree_features(features: FeatureSet) -> np.ndarray:
    """Summary statistics, static columns and trajectory statistics (NaN where undefined: trees split on it)."""
    return np.hstack([features.stats, features.static, trajectory_stats(features.values, features.mask)])


@dataclass(frozen=True)
class TreeBlend:
    """Per binary task: the trees and the weight of the network in ``(1 - w) * trees + w * network``."""

    trees: dict[str, TreeEnsemble]
    network_weight: dict[str, float]

    def apply(self, features: FeatureSet, network_scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The network's scores with each blended task replaced by the blend."""
        x = tree_features(features)
        blended = dict(network_scores)
        for task, trees in self.trees.items():
            if task in blended:
                w = self.network_weight[task]
                blended[task] = (1.0 - w) * trees.predict_proba(x) + w * network_scores[task]
        return blended

    def describe(self) -> dict[str, Any]:
        return {
            task: {"network_weight": self.network_weight[task], "boosting_rounds": trees.n_trees}
            for task, trees in self.trees.items()
        }

    def save(self, checkpoint: str | Path) -> Path:
        directory = Path(checkpoint) / BLEND_DIR
        directory.mkdir(parents=True, exist_ok=True)
        for task, trees in self.trees.items():
            trees.save(directory / f"{task}.npz")
        (directory / "blend.json").write_text(
            json.dumps({"features": TREE_FEATURES, "network_weight": self.network_weight}, indent=2)
        )
        return directory

    @classmethod
    def load(cls, checkpoint: str | Path) -> TreeBlend | None:
        """The blend saved beside a checkpoint, or ``None`` when the run fitted none."""
        directory = Path(checkpoint) / BLEND_DIR
        if not (directory / "blend.json").is_file():
            return None
        saved = json.loads((directory / "blend.json").read_text())
        if saved.get("features") != TREE_FEATURES:
            raise ValueError(
                f"{directory / 'blend.json'}: trees fitted on features {saved.get('features')!r}, this ehrflow "
                f"builds {TREE_FEATURES!r}; retrain with `ehrflow train fusion` (trees.enabled)"
            )
        weights = saved["network_weight"]
        return cls({task: TreeEnsemble.load(directory / f"{task}.npz") for task in weights}, weights)


def fit_tree_blend(
    options: TreeBlendOptions,
    train: FeatureSet,
    val: FeatureSet,
    network_val_scores: dict[str, np.ndarray],
) -> TreeBlend:
    """Fit trees per binary task on ``train``; rounds and network weight maximise validation AUROC.

    A task is left to the network alone when its training or validation labels hold a single class.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    x_train, x_val = tree_features(train), tree_features(val)
    trees: dict[str, TreeEnsemble] = {}
    weights: dict[str, float] = {}
    for task in BLEND_TASKS:
        if task not in network_val_scores:
            continue
        known, known_val = getattr(train, f"{task}_mask"), getattr(val, f"{task}_mask")
        y, y_val = getattr(train, task)[known], getattr(val, task)[known_val]
        if len(np.unique(y)) < 2 or len(np.unique(y_val)) < 2:
            log.warning("tree blend: %s has a single class in the training or validation split; network only", task)
            continue
        x = x_train[known]
        # scikit-learn cannot bin a column with no value (a statistic never defined in training); a constant
        # column gives no split, so the trees ignore it wherever it is defined later
        undefined = np.isnan(x).all(axis=0)
        if undefined.any():
            log.info("tree blend %s: %d feature columns never defined in training", task, int(undefined.sum()))
            x = np.where(undefined, 0.0, x)
        model = HistGradientBoostingClassifier(
            learning_rate=options.learning_rate,
            max_iter=options.max_iter,
            max_leaf_nodes=options.max_leaf_nodes,
            min_samples_leaf=options.min_samples_leaf,
            l2_regularization=options.l2_regularization,
            early_stopping=False,
            random_state=options.seed,
        ).fit(x, y)
        staged = [p[:, 1] for p in model.staged_predict_proba(x_val[known_val])]
        rounds = int(np.argmax([auroc(y_val, p) for p in staged])) + 1
        weights[task] = choose_network_weight(y_val, staged[rounds - 1], network_val_scores[task][known_val])
        trees[task] = TreeEnsemble.from_sklearn(model, rounds)
        log.info("tree blend %s: %d boosting rounds, network weight %.1f", task, rounds, weights[task])
    return TreeBlend(trees, weights)


def choose_network_weight(y_val: np.ndarray, tree_val: np.ndarray, network_val: np.ndarray) -> float:
    """The weight of the network in ``(1 - w) * trees + w * network`` with the best validation AUROC (the lowest
    such weight on ties), from ``WEIGHT_GRID``."""
    aucs = [auroc(y_val, (1 - w) * tree_val + w * network_val) for w in WEIGHT_GRID]
    return WEIGHT_GRID[int(np.argmax(aucs))]


__all__ = [
    "BLEND_DIR",
    "TREE_FEATURES",
    "WEIGHT_GRID",
    "TreeBlend",
    "TreeBlendOptions",
    "choose_network_weight",
    "fit_tree_blend",
    "tree_features",
]
