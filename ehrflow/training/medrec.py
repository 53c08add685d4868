"""Medication recommendation: training through Ray Train and the papers' evaluation protocol.

Protocol (GAMENet / SafeDrug / NLA-MMR): patients split 2/3 train, 1/6 validation, 1/6 test
(seeded), the checkpoint with the best validation Jaccard is kept, and the test set is scored
as 10 rounds of 80% of its patients drawn with replacement, reported as mean and standard
deviation of Jaccard, F1, PRAUC, DDI rate and the average number of drugs per visit.

``train_medrec(MedRecConfig(...))`` prepares the data in the driver, trains in a
``TorchTrainer`` (``num_workers=0`` runs in-process, Ray Train's local mode) and evaluates
the best checkpoint; ``evaluate_medrec(checkpoint_dir)`` re-scores a saved checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator
from sklearn.metrics import average_precision_score

from ehrflow.models.medrec import (
    NLAMMR,
    GAMENet,
    MedRecBatch,
    MoleculeGIN,
    MultiHotLinear,
    MultiHotMLP,
    collate,
    medrec_loss,
)
from ehrflow.training.medrec_data import (
    MedRecDataConfig,
    MedRecDataset,
    RepresentationConfig,
    Representations,
    build_from_store,
    build_representations,
    import_gamenet,
    load_ddi,
    split_by_patient,
)
from ehrflow.training.ray_utils import (
    META_FILE,
    RayTrainConfig,
    checkpoint_dirs,
    latest_checkpoint,
    load_state,
    report_epoch,
    run_config,
    scaling_config,
)

log = logging.getLogger(__name__)

ModelName = Literal["nlammr", "gamenet", "logreg", "mlp"]
METRICS = ("jaccard", "f1", "prauc", "ddi_rate", "avg_drugs")


class MedRecConfig(BaseModel):
    """Everything a med-rec run needs; ``ehrflow train medrec`` builds one from flags or YAML."""

    store_url: str | None = None
    """Build the dataset from this patient store (``data`` says how)."""
    gamenet_dir: Path | None = None
    """Or import ``records_final.pkl``, ``voc_final.pkl`` (and ``ddi_A_final.pkl`` if present) from here."""
    dataset_dir: Path | None = None
    """Or reuse a dataset saved by an earlier run (``<output_dir>/data``)."""
    data: MedRecDataConfig = Field(default_factory=MedRecDataConfig)
    representations: RepresentationConfig = Field(default_factory=RepresentationConfig)
    model: ModelName = "nlammr"
    dim: int = Field(128, ge=4)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    """Patients per step."""
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    target_ddi: float | None = Field(0.06, ge=0)
    """SafeDrug's controllable DDI loss target; ``None`` trains on accuracy alone."""
    kp: float = Field(0.05, gt=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    ddi_guard: float | None = Field(None, ge=0, le=1)
    """At prediction, the highest share of a visit's recommended drug pairs that may interact: the least likely
    drug of an interacting pair is dropped until the visit is at or under it (``ddi_guard_probs``). ``None``: off.
    Unlike ``target_ddi`` it holds for every visit whatever the model learnt; it costs the interacting drugs
    patients really get."""
    seed: int = 0
    ray: RayTrainConfig = Field(default_factory=lambda: RayTrainConfig(name="medrec", checkpoints_to_keep=2))
    """Workers (0: Train V2 local mode, in-process), GPU, and where checkpoints go (``storage_path/name``)."""
    output_dir: Path = Path(".ehrflow/medrec")
    """Where the prepared dataset and representations are written for the workers."""
    bootstrap_rounds: int = Field(10, ge=1)
    bootstrap_fraction: float = Field(0.8, gt=0, le=1)
    evaluate_baselines: bool = False
    """Also score the 'repeat the previous visit's drugs' rule on the same test rounds."""

    @model_validator(mode="after")
    def _one_source(self) -> MedRecConfig:
        given = [x for x in (self.store_url, self.gamenet_dir, self.dataset_dir) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of store_url, gamenet_dir or dataset_dir")
        return self


class MetricSummary(BaseModel):
    mean: float
    sd: float


class MedRecResult(BaseModel):
    model: str
    checkpoint: Path
    best_epoch: int
    validation: dict[str, float]
    test: dict[str, MetricSummary]
    test_baselines: dict[str, dict[str, MetricSummary]] = Field(default_factory=dict)
    seconds_per_epoch: list[float]
    n_patients: dict[str, int]
    n_visits: int
    dataset_report: dict[str, Any]


# ------------------------------------------------------------------------------------- metrics


def visit_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Jaccard, precision, recall, F1 and PRAUC of one patient's visits (SafeDrug's ``multi_label_metric``).

    Zero denominators (an empty prediction, an empty label set) count as 0 rather than raising;
    PRAUC is averaged over the visits that have at least one true drug (``nan`` if none has).
    """
    y_pred = y_prob >= threshold
    truth = y_true > 0
    inter = (y_pred & truth).sum(1)
    union = (y_pred | truth).sum(1)
    n_pred, n_true = y_pred.sum(1), truth.sum(1)
    jaccard = np.divide(inter, union, out=np.zeros(len(inter)), where=union > 0)
    precision = np.divide(inter, n_pred, out=np.zeros(len(inter)), where=n_pred > 0)
    recall = np.divide(inter, n_true, out=np.zeros(len(inter)), where=n_true > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(inter)), where=denom > 0)
    prauc = [average_precision_score(truth[i], y_prob[i]) for i in range(len(truth)) if truth[i].any()]
    return {
        "jaccard": float(jaccard.mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "prauc": float(np.mean(prauc)) if prauc else math.nan,
    }


def ddi_rate(pred_sets: Sequence[np.ndarray], ddi: np.ndarray | None) -> float:
    """Share of predicted drug pairs (within a visit) that interact; 0 with no pairs, ``nan`` without a DDI matrix."""
    if ddi is None:
        return math.nan
    pairs = bad = 0
    for drugs in pred_sets:
        k = len(drugs)
        pairs += k * (k - 1) // 2
        if k > 1:
            bad += int(np.triu(ddi[np.ix_(drugs, drugs)] > 0, 1).sum())
    return bad / pairs if pairs else 0.0


def ddi_guard_probs(probs: np.ndarray, ddi: np.ndarray, limit: float, threshold: float) -> np.ndarray:
    """``probs`` ``[T, M]`` with drugs dropped below ``threshold`` until each visit's share of interacting pairs
    among its recommended drugs is at most ``limit``; each step drops the least likely drug that interacts with
    another recommended one. Dropped drugs keep their rank order just under the threshold (in float64: the value
    just under it, cast back to float32, would land on the threshold again)."""
    out = probs.astype(np.float64)
    below = np.nextafter(threshold, 0.0)
    for row in out:
        chosen = np.flatnonzero(row >= threshold)
        while len(chosen) > 1:
            interacting = np.triu(ddi[np.ix_(chosen, chosen)] > 0, 1)
            if interacting.sum() <= limit * len(chosen) * (len(chosen) - 1) / 2:
                break
            involved = chosen[(interacting | interacting.T).any(1)]
            drop = involved[np.argmin(row[involved])]
            row[drop] = below * (1.0 - 1e-6 * (1.0 - row[drop]))  # below the threshold, order kept
            chosen = chosen[chosen != drop]
    return out


def guarded(config: MedRecConfig, ddi: np.ndarray | None, probs: list[np.ndarray]) -> list[np.ndarray]:
    """The per-patient probabilities after ``config.ddi_guard`` (unchanged when it is off or there is no DDI matrix)."""
    if config.ddi_guard is None or ddi is None:
        return probs
    return [ddi_guard_probs(p, ddi, config.ddi_guard, config.threshold) for p in probs]


def cohort_metrics(
    truths: Sequence[np.ndarray], probs: Sequence[np.ndarray], ddi: np.ndarray | None, threshold: float = 0.5
) -> dict[str, float]:
    """Per-patient means averaged over patients (as SafeDrug), DDI rate and drugs per visit over all visits."""
    per_patient = [visit_metrics(t, p, threshold) for t, p in zip(truths, probs, strict=True)]
    pred_sets = [np.flatnonzero(row >= threshold) for p in probs for row in p]
    n_visits = sum(len(p) for p in probs)
    out = {
        k: float(np.nanmean([m[k] for m in per_patient])) if per_patient else math.nan
        for k in ("jaccard", "f1", "prauc")
    }
    out["ddi_rate"] = ddi_rate(pred_sets, ddi)
    out["avg_drugs"] = sum(len(s) for s in pred_sets) / n_visits if n_visits else 0.0
    return out


def bootstrap_rounds(
    truths: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    ddi: np.ndarray | None,
    *,
    rounds: int = 10,
    fraction: float = 0.8,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, MetricSummary]:
    """The papers' test protocol: ``rounds`` draws of ``fraction`` of the test patients with replacement."""
    rng = np.random.default_rng(seed)
    n = len(truths)
    if n == 0:
        raise ValueError("no test patients to evaluate")
    size = max(1, round(n * fraction))
    samples = []
    for _ in range(rounds):
        idx = rng.choice(n, size=size, replace=True)
        samples.append(cohort_metrics([truths[i] for i in idx], [probs[i] for i in idx], ddi, threshold))
    return {
        k: MetricSummary(
            mean=float(np.nanmean(v)) if not np.isnan(v).all() else math.nan,
            sd=float(np.nanstd(v)) if not np.isnan(v).all() else math.nan,
        )
        for k in METRICS
        for v in [np.array([s[k] for s in samples], dtype=float)]
    }


# ------------------------------------------------------------------------------------- models


def ehr_cooccurrence(dataset: MedRecDataset, patients: Sequence[int]) -> np.ndarray:
    """GAMENet's EHR graph: drugs given together in a training visit."""
    adj = np.zeros((len(dataset.med_vocab), len(dataset.med_vocab)), dtype=np.float32)
    for i in patients:
        for _, _, meds in dataset.visits[i]:
            adj[np.ix_(meds, meds)] = 1.0
    np.fill_diagonal(adj, 0.0)
    return adj


def drug_log_odds(dataset: MedRecDataset, patients: Sequence[int]) -> np.ndarray:
    """Per drug, the Laplace-smoothed log-odds of being given at a visit of these patients.

    It starts the output bias of ehrflow's models where the data put it: a demo cohort trains for a few dozen
    steps, too few to learn 100 base rates from zero.
    """
    given = np.zeros(len(dataset.med_vocab))
    n_visits = 0
    for i in patients:
        for _, _, meds in dataset.visits[i]:
            given[list(set(meds))] += 1
            n_visits += 1
    prior = (given + 1) / (n_visits + 2)
    return np.log(prior / (1 - prior))


def build_model(
    name: str, dataset: MedRecDataset, reps: Representations | None, train_idx: Sequence[int], dim: int, dropout: float
) -> torch.nn.Module:
    n_diag, n_proc, n_meds = len(dataset.diag_vocab), len(dataset.proc_vocab), len(dataset.med_vocab)
    if name == "gamenet":
        ddi = torch.as_tensor(dataset.ddi) if dataset.ddi is not None else None
        return GAMENet(
            n_diag, n_proc, n_meds, torch.as_tensor(ehr_cooccurrence(dataset, train_idx)), ddi, dim=dim, dropout=dropout
        )
    bias = torch.as_tensor(drug_log_odds(dataset, train_idx))  # ehrflow's own models; GAMENet keeps its own start
    if name == "logreg":
        return MultiHotLinear(n_diag, n_proc, n_meds, bias_init=bias)
    if name == "mlp":
        return MultiHotMLP(n_diag, n_proc, n_meds, hidden=dim, dropout=dropout, bias_init=bias)
    if name == "nlammr":
        if reps is None:
            raise ValueError("the nlammr model needs text/molecule representations")
        t = torch.as_tensor
        graphs = reps.graphs
        encoder = None
        if graphs is not None:
            arrays = (graphs.atoms, graphs.edges, graphs.atom_molecule, graphs.molecule_drug)
            encoder = MoleculeGIN(*(t(a) for a in arrays), n_drugs=n_meds, dim=dim)
        return NLAMMR(
            t(reps.diag_text),
            t(reps.proc_text),
            t(reps.med_text),
            t(reps.med_mol),
            t(reps.med_has_mol),
            dim,
            dropout,
            bias_init=bias,
            molecule_encoder=encoder,
        )
    raise ValueError(f"unknown med-rec model {name!r}")


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: MedRecDataset, patients: Sequence[int], device: torch.device, batch_size: int = 64
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per patient: true multi-hots ``[T, M]`` and predicted probabilities ``[T, M]``."""
    model.eval()
    truths, probs = [], []
    n_meds = len(dataset.med_vocab)
    for start in range(0, len(patients), batch_size):
        chunk = [dataset.visits[i] for i in patients[start : start + batch_size]]
        batch = collate(chunk, n_meds).to(device)
        prob = torch.sigmoid(model(batch)).cpu().numpy()
        meds = batch.meds.cpu().numpy()
        for j, patient in enumerate(chunk):
            truths.append(meds[j, : len(patient)])
            probs.append(prob[j, : len(patient)])
    return truths, probs


def visit_truths(dataset: MedRecDataset, patients: Sequence[int]) -> list[np.ndarray]:
    """Per patient, the drug multi-hots of its visits ``[T, M]``, for scoring predictions made elsewhere."""
    return [collate([dataset.visits[i]], len(dataset.med_vocab)).meds[0].numpy() for i in patients]


def previous_visit_probs(dataset: MedRecDataset, patients: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The 'same drugs as last visit' rule (first visits predict nothing): the floor any model should clear."""
    truths = visit_truths(dataset, patients)
    probs = []
    for truth in truths:
        prob = np.zeros_like(truth)
        prob[1:] = truth[:-1]
        probs.append(prob)
    return truths, probs


# ------------------------------------------------------------------------------------- data prep


def prepare_data(config: MedRecConfig) -> tuple[MedRecDataset, Representations | None, Path]:
    """Build or import the dataset and its representations once, in the driver, and save them for the workers."""
    data_dir = config.output_dir / "data"
    if config.dataset_dir is not None:
        dataset = MedRecDataset.load(config.dataset_dir)
        if dataset.ddi is None:
            dataset.ddi = load_ddi(dataset.med_vocab, config.data.ddi_pairs, config.data.ddi_matrix)
    elif config.gamenet_dir is not None:
        ddi_path = config.gamenet_dir / "ddi_A_final.pkl"
        dataset = import_gamenet(
            config.gamenet_dir / "records_final.pkl",
            config.gamenet_dir / "voc_final.pkl",
            ddi_path if ddi_path.exists() else None,
        )
        if dataset.ddi is None:
            dataset.ddi = load_ddi(dataset.med_vocab, config.data.ddi_pairs, config.data.ddi_matrix)
    else:
        from ehrflow.records.store import PatientStore

        dataset = build_from_store(PatientStore(config.store_url), config.data)  # type: ignore[arg-type]
    if len(dataset.patient_ids) < 6:
        raise ValueError(
            f"only {len(dataset.patient_ids)} patients with >= {config.data.min_visits} visits: too few to split 2/3, 1/6, 1/6"
        )
    reps = build_representations(dataset, config.representations) if config.model == "nlammr" else None
    dataset.save(data_dir)
    if reps is not None:
        reps.save(data_dir / "representations.npz")
    train, val, test = split_by_patient(len(dataset.patient_ids), config.seed)
    (data_dir / "split.json").write_text(json.dumps({"train": train, "val": val, "test": test, "seed": config.seed}))
    return dataset, reps, data_dir


def load_prepared(data_dir: Path) -> tuple[MedRecDataset, Representations | None, dict[str, list[int]]]:
    dataset = MedRecDataset.load(data_dir)
    reps_path = data_dir / "representations.npz"
    reps = Representations.load(reps_path) if reps_path.exists() else None
    return dataset, reps, json.loads((data_dir / "split.json").read_text())


# ------------------------------------------------------------------------------------- training


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: a shard of the training patients per worker, validation Jaccard each epoch."""
    import ray.train
    import ray.train.torch

    config = MedRecConfig.model_validate_json(loop_config["config_json"])
    data_dir = Path(loop_config["data_dir"])
    dataset, reps, split = load_prepared(data_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.seed)
    try:
        device = ray.train.torch.get_device()
    except RuntimeError:
        device = torch.device("cpu")
    model = build_model(config.model, dataset, reps, split["train"], config.dim, config.dropout)
    model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    core = getattr(model, "module", model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ddi = torch.as_tensor(dataset.ddi, device=device) if dataset.ddi is not None else None
    target_ddi = config.target_ddi if ddi is not None else None
    n_meds = len(dataset.med_vocab)
    shard = split["train"][rank::world]
    steps = max(1, len(split["train"]) // world // config.batch_size)  # equal on every rank, so DDP never waits
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    rng = np.random.default_rng(config.seed + rank)
    serving_meta = _serving_meta(dataset)
    best = -1.0
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        model.train()
        start = time.perf_counter()
        order = rng.permutation(len(shard))
        losses = []
        for step in range(steps):
            picks = [shard[order[(step * config.batch_size + k) % len(shard)]] for k in range(config.batch_size)]
            batch: MedRecBatch = collate([dataset.visits[i] for i in picks], n_meds).to(device)
            logits = model(batch)[batch.visit_mask]
            loss, _ = medrec_loss(logits, batch.meds[batch.visit_mask], ddi, target_ddi, config.kp)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        train_seconds = time.perf_counter() - start
        truths, probs = predict(core, dataset, split["val"], device)
        val = cohort_metrics(truths, guarded(config, dataset.ddi, probs), dataset.ddi, config.threshold)
        metrics = {"train_loss": float(np.mean(losses)), "train_seconds": train_seconds}
        metrics.update({f"val_{k}": v for k, v in val.items()})
        history.append({"epoch": epoch, **metrics})
        improved = val["jaccard"] > best
        best = max(best, val["jaccard"])
        # Only improving epochs and the last carry a checkpoint: with two kept, they are the best and the last.
        keep = improved or epoch == config.epochs - 1
        meta = {
            "config": json.loads(config.model_dump_json()),
            "data_dir": str(data_dir),
            **serving_meta,
            "history": history,
            "checkpoints_to_keep": config.ray.checkpoints_to_keep,
        }
        report_epoch(
            metrics,
            epoch=epoch,
            state=core.state_dict() if keep else None,
            meta=meta,
            run_dir=config.ray.run_dir,
            local_mode=config.ray.num_workers == 0,
        )


def _fit(config: MedRecConfig, data_dir: Path) -> None:
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config_json": config.model_dump_json(), "data_dir": str(data_dir.resolve())},
        scaling_config=scaling_config(config.ray),
        run_config=run_config(config.ray),
    )
    trainer.fit()


def best_checkpoint(run_dir: Path) -> Path:
    """The kept checkpoint with the highest validation Jaccard (ties: the earliest)."""
    found = checkpoint_dirs(run_dir)
    if not found:
        raise RuntimeError(f"medrec training under {run_dir} wrote no checkpoint")
    scored = [(json.loads((p / META_FILE).read_text())["metrics"]["val_jaccard"], -i, p) for i, p in enumerate(found)]
    return max(scored, key=lambda x: (x[0], x[1]))[2]


def train_medrec(config: MedRecConfig) -> MedRecResult:
    """Prepare data, train through Ray Train, keep the best-validation-Jaccard checkpoint, bootstrap the test set."""
    if config.ray.resume:
        raise ValueError("medrec training does not resume (no optimizer state is checkpointed): set ray.resume=false")
    if config.ray.run_dir.exists():
        shutil.rmtree(config.ray.run_dir)  # a fresh run: old checkpoints must not compete for "best"
    dataset, _, data_dir = prepare_data(config)
    _fit(config, data_dir)
    checkpoint = best_checkpoint(config.ray.run_dir)
    history = json.loads((latest_checkpoint(config.ray.run_dir) / META_FILE).read_text())["history"]  # type: ignore[operator]
    evaluation = evaluate_medrec(checkpoint, with_baselines=config.evaluate_baselines)
    meta = json.loads((checkpoint / META_FILE).read_text())
    split = json.loads((data_dir / "split.json").read_text())
    return MedRecResult(
        model=config.model,
        checkpoint=checkpoint,
        best_epoch=int(meta["epoch"]),
        validation={k[4:]: float(v) for k, v in meta["metrics"].items() if k.startswith("val_")},
        test=evaluation["test"],
        test_baselines=evaluation.get("baselines", {}),
        seconds_per_epoch=[float(h["train_seconds"]) for h in history],
        n_patients={k: len(split[k]) for k in ("train", "val", "test")},
        n_visits=dataset.n_visits,
        dataset_report=asdict(dataset.report),
    )


def _serving_meta(dataset: MedRecDataset) -> dict[str, Any]:
    """What a checkpoint needs besides its weights to score a patient: the vocabularies and the DDI pairs (so
    serving never reads the run's prepared data, which holds every training visit)."""
    return {
        "vocabularies": {"diag": dataset.diag_vocab, "proc": dataset.proc_vocab, "med": dataset.med_vocab},
        "ddi_pairs": None if dataset.ddi is None else np.argwhere(np.triu(dataset.ddi) > 0).tolist(),
        "drug_names": {m: dataset.drug_names.get(m, [])[:3] for m in dataset.med_vocab},
    }


@dataclass
class TrainedMedRec:
    """A checkpoint restored without its training data: model (eval mode, CPU), config, vocabularies, DDI matrix."""

    model: torch.nn.Module
    config: MedRecConfig
    diag_vocab: list[str]
    proc_vocab: list[str]
    med_vocab: list[str]
    ddi: np.ndarray | None


def _restore_model(
    config: MedRecConfig, state: dict[str, torch.Tensor], sizes: tuple[int, int, int]
) -> torch.nn.Module:
    """The trained architecture with zero inputs shaped like the checkpoint's tensors; every data-derived input
    (text and molecule features, co-occurrence and DDI graphs, starting biases) is a parameter or buffer, so
    loading the state restores it exactly (``load_state_dict`` is strict)."""
    n_diag, n_proc, n_meds = sizes

    def zeros(key: str) -> torch.Tensor:
        return torch.zeros(state[key].shape, dtype=state[key].dtype)

    if config.model == "logreg":
        model: torch.nn.Module = MultiHotLinear(n_diag, n_proc, n_meds)
    elif config.model == "mlp":
        model = MultiHotMLP(n_diag, n_proc, n_meds, hidden=config.dim, dropout=config.dropout)
    elif config.model == "gamenet":
        ddi = zeros("ddi_gcn.adj") if "ddi_gcn.adj" in state else None
        model = GAMENet(n_diag, n_proc, n_meds, zeros("ehr_gcn.adj"), ddi, dim=config.dim, dropout=config.dropout)
    else:
        encoder = None
        if "molecule_encoder.atoms" in state:
            graphs = ("atoms", "edges", "atom_molecule", "molecule_drug")
            encoder = MoleculeGIN(*(zeros(f"molecule_encoder.{g}") for g in graphs), n_drugs=n_meds, dim=config.dim)
        model = NLAMMR(
            zeros("diag_text.weight"),
            zeros("proc_text.weight"),
            zeros("med_text"),
            zeros("med_mol"),
            zeros("med_has_mol").squeeze(-1),
            config.dim,
            config.dropout,
            molecule_encoder=encoder,
        )
    model.load_state_dict(state)
    return model.eval()


def checkpoint_drug_names(checkpoint: str | Path) -> dict[str, list[str]]:
    """Per drug of a checkpoint's vocabulary, the most frequent order names behind it in training (up to three), so
    results can say what an ATC class such as ``N02B`` stood for in this data; read from the JSON meta alone."""
    return json.loads((Path(checkpoint) / META_FILE).read_text()).get("drug_names", {})


def load_trained_medrec(checkpoint: str | Path) -> TrainedMedRec:
    """A checkpoint as the serving side needs it: no prepared data, no training visits."""
    state, meta = load_state(checkpoint)
    if "vocabularies" not in meta:
        raise ValueError(f"{checkpoint}: this medrec checkpoint predates self-contained checkpoints; train it again")
    config = MedRecConfig.model_validate(meta["config"])
    vocab = meta["vocabularies"]
    ddi = None
    if meta["ddi_pairs"] is not None:
        ddi = np.zeros((len(vocab["med"]), len(vocab["med"])), dtype=np.float32)
        for i, j in meta["ddi_pairs"]:
            ddi[i, j] = ddi[j, i] = 1.0
    sizes = (len(vocab["diag"]), len(vocab["proc"]), len(vocab["med"]))
    return TrainedMedRec(_restore_model(config, state, sizes), config, vocab["diag"], vocab["proc"], vocab["med"], ddi)


def load_medrec_model(
    checkpoint: str | Path, data_dir: str | Path | None = None
) -> tuple[torch.nn.Module, MedRecConfig, MedRecDataset, dict[str, list[int]]]:
    """A checkpoint's model (eval mode, CPU), its training config, and the run's dataset and split (from
    ``data_dir``, default the run's own), for evaluation."""
    state, meta = load_state(checkpoint)
    config = MedRecConfig.model_validate(meta["config"])
    dataset, _, splits = load_prepared(Path(data_dir or meta["data_dir"]))
    sizes = (len(dataset.diag_vocab), len(dataset.proc_vocab), len(dataset.med_vocab))
    return _restore_model(config, state, sizes), config, dataset, splits


def evaluate_medrec(
    checkpoint: str | Path,
    *,
    split: Literal["test", "val"] = "test",
    data_dir: str | Path | None = None,
    ddi_matrix: str | Path | None = None,
    ddi_pairs: str | Path | None = None,
    rounds: int | None = None,
    fraction: float | None = None,
    with_baselines: bool = False,
    ddi_guard: float | None = None,
) -> dict[str, Any]:
    """Score a checkpoint with the bootstrap protocol; a user's DDI matrix (``.npy``) or pairs file may replace the
    dataset's, and ``ddi_guard`` the run's prediction-time DDI cap."""
    model, config, dataset, splits = load_medrec_model(checkpoint, data_dir)
    if ddi_guard is not None:
        config.ddi_guard = ddi_guard
    if ddi_matrix is not None or ddi_pairs is not None:
        dataset.ddi = load_ddi(
            dataset.med_vocab, Path(ddi_pairs) if ddi_pairs else None, Path(ddi_matrix) if ddi_matrix else None
        )
    device = torch.device("cuda" if torch.cuda.is_available() and config.ray.use_gpu else "cpu")
    model.to(device)
    patients = splits[split]
    truths, probs = predict(model, dataset, patients, device)
    probs = guarded(config, dataset.ddi, probs)
    kwargs = {
        "rounds": rounds or config.bootstrap_rounds,
        "fraction": fraction or config.bootstrap_fraction,
        "seed": config.seed,
        "threshold": config.threshold,
    }
    out: dict[str, Any] = {
        "model": config.model,
        "split": split,
        "n_patients": len(patients),
        "test": bootstrap_rounds(truths, probs, dataset.ddi, **kwargs),
    }
    if with_baselines:
        t, p = previous_visit_probs(dataset, patients)
        out["baselines"] = {"previous_visit": bootstrap_rounds(t, p, dataset.ddi, **kwargs)}
    return out


__all__ = [
    "MedRecConfig",
    "MedRecResult",
    "MetricSummary",
    "bootstrap_rounds",
    "checkpoint_drug_names",
    "cohort_metrics",
    "ddi_guard_probs",
    "ddi_rate",
    "evaluate_medrec",
    "guarded",
    "drug_log_odds",
    "load_medrec_model",
    "load_prepared",
    "load_trained_medrec",
    "prepare_data",
    "best_checkpoint",
    "train_medrec",
    "TrainedMedRec",
    "visit_metrics",
    "visit_truths",
]
