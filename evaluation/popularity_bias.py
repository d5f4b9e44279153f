"""Popularity bias of a recommender, measured from what it recommends.

A recommender learns from logs it helped create, so popular items get shown, clicked and learned
more; these measures show how concentrated the recommendations are and whether popular items win
even when a user likes an unpopular one as much.

    item_share_curve    how many distinct items make 10%, 20%, ... 100% of all recommendations
    gini                Gini coefficient of recommendation counts over the catalog (0 equal, 1 one item)
    catalog_coverage    share of the catalog recommended to anyone
    popularity_lift     mean popularity of recommended items / mean popularity of the user's profile
    preference_parity   among users who liked both a popular and an unpopular held-out item, how
                        often the popular one is ranked above the unpopular one (a tie counts half;
                        0.5 = parity)

A measure the protocol cannot support raises ``NotApplicable`` with the reason: preference parity
under leave-one-out (one held-out item per user, so no user has a pair to compare), anything over
lists that are all empty. Empty slots of a short list (``-1``) are not recommendations.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import NotApplicable

SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _filled(recommended) -> np.ndarray:
    """The recommended ids, without the ``-1`` that pads a list shorter than k."""
    ids = np.asarray(recommended).ravel()
    ids = ids[ids >= 0]
    if ids.size == 0:
        raise NotApplicable("no list recommends anything")
    return ids


def item_share_curve(recommended, shares=SHARES) -> dict[float, int]:
    """For each share s: the fewest distinct items that together make s of all recommendations."""
    _, counts = np.unique(_filled(recommended), return_counts=True)
    cumulative = np.cumsum(np.sort(counts)[::-1]) / counts.sum()
    return {float(s): int(np.searchsorted(cumulative, s - 1e-12) + 1) for s in shares}


def gini(recommended, num_items: int) -> float:
    counts = np.zeros(num_items, dtype=np.float64)
    ids, c = np.unique(_filled(recommended), return_counts=True)
    counts[ids] = c
    sorted_counts = np.sort(counts)
    n = num_items
    cum = np.cumsum(sorted_counts)
    return float((n + 1 - 2 * (cum / cum[-1]).sum()) / n)


def catalog_coverage(recommended, num_items: int) -> float:
    return float(len(np.unique(_filled(recommended))) / num_items)


def popularity_lift(recommended, profiles, item_popularity) -> np.ndarray:
    """Per user: mean popularity of recommended items / mean popularity of the items in the profile."""
    pop = np.asarray(item_popularity, dtype=np.float64)
    top = np.asarray(recommended)
    filled = top >= 0
    with np.errstate(invalid="ignore"):  # an empty list has no mean: NaN, left out by nanmean
        rec = np.where(filled, pop[np.maximum(top, 0)], 0.0).sum(axis=1) / filled.sum(axis=1)
    prof = np.array([pop[list(p)].mean() if len(p) else np.nan for p in profiles])
    return rec / prof


def preference_parity(scores, liked, popular_items) -> tuple[float, int]:
    """Share of (popular, unpopular) liked-item pairs where the popular item scores higher.

    ``scores`` is ``[num_users, num_items]``; ``liked[u]`` the held-out items user ``u`` liked;
    ``popular_items`` a boolean mask over items; items scored ``-inf`` (unscorable) or NaN are left
    out, an item scored ``+inf`` is counted (it beats every finite score).
    Returns the share and the number of users counted.
    0.5 means the model ranks popular and unpopular items a user likes equally often first.
    Raises ``NotApplicable`` when no user liked both kinds (e.g. one held-out item per user).
    """
    liked_scores = []
    for u, items in enumerate(liked):
        items = np.asarray(list(items), dtype=np.int64)
        liked_scores.append((items, np.asarray(scores[u, items])))
    return preference_parity_of_liked(liked_scores, popular_items)


def preference_parity_of_liked(liked_scores, popular_items) -> tuple[float, int]:
    """``preference_parity`` from each user's liked items and their scores only (``[(items, scores)]``,
    one pair per user): what a scorer too large for one ``[num_users, num_items]`` matrix keeps."""
    popular = np.asarray(popular_items, dtype=bool)
    if popular.all() or not popular.any():
        raise NotApplicable(
            f"{'every' if popular.all() else 'no'} item counts as popular (training popularity is too flat to split)"
        )
    wins, pairs, users, most = 0.0, 0, 0, 0
    for items, item_scores in liked_scores:
        most = max(most, len(items))
        # -inf: an item the scorer could not score; NaN would lose both ways. +inf is a score.
        keep = ~(np.isneginf(item_scores) | np.isnan(item_scores))
        items, item_scores = items[keep], item_scores[keep]
        if items.size < 2:
            continue
        is_popular = popular[items]
        if is_popular.all() or not is_popular.any():
            continue
        s_pop, s_unpop = item_scores[is_popular][:, None], item_scores[~is_popular][None, :]
        wins += (s_pop > s_unpop).sum() + 0.5 * (s_pop == s_unpop).sum()
        pairs += s_pop.size * s_unpop.size
        users += 1
    if pairs == 0:
        raise NotApplicable(
            "no user liked both a popular and an unpopular held-out item"
            + (" (at most one held-out item per user, as in leave-one-out)" if most <= 1 else "")
        )
    return float(wins / pairs), users
