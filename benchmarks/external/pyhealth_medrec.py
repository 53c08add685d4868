"""PyHealth 1.1.6's GAMENet or MLP on an ehrflow med-rec split: runs in its own virtual environment.

PyHealth pins ``pandas<2`` and ``urllib3<=1.26.15`` and imports torchvision, so it cannot share
the project's environment; ``make pyhealth-venv`` builds ``.venv-pyhealth`` (CPU torch 2.13.0,
pyhealth 1.1.6, numpy<2) and ``benchmarks/medrec.py --pyhealth-python .venv-pyhealth/bin/python``
calls this script once per cohort and split. It reads only the files ehrflow wrote for that run
(``dataset.json.gz``, ``ddi.npy``, ``split.json``), so it needs no ehrflow import.

What is PyHealth's and what is adapted:

- the models (``pyhealth.models.GAMENet``: embeddings, GRUs, graph memory, its loss;
  ``pyhealth.models.MLP`` with its defaults, on the visit's own diagnosis and procedure codes as
  ehrflow's MLP baseline), the trainer (``pyhealth.trainer.Trainer``: AdamW, best checkpoint by
  validation ``jaccard_samples``) and the sample layout of PyHealth's
  ``drug_recommendation_mimic3_fn`` (one sample per visit, the codes of that visit and all earlier
  ones, the drugs of earlier visits as history) are PyHealth's own;
- the DDI graph is the ehrflow run's ``ddi.npy`` (PyHealth would download its own ATC table, and
  nothing here fetches data), indexed by PyHealth's label vocabulary;
- visits with no diagnosis or no procedure code get the token ``<none>`` for that list, so every
  visit of the split is scored (PyHealth's task function drops such visits);
- ``GAMENetLayer.beta`` (the weight of the DDI memory) is created with ``torch.FloatTensor(1)`` and
  never initialised in PyHealth 1.1.6, so each run starts from whatever memory held (runs did not
  repeat, and a NaN start is possible). It is drawn from U(-0.1, 0.1) as GAMENet's own code does;
- torchvision from PyPI is built against CUDA torch and fails to import with the CPU wheel;
  PyHealth imports it only for image featurisers, so a stand-in module is installed before the
  import. Neither model touches it.

Writes ``OUT.npz`` (``probs``: test visits x ehrflow's drug vocabulary, patients in the split's
order, visits in time order) and ``OUT.json`` (training seconds of each epoch without validation
and their median, steps per epoch run and in a full epoch, best validation score, vocabulary coverage).

    .venv-pyhealth/bin/python benchmarks/external/pyhealth_medrec.py DATA_DIR OUT [--model gamenet|mlp] [--epochs 12]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import time
import types
from importlib.metadata import version
from pathlib import Path

import numpy as np

NONE_TOKEN = "<none>"


def _stand_in_torchvision() -> None:
    """PyHealth imports ``torchvision.transforms`` at package import; the med-rec models never use it."""
    vision = types.ModuleType("torchvision")
    vision.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
    sys.modules["torchvision"] = vision
    sys.modules["torchvision.transforms"] = vision.transforms  # type: ignore[attr-defined]


def _shared_columns(token2idx: dict[str, int], med_vocab: list[str]) -> tuple[list[int], list[int]]:
    """Column indices of the drugs both vocabularies hold: (PyHealth's, ehrflow's)."""
    pairs = [(token2idx[token], j) for j, token in enumerate(med_vocab) if token in token2idx]
    return [a for a, _ in pairs], [b for _, b in pairs]


def samples_of(doc: dict, patients: list[int]) -> list[dict]:
    """PyHealth's drug-recommendation samples: per visit, codes up to it, drugs of earlier visits
    (GAMENet's inputs), and the visit's own codes (the MLP's)."""
    diag_vocab, proc_vocab, med_vocab = doc["diag_vocab"], doc["proc_vocab"], doc["med_vocab"]
    samples = []
    for p in patients:
        conditions: list[list[str]] = []
        procedures: list[list[str]] = []
        drugs_hist: list[list[str]] = []
        for t, (diag, proc, meds) in enumerate(doc["visits"][p]):
            conditions.append([diag_vocab[i] for i in diag] or [NONE_TOKEN])
            procedures.append([proc_vocab[i] for i in proc] or [NONE_TOKEN])
            drugs = [med_vocab[i] for i in meds]
            samples.append(
                {
                    "patient_id": str(p),
                    "visit_id": f"{p}-{t}",
                    "conditions": [list(c) for c in conditions],
                    "procedures": [list(c) for c in procedures],
                    "visit_conditions": list(conditions[-1]),
                    "visit_procedures": list(procedures[-1]),
                    "drugs": drugs,
                    "drugs_hist": [list(d) for d in drugs_hist] + [[]],  # the visit's own drugs are the target
                }
            )
            drugs_hist.append(drugs)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="an ehrflow med-rec run's data directory")
    parser.add_argument("out", type=Path, help="output stem: OUT.npz and OUT.json")
    parser.add_argument("--model", choices=("gamenet", "mlp"), default="gamenet")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="samples (visits) per step")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap, for throughput runs on large cohorts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pyhealth-") as scratch:
        run(args, Path(scratch))


def run(args: argparse.Namespace, scratch: Path) -> None:
    """Train, pick the best validation epoch, write the test probabilities; ``scratch`` holds PyHealth's files."""
    os.environ["HOME"] = str(scratch)  # PyHealth writes its cache (and GAMENet's ddi_adj.npy) under ~/.cache
    _stand_in_torchvision()
    import torch
    from pyhealth.datasets import SampleEHRDataset, get_dataloader
    from pyhealth.models import MLP, GAMENet
    from pyhealth.trainer import Trainer
    from torch.utils.data import Subset

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    with gzip.open(args.data_dir / "dataset.json.gz", "rt") as fh:
        doc = json.load(fh)
    split = json.loads((args.data_dir / "split.json").read_text())
    ddi = np.load(args.data_dir / "ddi.npy")
    med_vocab = doc["med_vocab"]

    order = split["train"] + split["val"] + split["test"]
    samples = samples_of(doc, order)
    dataset = SampleEHRDataset(samples, dataset_name="ehrflow", task_name="drug_recommendation")
    sizes = {name: sum(len(doc["visits"][p]) for p in split[name]) for name in ("train", "val", "test")}
    bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
    subsets = {
        name: Subset(dataset, list(range(bounds[i], bounds[i + 1]))) for i, name in enumerate(("train", "val", "test"))
    }

    class EhrflowDDIGAMENet(GAMENet):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            with torch.no_grad():  # PyHealth leaves beta as uninitialised memory; GAMENet's code draws U(-0.1, 0.1)
                self.gamenet.beta.uniform_(-0.1, 0.1)

        def generate_ddi_adj(self) -> torch.Tensor:
            size = self.label_tokenizer.get_vocabulary_size()
            theirs, ours = _shared_columns(self.label_tokenizer.vocabulary.token2idx, med_vocab)
            adj = torch.zeros(size, size)
            adj[np.ix_(theirs, theirs)] = torch.as_tensor(ddi[np.ix_(ours, ours)], dtype=torch.float32)
            return adj

    class TimedTrainer(Trainer):
        """Times each epoch's training apart from its validation (the trainer validates at each epoch's end)."""

        mark: float
        epoch_seconds: list[float]

        def evaluate(self, dataloader):  # type: ignore[no-untyped-def]
            self.epoch_seconds.append(time.perf_counter() - self.mark)
            try:
                return super().evaluate(dataloader)
            finally:
                self.mark = time.perf_counter()

    if args.model == "gamenet":
        model = EhrflowDDIGAMENet(dataset)
    else:
        model = MLP(dataset, ["visit_conditions", "visit_procedures"], "drugs", "multilabel")
    trainer = TimedTrainer(model, metrics=["jaccard_samples"], device="cpu", output_path=str(scratch), exp_name="run")
    loaders = {
        name: get_dataloader(subsets[name], batch_size=args.batch_size, shuffle=name == "train")
        for name in ("train", "val", "test")
    }
    trainer.epoch_seconds = []
    trainer.mark = time.perf_counter()
    trainer.train(
        loaders["train"],
        loaders["val"],
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        monitor="jaccard_samples",
    )
    epoch_seconds = list(trainer.epoch_seconds)
    steps = args.steps_per_epoch or len(loaders["train"])
    best_val = Trainer.evaluate(trainer, loaders["val"])["jaccard_samples"]  # the best checkpoint is loaded at the end
    _, y_prob, _ = trainer.inference(loaders["test"])

    theirs, ours = _shared_columns(model.label_tokenizer.vocabulary.token2idx, med_vocab)
    probs = np.zeros((len(y_prob), len(med_vocab)), dtype=np.float32)
    probs[:, ours] = y_prob[:, theirs]
    np.savez(args.out.with_suffix(".npz"), probs=probs)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "model": "pyhealth.models." + ("GAMENet" if args.model == "gamenet" else "MLP"),
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seconds_per_epoch": float(np.median(epoch_seconds)),
                "epoch_seconds": epoch_seconds,
                "steps_per_epoch": steps,
                "full_epoch_steps": len(loaders["train"]),
                "train_visits": sizes["train"],
                "val_jaccard_samples": best_val,
                "drugs_in_pyhealth_vocabulary": len(ours),
                "drugs": len(med_vocab),
                "test_visits": int(len(y_prob)),
                "versions": {name: version(name) for name in ("pyhealth", "torch", "pandas", "numpy")},
            }
        )
    )


if __name__ == "__main__":
    main()
