"""Ordering: how the heavy ranker's candidates become the list a user is served.

The last step of the funnel, configured by ``serving.ordering`` (``configs.OrderingConfig``):

1. **Final score.** The heavy ranker's weighted multi-signal score, optionally blended with how
   highly retrieval placed the item among the candidates it returned, and with how strongly the
   user's history points at the item (item-to-item affinity, ``models/item_affinity.py``)::

       final = (1 - retrieval_weight - affinity_weight) * heavy_score
               + retrieval_weight * retrieval_percentile + affinity_weight * affinity_percentile

   ``retrieval_percentile`` is the share of the request's retrieved candidates whose retrieval score
   is at most the item's; ``affinity_percentile`` the share of the heavy ranker's candidates whose
   affinity is at most the item's (both in [0, 1]), so every term shares a scale and ``final`` stays
   in [0, 1] whatever the two-tower's or the affinity's score range. Why blend: each stage sees the
   user differently (retrieval was trained against the whole catalog with in-batch negatives, the
   rankers on sampled rows, the affinity reads the user's items one by one), and on MovieLens-100K
   the blend beat each alone (README, "Offline evaluation").
2. **Exploration** (``exploration_temperature`` > 0): instead of sorting, the list is sampled
   without replacement with probabilities ``softmax(final / temperature)`` (Plackett-Luce, drawn
   with the Gumbel-top-k trick), so items just below the cut are shown now and then and the logs
   that train the next model are not only the current model's favourites. 0 = deterministic.
3. **Business rules**: ``max_per_category`` keeps at most that many items of one value of
   ``category_column`` in the list (diversity); the best remaining items of other categories fill
   the freed places. If every candidate is used up, the list is shorter than k rather than breaking
   the rule.

Pure functions over numpy arrays, imported by the ordering stage (``serving/stages.py``) and by the
offline evaluation, so what is measured offline is what is served.
"""

from __future__ import annotations

import numpy as np


def percentile_among(item_scores: np.ndarray, candidate_scores: np.ndarray) -> np.ndarray:
    """Share of ``candidate_scores`` at most each of ``item_scores`` (0 for an empty candidate list)."""
    item_scores = np.asarray(item_scores, dtype=np.float64).reshape(-1)
    ranked = np.sort(np.asarray(candidate_scores, dtype=np.float64).reshape(-1))
    if ranked.size == 0:
        return np.zeros(item_scores.shape, dtype=np.float64)
    return np.searchsorted(ranked, item_scores, side="right") / ranked.size


def final_scores(
    heavy_scores: np.ndarray,
    retrieval_pct: np.ndarray | None,
    retrieval_weight: float,
    affinity_pct: np.ndarray | None = None,
    affinity_weight: float = 0.0,
) -> np.ndarray:
    """The blended score in [0, 1] (``heavy_scores`` and both percentiles in [0, 1]); a percentile
    may be ``None`` when its weight is 0."""
    heavy = np.asarray(heavy_scores, dtype=np.float64).reshape(-1)
    final = (1.0 - retrieval_weight - affinity_weight) * heavy
    for name, pct, weight in (
        ("retrieval", retrieval_pct, retrieval_weight),
        ("affinity", affinity_pct, affinity_weight),
    ):
        if weight == 0.0:
            continue
        pct = None if pct is None else np.asarray(pct, dtype=np.float64).reshape(-1)
        if pct is None or pct.shape != heavy.shape:
            raise ValueError(f"{heavy.size} heavy scores but {0 if pct is None else pct.size} {name} percentiles")
        final += weight * pct
    return final.astype(np.float32)


def rank(scores: np.ndarray, temperature: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Positions of ``scores`` from first to last: sorted (stable) or, with ``temperature`` > 0, a
    Plackett-Luce sample: the order of ``scores / temperature + Gumbel noise`` has exactly the
    probabilities of drawing items one after another from ``softmax(scores / temperature)``.

    A temperature so small that ``scores / temperature`` overflows (a subnormal one, 1e-310) is the
    limit T -> 0+: the score order, ties in a random order. Before 2026-12-07 every score became inf
    and the list came out in candidate order, the lowest-scored first as often as not."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if temperature <= 0.0:
        return np.argsort(-scores, kind="stable")
    rng = rng if rng is not None else np.random.default_rng()
    noise = rng.gumbel(size=scores.size)
    with np.errstate(over="ignore"):
        scaled = scores / temperature
    if not np.isfinite(scaled[np.isfinite(scores)]).all():
        # Overflowed: two distinct scores then differ by over 1e290 after scaling, which no Gumbel
        # draw bridges, so sorting by score (the noise ordering only the exact ties) is the sample.
        return np.lexsort((-noise, -scores))
    return np.argsort(-(scaled + noise), kind="stable")


def cap_per_category(order: np.ndarray, categories: np.ndarray, max_per_category: int, k: int) -> np.ndarray:
    """The first ``k`` positions of ``order`` keeping at most ``max_per_category`` per category
    (``categories[i]`` is the category of position ``i``); 0 = no limit."""
    order = np.asarray(order)
    if max_per_category <= 0:
        return order[:k]
    kept, used = [], {}
    for position in order:
        category = categories[position]
        if used.get(category, 0) < max_per_category:
            used[category] = used.get(category, 0) + 1
            kept.append(position)
            if len(kept) == k:
                break
    return np.asarray(kept, dtype=np.int64)


def order_candidates(
    heavy_scores,
    retrieval_pct,
    k: int,
    *,
    retrieval_weight: float = 0.0,
    affinity_pct=None,
    affinity_weight: float = 0.0,
    exploration_temperature: float = 0.0,
    max_per_category: int = 0,
    categories: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the served candidates (at most ``k``) and their final scores."""
    scores = final_scores(heavy_scores, retrieval_pct, retrieval_weight, affinity_pct, affinity_weight)
    if max_per_category > 0 and categories is None:
        raise ValueError("max_per_category needs the candidates' categories")
    order = cap_per_category(rank(scores, exploration_temperature, rng), categories, max_per_category, k)
    return order, scores[order]
