"""Code vocabularies on top of the KG: ICD-9-CM / ICD-10-CM titles, hierarchy, crosswalk, code -> disease
links, drug name -> drug node, and SMILES.

EHRs store ICD codes in several spellings (MIMIC: "4280", "E8790", "V4581", "I509"); everything here
accepts them with or without the dot and with or without an "ICD9CM:"/"ICD10CM:" prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ehrflow.knowledge.graph import KnowledgeGraph, Node

IcdVersion = Literal[9, 10]
ICD_PREFIX = {9: "ICD9CM", 10: "ICD10CM"}
_VERSION_NAMES = {"9": 9, "10": 10, "ICD9": 9, "ICD10": 10, "ICD9CM": 9, "ICD10CM": 10}
DISEASE_TYPES = ("disease",)


def icd_version(version: int | str) -> IcdVersion:
    """9 or 10 from 9, "9", "ICD9CM", 10, "10", "ICD10CM" (MIMIC-IV's ``icd_version`` column is 9/10)."""
    key = str(version).strip().upper().replace("-", "")
    if key not in _VERSION_NAMES:
        raise ValueError(f"unknown ICD version {version!r}: expected 9 or 10")
    return 9 if _VERSION_NAMES[key] == 9 else 10


def format_icd(code: str, version: int | str) -> str:
    """The dotted form of an ICD-9-CM / ICD-10-CM diagnosis code: "4280" -> "428.0", "E8790" -> "E879.0",
    "V4581" -> "V45.81", "I509" -> "I50.9". Ranges and already dotted codes are kept."""
    v = icd_version(version)
    code = code.strip().upper()
    prefix = ICD_PREFIX[v] + ":"
    if code.startswith(prefix):
        code = code[len(prefix) :]
    if "-" in code or code.startswith("GROUP:"):
        return code
    bare = code.replace(".", "")
    if v == 10:
        head = 3
    elif bare.startswith("E"):
        head = 4
    else:
        head = 3  # numeric "428" and "V45" both have three characters before the dot
    return bare if len(bare) <= head else f"{bare[:head]}.{bare[head:]}"


def icd_node_id(code: str, version: int | str) -> str:
    """KG node id of an ICD code: ("4280", 9) -> "ICD9CM:428.0"."""
    v = icd_version(version)
    return f"{ICD_PREFIX[v]}:{format_icd(code, v)}"


@dataclass(frozen=True)
class CodeLink:
    """A KG disease reached from an ICD code, and how: the code itself, its ICD-10 equivalent, or an ancestor."""

    node: Node
    code: str
    """Node id of the ICD code that carries the link."""
    via: Literal["exact", "crosswalk", "ancestor"]
    distance: int
    """Hierarchy steps walked up from the queried code (0 for exact and crosswalk)."""


_STRENGTH = re.compile(
    r"\b\d+(?:[.,]\d+)?\s*(?:mg|mcg|µg|ug|g|kg|ml|l|meq|mmol|units?|u|iu|%|mg/ml|mcg/ml|units/ml)\b", re.IGNORECASE
)
_NUMBER = re.compile(r"\b\d+(?:[.,/]\d+)*\b")
_PARENS = re.compile(r"\([^)]*\)|\[[^\]]*\]")
_FORM_WORDS = frozenset(
    [
        "tab",
        "tabs",
        "tablet",
        "tablets",
        "cap",
        "caps",
        "capsule",
        "capsules",
        "inj",
        "injection",
        "soln",
        "solution",
        "susp",
        "suspension",
        "syrup",
        "elixir",
        "cream",
        "ointment",
        "oint",
        "gel",
        "patch",
        "drops",
        "neb",
        "nebulizer",
        "inhaler",
        "powder",
        "vial",
        "bag",
        "premix",
        "iv",
        "po",
        "pr",
        "sl",
        "im",
        "sc",
        "subq",
        "er",
        "sr",
        "xr",
        "xl",
        "dr",
        "ec",
        "cr",
        "odt",
        "liquid",
        "oral",
        "topical",
        "ophth",
        "ophthalmic",
        "chewable",
        "dose",
        "bolus",
        "infusion",
        "in",
        "ns",
        "d5w",
    ]
)
_SALT_WORDS = frozenset(
    [
        "hydrochloride",
        "hcl",
        "sodium",
        "sulfate",
        "acetate",
        "citrate",
        "maleate",
        "tartrate",
        "succinate",
        "besylate",
        "mesylate",
        "phosphate",
        "bromide",
        "fumarate",
        "hyclate",
        "monohydrate",
        "dihydrate",
        "trihydrate",
        "calcium",
        "magnesium",
        "disodium",
        "potassium",
    ]
)


class Vocabularies:
    """ICD and drug lookups backed by one ``KnowledgeGraph`` (the shipped default unless given)."""

    def __init__(self, kg: KnowledgeGraph | None = None):
        self.kg = kg if kg is not None else KnowledgeGraph.default()

    # ------------------------------------------------------------------ ICD codes

    def icd(self, code: str, version: int | str) -> Node | None:
        """The ICD code node, or None when the code is unknown."""
        return self.kg.get(icd_node_id(code, version))

    def title(self, code: str, version: int | str) -> str | None:
        node = self.icd(code, version)
        return None if node is None else node.name

    def parent(self, code: str, version: int | str) -> Node | None:
        """The next level up (category, block or chapter); None at the top or for unknown codes."""
        node = self.icd(code, version)
        return None if node is None else self._parent(node.id)

    def _parent(self, node_id: str) -> Node | None:
        parents = self.kg.neighbors(node_id, relations=["code_code"], direction="out", limit=1)
        return parents[0][1] if parents else None

    def ancestors(self, code: str, version: int | str) -> list[Node]:
        """Parent, grandparent, ... up to the chapter (nearest first)."""
        node = self.icd(code, version)
        chain: list[Node] = []
        seen = set()
        while node is not None and node.id not in seen:
            seen.add(node.id)
            node = self._parent(node.id)
            if node is not None:
                chain.append(node)
        return chain

    def icd9_to_icd10(self, code: str) -> list[Node]:
        """ICD-10-CM codes the CMS General Equivalence Mapping gives for an ICD-9-CM code."""
        node = self.icd(code, 9)
        if node is None:
            return []
        return [other for _, other in self.kg.neighbors(node.id, relations=["code_crosswalk"], direction="out")]

    def _linked_diseases(self, code_id: str) -> list[Node]:
        """Diseases naming this code: ``disease_xref`` edges, then node xrefs."""
        found = {
            other.id: other
            for _, other in self.kg.neighbors(code_id, relations=["disease_xref"], direction="in")
            if other.type in DISEASE_TYPES
        }
        for node in self.kg.by_xref(code_id):
            if node.type in DISEASE_TYPES:
                found.setdefault(node.id, node)
        return list(found.values())

    def diseases(self, code: str, version: int | str, walk_up: bool = True, crosswalk: bool = True) -> list[CodeLink]:
        """KG disease nodes for an ICD code, from the most specific evidence available: the code itself;
        else (ICD-9) its ICD-10-CM equivalents; else the nearest ancestor category that has links
        (never a block or chapter). Empty for unknown codes and codes no disease names (many injury/Z codes)."""
        v = icd_version(version)
        node_id = icd_node_id(code, v)
        if self.kg.get(node_id) is None:
            return []
        links = [CodeLink(d, node_id, "exact", 0) for d in self._linked_diseases(node_id)]
        if links:
            return links
        targets = [t.id for t in self.icd9_to_icd10(code)] if v == 9 and crosswalk else []
        links = _unique([CodeLink(d, t, "crosswalk", 0) for t in targets for d in self._linked_diseases(t)])
        if links or not walk_up:
            return links
        # Walk up the code's own hierarchy and, for ICD-9, that of its ICD-10 equivalents, one level at
        # a time; blocks and chapters ("E70-E88", "CH4") are too broad to name a disease.
        frontier = [node_id, *targets]
        for distance in range(1, 8):
            parents = [p for p in (self._parent(c) for c in frontier) if p is not None and not _is_block(p.id)]
            if not parents:
                return []
            links = _unique(
                [CodeLink(d, p.id, "ancestor", distance) for p in parents for d in self._linked_diseases(p.id)]
            )
            if links:
                return links
            frontier = list(dict.fromkeys(p.id for p in parents))
        return []

    # ------------------------------------------------------------------ drugs

    def drugs(self, name: str) -> list[Node]:
        """Drug nodes for a drug or prescription name ("Potassium Chloride", "Furosemide 40mg Tab",
        "Heparin Sodium"): exact/normalised lookup first, then without strength and form words, then
        without salt words."""
        for candidate in _drug_name_candidates(name):
            matches = self.kg.lexical_lookup(candidate, types=["drug"])
            if matches:
                return [m.node for m in matches]
        return []

    def smiles(self, drug: str) -> str | None:
        """SMILES for a drug node id or drug name, when the KG ships structures; else None."""
        if self.kg.get(drug) is not None:
            return self.kg.smiles(drug)
        for node in self.drugs(drug):
            if smiles := self.kg.smiles(node.id):
                return smiles
        return None


def _is_block(code_id: str) -> bool:
    """ICD ranges, chapters and named groups ("ICD10CM:E70-E88", "ICD10CM:CH4", "ICD9CM:GROUP:...")."""
    local = code_id.partition(":")[2]
    return "-" in local or local.startswith("GROUP:") or bool(re.fullmatch(r"CH\d+", local))


def _unique(links: list[CodeLink]) -> list[CodeLink]:
    seen: set[str] = set()
    unique = []
    for link in links:
        if link.node.id not in seen:
            seen.add(link.node.id)
            unique.append(link)
    return unique


def _drug_name_candidates(name: str) -> list[str]:
    """Progressively simpler spellings of a prescription name, most faithful first."""
    candidates = [name.strip()]
    text = _PARENS.sub(" ", name)
    text = _STRENGTH.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    words = [w for w in re.split(r"[\s,;/]+", text.lower()) if w and w not in _FORM_WORDS]
    candidates.append(" ".join(words))
    without_salts = [w for w in words if w not in _SALT_WORDS]
    if without_salts:
        candidates.append(" ".join(without_salts))
    return [c for c in dict.fromkeys(candidates) if c]
