"""BM25 over note chunks with the ``bm25s`` library and a Lucene-like analyser.

The analyser follows Anserini (Lucene's ``EnglishAnalyzer``): split on non-word characters, lower-case, drop
Lucene's 33 English stop words, Porter-stem. Lone letters are dropped (the possessive "s", initials) but lone digits
are kept ("type 2"). With k1=0.9, b=0.4 this lands on Anserini's published BM25 figure for BEIR SciFact (nDCG@10
0.675 against 0.665-0.679; keeping lone letters gives 0.680, see ``benchmarks/retrieval_beir.py``), so the
lexical baseline here is the standard one. Abbreviations such as "MI" survive as the token "mi".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

_LUCENE_STOPWORDS_TEXT = (
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with"
)
LUCENE_STOPWORDS: frozenset[str] = frozenset(_LUCENE_STOPWORDS_TEXT.split())
"""Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET``, which Anserini's BEIR baselines use."""

_TOKEN = re.compile(r"[^\W_]{2,}|\d", re.UNICODE)
DEFAULT_K1 = 0.9
DEFAULT_B = 0.4
_INDEX_FORMAT = "1"


@cache
def _stemmer() -> Any:
    """PyStemmer's Porter stemmer (C, fast); plain lower-cased tokens if it is not installed."""
    try:
        import Stemmer
    except ImportError:  # pragma: no cover - PyStemmer is installed beside bm25s
        return None
    return Stemmer.Stemmer("porter")


def analyze(text: str) -> list[str]:
    """Lucene-like tokens of ``text``: lower-cased, stop words removed, Porter-stemmed."""
    tokens = [t for t in _TOKEN.findall(text.lower()) if t not in LUCENE_STOPWORDS]
    stemmer = _stemmer()
    return stemmer.stemWords(tokens) if stemmer is not None and tokens else tokens


class BM25Index:
    """An immutable BM25 index over (id, text) pairs; build it again when the texts change."""

    def __init__(self, ids: Sequence[str], retriever: Any, k1: float, b: float):
        self.ids = list(ids)
        self._retriever = retriever
        self.k1 = k1
        self.b = b

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], k1: float = DEFAULT_K1, b: float = DEFAULT_B) -> BM25Index:
        """Tokenises and indexes ``texts``; ``ids[i]`` names ``texts[i]`` in results."""
        import bm25s

        if len(ids) != len(texts):
            raise ValueError(f"BM25Index.build: {len(ids)} ids but {len(texts)} texts")
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        if ids:
            retriever.index([analyze(t) for t in texts], show_progress=False)
        return cls(ids, retriever if ids else None, k1, b)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every document for ``query`` (zeros when no query token is in the vocabulary)."""
        return self.scores_for_tokens(analyze(query))

    def scores_for_tokens(self, tokens: Iterable[str]) -> np.ndarray:
        """Scores for an already-analysed query; repeated tokens count once, so expansions cannot inflate a term."""
        if self._retriever is None:
            return np.zeros(0, dtype=np.float32)
        vocab = self._retriever.vocab_dict
        token_ids = sorted({vocab[t] for t in tokens if t and t in vocab})
        if not token_ids:
            return np.zeros(len(self.ids), dtype=np.float32)
        return self._retriever.get_scores_from_ids(token_ids)

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best (id, score) pairs, best first; documents that share no token with the query are left out."""
        return self.top(self.scores(query), k)

    def search_tokens(self, tokens: Iterable[str], k: int = 10) -> list[tuple[str, float]]:
        return self.top(self.scores_for_tokens(tokens), k)

    def top(self, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
        if k <= 0 or not len(scores):
            return []
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(self.ids[i], float(scores[i])) for i in best if scores[i] > 0]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Writes the index and ``extra`` (e.g. the collection revision it was built from) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._retriever is not None:
            self._retriever.save(str(directory / "bm25s"))
        meta = {"format": _INDEX_FORMAT, "k1": self.k1, "b": self.b, "ids": self.ids, **(extra or {})}
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(directory / "meta.json")  # written last: a half-written index has no meta and is rebuilt

    @classmethod
    def load(cls, directory: str | Path) -> tuple[BM25Index, dict[str, Any]] | None:
        """The index saved in ``directory`` and its metadata, or ``None`` when there is none (or an old format)."""
        import bm25s

        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != _INDEX_FORMAT:
            return None
        ids = meta["ids"]
        retriever = bm25s.BM25.load(str(directory / "bm25s")) if ids else None
        return cls(ids, retriever, float(meta["k1"]), float(meta["b"])), meta


__all__ = ["DEFAULT_B", "DEFAULT_K1", "LUCENE_STOPWORDS", "BM25Index", "analyze"]
