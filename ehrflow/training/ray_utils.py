"""Ray Train helpers shared by ehrflow's trainers (fusion, medication recommendation, retriever).

- ``RayTrainConfig``: the typed scaling/run settings a trainer config embeds.
- ``scaling_config`` / ``run_config``: Ray objects from it. ``num_workers=0`` is Train V2's local
  in-process mode (no ``ray.init``; used for quick runs and benchmarks).
- ``report_epoch``: report metrics with a checkpoint (Train V2 only keeps ``Result.metrics`` for
  reports that carry one). Checkpoints are directories named ``checkpoint_epoch_NNNN`` under
  ``<storage_path>/<name>/`` in both modes: local mode does not persist checkpoints itself, so we
  write them there directly.
- ``latest_checkpoint`` / ``load_state``: find and read them back, for resuming and evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

STATE_FILE = "state.pt"
META_FILE = "meta.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint_epoch_(\d+)$")


class RayTrainConfig(BaseModel):
    """Where and how a Ray Train run executes."""

    num_workers: int = Field(1, ge=0)
    """0: Train V2 local mode (in-process, no Ray cluster); >= 1: that many Ray workers."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: Path = Path(".ehrflow/runs")
    name: str = "run"
    checkpoints_to_keep: int | None = Field(3, ge=1)
    max_failures: int = Field(0, ge=-1)
    controller_poll_s: float = Field(0.25, gt=0)
    """How often the Train controller polls workers for reports. Ray's default (2 s) makes every
    epoch shorter than that wait for the next poll; 0.25 s cuts the per-epoch overhead on small models."""
    resume: bool = False
    """Continue from the newest checkpoint under ``storage_path/name`` (error if there is none)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path).resolve() / self.name


def scaling_config(cfg: RayTrainConfig):  # noqa: ANN201
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.cpus_per_worker}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def run_config(cfg: RayTrainConfig):  # noqa: ANN201
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    # Read by the controller actor that ``fit()`` starts; Train V2 propagates it from the driver.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.controller_poll_s)
    return RunConfig(
        name=cfg.name,
        storage_path=str(Path(cfg.storage_path).resolve()),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def log_progress_in_worker() -> None:
    """Lets a Ray Train worker's ``ehrflow`` INFO lines (step progress) reach the driver's console.

    A worker process starts with Python's default WARNING level; only ehrflow's own logger is raised, once."""
    logger = logging.getLogger("ehrflow")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def world_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def world_size() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduces each gradient to its mean over the workers (after ``backward``, before the optimiser step).

    The alternative to DDP for a model run more than once before one backward, with parameters that get no
    gradient (the bi-encoder step). Every worker runs the same graph, so a parameter without a gradient (an unused
    pooler) has none on every worker.
    """
    import torch.distributed as dist

    size = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= size


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (``prepare_model`` does not wrap it in local mode)."""
    return getattr(model, "module", model)


def _write_checkpoint(directory: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def report_epoch(
    metrics: dict[str, float],
    *,
    epoch: int,
    state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    run_dir: Path,
    local_mode: bool,
) -> None:
    """``ray.train.report`` of ``metrics``; rank 0 attaches a checkpoint of ``state`` (torch) and ``meta`` (JSON).

    Every worker must call this once per epoch (Ray Train reports are collective).
    """
    import ray.train
    from ray.train import Checkpoint

    name = f"checkpoint_epoch_{epoch:04d}"
    metrics = {**metrics, "epoch": epoch}
    if state is None or world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    meta = {**(meta or {}), "epoch": epoch, "metrics": metrics}
    if local_mode:
        directory = Path(run_dir) / name
        _write_checkpoint(directory, state, meta)
        _prune(Path(run_dir), keep=meta.get("checkpoints_to_keep"))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp), state, meta)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def _prune(run_dir: Path, keep: int | None) -> None:
    """Local mode only: keep the newest ``keep`` checkpoints (Ray does this itself for worker runs)."""
    if keep is None:
        return
    import shutil

    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest epoch first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def load_state(checkpoint: str | Path | Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch state, JSON meta) of a checkpoint directory or a ``ray.train.Checkpoint``."""
    path = Path(checkpoint.path) if hasattr(checkpoint, "path") else Path(checkpoint)
    state_file, meta_file = path / STATE_FILE, path / META_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not an ehrflow checkpoint (no {STATE_FILE})")
    state = torch.load(state_file, map_location="cpu", weights_only=True)  # tensors and plain data only
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return state, meta


__all__ = [
    "RayTrainConfig",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_state",
    "report_epoch",
    "run_config",
    "scaling_config",
    "seed_everything",
    "unwrap",
    "world_rank",
    "world_size",
]
