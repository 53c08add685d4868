"""ExtractionAgent: notes -> diseases, symptoms, procedures and medications that are the patient's.

Hybrid, as the design requires: the KG lexical matcher proposes mentions (the floor that always
works, whatever the model), negation and family-history context removes those that are not the
patient's, and the LLM may add mentions and flag proposed ones as not the patient's. Like EMERGE,
an entity is kept only if its text occurs in the note; a small model's inventions cannot pass.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ehrflow.agents.negation import is_family, is_negated, is_not_a_condition, sentences, words
from ehrflow.agents.prompts import render
from ehrflow.agents.types import Entity, EntityKind
from ehrflow.knowledge.text import normalize
from ehrflow.records.model import Note

log = logging.getLogger(__name__)

MAX_NGRAM = 6
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "or",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "by",
        "from",
        "as",
        "is",
        "was",
        "are",
        "were",
        "be",
        "been",
        "has",
        "have",
        "had",
        "this",
        "that",
        "these",
        "those",
        "patient",
        "patients",
        "history",
        "left",
        "right",
        "no",
        "not",
        "mg",
        "ml",
        "oral",
        "tablet",
        "day",
        "daily",
        "year",
        "old",
        "male",
        "female",
        "he",
        "she",
        "his",
        "her",
        "who",
        "which",
        "will",
        "would",
        "can",
        "may",
        "per",
        "unit",
        "units",
        "dose",
        "pain-free",
        "normal",
        "other",
        "new",
        "today",
        "yesterday",
    ]
)
_NODE_KIND: dict[str, EntityKind] = {
    "disease": "disease",
    "effect/phenotype": "symptom",
    "drug": "medication",
    "pharmacologic_class": "medication",
}
_SEMANTIC_TAG = re.compile(
    r"\s*\((?:disorder|finding|situation|procedure|morphologic abnormality|qualifier value)\)", re.I
)


class ExtractionConfig(BaseModel):
    mode: Literal["lexical", "llm", "hybrid"] = "hybrid"
    node_types: tuple[str, ...] = ("disease", "effect/phenotype", "drug")
    max_note_chars: int = Field(1500, gt=0)
    """How much of each note the LLM sees per call (the local model has a 2k-token context)."""
    max_llm_entities: int = Field(8, gt=0, le=32)
    llm_max_tokens: int = Field(256, gt=0)
    max_llm_notes: int | None = Field(4, gt=0)
    """The LLM reads only the patient's most recent notes (``None``: all); lexical extraction reads every note.
    Bounds a job's cost on a laptop: a long stay has dozens of notes and the local model takes seconds per note."""


class _LLMEntity(BaseModel):
    text: str = Field(max_length=60)
    kind: Literal["disease", "symptom", "procedure", "medication"]


class LLMExtraction(BaseModel):
    """What the LLM returns per note: bounded, so small models terminate."""

    entities: list[_LLMEntity] = Field(default_factory=list, max_length=8)
    not_about_patient: list[Annotated[str, Field(max_length=60)]] = Field(default_factory=list, max_length=8)


class ExtractionAgent:
    def __init__(self, kg, llm=None, config: ExtractionConfig | None = None):  # noqa: ANN001
        self.kg = kg
        self.llm = llm
        self.config = config or ExtractionConfig()

    def __call__(self, notes: Iterable[Note]) -> list[Entity]:
        notes = list(notes)
        by_recency = sorted(range(len(notes)), key=lambda i: (notes[i].time is not None, notes[i].time), reverse=True)
        for_llm = set(by_recency[: self.config.max_llm_notes] if self.config.max_llm_notes else by_recency)
        out: list[Entity] = []
        for i, note in enumerate(notes):
            proposed = self.lexical(note) if self.config.mode in ("lexical", "hybrid") else []
            if self.config.mode in ("llm", "hybrid") and self.llm is not None and i in for_llm:
                proposed = self._with_llm(note, proposed)
            out.extend(proposed)
        return _dedupe(out)

    def lexical(self, note: Note) -> list[Entity]:
        """KG-matched mentions (longest match first, no overlaps), with negation and family context."""
        found: list[Entity] = []
        text = note.text
        for sent in sentences(text):
            toks = words(sent.text)
            taken = [False] * len(toks)
            for n in range(min(MAX_NGRAM, len(toks)), 0, -1):
                for i in range(len(toks) - n + 1):
                    if any(taken[i : i + n]):
                        continue
                    span = sent.text[toks[i].start() : toks[i + n - 1].end()]
                    if not self._worth_looking_up(span, n):
                        continue
                    matches = [
                        m
                        for m in self.kg.lexical_lookup(_SEMANTIC_TAG.sub("", span), types=self.config.node_types)
                        if self.kg.names_a_condition(m.node.id)
                    ]
                    if not matches:
                        continue
                    best = matches[0]
                    for k in range(i, i + n):
                        taken[k] = True
                    s, e = toks[i].start(), toks[i + n - 1].end()
                    if best.node.type != "drug" and is_not_a_condition(sent.section, sent.text, s, e):
                        continue  # a vaccine, screening or procedure named after a condition
                    found.append(
                        Entity(
                            text=span,
                            kind=_NODE_KIND.get(best.node.type, "other"),
                            origin="lexical",
                            note_id=note.id,
                            start=sent.start + s,
                            end=sent.start + e,
                            section=sent.section,
                            negated=is_negated(sent.text, s, e),
                            family=is_family(sent.section, sent.text, s),
                            candidate_node_id=best.node.id,
                        )
                    )
        return found

    def lexical_mentions(self, text: str) -> list[Entity]:
        """The patient's own (not negated, not family) KG mentions in free text, e.g. a chat question."""
        return [e for e in self.lexical(Note(id="query", text=text)) if not e.negated and not e.family]

    @staticmethod
    def _worth_looking_up(span: str, n: int) -> bool:
        tokens = normalize(span).split()
        if not tokens or all(t in _STOP for t in tokens) or tokens[0] in _STOP or tokens[-1] in _STOP:
            return False
        if n == 1:
            word = span.strip()
            # Single words: real words of 4+ letters, or upper-case abbreviations (MI, CHF, COPD).
            return (len(word) >= 4 and word.isalpha()) or (word.isupper() and 2 <= len(word) <= 6)
        return True

    def _with_llm(self, note: Note, proposed: list[Entity]) -> list[Entity]:
        from ehrflow.llm import LLMContextError, LLMOutputError

        excerpt = note.text[: self.config.max_note_chars]
        candidates = sorted({e.text for e in proposed if not e.negated and not e.family})
        messages = render("extraction", note=excerpt, candidates="; ".join(candidates[:30]) or "(none)")
        try:
            answer = self.llm.structured(messages, LLMExtraction, max_tokens=self.config.llm_max_tokens)
        except (LLMOutputError, LLMContextError) as err:
            log.warning("extraction LLM call failed for one note, keeping lexical mentions: %s", err)
            return proposed
        flagged = {normalize(t) for t in answer.not_about_patient}
        kept = [e for e in proposed if normalize(e.text) not in flagged]
        lower = note.text.lower()
        spans = sentences(note.text)
        for item in answer.entities[: self.config.max_llm_entities]:
            mention = item.text.strip()
            at = lower.find(mention.lower()) if len(mention) >= 3 else -1
            if at < 0:
                continue  # not in the note: an invention, dropped
            sent = next((s for s in spans if s.start <= at < s.end), None)
            rel_s = at - sent.start if sent else 0
            rel_e = rel_s + len(mention)
            kept.append(
                Entity(
                    text=note.text[at : at + len(mention)],
                    kind=item.kind,
                    origin="llm",
                    note_id=note.id,
                    start=at,
                    end=at + len(mention),
                    section=sent.section if sent else None,
                    negated=is_negated(sent.text, rel_s, rel_e) if sent else False,
                    family=is_family(sent.section, sent.text, rel_s) if sent else False,
                )
            )
        return kept


def _dedupe(entities: list[Entity]) -> list[Entity]:
    """One entity per (note, normalised text, negated, family); lexical wins over LLM."""
    seen: dict[tuple[str | None, str, bool, bool], Entity] = {}
    for e in sorted(entities, key=lambda e: e.origin != "lexical"):
        key = (e.note_id, normalize(e.text), e.negated, e.family)
        seen.setdefault(key, e)
    return list(seen.values())
