"""What a workflow needs, built once per process (or per Ray actor) from ``Settings``."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ehrflow.agents.extraction import ExtractionAgent
from ehrflow.agents.grounding import GroundingAgent
from ehrflow.agents.retrieval import RetrievalAgent
from ehrflow.agents.summary import SummaryAgent
from ehrflow.agents.timeseries import TimeSeriesFindings
from ehrflow.config import Settings
from ehrflow.records.model import Patient
from ehrflow.records.store import PatientStore

log = logging.getLogger(__name__)


class PatientNotFound(KeyError):
    def __str__(self) -> str:
        return f"patient {self.args[0]!r} is not in the patient store"


@dataclass
class WorkflowDeps:
    store: PatientStore
    kg: Any
    extraction: ExtractionAgent
    timeseries: TimeSeriesFindings
    grounding: GroundingAgent
    retrieval: RetrievalAgent
    summary: SummaryAgent
    llm: Any = None
    note_index: Any = None
    predictor: Callable[..., dict[str, float]] | None = None
    _patients: OrderedDict[str, Patient] = field(default_factory=OrderedDict, repr=False)

    def patient(self, patient_id: str) -> Patient:
        """The patient record, cached for the few nodes of one job."""
        if patient_id not in self._patients:
            patient = self.store.get(patient_id)
            if patient is None:
                raise PatientNotFound(patient_id)
            self._patients[patient_id] = patient
            while len(self._patients) > 8:
                self._patients.popitem(last=False)
        return self._patients[patient_id]

    @classmethod
    def from_settings(
        cls, settings: Settings, *, llm: Any = None, embedder: Any = None, predictor: Any = None, progress: bool = False
    ) -> WorkflowDeps:
        """Open the stores, the KG and its entity index (built on first use), the note index, the LLM and the
        trained model. ``llm``, ``embedder`` and ``predictor`` replace the configured ones (Serve passes handles)."""
        from ehrflow.knowledge import KnowledgeGraph
        from ehrflow.llm import build_llm
        from ehrflow.retrieval import EntityIndex, chroma_client

        kg = KnowledgeGraph.open(settings.knowledge.path) if settings.knowledge.path else KnowledgeGraph.default()
        client = chroma_client(path=settings.chroma_path, host=settings.chroma.host, port=settings.chroma.port)
        entity_index = EntityIndex.from_config(kg, settings.grounding, client)
        if settings.grounding.mode != "lexical":
            entity_index.build(progress=progress)
        note_index = open_note_index(settings, client, kg, embedder)
        llm = llm if llm is not None else build_llm(settings.llm)
        if predictor is None:
            from ehrflow.training.predictor import PatientPredictor

            predictor = PatientPredictor.from_settings(settings.models)
        return cls(
            store=PatientStore(settings.patient_store_url),
            kg=kg,
            extraction=ExtractionAgent(kg, llm, settings.extraction),
            timeseries=TimeSeriesFindings(),
            grounding=GroundingAgent(kg, entity_index),
            retrieval=RetrievalAgent(kg, note_index, settings.retrieval),
            summary=SummaryAgent(llm, settings.summary),
            llm=llm,
            note_index=note_index,
            predictor=predictor,
        )


def build_embedder(settings: Settings) -> Any:
    """The configured note embedder (all-MiniLM-L6-v2 by default, or a fine-tuned retriever directory)."""
    from ehrflow.retrieval import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        settings.embedder.model, backend=settings.embedder.backend, device=settings.embedder.device
    )


def open_note_index(settings: Settings, client: Any = None, kg: Any = None, embedder: Any = None) -> Any:
    """The patients' note index in the configured Chroma, embedded with ``embedder`` or the configured one."""
    from ehrflow.retrieval import NoteIndex, chroma_client

    if client is None:
        client = chroma_client(path=settings.chroma_path, host=settings.chroma.host, port=settings.chroma.port)
    return NoteIndex(embedder or build_embedder(settings), client, kg=kg)
