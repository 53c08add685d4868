"""Per-patient predictions from a trained fusion checkpoint, for the patient-job workflow's ``predict`` node.

``FusionPredictor.from_checkpoint(path)`` loads the best-epoch model and the ``Normalizer`` it was
trained with; calling it with ``(patient, summary)`` featurises the patient's last inpatient
admission exactly as training did and returns one probability per output:
``{"mortality": p, "readmission": p, "phenotype/<group>": p, ...}`` (only the checkpoint's tasks).

The workflow summary (``HealthSummary.text``, the same text ``WorkflowResultStore.summaries`` gives
the trainer) is the summary modality when the model has one; without a summary the model falls
back to its other inputs, as it did for training stays without one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ehrflow.records.model import Admission, Patient
from ehrflow.training.features import FeatureReport, Normalizer, TextEncoder, extract_stays, load_text_encoder
from ehrflow.training.fusion import FusionTrainConfig, load_fusion_model, predict, to_tensors

if TYPE_CHECKING:
    from ehrflow.agents.types import HealthSummary
    from ehrflow.models.fusion import FusionModel

log = logging.getLogger(__name__)


class PredictionUnavailable(ValueError):
    """The patient cannot be scored by this model (no inpatient admission, no measurement in the window)."""


def _load_normalizer(meta: dict[str, Any], checkpoint: Path) -> Normalizer:
    """The checkpoint's own copy when it has one (self-contained), else the run's saved features directory."""
    if meta.get("normalizer"):
        return Normalizer.model_validate(meta["normalizer"])
    path = Path(meta.get("data_dir", "")) / "normalizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no normalizer in the checkpoint and {path} is missing")
    return Normalizer.model_validate_json(path.read_text())


def last_inpatient_admission(patient: Patient) -> Admission | None:
    """The most recent inpatient admission (ambulatory encounters carry no labels and are never scored)."""
    inpatient = [a for a in patient.admissions if a.inpatient]
    if not inpatient:
        return None
    return max(enumerate(inpatient), key=lambda ia: (ia[1].admit_time is not None, ia[1].admit_time, ia[0]))[1]


class FusionPredictor:
    """Callable ``(patient, summary) -> {output: probability}`` over a trained fusion model."""

    def __init__(
        self,
        model: FusionModel,
        normalizer: Normalizer,
        phenotype_names: list[str],
        text_encoder: TextEncoder | None = None,
    ):
        self.model = model.eval()
        self.normalizer = normalizer
        self.phenotype_names = phenotype_names
        self.text_encoder = text_encoder
        if model.cfg.uses_text and text_encoder is None:
            raise ValueError("the model uses text modalities: a text encoder is required")

    @classmethod
    def from_checkpoint(cls, path: str | Path, text_encoder: TextEncoder | None = None) -> FusionPredictor:
        """Load a checkpoint directory; the text encoder defaults to the one the run was configured with."""
        path = Path(path)
        model, meta = load_fusion_model(path)
        normalizer = _load_normalizer(meta, path)
        if model.cfg.uses_text and text_encoder is None:
            config = FusionTrainConfig.model_validate(meta["config"])
            text_encoder = load_text_encoder(config.text.encoder, config.text.cache_dir)
        names = list(meta.get("phenotype_names") or normalizer.config.phenotype_groups)
        return cls(model, normalizer, names, text_encoder)

    @property
    def outputs(self) -> list[str]:
        names: list[str] = []
        for task in self.model.cfg.tasks:
            names += [f"phenotype/{n}" for n in self.phenotype_names] if task == "phenotypes" else [task]
        return names

    def __call__(self, patient: Patient, summary: HealthSummary | None = None) -> dict[str, float]:
        """Probabilities for the patient's last inpatient admission; raises ``PredictionUnavailable``."""
        admission = last_inpatient_admission(patient)
        if admission is None:
            raise PredictionUnavailable("the patient has no inpatient admission to score")
        summary_text = summary.text if summary is not None and summary.statements else None
        summaries = {admission.id: summary_text} if summary_text else None
        report = FeatureReport()
        records = extract_stays(
            [patient.model_copy(update={"admissions": [admission]})], self.normalizer.config, report, summaries
        )
        if not records or not records[0].values.size:
            hours = self.normalizer.config.hours
            raise PredictionUnavailable(f"the last inpatient admission has no measurement in its first {hours:g} h")
        features = self.normalizer.transform(records, report, self.text_encoder if self.model.cfg.uses_text else None)
        if report.values_used == 0:
            raise PredictionUnavailable("none of the admission's measurements is a variable the model was trained on")
        log.debug("predictor features for %s: %s", admission.id, report.model_dump(exclude={"warnings"}))
        scores = predict(self.model, to_tensors(features, self.model.cfg), list(self.model.cfg.tasks))
        out: dict[str, float] = {}
        for task, values in scores.items():
            if task == "phenotypes":
                out.update({f"phenotype/{n}": float(p) for n, p in zip(self.phenotype_names, values[0], strict=True)})
            else:
                out[task] = float(values[0])
        return out


__all__ = ["FusionPredictor", "PredictionUnavailable", "last_inpatient_admission"]
