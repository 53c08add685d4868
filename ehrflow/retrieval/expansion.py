"""KG query expansion: the other ways a note may write what the query asks for.

A clinician asks about "myocardial infarction"; the note says "MI", "heart attack" or "NSTEMI". DR.EHR injects
such knowledge into training; here it is injected at query time instead: the query's spans are grounded to KG
nodes by exact/normalised lexical lookup (no dense guessing, so an expansion is always a known equivalent), and
each node contributes its synonyms, abbreviations and the names of its child concepts (hyponyms).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ehrflow.knowledge.graph import KnowledgeGraph, Node
from ehrflow.knowledge.text import abbreviations_in, casefold_key, is_abbreviation

TermKind = Literal["synonym", "abbreviation", "child"]
DEFAULT_NODE_TYPES: tuple[str, ...] = ("disease", "effect/phenotype", "drug")
HIERARCHY_RELATIONS: tuple[str, ...] = ("disease_disease", "phenotype_phenotype")
"""Edges that point child -> parent in the KG, so incoming ones lead to child concepts."""
MAX_SPAN_TOKENS = 6
_WORD = re.compile(r"[\w'’\-/]+")
_QUESTION_WORDS_TEXT = (
    "a an and any are as at be been by can did do does for from had has have he her his history if in is "
    "it me of on or past patient patients she show that the their there this to was were what when which "
    "who with"
)
_QUESTION_WORDS: frozenset[str] = frozenset(_QUESTION_WORDS_TEXT.split())
"""Single words never grounded on their own: question scaffolding, not clinical content."""


class ExpansionTerm(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    kind: TermKind
    node_id: str
    """The grounded node the term came from (for a child: the parent that was grounded)."""


class QueryExpansion(BaseModel):
    model_config = ConfigDict(frozen=True)

    query: str
    mentions: tuple[str, ...] = ()
    """The query spans that grounded to KG nodes."""
    node_ids: tuple[str, ...] = ()
    terms: tuple[ExpansionTerm, ...] = ()

    @property
    def texts(self) -> list[str]:
        return [t.text for t in self.terms]


class QueryExpander:
    """Grounds query spans to KG nodes lexically and lists their synonyms, abbreviations and children."""

    def __init__(
        self,
        kg: KnowledgeGraph,
        node_types: Iterable[str] = DEFAULT_NODE_TYPES,
        max_children: int = 20,
        max_terms: int = 40,
    ):
        self.kg = kg
        self.node_types = tuple(node_types)
        self.max_children = max_children
        self.max_terms = max_terms

    def ground(self, query: str) -> list[tuple[str, list[Node]]]:
        """Longest non-overlapping query spans (up to 6 words) that name KG nodes, left to right."""
        words = _WORD.findall(query)
        found: list[tuple[int, str, list[Node]]] = []
        taken = [False] * len(words)
        for size in range(min(MAX_SPAN_TOKENS, len(words)), 0, -1):
            for start in range(len(words) - size + 1):
                if any(taken[start : start + size]):
                    continue
                span = " ".join(words[start : start + size]).strip("'’-/")
                if size == 1 and not _groundable_word(span):
                    continue
                nodes = [m.node for m in self.kg.lexical_lookup(span, types=self.node_types)]
                if nodes:
                    found.append((start, span, nodes))
                    taken[start : start + size] = [True] * size
        return [(span, nodes) for _, span, nodes in sorted(found, key=lambda item: item[0])]

    def expand(self, query: str) -> QueryExpansion:
        """The expansion terms of ``query``, without the query's own spans and without repeats (case-insensitive)."""
        grounded = self.ground(query)
        seen = {casefold_key(span) for span, _ in grounded} | {casefold_key(query)}
        terms: list[ExpansionTerm] = []
        node_ids: list[str] = []

        def add(text: str, kind: TermKind, node_id: str) -> None:
            key = casefold_key(text)
            if key and key not in seen and len(terms) < self.max_terms:
                seen.add(key)
                terms.append(ExpansionTerm(text=text.strip(), kind=kind, node_id=node_id))

        for _, nodes in grounded:
            for node in nodes:
                node_ids.append(node.id)
                for label in (node.name, *node.synonyms):
                    add(label, "abbreviation" if is_abbreviation(label) else "synonym", node.id)
                    for short in abbreviations_in(label):
                        add(short, "abbreviation", node.id)
        for _, nodes in grounded:  # children after all synonyms, so a cap on terms drops children first
            for node in nodes:
                for _, child in self.kg.neighbors(
                    node.id, relations=HIERARCHY_RELATIONS, direction="in", limit=self.max_children
                ):
                    add(child.name, "child", node.id)
        return QueryExpansion(
            query=query,
            mentions=tuple(span for span, _ in grounded),
            node_ids=tuple(dict.fromkeys(node_ids)),
            terms=tuple(terms),
        )


def _groundable_word(word: str) -> bool:
    """One word grounds only if it is an abbreviation ("MI") or a content word of 4+ letters ("asthma")."""
    if is_abbreviation(word):
        return True
    return len(word) >= 4 and word.casefold() not in _QUESTION_WORDS and not word.isdigit()


__all__ = ["HIERARCHY_RELATIONS", "ExpansionTerm", "QueryExpander", "QueryExpansion", "TermKind"]
