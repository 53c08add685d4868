"""Per-patient predictions from a trained fusion checkpoint, for the patient-job workflow's ``predict`` node.

``FusionPredictor.from_checkpoint(path)`` loads the best-epoch model and the ``Normalizer`` it was
trained with; calling it with ``(patient, summary)`` featurises the patient's last inpatient
admission exactly as training did and returns one probability per output:
``{"mortality": p, "readmission": p, "phenotype/<group>": p, ...}`` (only the checkpoint's tasks).

The workflow summary (``HealthSummary.text``, the same text ``WorkflowResultStore.summaries`` gives
the trainer) is the summary modality when the model has one; without a summary the model falls
back to its other inputs, as it did for training stays without one.

``MedicationPredictor.from_checkpoint(path)`` loads a medication-recommendation checkpoint
(``ehrflow train medrec``) and scores the patient's most recent admission with diagnosis codes,
given the drugs of the admissions before it, with the same code keys, drug mapping and vocabulary
as training: ``{"medication:<drug>": p, ...}`` for the drugs at or above the checkpoint's
threshold, plus ``"medications_recommended"`` (how many). ``PatientPredictor`` runs whichever of the
two models are configured (``models.fusion_checkpoint``, ``models.medrec_checkpoint``) as one callable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ehrflow.records.model import Admission, Patient
from ehrflow.training.features import FeatureReport, Normalizer, TextEncoder, extract_stays, load_text_encoder
from ehrflow.training.fusion import FusionTrainConfig, load_fusion_model, predict, to_tensors
from ehrflow.training.outputs import MEDICATION_PREFIX, MEDICATIONS_RECOMMENDED
from ehrflow.training.tree_blend import TreeBlend

if TYPE_CHECKING:
    from ehrflow.agents.types import HealthSummary
    from ehrflow.config import ModelSettings
    from ehrflow.models.fusion import FusionModel
    from ehrflow.training.medrec import MedRecConfig
    from ehrflow.training.medrec_data import DrugMapper

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
        blend: TreeBlend | None = None,
    ):
        self.model = model.eval()
        self.normalizer = normalizer
        self.phenotype_names = phenotype_names
        self.text_encoder = text_encoder
        self.blend = blend
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
        return cls(model, normalizer, names, text_encoder, TreeBlend.load(path))

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
        if self.blend is not None:
            scores = self.blend.apply(features, scores)
        out: dict[str, float] = {}
        for task, values in scores.items():
            if task == "phenotypes":
                out.update({f"phenotype/{n}": float(p) for n, p in zip(self.phenotype_names, values[0], strict=True)})
            else:
                out[task] = float(values[0])
        return out


class MedicationPredictor:
    """Callable ``patient -> {"medication:<drug>": probability}`` over a trained medication-recommendation model."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: MedRecConfig,
        diag_vocab: list[str],
        proc_vocab: list[str],
        med_vocab: list[str],
        mapper: DrugMapper | None,
        ddi: np.ndarray | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config
        self.diag_index = {w: i for i, w in enumerate(diag_vocab)}
        self.proc_index = {w: i for i, w in enumerate(proc_vocab)}
        self.med_vocab = med_vocab
        self.med_index = {w: i for i, w in enumerate(med_vocab)}
        self.mapper = mapper
        self.ddi = ddi
        self._notes: tuple[Any, Any] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MedicationPredictor:
        """The model of a medrec checkpoint, with the vocabularies it carries and the drug mapping files its training
        read (``data.mapping_dir``); the run's prepared data (every training visit) is not needed."""
        from ehrflow.training.medrec import load_trained_medrec
        from ehrflow.training.medrec_data import DrugMapper

        trained = load_trained_medrec(path)
        mapping_dir = trained.config.data.mapping_dir
        mapper = DrugMapper.from_dir(mapping_dir) if mapping_dir is not None else None
        return cls(
            trained.model,
            trained.config,
            trained.diag_vocab,
            trained.proc_vocab,
            trained.med_vocab,
            mapper,
            trained.ddi,
        )

    def _note_codes(self, admission: Admission) -> list[str]:
        from ehrflow.training.medrec_data import note_codes, note_extractor

        if not self.config.data.symptoms_from_notes or not admission.notes:
            return []
        if self._notes is None:
            self._notes = note_extractor(None)
        kg, extractor = self._notes
        return list(note_codes(extractor, kg, admission.notes)[0])

    def _encode(self, admission: Admission, with_drugs: bool) -> tuple[list[int], list[int], list[int]]:
        """One visit as vocabulary ids (diagnoses, procedures, and with ``with_drugs`` its drugs in the vocabulary)."""
        from ehrflow.training.medrec_data import OOV, order_drug, visit_codes

        diags, procs = visit_codes(admission)
        diags += [key for key in self._note_codes(admission) if key not in diags]
        meds: list[int] = []
        if with_drugs:
            for order in admission.medications:
                drug, _ = order_drug(order, self.mapper, self.config.data.unmapped_drugs)
                if drug in self.med_index:
                    meds.append(self.med_index[drug])
        return (
            list(dict.fromkeys(self.diag_index.get(c, OOV) for c in diags)),
            list(dict.fromkeys(self.proc_index.get(c, OOV) for c in procs)),
            list(dict.fromkeys(meds)),
        )

    @torch.no_grad()
    def probabilities(self, patient: Patient) -> np.ndarray:
        """Every drug's probability (``med_vocab`` order) for the latest admission with diagnoses, given the
        drugs of the admissions before it, after the checkpoint's ``ddi_guard``; raises ``PredictionUnavailable``."""
        from ehrflow.models.medrec import collate
        from ehrflow.training.medrec import guarded
        from ehrflow.training.medrec_data import visit_time

        admissions = sorted(patient.admissions, key=visit_time)
        target = next((i for i in range(len(admissions) - 1, -1, -1) if admissions[i].diagnoses), None)
        if target is None:
            raise PredictionUnavailable("the patient has no admission with diagnosis codes to recommend drugs for")
        # earlier visits count as training counted them: with diagnoses and a drug in the vocabulary
        history = [v for a in admissions[:target] if (v := self._encode(a, with_drugs=True))[0] and v[2]]
        visits = [*history, self._encode(admissions[target], with_drugs=False)]
        log.debug("medication predictor: %d earlier visits used for admission %s", len(history), admissions[target].id)
        probabilities = torch.sigmoid(self.model(collate([visits], len(self.med_vocab))))[0].numpy()
        return guarded(self.config, self.ddi, [probabilities])[0][-1]

    def __call__(self, patient: Patient, summary: HealthSummary | None = None) -> dict[str, float]:
        """The recommended drugs (probability >= the checkpoint's threshold), best first, and how many."""
        probabilities = self.probabilities(patient)
        chosen = sorted(np.flatnonzero(probabilities >= self.config.threshold), key=lambda i: -probabilities[i])
        return {
            **{MEDICATION_PREFIX + self.med_vocab[i]: float(probabilities[i]) for i in chosen},
            MEDICATIONS_RECOMMENDED: float(len(chosen)),
        }


class PatientPredictor:
    """The configured models as one callable: fusion outcomes and medication recommendations in one dict.

    A model that cannot score the patient is left out; ``PredictionUnavailable`` only when none can.
    """

    def __init__(self, fusion: FusionPredictor | None = None, medications: MedicationPredictor | None = None) -> None:
        self.models = [m for m in (fusion, medications) if m is not None]
        if not self.models:
            raise ValueError("PatientPredictor needs at least one model")

    @classmethod
    def from_settings(cls, models: ModelSettings) -> PatientPredictor | None:
        """Both checkpoints the settings name, or ``None`` when they name neither."""
        if models.fusion_checkpoint is None and models.medrec_checkpoint is None:
            return None
        return cls(
            FusionPredictor.from_checkpoint(models.fusion_checkpoint) if models.fusion_checkpoint else None,
            MedicationPredictor.from_checkpoint(models.medrec_checkpoint) if models.medrec_checkpoint else None,
        )

    def __call__(self, patient: Patient, summary: HealthSummary | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        reasons: list[str] = []
        for model in self.models:
            try:
                out.update(model(patient, summary))
            except PredictionUnavailable as err:
                reasons.append(str(err))
        if not out:
            raise PredictionUnavailable("; ".join(reasons))
        if reasons:
            log.debug("models left out for this patient: %s", "; ".join(reasons))
        return out


__all__ = [
    "FusionPredictor",
    "MedicationPredictor",
    "PatientPredictor",
    "PredictionUnavailable",
    "last_inpatient_admission",
]
