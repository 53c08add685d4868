"""Train and evaluate the fusion models (EMERGE, MEDFuse) with Ray Train.

``train_fusion(config)`` featurises the cohort on the driver (normalisation fitted on the training
split), writes the arrays under the run directory, trains through a ``TorchTrainer`` (a checkpoint
and a metrics report every epoch, early stopping on a validation metric, resumable), then
evaluates the best epoch on the test split: metrics with bootstrap intervals, plots, a model card
and a logistic-regression baseline beside it.

``evaluate_fusion(checkpoint)`` re-evaluates a checkpoint on its saved test split, or featurises
new patients with the checkpoint's own ``Normalizer``.

The run directory must be visible to every worker (local disk for one node; shared storage,
like Ray's own ``storage_path``, on a cluster).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, Field, model_validator

from ehrflow.models.fusion import FusionModel, FusionModelConfig, StatsLayout, Task
from ehrflow.records.ingest import InputSpec, source_patients
from ehrflow.records.model import Patient
from ehrflow.training.evaluate import evaluate_predictions, flat_values, plot_binary, write_model_card
from ehrflow.training.features import (
    TRAJECTORY_STAT_NAMES,
    FeatureConfig,
    FeatureReport,
    FeatureSet,
    Normalizer,
    StayRecord,
    TextEncoder,
    extract_stays,
    load_text_encoder,
    trajectory_stats,
)
from ehrflow.training.ray_utils import (
    META_FILE,
    RayTrainConfig,
    latest_checkpoint,
    load_state,
    report_epoch,
    run_config,
    scaling_config,
    seed_everything,
    unwrap,
    world_rank,
    world_size,
)
from ehrflow.training.tree_blend import TreeBlend, TreeBlendOptions, fit_tree_blend

log = logging.getLogger(__name__)

Modality = Literal["timeseries", "static", "stats", "notes", "summary"]
SPLITS = ("train", "val", "test")


class DataConfig(BaseModel):
    """Where patients come from: a ``PatientStore`` (with a cohort filter) or loader inputs."""

    store_url: str | None = None
    cohort: str = ""
    """``CohortFilter.parse`` syntax, e.g. ``"source=physionet2012"``."""
    inputs: list[InputSpec] = Field(default_factory=list)
    summaries_path: Path | None = None
    """Workflow summaries: JSON ``{stay or patient id: text}`` or JSONL lines ``{"id": ..., "summary": ...}``."""
    max_patients: int | None = Field(None, ge=1)


class SplitConfig(BaseModel):
    """A split file (CSV: id column + split column with train/val/test), else random by patient."""

    file: Path | None = None
    id_column: str = "RecordID"
    id_prefix: str = "p12-"
    """Prepended to the file's ids to match patient ids (PhysioNet RecordID -> ``p12-<id>``)."""
    column: str = "split1"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0


class ModelOptions(BaseModel):
    variant: Literal["emerge", "medfuse"] = "emerge"
    encoder: Literal["gru", "transformer"] = "gru"
    hidden: int = Field(64, ge=4)
    layers: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    mi_weight: float = Field(0.1, ge=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    stats_layout: StatsLayout = "summary+trajectory"
    """What the statistics branch (modality ``stats``) reads; see ``stats_branch_inputs``."""


class OptimConfig(BaseModel):
    epochs: int = Field(20, ge=1)
    pretrain_epochs: int = Field(0, ge=0)
    """MEDFuse masked lab-test modelling epochs before supervised training."""
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(5, ge=1)
    monitor: str | None = None
    """Validation metric to maximise, e.g. ``val/mortality/auroc`` (default: first task's AUROC)."""
    max_steps_per_epoch: int | None = Field(None, ge=1)
    seed: int = 0


class TextOptions(BaseModel):
    encoder: str | None = None
    """``None``: ehrflow's default embedder (all-MiniLM-L6-v2); else a local sentence-transformers directory."""
    cache_dir: Path | None = Path(".ehrflow/cache/text-embeddings")


class FusionTrainConfig(BaseModel):
    """Everything a fusion training run needs; loadable from YAML (``FusionTrainConfig.from_yaml``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    model: ModelOptions = Field(default_factory=ModelOptions)
    modalities: list[Modality] = Field(default_factory=lambda: ["timeseries", "static"])
    tasks: list[Task] = Field(default_factory=lambda: ["mortality"])
    text: TextOptions = Field(default_factory=TextOptions)
    train: OptimConfig = Field(default_factory=OptimConfig)
    ray: RayTrainConfig = Field(default_factory=lambda: RayTrainConfig(name="fusion"))
    trees: TreeBlendOptions = Field(default_factory=TreeBlendOptions)
    """Boosted trees on summary statistics blended with the network (``ehrflow.training.tree_blend``)."""
    n_bootstrap: int = Field(1000, ge=0)

    @model_validator(mode="after")
    def _check(self) -> FusionTrainConfig:
        if "timeseries" not in self.modalities:
            raise ValueError("modalities must include 'timeseries' (the fusion models are built around it)")
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list without repeats, got {self.tasks}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> FusionTrainConfig:
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    @property
    def monitor(self) -> str:
        if self.train.monitor:
            return self.train.monitor
        first = self.tasks[0]
        return f"val/{first}/{'auroc_macro' if first == 'phenotypes' else 'auroc'}"


class ModalityError(ValueError):
    """The config asks for a modality or task the data cannot provide (raised before training)."""


@dataclass
class PreparedData:
    normalizer: Normalizer
    splits: dict[str, FeatureSet]
    report: FeatureReport
    data_dir: Path


@dataclass
class FusionResult:
    run_dir: Path
    checkpoint: Path
    best_epoch: int | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, Any]
    baseline_metrics: dict[str, Any]
    feature_report: FeatureReport
    model_card: Path
    plots: list[Path] = field(default_factory=list)
    epochs_run: int = 0
    wall_seconds: float = 0.0
    tree_blend: dict[str, Any] | None = None
    """Per task, the boosting rounds and network weight of the tree blend (``None`` without one)."""


# ---------------------------------------------------------------- data


def load_summaries(path: str | Path) -> dict[str, str]:
    """Workflow summaries by stay or patient id, from JSON or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: summaries file not found")
    text = path.read_text()
    if path.suffix == ".jsonl":
        out = {}
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "id" not in row or "summary" not in row:
                raise ValueError(f"{path}, line {line_no}: expected keys 'id' and 'summary'")
            out[str(row["id"])] = str(row["summary"])
        return out
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{id: summary}}")
    return {str(k): str(v) for k, v in data.items()}


def assign_splits(records: list[StayRecord], split: SplitConfig) -> dict[str, list[StayRecord]]:
    """Split stays by the split file, or randomly by patient (no patient in two splits)."""
    out: dict[str, list[StayRecord]] = {s: [] for s in SPLITS}
    if split.file is not None:
        assignment: dict[str, str] = {}
        with Path(split.file).open(newline="") as fh:
            reader = csv.DictReader(fh)
            for col in (split.id_column, split.column):
                if col not in (reader.fieldnames or []):
                    raise ValueError(f"{split.file}: no column {col!r} (columns: {reader.fieldnames})")
            for row in reader:
                assignment[f"{split.id_prefix}{row[split.id_column]}"] = row[split.column]
        unassigned = 0
        for rec in records:
            where = assignment.get(rec.patient_id) or assignment.get(rec.stay_id)
            if where in out:
                out[where].append(rec)
            else:
                unassigned += 1
        if unassigned:
            log.info("split file %s: %d stays not in train/val/test, left out", split.file, unassigned)
        return out
    patients = sorted({r.patient_id for r in records})
    rng = np.random.default_rng(split.seed)
    rng.shuffle(patients)
    total = sum(split.fractions)
    n_train = round(len(patients) * split.fractions[0] / total)
    n_val = round(len(patients) * split.fractions[1] / total)
    where = {p: "train" for p in patients[:n_train]}
    where.update({p: "val" for p in patients[n_train : n_train + n_val]})
    where.update({p: "test" for p in patients[n_train + n_val :]})
    for rec in records:
        out[where[rec.patient_id]].append(rec)
    return out


def _check_modalities(config: FusionTrainConfig, train: list[StayRecord]) -> None:
    if config.features.drop_empty_stays:  # judge the stays that will be featurised, not those dropped later
        train = [r for r in train if r.values.size]
    if not train:
        raise ModalityError("the training split is empty (or has no stay with a measurement in the window)")
    if "notes" in config.modalities and not any(r.note_texts for r in train):
        raise ModalityError("modality 'notes' requested, but no training stay has a note inside the window")
    if "summary" in config.modalities and not any(r.summary_text for r in train):
        raise ModalityError(
            "modality 'summary' requested, but no training stay has a workflow summary (set data.summaries_path)"
        )
    for task in config.tasks:
        known = {
            "mortality": sum(r.mortality is not None for r in train),
            "readmission": sum(r.readmission is not None for r in train),
            "phenotypes": sum(r.phenotypes is not None for r in train),
        }[task]
        if known == 0:
            raise ModalityError(f"task {task!r} requested, but no training stay has its label")


def prepare_data(
    config: FusionTrainConfig,
    patients: Iterable[Patient] | None = None,
    *,
    summaries: Mapping[str, str] | None = None,
    text_encoder: TextEncoder | None = None,
    data_dir: str | Path | None = None,
) -> PreparedData:
    """Extract stays, split, fit the ``Normalizer`` on train, featurise every split, save to ``data_dir``."""
    report = FeatureReport()
    if summaries is None and config.data.summaries_path is not None:
        summaries = load_summaries(config.data.summaries_path)
    source = (
        patients
        if patients is not None
        else source_patients(config.data.store_url, config.data.cohort, config.data.inputs)
    )
    if config.data.max_patients is not None:
        source = (p for i, p in enumerate(source) if i < config.data.max_patients)
    records = extract_stays(source, config.features, report, summaries)
    by_split = assign_splits(records, config.split)
    _check_modalities(config, by_split["train"])
    for name in ("val", "test"):
        if not by_split[name]:
            raise ModalityError(f"the {name} split is empty")
    uses_text = any(m in config.modalities for m in ("notes", "summary"))
    if uses_text and text_encoder is None:
        text_encoder = load_text_encoder(config.text.encoder, config.text.cache_dir)
    normalizer = Normalizer.fit(by_split["train"], config.features, report)
    splits = {
        name: normalizer.transform(by_split[name], report, text_encoder if uses_text else None) for name in SPLITS
    }
    data_dir = Path(data_dir) if data_dir is not None else config.ray.run_dir / "data"
    for name, fs in splits.items():
        fs.save(data_dir / f"{name}.npz")
    (data_dir / "normalizer.json").write_text(normalizer.model_dump_json(indent=2))
    (data_dir / "feature_report.json").write_text(report.model_dump_json(indent=2))
    log.info("features: %s", {k: len(v) for k, v in splits.items()})
    return PreparedData(normalizer=normalizer, splits=splits, report=report, data_dir=data_dir)


def load_prepared(data_dir: str | Path) -> PreparedData:
    data_dir = Path(data_dir)
    normalizer = Normalizer.model_validate_json((data_dir / "normalizer.json").read_text())
    report = FeatureReport.model_validate_json((data_dir / "feature_report.json").read_text())
    splits = {name: FeatureSet.load(data_dir / f"{name}.npz") for name in SPLITS}
    return PreparedData(normalizer=normalizer, splits=splits, report=report, data_dir=data_dir)


def model_config_for(config: FusionTrainConfig, prepared: PreparedData) -> FusionModelConfig:
    fs = prepared.splits["train"]
    text_dim = max(s.notes.shape[1] for s in prepared.splits.values())
    text_dim = max(text_dim, *(s.summary.shape[1] for s in prepared.splits.values()))
    return FusionModelConfig(
        n_variables=fs.values.shape[2],
        n_bins=fs.values.shape[1],
        n_static=fs.static.shape[1] if "static" in config.modalities else 0,
        n_stats=fs.values.shape[2] * STATS_PER_VARIABLE[config.model.stats_layout]
        if "stats" in config.modalities
        else 0,
        text_dim=text_dim if any(m in config.modalities for m in ("notes", "summary")) else 0,
        use_notes="notes" in config.modalities,
        use_summary="summary" in config.modalities,
        bin_hours=prepared.normalizer.config.bin_hours,
        tasks=config.tasks,
        n_phenotypes=len(prepared.normalizer.config.phenotype_groups),
        **config.model.model_dump(),
    )


def network_stats(stats: np.ndarray) -> np.ndarray:
    """The six summary statistics for a model: NaN (variable not observed) -> 0, counts -> log1p."""
    out = np.nan_to_num(stats.reshape(len(stats), -1, 6), nan=0.0).copy()
    out[..., 5] = np.log1p(out[..., 5])
    return out.reshape(len(stats), -1).astype(np.float32)


STATS_PER_VARIABLE: dict[str, int] = {"summary": 6, "summary+trajectory": 6 + len(TRAJECTORY_STAT_NAMES)}
"""Columns per variable that ``stats_branch_inputs`` gives for each layout."""


def stats_branch_inputs(fs: FeatureSet, layout: StatsLayout) -> np.ndarray:
    """What the statistics branch reads: ``network_stats``, then (``summary+trajectory``) the trajectory statistics
    with NaN -> 0, bins since the last observation as a fraction of the window and bins observed as log1p."""
    summary = network_stats(fs.stats)
    if layout == "summary":
        return summary
    n, n_bins, n_variables = fs.values.shape
    trajectory = trajectory_stats(fs.values, fs.mask).reshape(n, len(TRAJECTORY_STAT_NAMES), n_variables)
    trajectory[:, TRAJECTORY_STAT_NAMES.index("bins_since_last")] /= n_bins
    observed = TRAJECTORY_STAT_NAMES.index("bins_observed")
    trajectory[:, observed] = np.log1p(trajectory[:, observed])
    trajectory = np.nan_to_num(trajectory.reshape(n, -1), nan=0.0, posinf=0.0, neginf=0.0)
    return np.hstack([summary, trajectory]).astype(np.float32)


def to_tensors(fs: FeatureSet, model_cfg: FusionModelConfig) -> dict[str, torch.Tensor]:
    """The model's input dict (text arrays padded to ``text_dim`` when a split has no text)."""
    n = len(fs)

    def text(arr: np.ndarray) -> torch.Tensor:
        if arr.shape[1] == model_cfg.text_dim:
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if arr.shape[1] != 0:
            raise ValueError(f"text embeddings have dimension {arr.shape[1]}, the model expects {model_cfg.text_dim}")
        return torch.zeros(n, model_cfg.text_dim)

    return {
        "values": torch.from_numpy(fs.values.astype(np.float32)),
        "mask": torch.from_numpy(fs.mask.astype(np.float32)),
        "static": torch.from_numpy(fs.static.astype(np.float32)),
        "stats": torch.from_numpy(stats_branch_inputs(fs, model_cfg.stats_layout)),
        "notes": text(fs.notes),
        "notes_mask": torch.from_numpy(fs.notes_mask.astype(bool)),
        "summary": text(fs.summary),
        "summary_mask": torch.from_numpy(fs.summary_mask.astype(bool)),
        "mortality": torch.from_numpy(fs.mortality.astype(np.float32)),
        "mortality_mask": torch.from_numpy(fs.mortality_mask.astype(bool)),
        "readmission": torch.from_numpy(fs.readmission.astype(np.float32)),
        "readmission_mask": torch.from_numpy(fs.readmission_mask.astype(bool)),
        "phenotypes": torch.from_numpy(fs.phenotypes.astype(np.float32)),
        "phenotypes_mask": torch.from_numpy(fs.phenotypes_mask.astype(bool)),
    }


# ---------------------------------------------------------------- training loop


def supervised_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], tasks: list[str]) -> torch.Tensor:
    """Masked binary cross-entropy summed over tasks (unknown labels contribute nothing), plus aux losses."""
    loss = out["aux_loss"]
    for task in tasks:
        known = batch[f"{task}_mask"]
        if known.any():
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out[task][known], batch[task][known])
    return loss


@torch.no_grad()
def predict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], tasks: list[str], batch_size: int = 512):
    """Probabilities per task over all samples of ``tensors``."""
    model.eval()
    n = len(tensors["values"])
    chunks: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in tensors.items()}
        out = model(batch)
        for task in tasks:
            chunks[task].append(torch.sigmoid(out[task]).cpu().numpy())
    return {t: np.concatenate(c) if c else np.zeros(0) for t, c in chunks.items()}


def _labels(tensors: dict[str, torch.Tensor], tasks: list[str]):
    return {t: tensors[t].cpu().numpy() for t in tasks}, {t: tensors[f"{t}_mask"].cpu().numpy() for t in tasks}


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch

    config = FusionTrainConfig.model_validate_json(loop_config["config"])
    model_cfg = FusionModelConfig.model_validate_json(loop_config["model"])
    data_dir = Path(loop_config["data_dir"])
    rank, size = world_rank(), world_size()
    seed_everything(config.train.seed)
    torch.set_num_threads(max(1, int(config.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    train = {k: v.to(device) for k, v in to_tensors(FeatureSet.load(data_dir / "train.npz"), model_cfg).items()}
    val = {k: v.to(device) for k, v in to_tensors(FeatureSet.load(data_dir / "val.npz"), model_cfg).items()}
    # Heads, the reconstruction layer and CLUB are idle in some phases: DDP must allow unused parameters.
    model = ray.train.torch.prepare_model(
        FusionModel(model_cfg), parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    core = unwrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    tasks = list(config.tasks)
    pretrain = config.train.pretrain_epochs if model_cfg.variant == "medfuse" else 0
    total_epochs = pretrain + config.train.epochs
    monitor = config.monitor

    start_epoch, best_score, best_epoch, stale = 0, -math.inf, None, 0
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    source = checkpoint if checkpoint is not None else loop_config.get("resume_from")
    if source is not None:
        state, meta = load_state(source)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_state = state.get("best_model")
        start_epoch = int(meta["epoch"]) + 1
        best_score, best_epoch, stale = meta["best_score"], meta["best_epoch"], meta["stale_epochs"]
        if best_score is None:
            best_score = -math.inf
        if stale >= config.train.patience:
            start_epoch = total_epochs  # the resumed run had already stopped early

    n = len(train["values"])
    generator = torch.Generator().manual_seed(config.train.seed)
    for epoch in range(start_epoch, total_epochs):
        started, started_unix = time.perf_counter(), time.time()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.train.seed * 1000 + epoch))
        shard = order[rank::size].to(device)
        steps_per_epoch = math.ceil(math.ceil(n / size) / config.train.batch_size)
        if config.train.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
        phase = "pretrain" if epoch < pretrain else "supervised"
        losses, seen = [], 0
        for step in range(steps_per_epoch):
            idx = shard[step * config.train.batch_size : (step + 1) * config.train.batch_size]
            if len(idx) == 0:  # keep every rank at the same number of collective steps
                idx = shard[: config.train.batch_size]
            batch = {k: v[idx] for k, v in train.items()}
            if phase == "pretrain":
                loss = model(batch, pretrain=True, generator=generator)["pretrain_loss"]
            else:
                loss = supervised_loss(model(batch), batch, tasks)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            seen += len(idx)
        metrics: dict[str, float] = {
            f"train/{phase}_loss": float(np.mean(losses)),
            "train/samples_per_second": seen * size / (time.perf_counter() - started),
        }
        if phase == "pretrain":
            with torch.no_grad():
                core.eval()
                metrics["val/pretrain_loss"] = float(core.pretrain_loss(val, torch.Generator().manual_seed(0)))
        else:
            scores = predict(core, val, tasks)
            labels, masks = _labels(val, tasks)
            metrics.update(flat_values(evaluate_predictions(labels, masks, scores), "val"))
            score = metrics.get(monitor, math.nan)
            if math.isfinite(score) and score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(core.state_dict())
            else:
                stale += 1
        metrics["epoch_seconds"] = time.perf_counter() - started
        # wall-clock stamps let a benchmark measure per-epoch time including the report (train_speed.py)
        metrics["time/epoch_start_unix"], metrics["time/epoch_end_unix"] = started_unix, time.time()
        state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "best_model": best_state}
        meta = {
            "best_score": best_score if math.isfinite(best_score) else None,
            "best_epoch": best_epoch,
            "stale_epochs": stale,
            "monitor": monitor,
            "phase": phase,
            "checkpoints_to_keep": config.ray.checkpoints_to_keep,
            **loop_config["meta"],
        }
        report_epoch(
            metrics,
            epoch=epoch,
            state=state,
            meta=meta,
            run_dir=config.ray.run_dir,
            local_mode=config.ray.num_workers == 0,
        )
        if phase == "supervised" and stale >= config.train.patience:
            break


def train_fusion(
    config: FusionTrainConfig,
    patients: Iterable[Patient] | None = None,
    *,
    summaries: Mapping[str, str] | None = None,
    text_encoder: TextEncoder | None = None,
    prepared: PreparedData | None = None,
) -> FusionResult:
    """Featurise, train through Ray Train, evaluate the best epoch on test; see the module docstring.

    ``config.ray.resume``: continue from the newest checkpoint of ``config.ray.run_dir`` and reuse its
    saved features. Otherwise the run directory must hold no checkpoint yet (no silent mixing of runs).
    """
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    run_dir = config.ray.run_dir
    resume_from = latest_checkpoint(run_dir)
    if config.ray.resume:
        if resume_from is None:
            raise FileNotFoundError(f"{run_dir}: resume requested but the run has no checkpoint")
        if prepared is None:
            prepared = load_prepared(run_dir / "data")
    elif resume_from is not None:
        raise FileExistsError(f"{run_dir}: the run already has checkpoints; set ray.resume or choose a new ray.name")
    if prepared is None:
        prepared = prepare_data(config, patients, summaries=summaries, text_encoder=text_encoder)
    model_cfg = model_config_for(config, prepared)
    if config.ray.resume:
        _check_resumable(resume_from, model_cfg)  # type: ignore[arg-type]  # resume_from is set when resuming
    phenotype_names = list(prepared.normalizer.config.phenotype_groups)
    meta = {
        "config": config.model_dump(mode="json"),
        "model_config": model_cfg.model_dump(mode="json"),
        "data_dir": str(prepared.data_dir),
        "phenotype_names": phenotype_names,
        "normalizer": prepared.normalizer.model_dump(mode="json"),  # checkpoints stay usable without data_dir
    }
    (run_dir / "fusion_config.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "fusion_config.json").write_text(json.dumps(meta, indent=2))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "config": config.model_dump_json(),
            "model": model_cfg.model_dump_json(),
            "data_dir": str(prepared.data_dir),
            "resume_from": str(resume_from) if config.ray.resume and resume_from else None,
            "meta": meta,
        },
        scaling_config=scaling_config(config.ray),
        run_config=run_config(config.ray),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training finished without a checkpoint")
    checkpoint = Path(result.checkpoint.path)
    if config.trees.enabled:
        model, _ = load_fusion_model(checkpoint)
        val = prepared.splits["val"]
        val_scores = predict(model, to_tensors(val, model.cfg), list(model.cfg.tasks))
        fit_tree_blend(config.trees, prepared.splits["train"], val, val_scores).save(checkpoint)
    evaluation = evaluate_fusion(checkpoint, prepared=prepared, n_bootstrap=config.n_bootstrap)
    return FusionResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        best_epoch=evaluation["best_epoch"],
        val_metrics={k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)},
        test_metrics=evaluation["metrics"],
        baseline_metrics=evaluation["baseline"],
        feature_report=prepared.report,
        model_card=Path(evaluation["model_card"]),
        plots=[Path(p) for p in evaluation["plots"]],
        epochs_run=int((result.metrics or {}).get("epoch", -1)) + 1,
        wall_seconds=time.perf_counter() - started,
        tree_blend=evaluation["tree_blend"],
    )


def train_fusion_from_file(
    config_path: str | Path, *, resume: bool = False, default_store_url: str | None = None
) -> FusionResult:
    """What ``ehrflow train fusion --config FILE [--resume]`` runs: YAML config -> ``train_fusion``.

    ``default_store_url`` (the CLI passes the settings' patient store) is used when the file names
    neither ``data.store_url`` nor ``data.inputs``.
    """
    config = FusionTrainConfig.from_yaml(config_path)
    if default_store_url and not config.data.store_url and not config.data.inputs:
        config = config.model_copy(update={"data": config.data.model_copy(update={"store_url": default_store_url})})
    if resume:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"resume": True})})
    return train_fusion(config)


# ---------------------------------------------------------------- evaluation


def _saved_model_config(meta: Mapping[str, Any]) -> FusionModelConfig:
    """The model settings a checkpoint was trained with. Checkpoints written before the statistics branch read
    trajectory statistics carry no layout: they were trained on the summary statistics."""
    return FusionModelConfig.model_validate({"stats_layout": "summary", **meta["model_config"]})


def _check_resumable(checkpoint: Path, model_cfg: FusionModelConfig) -> None:
    """A resumed run must rebuild the model its checkpoint holds; otherwise (a changed setting, or a newer default
    such as ``model.stats_layout``) the weights would fail to load deep inside a Ray worker, on tensor shapes."""
    saved = _saved_model_config(json.loads((checkpoint / META_FILE).read_text())).model_dump(mode="json")
    current = model_cfg.model_dump(mode="json")
    changed = [
        f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if changed:
        raise ValueError(
            f"{checkpoint}: cannot resume, the model settings differ from the checkpoint's ({'; '.join(changed)}); "
            "set them in the config as the checkpoint has them (model.<setting>), or start a new run (ray.name)"
        )


def load_fusion_model(checkpoint: str | Path) -> tuple[FusionModel, dict[str, Any]]:
    """The best-epoch model of a checkpoint (the latest weights when no supervised epoch ran)."""
    state, meta = load_state(checkpoint)
    model = FusionModel(_saved_model_config(meta))
    model.load_state_dict(state["best_model"] if state.get("best_model") is not None else state["model"])
    model.eval()
    return model, meta


def _baseline(prepared: PreparedData, split: FeatureSet, tasks: list[str], n_bootstrap: int) -> dict[str, Any]:
    """Logistic regression on summary statistics + static features, the simple model beside every result."""
    from sklearn.linear_model import LogisticRegression

    def design(fs: FeatureSet) -> np.ndarray:
        return np.hstack([network_stats(fs.stats), fs.static])

    train = prepared.splits["train"]
    out: dict[str, Any] = {}
    for task in tasks:
        if task == "phenotypes":
            continue
        y, known = getattr(train, task), getattr(train, f"{task}_mask")
        if not known.any() or len(np.unique(y[known])) < 2:
            continue
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(design(train)[known], y[known])
        scores = {task: clf.predict_proba(design(split))[:, 1]}
        out.update(
            evaluate_predictions(
                {task: getattr(split, task)}, {task: getattr(split, f"{task}_mask")}, scores, n_bootstrap=n_bootstrap
            )
        )
    return out


def evaluate_fusion(
    checkpoint: str | Path,
    patients: Iterable[Patient] | None = None,
    *,
    prepared: PreparedData | None = None,
    summaries: Mapping[str, str] | None = None,
    text_encoder: TextEncoder | None = None,
    output_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Evaluate a checkpoint: on ``patients`` (featurised with its saved ``Normalizer``) or its test split.

    Writes plots and ``model_card.json`` to ``output_dir`` (default ``<run dir>/eval``) and returns
    ``{"metrics", "network_metrics", "tree_blend", "baseline", "best_epoch", "model_card", "plots", "n"}``;
    with a tree blend beside the checkpoint, ``metrics`` are the blend's and ``network_metrics`` the network's
    alone (else ``None``).
    """
    checkpoint = Path(checkpoint)
    model, meta = load_fusion_model(checkpoint)
    config = FusionTrainConfig.model_validate(meta["config"])
    model_cfg = model.cfg
    if prepared is None:
        prepared = load_prepared(meta["data_dir"])
    if patients is not None:
        report = FeatureReport()
        records = extract_stays(patients, prepared.normalizer.config, report, summaries)
        uses_text = model_cfg.uses_text
        if uses_text and text_encoder is None:
            text_encoder = load_text_encoder(config.text.encoder, config.text.cache_dir)
        split, split_name = prepared.normalizer.transform(records, report, text_encoder if uses_text else None), "given"
    else:
        split, split_name, report = prepared.splits["test"], "test", prepared.report
    tasks = list(model_cfg.tasks)
    tensors = to_tensors(split, model_cfg)
    scores = predict(model, tensors, tasks)
    labels, masks = _labels(tensors, tasks)
    phenotype_names = meta.get("phenotype_names", [])
    blend = TreeBlend.load(checkpoint)
    network_metrics = None
    if blend is not None:
        network_metrics = evaluate_predictions(
            labels, masks, scores, n_bootstrap=n_bootstrap, phenotype_names=phenotype_names
        )
        scores = blend.apply(split, scores)
    metrics = evaluate_predictions(labels, masks, scores, n_bootstrap=n_bootstrap, phenotype_names=phenotype_names)
    baseline = _baseline(prepared, split, tasks, n_bootstrap)
    output_dir = Path(output_dir) if output_dir is not None else config.ray.run_dir / "eval"
    plots: list[Path] = []
    for task in tasks:
        if task != "phenotypes" and masks[task].any():
            plots += plot_binary(labels[task][masks[task]], scores[task][masks[task]], output_dir, task)
    card = write_model_card(
        output_dir / "model_card.json",
        model=f"ehrflow fusion ({model_cfg.variant}, {model_cfg.encoder} encoder)"
        + (" blended with boosted trees on summary statistics" if blend is not None else ""),
        data={
            "split_evaluated": split_name,
            "n_evaluated": len(split),
            "sizes": {k: len(v) for k, v in prepared.splits.items()},
            "variables": prepared.normalizer.variables,
            "static_columns": prepared.normalizer.static_columns,
            "feature_report": report.model_dump(),
            "data_config": config.data.model_dump(mode="json"),
        },
        split=config.split.model_dump(mode="json"),
        metrics=metrics,
        baseline={"model": "logistic regression on summary statistics + static", "metrics": baseline},
        config={
            "train": meta["config"],
            "model": meta["model_config"],
            "checkpoint": str(checkpoint),
            **({"tree_blend": blend.describe(), "network_alone_metrics": network_metrics} if blend else {}),
        },
        plots=plots,
        limitations=[
            "Metrics are for the cohort and split named above; they do not transfer to other hospitals unvalidated.",
            "Best epoch chosen on the validation split by " + meta.get("monitor", config.monitor) + ".",
        ],
    )
    return {
        "metrics": metrics,
        "network_metrics": network_metrics,
        "tree_blend": blend.describe() if blend is not None else None,
        "baseline": baseline,
        "best_epoch": meta.get("best_epoch"),
        "model_card": str(card),
        "plots": [str(p) for p in plots],
        "n": len(split),
    }


__all__ = [
    "DataConfig",
    "FusionResult",
    "FusionTrainConfig",
    "InputSpec",
    "ModalityError",
    "ModelOptions",
    "OptimConfig",
    "PreparedData",
    "SplitConfig",
    "TextOptions",
    "assign_splits",
    "evaluate_fusion",
    "load_fusion_model",
    "load_prepared",
    "load_summaries",
    "model_config_for",
    "predict",
    "prepare_data",
    "to_tensors",
    "train_fusion",
    "train_fusion_from_file",
]
