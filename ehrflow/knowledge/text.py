"""String keys shared by KG lexical lookup and entity grounding, so both sides match the same way."""

from __future__ import annotations

import re
import unicodedata

_POSSESSIVE = re.compile(r"(\w)['’]s\b")
_NON_WORD = re.compile(r"[^\w]+|_")
_ABBREVIATION = re.compile(r"^(?=.*[A-Z])[A-Z0-9][A-Za-z0-9\-/.]{0,9}$")
_PARENTHESISED = re.compile(r"\(([^()]{2,10})\)")
_PLURAL_KEEP = ("ss", "us", "is", "ous", "sis", "xis")


def casefold_key(text: str) -> str:
    """The key for exact (case-insensitive) name/synonym matches: only case and outer/inner spacing differ."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())


def _singular(token: str) -> str:
    if len(token) <= 3 or token.isdigit():
        return token
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith("s") and not token.endswith(_PLURAL_KEEP):
        return token[:-1]
    return token


def normalize(text: str) -> str:
    """Lower-case, drop accents and punctuation, collapse spaces, strip possessives and simple plurals.

    Applied to both the query and the KG strings, so crude rules ("diabetes" -> "diabete") still
    match consistently; "Crohn's Disease", "crohn disease" and "Crohns disease" share one key.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = _POSSESSIVE.sub(r"\1", text.casefold())
    tokens = _NON_WORD.sub(" ", text).split()
    return " ".join(_singular(t) for t in tokens)


def is_abbreviation(text: str) -> bool:
    """Short, space-free, upper-case-led strings such as "CHF", "MEN2A", "COVID-19" are treated as abbreviations."""
    text = text.strip()
    if not _ABBREVIATION.match(text):
        return False
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 2 and sum(c.isupper() for c in letters) >= max(2, len(letters) - 1)


def abbreviations_in(text: str) -> list[str]:
    """Abbreviations written in parentheses inside a label, e.g. "... pulmonary disease (COPD)"."""
    return [m.strip() for m in _PARENTHESISED.findall(text) if is_abbreviation(m.strip())]


_ABBREVIATION_CODE = re.compile(r"^([A-Za-z]+)-?(\d[0-9A-Za-z]*)$")
_DIGITS = re.compile(r"\d+")


def series_code(text: str) -> tuple[str, str] | None:
    """An abbreviation of a numbered series split into (letters, code): "DFNB63" -> ("DFNB", "63"),
    "CMT2B1" -> ("CMT", "2b1"). ``None`` for anything else."""
    text = text.strip()
    match = _ABBREVIATION_CODE.match(text) if is_abbreviation(text) else None
    return (match.group(1).upper(), match.group(2).lower()) if match else None


def number_tokens(text: str) -> frozenset[str]:
    """The subtype numbers a mention or label names: "63" in "deafness 63" or "DFNB63", "1a" in "type 1A".

    Dense embeddings barely see these ("deafness 61" and "deafness 63" embed almost alike), so grounding
    checks them lexically.
    """
    code = series_code(text)
    if code is not None:
        return frozenset({code[1]})
    return frozenset(t for t in normalize(text).split() if any(c.isdigit() for c in t))


def digit_runs(tokens: frozenset[str]) -> frozenset[str]:
    """The bare numbers inside number tokens ("2b1" -> "2", "1"), for a looser agreement test."""
    return frozenset(run for token in tokens for run in _DIGITS.findall(token))


_XREF_PREFIXES = {
    "UMLS_CUI": "UMLS",
    "UMLSCUI": "UMLS",
    "UMLS": "UMLS",
    "MIM": "OMIM",
    "OMIM": "OMIM",
    "ICD9": "ICD9CM",
    "ICD9CM": "ICD9CM",
    "ICD10CM": "ICD10CM",
    "ICD10WHO": "ICD10",
    "ICD-10": "ICD10",
    "MESH": "MESH",
    "MESH_DESCRIPTOR_UI": "MESH",
    "MESH_SUPPLEMENTAL_RECORD_UI": "MESH",
    "SCTID": "SNOMEDCT",
    "SNOMEDCT": "SNOMEDCT",
    "SNOMEDCT_US": "SNOMEDCT",
    "ORPHANET": "ORPHA",
    "ORDO": "ORPHA",
    "ORPHA": "ORPHA",
    "NCI": "NCIT",
    "NCIT": "NCIT",
    "DRUGBANK_ID": "DRUGBANK",
    "DRUGBANK": "DRUGBANK",
    "CHEMBL_ID": "CHEMBL",
    "PUBCHEM_CID": "PUBCHEM",
    "RXNORM": "RXNORM",
    "CHEBI": "CHEBI",
    "DOID": "DOID",
    "HP": "HP",
    "MEDGEN": "MEDGEN",
}


def canonical_xref(xref: str) -> str:
    """One spelling per vocabulary: "UMLS_CUI:C1" / "UMLSCUI:C1" -> "UMLS:C1", "MIM:1" -> "OMIM:1", "ICD9:1" -> "ICD9CM:1".

    Unknown prefixes are kept as written (upper-cased), so nothing is lost.
    """
    prefix, sep, local = xref.strip().partition(":")
    if not sep:
        return xref.strip()
    key = prefix.upper()
    if key.startswith("SNOMEDCT_US_"):  # versioned SNOMED prefixes such as SNOMEDCT_US_2025_09_01
        key = "SNOMEDCT"
    canonical = _XREF_PREFIXES.get(key, key)
    if canonical == "CHEBI" and local.upper().startswith("CHEBI:"):
        local = local[6:]
    return f"{canonical}:{local.strip()}"
