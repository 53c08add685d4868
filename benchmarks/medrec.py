"""Medication recommendation on the open EHR demos: NLA-MMR (Morgan or GIN molecules) vs GAMENet vs LR/MLP, plus
a throughput run.

Quality: for each open cohort (MIMIC-IV demo, MIMIC-III demo, Synthea CSV) the dataset is built
with the GAMENet/SafeDrug drug mapping (``../shared/data/medrec``), split by patient 2/3, 1/6,
1/6, every model is trained through ``train_medrec`` (Ray Train local mode, one process) and the
best-validation-Jaccard checkpoint is scored with 10 bootstrap rounds of 80% of the test patients.
NLA-MMR trains with SafeDrug's DDI loss at MedRecConfig's default target (``nlammr``, ``nlammr_gin``),
without it (``nlammr_no_ddi``), and without it but with the prediction-time ``ddi_guard`` at that rate
(``nlammr_ddi_guard``); the baselines train as published, without either, like PyHealth's models and the
rule, so ``nlammr_no_ddi`` is the like-for-like comparison and the other two show what DDI control costs.
The "previous visit's drugs" rule is scored on the same rounds. These cohorts are tiny (100
patients each, of which 13-48 have two usable visits): the test sets hold 2-8 patients, so one
split says little. Each seed in ``--seeds`` draws its own split (seed 0 is the protocol's; 20 by default, since on
the MIMIC-III demo's 2-patient test sets five splits ranked the models the other way round from twenty) and
``over_seeds`` averages every model's test Jaccard over those splits, with its paired difference from GAMENet.

Throughput: a synthetic cohort (default 50k visits, MIMIC-III benchmark-like code counts) trained
for a bounded number of steps on 1 and 2 Ray workers; reported are measured seconds, patients per
second and the full epoch time that rate implies (``projected``).

PyHealth: its GAMENet and MLP (``pyhealth.models``, with PyHealth's own trainer) run on every
cohort and split next to ehrflow's models, in their own virtual environment (``make pyhealth-venv``:
PyHealth 1.1.6 pins pandas<2 and cannot share the project's), through
``benchmarks/external/pyhealth_medrec.py``. Their test-visit probabilities come back and are scored
here with the same bootstrap rounds; their seconds per epoch are training only, as ehrflow's.
Without that environment the part is skipped and the result says so.

    .venv/bin/python benchmarks/medrec.py [--epochs 25] [--seeds 0,1,...,19] [--scale-visits 50000] [--scale-steps 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from _util import dot_row, peak_rss_mib, write_result

from ehrflow.records.errors import ErrorSink
from ehrflow.records.loaders.mimic import Mimic3Loader, Mimic4Loader
from ehrflow.records.loaders.synthea_csv import SyntheaCsvLoader
from ehrflow.records.model import Patient
from ehrflow.training.medrec import MedRecConfig, bootstrap_rounds, train_medrec, visit_truths
from ehrflow.training.medrec_data import OOV, PAD, MedRecDataConfig, MedRecDataset, build_dataset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file written outside the project
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# benchmark name -> (model, molecule encoder, DDI control): "loss" is SafeDrug's DDI loss at MedRecConfig's
# target_ddi, "guard" the prediction-time ddi_guard at that same rate, None neither
MODELS: dict[str, tuple[str, str | None, str | None]] = {
    "nlammr": ("nlammr", None, "loss"),
    "nlammr_no_ddi": ("nlammr", None, None),
    "nlammr_ddi_guard": ("nlammr", None, "guard"),
    "nlammr_gin": ("nlammr", "gin", "loss"),
    "gamenet": ("gamenet", None, None),
    "mlp": ("mlp", None, None),
    "logreg": ("logreg", None, None),
}
MIMIC3_TABLES = ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS", "D_ICD_DIAGNOSES")
PYHEALTH_VENV_PYTHON = REPO / ".venv-pyhealth" / "bin" / "python"
PYHEALTH_ADAPTER = REPO / "benchmarks" / "external" / "pyhealth_medrec.py"
PYHEALTH_MODELS = ("gamenet", "mlp")


def _patients(cohort: str, scratch: Path) -> list[Patient]:
    ehr = SHARED / "ehr"
    if cohort == "mimic4_demo":
        loader, root = Mimic4Loader(), ehr / "mimic4_demo"
    elif cohort == "mimic3_demo":
        loader, root = Mimic3Loader(), scratch / "mimic3_tables"
        root.mkdir(exist_ok=True)
        for table in MIMIC3_TABLES:  # the chart events are not needed and take long to parse
            link = root / f"{table}.csv.gz"
            if not link.exists():
                link.symlink_to(ehr / "mimic3_demo" / f"{table}.csv.gz")
    else:
        loader, root = SyntheaCsvLoader(), ehr / "synthea" / "csv"
    return [p for unit in loader.units(root) for p in loader.load(unit, ErrorSink(skip_invalid=True))]


def _summary(metrics: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v.mean:.4f} +- {v.sd:.4f}" for k, v in metrics.items()}


def _config(
    dataset_dir: Path, model: str, args: argparse.Namespace, scratch: Path, name: str | None = None, **extra: Any
) -> MedRecConfig:
    medrec = SHARED / "medrec"
    name = name or f"{dataset_dir.name}-{model}"
    return MedRecConfig.model_validate(
        {
            "dataset_dir": str(dataset_dir),
            "data": {"ddi_pairs": str(medrec / "ddi_atc3_pairs.tsv")},
            "representations": {
                "text_encoder": args.text_encoder,
                "use_kg": args.text_encoder == "default",
                "smiles_path": str(medrec / "atc3_smiles.tsv"),
                "cache_dir": str(scratch / "text_cache"),
            },
            "model": model,
            "dim": 64,
            "epochs": args.epochs,
            "batch_size": 4,
            "lr": 1e-3,
            "ray": {"num_workers": 0, "storage_path": str(scratch / "runs"), "name": name},
            "output_dir": str(scratch / "out" / name),
            "evaluate_baselines": True,
            **extra,
        }
    )


def _model_config(dataset_dir: Path, model: str, args: argparse.Namespace, scratch: Path, **extra: Any) -> MedRecConfig:
    """``_config`` for a benchmark model name: its architecture, molecule encoder and DDI loss setting."""
    architecture, molecules, ddi_control = MODELS[model]
    config = _config(dataset_dir, architecture, args, scratch, **extra)
    if molecules is not None:
        config.representations.molecule_method = molecules
    if ddi_control == "guard":
        config.ddi_guard = config.target_ddi
    if ddi_control != "loss":
        config.target_ddi = None
    return config


def quality(
    cohort: str, args: argparse.Namespace, scratch: Path, out: dict[str, Any], save: Callable[[], None]
) -> None:
    """Fill ``out`` model by model, saving after each, so a run cut short still leaves its numbers."""
    medrec = SHARED / "medrec"
    start = time.perf_counter()
    data_config = MedRecDataConfig(
        mapping_dir=medrec,
        ddi_pairs=medrec / "ddi_atc3_pairs.tsv",
        unmapped_drugs="rxnorm-or-name" if cohort == "synthea" else "drop",
    )
    dataset = build_dataset(_patients(cohort, scratch), data_config)
    dataset_dir = dataset.save(scratch / cohort)
    out.update(
        {
            "build_seconds": round(time.perf_counter() - start, 1),
            "patients": len(dataset.patient_ids),
            "visits": dataset.n_visits,
            "vocab": {
                "diag": len(dataset.diag_vocab) - 2,
                "proc": len(dataset.proc_vocab) - 2,
                "med": len(dataset.med_vocab),
            },
            "dataset_report": {k: v for k, v in asdict(dataset.report).items() if k != "drugs_without_smiles"},
        }
    )
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed: dict[str, dict[str, Any]] = out.setdefault("seeds", {})
    for seed in seeds:
        runs = per_seed.setdefault(str(seed), {"models": {}})
        for model in args.models.split(","):
            t0 = time.perf_counter()
            name = f"{cohort}-{model}-seed{seed}"
            config = _model_config(dataset_dir, model, args, scratch, seed=seed, name=name)
            result = train_medrec(config)
            runs["split"] = result.n_patients
            runs["models"][model] = {
                "test": _summary(result.test),
                "test_jaccard_mean": result.test["jaccard"].mean,
                "val_jaccard": round(result.validation["jaccard"], 4),
                "best_epoch": result.best_epoch,
                "seconds_per_epoch": round(float(np.median(result.seconds_per_epoch)), 3),
                "wall_seconds": round(time.perf_counter() - t0, 1),
            }
            runs["models"]["previous_visit_rule"] = {
                "test": _summary(result.test_baselines["previous_visit"]),
                "test_jaccard_mean": result.test_baselines["previous_visit"]["jaccard"].mean,
            }
            if model == "nlammr":
                reps = np.load(scratch / "out" / name / "data" / "representations.npz")
                out["drugs_without_smiles"] = int((~reps["med_has_mol"]).sum())
            logging.info("%s seed %d %s: %s", cohort, seed, model, runs["models"][model]["test"])
            out["over_seeds"] = _over_seeds(per_seed)
            save()
        if args.pyhealth_python is not None:
            run_data = scratch / "out" / name / "data"  # the split every model of this seed used
            for pyhealth_model in PYHEALTH_MODELS:
                key = f"pyhealth_{pyhealth_model}"
                runs["models"][key] = pyhealth_quality(args, run_data, seed, scratch, pyhealth_model)
                logging.info("%s seed %d %s: %s", cohort, seed, key, runs["models"][key]["test"])
                out["over_seeds"] = _over_seeds(per_seed)
                save()


def _run_pyhealth(args: argparse.Namespace, run_data: Path, out: Path, *options: str) -> dict[str, Any]:
    """Run the adapter in PyHealth's environment; its trainer logs every epoch, so output goes to a file."""
    log = out.with_suffix(".log")
    with open(log, "w") as fh:
        done = subprocess.run(
            [str(args.pyhealth_python), str(PYHEALTH_ADAPTER), str(run_data), str(out), *options],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # PyHealth builds its vocabularies from sets
        )
    if done.returncode != 0:
        raise RuntimeError(f"PyHealth failed on {run_data} ({' '.join(options)}):\n" + log.read_text()[-3000:])
    return json.loads(out.with_suffix(".json").read_text())


def pyhealth_quality(args: argparse.Namespace, run_data: Path, seed: int, scratch: Path, model: str) -> dict[str, Any]:
    """A PyHealth model on the run's split in its own environment; scored with the same bootstrap rounds."""
    dataset = MedRecDataset.load(run_data)
    test = json.loads((run_data / "split.json").read_text())["test"]
    out = scratch / "pyhealth" / f"{run_data.parent.name}-{model}"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = _run_pyhealth(args, run_data, out, "--model", model, "--epochs", str(args.epochs), "--seed", str(seed))
    flat = np.load(out.with_suffix(".npz"))["probs"]
    truths = visit_truths(dataset, test)
    probs, at = [], 0
    for truth in truths:
        probs.append(flat[at : at + len(truth)])
        at += len(truth)
    if at != len(flat):
        raise RuntimeError(f"PyHealth returned {len(flat)} test visits, the split has {at}")
    # the rounds ehrflow's models were scored with (``_config`` keeps MedRecConfig's defaults)
    protocol = MedRecConfig.model_fields
    scores = bootstrap_rounds(
        truths,
        probs,
        dataset.ddi,
        rounds=protocol["bootstrap_rounds"].default,
        fraction=protocol["bootstrap_fraction"].default,
        seed=seed,
        threshold=protocol["threshold"].default,
    )
    return {
        "test": _summary(scores),
        "test_jaccard_mean": scores["jaccard"].mean,
        "val_jaccard": round(info["val_jaccard_samples"], 4),
        "seconds_per_epoch": round(info["seconds_per_epoch"], 3),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "drugs_in_pyhealth_vocabulary": info["drugs_in_pyhealth_vocabulary"],
        "versions": info["versions"],
    }


def _over_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each model's test Jaccard (the mean of its bootstrap rounds) averaged over the seeds' splits, and its paired
    difference from GAMENet on the same splits (mean, sd, splits where it is ahead)."""
    names = {m for runs in per_seed.values() for m in runs["models"]}
    table = {}
    for name in sorted(names):
        values = [runs["models"][name]["test_jaccard_mean"] for runs in per_seed.values() if name in runs["models"]]
        table[name] = {
            "splits": len(values),
            "jaccard_mean": float(np.mean(values)),
            "jaccard_sd": float(np.std(values)),
        }
        paired = [
            runs["models"][name]["test_jaccard_mean"] - runs["models"]["gamenet"]["test_jaccard_mean"]
            for runs in per_seed.values()
            if name in runs["models"] and "gamenet" in runs["models"]
        ]
        if paired and name != "gamenet":
            table[name]["minus_gamenet"] = {
                "mean": float(np.mean(paired)),
                "sd": float(np.std(paired)),
                "splits_ahead": int(sum(d > 0 for d in paired)),
            }
    ranking = sorted(table, key=lambda m: -table[m]["jaccard_mean"])
    return {"models": table, "ranking_by_test_jaccard": ranking}


def synthetic_cohort(n_visits: int, seed: int = 0) -> MedRecDataset:
    """Zipf-distributed codes with the MIMIC-III benchmark's shape: ~10 diagnoses, ~4 procedures, ~11 drugs a visit."""
    rng = np.random.default_rng(seed)
    atc3 = sorted(
        {line.split("\t")[0] for line in (SHARED / "medrec" / "atc3_smiles.tsv").read_text().splitlines()[1:]}
    )
    n_diag, n_proc, n_med = 1958, 1430, len(atc3)

    def draw(n: int, size: int) -> list[int]:
        ids = np.minimum(rng.zipf(1.3, size=size * 2), n) - 1
        return list(dict.fromkeys(int(i) for i in ids))[:size]

    visits: list[list[tuple[list[int], list[int], list[int]]]] = []
    total = 0
    while total < n_visits:
        n = min(int(rng.integers(2, 5)), n_visits - total) if n_visits - total >= 2 else 2
        visits.append(
            [
                (
                    [i + 2 for i in draw(n_diag, int(rng.integers(3, 18)))],
                    [i + 2 for i in draw(n_proc, int(rng.integers(1, 7)))],
                    draw(n_med, int(rng.integers(4, 19))),
                )
                for _ in range(n)
            ]
        )
        total += n
    diag_vocab = [PAD, OOV, *(f"ICD9CM:D{i}" for i in range(n_diag))]
    proc_vocab = [PAD, OOV, *(f"ICD9PROC:P{i}" for i in range(n_proc))]
    return MedRecDataset([f"synthetic-{i}" for i in range(len(visits))], visits, diag_vocab, proc_vocab, atc3)


def throughput(args: argparse.Namespace, scratch: Path, out: dict[str, Any], save: Callable[[], None]) -> None:
    import ray

    dataset = synthetic_cohort(args.scale_visits)
    dataset_dir = dataset.save(scratch / "synthetic")
    out.update({"visits": dataset.n_visits, "patients": len(dataset.patient_ids), "runs": {}})
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(scratch / "ray"))
    for model in args.scale_models.split(","):
        for workers in (1, 2):
            config = _model_config(
                dataset_dir,
                model,
                args,
                scratch,
                epochs=2,
                batch_size=32,
                max_steps_per_epoch=args.scale_steps,
                evaluate_baselines=False,
                representations={
                    "text_encoder": "hashed",
                    "use_kg": False,
                    "smiles_path": str(SHARED / "medrec" / "atc3_smiles.tsv"),
                },
            )
            config.ray.num_workers = workers
            config.ray.name = f"synthetic-{model}-{workers}"
            result = train_medrec(config)
            steps = min(args.scale_steps, result.n_patients["train"] // workers // config.batch_size)
            seconds = result.seconds_per_epoch[-1]  # the second epoch: no first-step warm-up
            rate = steps * config.batch_size * workers / seconds
            out["runs"][f"{model}/{workers}_workers"] = {
                "steps_per_worker": steps,
                "measured_epoch_seconds": round(seconds, 2),
                "patients_per_second": round(rate, 1),
                "projected_full_epoch_seconds": round(result.n_patients["train"] / rate, 1),
            }
            logging.info("throughput %s %d workers: %s", model, workers, out["runs"][f"{model}/{workers}_workers"])
            save()
    if args.pyhealth_python is not None:
        out["runs"]["pyhealth_gamenet/1_process"] = pyhealth_throughput(
            args, dataset, config.output_dir, config.batch_size
        )
        logging.info("throughput pyhealth_gamenet: %s", out["runs"]["pyhealth_gamenet/1_process"])
        save()


def pyhealth_throughput(
    args: argparse.Namespace, dataset: MedRecDataset, output_dir: Path, patients_per_batch: int
) -> dict[str, Any]:
    """PyHealth's GAMENet on the same synthetic split: two capped epochs, batches of as many visits as ehrflow's."""
    batch = round(patients_per_batch * dataset.n_visits / len(dataset.patient_ids))
    out = output_dir.parent / "pyhealth-throughput"
    info = _run_pyhealth(
        args,
        output_dir / "data",
        out,
        "--epochs",
        "2",
        "--steps-per-epoch",
        str(args.scale_steps),
        "--batch-size",
        str(batch),
    )
    seconds = info["epoch_seconds"][-1]  # the second epoch, as for ehrflow's runs
    return {
        "steps_per_epoch": info["steps_per_epoch"],
        "batch_visits": batch,
        "measured_epoch_seconds": round(seconds, 2),
        "visits_per_second": round(info["steps_per_epoch"] * batch / seconds, 1),
        "projected_full_epoch_seconds": round(seconds * info["full_epoch_steps"] / info["steps_per_epoch"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--cohorts", default="mimic4_demo,mimic3_demo,synthea")
    parser.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    parser.add_argument(
        "--seeds",
        default=",".join(str(seed) for seed in range(20)),
        help="one patient split (and initialisation) per seed; seed 0 is the protocol's",
    )
    parser.add_argument("--text-encoder", choices=("default", "hashed"), default="default")
    parser.add_argument(
        "--result", default="medrec", help="results file name under benchmarks/results (e.g. for a split-count study)"
    )
    parser.add_argument("--scale-visits", type=int, default=50_000)
    parser.add_argument("--scale-steps", type=int, default=60)
    parser.add_argument("--scale-models", default="nlammr,gamenet")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-after", type=int, default=2, help="run the throughput part after this many cohorts")
    parser.add_argument(
        "--pyhealth-python",
        type=Path,
        default=PYHEALTH_VENV_PYTHON if PYHEALTH_VENV_PYTHON.exists() else None,
        help="python of a PyHealth 1.1.6 environment (make pyhealth-venv); default .venv-pyhealth when present",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "ehrflow", "httpx", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "protocol": "patient split 2/3 train, 1/6 val, 1/6 test (one split per seed); best val Jaccard; 10 x 80% bootstrap",
        "note": "demo cohorts are tiny (100 patients each; test sets of 2-8 patients): not a model ranking",
        "settings": {**vars(args), "pyhealth_python": str(args.pyhealth_python or "")},
        "pyhealth": (
            f"pyhealth.models GAMENet and MLP through {args.pyhealth_python} (benchmarks/external/pyhealth_medrec.py)"
            if args.pyhealth_python is not None
            else "skipped: no PyHealth environment (make pyhealth-venv)"
        ),
        "cohorts": {},
        "complete": False,
    }

    def save() -> Path:
        payload["total_seconds"] = round(time.perf_counter() - started, 1)
        payload["peak_rss_mib"] = round(peak_rss_mib(), 1)
        return write_result(args.result, payload, packages=("torch", "ray", "rdkit"))

    cohorts = args.cohorts.split(",")
    with tempfile.TemporaryDirectory(prefix="medrec-bench-") as tmp:
        scratch = Path(tmp)
        for i, cohort in enumerate(cohorts):
            if i == args.scale_after and not args.skip_scale:
                throughput(args, scratch, payload.setdefault("throughput", {}), save)
            quality(cohort, args, scratch, payload["cohorts"].setdefault(cohort, {}), save)
        if args.scale_after >= len(cohorts) and not args.skip_scale:
            throughput(args, scratch, payload.setdefault("throughput", {}), save)
    payload["complete"] = True
    path = save()
    print(json.dumps(payload, indent=2, default=str))
    print(f"written to {path} and {plot_splits(path)}")


def _test_jaccard(seed_result: dict[str, Any], model: str) -> float:
    """The bootstrap mean of a model's test Jaccard on one split (stored as "mean +- sd")."""
    return float(str(seed_result["models"][model]["test"]["jaccard"]).split("+-")[0])


def plot_splits(result: Path) -> Path:
    """Per cohort, each model's test Jaccard on every patient split (grey) and its mean (blue), beside its
    difference from GAMENet on the same split: on test sets of 2-8 patients the splits disagree, and this shows
    by how much before anyone reads a ranking into the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = json.loads(result.read_text())["cohorts"]
    fig, axes = plt.subplots(len(cohorts), 2, figsize=(11, 3.6 * len(cohorts)), squeeze=False)
    for (left, right), (cohort, found) in zip(axes, cohorts.items(), strict=True):
        seeds = found["seeds"]
        models = sorted({m for s in seeds.values() for m in s["models"]})
        for row, model in enumerate(models):
            splits = [s for s in seeds if model in seeds[s]["models"]]
            values = np.array([_test_jaccard(seeds[s], model) for s in splits])
            dot_row(left, row, values)
            dot_row(right, row, values - np.array([_test_jaccard(seeds[s], "gamenet") for s in splits]))
        right.axvline(0, color="C1", ls="--", lw=1)
        left.set_yticks(range(len(models)), models)
        right.set_yticks(range(len(models)), [])
        left.invert_yaxis()
        right.invert_yaxis()
        left.set_title(f"{cohort}: {found['patients']} patients, {found['visits']} visits", fontsize=10)
        left.set_xlabel("test Jaccard (grey: a patient split; blue: the mean)")
        right.set_xlabel("Jaccard minus GAMENet on the same split")
    fig.tight_layout()
    path = result.with_suffix(".png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
