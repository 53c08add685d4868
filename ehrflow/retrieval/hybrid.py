"""Reciprocal rank fusion: combine rankings whose scores are not comparable (BM25 scores vs cosine similarities).

RRF (Cormack et al., SIGIR 2009) scores a document by ``sum(weight / (k + rank))`` over the rankings it appears in,
so only ranks matter. k=60 is the value from the paper and what CliniQ's fusion baseline uses.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

RRF_K = 60
Key = TypeVar("Key", bound=Hashable)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Key]], k: int = RRF_K, weights: Sequence[float] | None = None
) -> list[tuple[Key, float]]:
    """Fuses best-first rankings into one list of (key, RRF score), best first; ties keep first-seen order.

    Ranks start at 1. A key repeated within one ranking counts at its best rank only.
    """
    if k < 0:
        raise ValueError(f"RRF k must be >= 0, got {k}")
    if weights is not None and len(weights) != len(rankings):
        raise ValueError(f"RRF: {len(rankings)} rankings but {len(weights)} weights")
    fused: dict[Key, float] = {}
    for i, ranking in enumerate(rankings):
        weight = 1.0 if weights is None else float(weights[i])
        seen: set[Key] = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    order = {key: n for n, key in enumerate(fused)}
    return sorted(fused.items(), key=lambda item: (-item[1], order[item[0]]))


__all__ = ["RRF_K", "reciprocal_rank_fusion"]
