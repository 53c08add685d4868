"""Fusion training speed: a plain single-process torch loop vs Ray Train (1 and 2 CPU workers), same model and data.

Data: the first ``--stays`` PhysioNet 2012 set-a stays, featurised once (80/10/10 random split by
patient). Model: ehrflow's EMERGE-style fusion net with a GRU encoder over time series + static +
statistics (hidden 64). Every variant runs ``--epochs`` epochs of the same work: one pass over the
training split (batch 128, AdamW) and a validation AUROC.

- **plain**: the loop written directly in this process (no Ray), one torch thread.
- **ray1 / ray2**: ``train_fusion`` through a ``TorchTrainer`` with 1 or 2 workers (1 CPU / torch
  thread each), a checkpoint and ``ray.train.report`` every epoch, as in production.

Reported per variant: steady-state seconds per epoch (median over epochs after the first; for Ray
the wall time between consecutive epoch starts, so the report and checkpoint are included),
training samples/s, and for Ray the fixed start-up cost (``fit()`` call to the first epoch's start)
separately. ``ray.init`` is timed on its own. The machine is a shared 2-core box: the load average
is recorded with the result.

    .venv/bin/python benchmarks/train_speed.py [--stays 4000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _util import peak_rss_mib, write_result

from ehrflow.models.fusion import FusionModel
from ehrflow.records.errors import ErrorSink
from ehrflow.records.loaders.physionet2012 import PhysioNet2012Loader
from ehrflow.training.evaluate import evaluate_predictions
from ehrflow.training.fusion import (
    FusionTrainConfig,
    model_config_for,
    predict,
    prepare_data,
    supervised_loss,
    to_tensors,
    train_fusion,
)

DATA = Path(os.environ.get("EHRFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SET_A = DATA / "ehr" / "physionet2012" / "set-a.tar.gz"


def make_config(run_root: Path, name: str, workers: int, epochs: int) -> FusionTrainConfig:
    return FusionTrainConfig.model_validate(
        {
            "modalities": ["timeseries", "static", "stats"],
            "split": {"fractions": [0.8, 0.1, 0.1], "seed": 0},
            "model": {"variant": "emerge", "encoder": "gru", "hidden": 64},
            # patience above the epoch count: every variant runs exactly ``epochs`` epochs
            "train": {"epochs": epochs, "batch_size": 128, "lr": 1e-3, "patience": epochs + 1, "seed": 0},
            "ray": {
                "num_workers": workers,
                "cpus_per_worker": 1,
                "storage_path": str(run_root),
                "name": name,
                "checkpoints_to_keep": None,
            },
            "n_bootstrap": 0,
        }
    )


def plain_loop(config: FusionTrainConfig, prepared) -> list[float]:  # noqa: ANN001
    """The same work as ``_train_loop`` without Ray: seconds per epoch."""
    torch.set_num_threads(1)
    torch.manual_seed(config.train.seed)
    model_cfg = model_config_for(config, prepared)
    train = to_tensors(prepared.splits["train"], model_cfg)
    val = to_tensors(prepared.splits["val"], model_cfg)
    model = FusionModel(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    n, batch_size = len(train["values"]), config.train.batch_size
    seconds = []
    for epoch in range(config.train.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for step in range(math.ceil(n / batch_size)):
            idx = order[step * batch_size : (step + 1) * batch_size]
            batch = {k: v[idx] for k, v in train.items()}
            loss = supervised_loss(model(batch), batch, ["mortality"])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        scores = predict(model, val, ["mortality"])
        evaluate_predictions(
            {"mortality": val["mortality"].numpy()}, {"mortality": val["mortality_mask"].numpy()}, scores
        )
        seconds.append(time.perf_counter() - started)
    return seconds


def ray_run(config: FusionTrainConfig, prepared) -> dict[str, Any]:  # noqa: ANN001
    """Train through Ray Train; per-epoch wall times from the stamps each epoch's checkpoint carries."""
    called = time.time()
    result = train_fusion(config, prepared=prepared)
    returned = time.time()
    metas = [json.loads(p.read_text())["metrics"] for p in sorted(result.run_dir.glob("checkpoint_epoch_*/meta.json"))]
    starts = [m["time/epoch_start_unix"] for m in metas]
    ends = [m["time/epoch_end_unix"] for m in metas]
    between_starts = list(np.diff(starts))
    return {
        "epochs": len(metas),
        "startup_seconds": starts[0] - called,
        "epoch_wall_seconds": between_starts,
        "epoch_compute_seconds": [m["epoch_seconds"] for m in metas],
        "after_last_epoch_seconds": returned - ends[-1],
        "total_seconds": returned - called,
    }


def steady(seconds: list[float]) -> float:
    """Median over the epochs after the first (warm-up)."""
    return float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stays", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    load_avg_start = os.getloadavg()
    stream = PhysioNet2012Loader().load(SET_A, ErrorSink())
    patients = list(itertools.islice(stream, args.stays))
    stream.close()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared = prepare_data(make_config(root, "features", 1, args.epochs), patients, data_dir=root / "data")
        n_train = len(prepared.splits["train"])

        plain = plain_loop(make_config(root, "plain", 1, args.epochs), prepared)
        print(f"plain: {steady(plain):.2f} s/epoch", flush=True)

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(root / "ray"))
        ray_init_seconds = time.perf_counter() - started
        runs = {}
        for workers in (1, 2):
            runs[workers] = ray_run(make_config(root, f"ray{workers}", workers, args.epochs), prepared)
            print(f"ray {workers} worker(s): {steady(runs[workers]['epoch_wall_seconds']):.2f} s/epoch", flush=True)
        ray.shutdown()

    plain_epoch = steady(plain)
    variants: dict[str, Any] = {
        "plain": {
            "steady_seconds_per_epoch": plain_epoch,
            "samples_per_second": n_train / plain_epoch,
            "epoch_seconds": plain,
        }
    }
    for workers, run in runs.items():
        epoch = steady(run["epoch_wall_seconds"])
        variants[f"ray_{workers}_worker"] = {
            "steady_seconds_per_epoch": epoch,
            "steady_compute_seconds_per_epoch": steady(run["epoch_compute_seconds"]),
            "samples_per_second": n_train / epoch,
            "overhead_ratio_vs_plain": epoch / plain_epoch,
            **run,
        }
    payload = {
        "setup": {
            "data": f"first {args.stays} PhysioNet 2012 set-a stays, 48 hourly bins",
            "sizes": {k: len(v) for k, v in prepared.splits.items()},
            "model": "EMERGE-style fusion, GRU encoder, hidden 64, time series + static + statistics",
            "epochs": args.epochs,
            "batch_size": 128,
            "threads": "1 torch thread per process (plain) or per worker (Ray)",
            "steady_state": "median over epochs 2..N; Ray epochs are wall time between consecutive epoch starts "
            "(includes ray.train.report with a checkpoint every epoch)",
        },
        "ray_init_seconds": ray_init_seconds,
        "variants": variants,
        "goal_ratio_1_worker": 1.3,
        "ratio_1_worker": variants["ray_1_worker"]["overhead_ratio_vs_plain"],
        "speedup_1_to_2_workers": variants["ray_1_worker"]["steady_seconds_per_epoch"]
        / variants["ray_2_worker"]["steady_seconds_per_epoch"],
        "load_average_at_start": [round(x, 2) for x in load_avg_start],
        "peak_rss_mib_driver": peak_rss_mib(),
    }
    path = write_result("train_speed", payload, packages=("torch", "ray"))
    print(f"wrote {path}")
    for name, v in variants.items():
        extra = (
            f", ratio {v['overhead_ratio_vs_plain']:.2f}, start-up {v['startup_seconds']:.1f} s"
            if "ray" in name
            else ""
        )
        print(f"{name:14s} {v['steady_seconds_per_epoch']:.2f} s/epoch, {v['samples_per_second']:.0f} samples/s{extra}")


if __name__ == "__main__":
    main()
