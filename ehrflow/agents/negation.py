"""Sections, sentences and NegEx-style negation / family-history context for note mentions.

A negated mention ("denies chest pain") or one about a relative ("mother had breast cancer",
anything under a Family History header) is not the patient's and must not reach the summary.
The rules follow NegEx (Chapman et al., 2001): a trigger phrase negates mentions within a few
tokens after it (pre-triggers) or before it (post-triggers), and a termination word ("but",
"however") ends its scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PRE_NEGATION = (
    "no",
    "not",
    "denies",
    "denied",
    "deny",
    "without",
    "negative for",
    "no evidence of",
    "no signs of",
    "no sign of",
    "no history of",
    "free of",
    "absence of",
    "rules out",
    "ruled out",
    "rule out",
    "never had",
    "resolved",
    "no known",
    "none",
)
_POST_NEGATION = (
    "was ruled out",
    "is ruled out",
    "has been ruled out",
    "unlikely",
    "was negative",
    "absent",
    "not seen",
)
_TERMINATION = ("but", "however", "although", "though", "except", "aside from", "apart from", "which", "yet")
_FAMILY = (
    "family history",
    "mother",
    "father",
    "sister",
    "brother",
    "aunt",
    "uncle",
    "grandmother",
    "grandfather",
    "cousin",
    "sibling",
    "son",
    "daughter",
    "parents",
    "maternal",
    "paternal",
)
NEGATION_WINDOW = 6
"""Tokens a pre-negation trigger reaches, as in NegEx."""

_HEADER_MD = re.compile(r"^\s*#+\s*(?P<name>[^\n#]{2,60}?)\s*$")
_HEADER_COLON = re.compile(r"^\s*(?P<name>[A-Z][A-Za-z /&()-]{2,50}):(?:\s|$)")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'/-]*")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    text: str
    section: str | None


def _phrase_re(phrases: tuple[str, ...]) -> re.Pattern[str]:
    alts = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"\b(?:{alts})\b", re.IGNORECASE)


_PRE_RE = _phrase_re(_PRE_NEGATION)
_POST_RE = _phrase_re(_POST_NEGATION)
_TERM_RE = _phrase_re(_TERMINATION)
_FAMILY_RE = _phrase_re(_FAMILY)


def sentences(text: str) -> list[Span]:
    """Sentences with character offsets and the section header they fall under (lower-case)."""
    out: list[Span] = []
    section: str | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        header = _HEADER_MD.match(line) or _HEADER_COLON.match(line)
        if header:
            section = header.group("name").strip().lower()
            rest_start = header.end() if _HEADER_COLON.match(line) else len(line)
        else:
            rest_start = 0
        body = line[rest_start:]
        offset = pos + rest_start
        start = 0
        for m in _SENTENCE_END.finditer(body):
            piece = body[start : m.start()]
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                out.append(Span(offset + start + lead, offset + m.start(), piece.strip(), section))
            start = m.end()
        piece = body[start:]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            out.append(Span(offset + start + lead, offset + start + lead + len(piece.strip()), piece.strip(), section))
        pos += len(line)
    return out


def is_negated(sentence: str, mention_start: int, mention_end: int) -> bool:
    """Whether the mention at [start, end) of ``sentence`` lies in a negation trigger's scope."""
    before = sentence[:mention_start]
    for trig in _PRE_RE.finditer(before):
        between = before[trig.end() :]
        if _TERM_RE.search(between):
            continue
        if len(_WORD.findall(between)) <= NEGATION_WINDOW:
            return True
    after = sentence[mention_end:]
    post = _POST_RE.search(after)
    return bool(
        post
        and not _TERM_RE.search(after[: post.start()])
        and len(_WORD.findall(after[: post.start()])) <= NEGATION_WINDOW
    )


def is_family(section: str | None, sentence: str, mention_start: int) -> bool:
    """Whether the mention is about a relative: a Family History section, or a relative named before it."""
    if section and "family" in section:
        return True
    return bool(_FAMILY_RE.search(sentence[:mention_start]))


def words(text: str) -> list[re.Match[str]]:
    return list(_WORD.finditer(text))


_NOT_A_CONDITION_SECTIONS = ("immuniz", "vaccin", "procedure", "screening")
_ORDERED_BEFORE = re.compile(r"\b(?:screening|assessment|evaluation|test(?:ing)?)\s+(?:for|of)\s+$", re.IGNORECASE)
_ORDERED_AFTER = re.compile(
    r"^\s*(?:,\s*seasonal|screening|assessment|vaccine|vaccination|immunization|\(procedure\))", re.I
)


def is_not_a_condition(section: str | None, sentence: str, start: int, end: int) -> bool:
    """Whether a disease or symptom name stands for something done, not something the patient has:
    an immunisation ("influenza, seasonal, injectable"), a screening or assessment ("depression
    screening", "assessment of anxiety"), or any mention under an immunisation or procedure header."""
    if section and any(key in section for key in _NOT_A_CONDITION_SECTIONS):
        return True
    return bool(_ORDERED_BEFORE.search(sentence[:start]) or _ORDERED_AFTER.match(sentence[end:]))
