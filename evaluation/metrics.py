"""Ranking and classification metrics, vectorised over users.

Ranking metrics take the recommended ids ``top_items`` (``[num_users, k]``, best first) and the
relevant ids of each user, and return one value per user (``per_user=True``) or their mean. The
relevance test is one vectorised ``isin`` over ``user * stride + item`` keys, so no Python loop runs
per user. ``xp`` is the array module of the inputs (numpy, or cupy on a GPU), so the same code
measures on either.

Definitions (binary relevance, the conventions of RecBole and most papers):

    Recall@K     hits in top K / number of relevant items of the user
    Precision@K  hits in top K / K
    HitRate@K    1 if any hit in top K
    NDCG@K       DCG of the hits / DCG of an ideal list with min(K, |relevant|) hits
    MRR@K        1 / rank of the first hit (0 if none)

``full_ranking_top_k`` ranks the whole catalog per user with already-seen items removed, which is
what "full ranking" protocols (RecBole's default) require.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


class NotApplicable(ValueError):
    """A figure the protocol cannot support (one class, no pair to compare, one group): the report
    says "not applicable" with this message as the reason, and every other figure still comes out."""


def array_module(x):
    """cupy for cupy arrays, numpy otherwise."""
    try:
        import cupy

        return cupy.get_array_module(x)
    except ImportError:
        return np


# --------------------------------------------------------------------------- classification


def _finite_order(scores) -> np.ndarray:
    """``scores`` as float64, refusing NaN as sklearn does: NaN has no place in the order, so ROC-AUC
    came out NaN (which the report reads as "one class only") and PR-AUC ranked it below every score."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    nan = int(np.isnan(scores).sum())
    if nan:
        raise ValueError(f"{nan} of {scores.size} scores are NaN: the scorer is broken, there is no order to measure")
    return scores


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = _finite_order(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise NotApplicable("ROC-AUC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(labels, scores) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = _finite_order(scores)
    if labels.sum() == 0:
        raise NotApplicable("PR-AUC needs at least one positive label")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    # Group tied scores so their order cannot change the result.
    sorted_scores = scores[order]
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tp = np.cumsum(hits)[last_of_tie]
    fp = np.cumsum(~hits)[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    recall_steps = np.diff(np.r_[0.0, recall])
    return float((precision * recall_steps).sum())


# --------------------------------------------------------------------------- ranking


def _relevant_pairs(relevant: Sequence, num_users: int, xp=np):
    """Flatten per-user relevant ids into (user index, item id) arrays, each pair once, and count them."""
    lengths = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=num_users)
    users = np.repeat(np.arange(num_users), lengths)
    items = np.fromiter((int(i) for r in relevant for i in r), dtype=np.int64, count=int(lengths.sum()))
    # An id listed twice for a user is one item, as a repeat in a ranked list is one hit: counted twice,
    # the one item found read recall 0.5.
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    first = np.r_[True, (users[1:] != users[:-1]) | (items[1:] != items[:-1])][: len(items)]
    users, items = users[first], items[first]
    lengths = np.bincount(users, minlength=num_users).astype(np.int64)
    return xp.asarray(users), xp.asarray(items), xp.asarray(lengths)


def hit_matrix(top_items, relevant: Sequence, num_relevant=None):
    """Boolean ``[num_users, k]``: is ``top_items[u, j]`` relevant to user ``u``? An item repeated
    in a list is a hit at its first place only (a list showing one film twice has found it once).
    Also each user's number of relevant items: ``len(relevant[u])``, or ``num_relevant[u]`` where
    some relevant items cannot appear in any list (held-out items no model was trained on count in
    recall's and NDCG's denominators, as in RecBole)."""
    xp = array_module(top_items)
    top = xp.asarray(top_items).astype(xp.int64)
    num_users, k = top.shape
    users, items, lengths = _relevant_pairs(relevant, num_users, xp)
    if num_relevant is not None:
        counted = xp.asarray(num_relevant, dtype=xp.int64)
        if counted.shape != lengths.shape or bool((counted < lengths).any()):
            raise ValueError("num_relevant must give each user at least as many items as relevant lists")
        lengths = counted
    stride = int(max(int(top.max()) if top.size else 0, int(items.max()) if items.size else 0)) + 1
    keys = users * stride + items
    rows = xp.arange(num_users, dtype=xp.int64)[:, None]
    hits = xp.isin(rows * stride + top, keys)
    return hits & (top >= 0) & ~repeated(top), lengths


def repeated(top):
    """Boolean ``[num_users, k]``: has ``top[u, j]`` already appeared earlier in row ``u``?"""
    xp = array_module(top)
    if top.shape[1] < 2:
        return xp.zeros(top.shape, dtype=bool)
    order = xp.argsort(top, axis=1, kind="stable")  # equal ids keep their list order
    ordered = xp.take_along_axis(top, order, axis=1)
    later = xp.zeros(top.shape, dtype=bool)
    later[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    out = xp.empty_like(later)
    out[xp.arange(top.shape[0])[:, None], order] = later
    return out


def _finish(values, lengths, per_user: bool):
    xp = array_module(values)
    valid = lengths > 0  # users without a relevant item are left out, as every protocol does
    if not bool(valid.any()):
        raise ValueError("no user has a relevant item")
    values = values[valid]
    return values if per_user else float(xp.mean(values))


def recall_at_k(top_items, relevant: Sequence, k: int | None = None, per_user: bool = False, num_relevant=None):
    hits, lengths = hit_matrix(_cut(top_items, k), relevant, num_relevant)
    return _finish(hits.sum(axis=1) / array_module(hits).maximum(lengths, 1), lengths, per_user)


def precision_at_k(top_items, relevant: Sequence, k: int | None = None, per_user: bool = False, num_relevant=None):
    """Hits in the first ``k`` places over ``k``, however short the list (a list of 3 for a top 10
    has 7 empty places, as a list padded with -1 has)."""
    top = _cut(top_items, k)
    hits, lengths = hit_matrix(top, relevant, num_relevant)
    return _finish(hits.sum(axis=1) / (top.shape[1] if k is None else k), lengths, per_user)


def hit_rate_at_k(top_items, relevant: Sequence, k: int | None = None, per_user: bool = False, num_relevant=None):
    hits, lengths = hit_matrix(_cut(top_items, k), relevant, num_relevant)
    return _finish(hits.any(axis=1).astype(float), lengths, per_user)


def ndcg_at_k(top_items, relevant: Sequence, k: int | None = None, per_user: bool = False, num_relevant=None):
    top = _cut(top_items, k)
    hits, lengths = hit_matrix(top, relevant, num_relevant)
    xp = array_module(hits)
    # The ideal list has k places however narrow ``top`` is (a catalog smaller than k, a short list),
    # as a list padded with -1 to k has: otherwise a user with more relevant items than places would
    # be measured against a shorter ideal than K allows.
    places = top.shape[1] if k is None else k
    discounts = 1.0 / xp.log2(xp.arange(2, places + 2))
    dcg = (hits * discounts[: top.shape[1]]).sum(axis=1)
    ideal_hits = xp.minimum(lengths, places)
    idcg = xp.cumsum(discounts)[xp.maximum(ideal_hits, 1) - 1]
    return _finish(dcg / idcg, lengths, per_user)


def mrr_at_k(top_items, relevant: Sequence, k: int | None = None, per_user: bool = False, num_relevant=None):
    top = _cut(top_items, k)
    hits, lengths = hit_matrix(top, relevant, num_relevant)
    xp = array_module(hits)
    first = xp.argmax(hits, axis=1)
    rr = xp.where(hits.any(axis=1), 1.0 / (first + 1), 0.0)
    return _finish(rr, lengths, per_user)


RANKING_METRICS = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "hit_rate": hit_rate_at_k,
    "ndcg": ndcg_at_k,
    "mrr": mrr_at_k,
}


def _cut(top_items, k):
    top = array_module(top_items).asarray(top_items)
    return top if k is None else top[:, :k]


def full_ranking_top_k(scores, k: int, exclude: Sequence | None = None):
    """Top-``k`` column indices of each row of ``scores`` ``[num_users, num_items]``, best first.

    ``exclude[u]`` lists item columns user ``u`` must not get (already seen in training); where
    fewer than ``k`` items are left, the rest of the row is -1 (no item), never an excluded one.

    Equal scores go lower column first, as a stable sort of the whole row orders them. Without that
    rule the partition's own order decided which of the items tied at the k-th place made the list,
    so a recommender with ties (popularity counts) scored another NDCG@10 when NDCG@20 was asked too.

    Scores are ranked at their own precision (float32 or wider): a cast to float32 made float64 scores
    closer than float32 resolves equal, and the lower column went first even where it scored less.

    A NaN score of an item not excluded is refused (``ValueError`` naming the first cell), as the
    classification metrics refuse it: NaN has no place in the order, so it was ranked after the -1
    fillers, or a -1 before it, and the list was garbage. -inf is the score of an unscorable item.
    """
    xp = array_module(scores)
    scores = xp.asarray(scores)
    scores = xp.array(scores, dtype=xp.result_type(scores.dtype, xp.float32), copy=True)
    num_users, num_items = scores.shape
    if exclude is not None:
        users, items, _ = _relevant_pairs(exclude, num_users, xp)
        scores[users, items] = -xp.inf
    nan = xp.isnan(scores)
    if bool(nan.any()):
        row, col = (int(i[0]) for i in xp.nonzero(nan))
        raise ValueError(
            f"{int(nan.sum())} of {scores.size} scores are NaN (first: row {row}, item column {col}): "
            "the scorer is broken, there is no order to rank"
        )
    k = min(k, num_items)
    # By column, so the stable sort below puts tied items lower column first.
    part = xp.sort(xp.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
    part_scores = xp.take_along_axis(scores, part, axis=1)
    # Rows whose k-th score is shared by an item outside the partition: which tied items belong is
    # the lowest columns', from a stable sort of those rows alone.
    crossing = xp.nonzero((scores >= part_scores.min(axis=1, keepdims=True)).sum(axis=1) > k)[0]
    if crossing.size:
        part[crossing] = xp.sort(xp.argsort(-scores[crossing], axis=1, kind="stable")[:, :k], axis=1)
        part_scores[crossing] = xp.take_along_axis(scores[crossing], part[crossing], axis=1)
    order = xp.argsort(-part_scores, axis=1, kind="stable")
    top = xp.take_along_axis(part, order, axis=1)
    return xp.where(xp.take_along_axis(part_scores, order, axis=1) == -xp.inf, -1, top)


# Elements of one chunk of bootstrap resamples (indices and gathered values): 2^25 is 256 MB of int64.
BOOTSTRAP_CHUNK_CELLS = 1 << 25


def bootstrap_means(rng: np.random.Generator, arrays: Sequence[np.ndarray], n_resamples: int) -> list[np.ndarray]:
    """The mean of each of ``arrays`` (same length, resampled together: the same users in every one)
    over ``n_resamples`` bootstrap resamples of their positions, drawn from ``rng``.

    The resamples are drawn and reduced in chunks of rows of about ``BOOTSTRAP_CHUNK_CELLS``
    elements, so memory does not grow with resamples x users (200,000 users x 1,000 resamples is
    1.6 GB per array). ``Generator.integers`` draws a ``(rows, n)`` block as the next ``rows * n``
    values of one stream, so the chunks concatenated are the single ``(n_resamples, n)`` draw and the
    means (one per row) are the same to the bit, and ``rng`` is left in the same state."""
    n = len(arrays[0])
    rows = max(1, BOOTSTRAP_CHUNK_CELLS // max(n, 1))
    chunks = [[] for _ in arrays]
    for start in range(0, max(n_resamples, 1), rows):
        idx = rng.integers(0, n, size=(min(rows, n_resamples - start), n))
        for out, values in zip(chunks, arrays):
            out.append(values[idx].mean(axis=1))
    return [np.concatenate(out) for out in chunks]


def bootstrap_ci(per_user_values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Mean and percentile bootstrap interval of a per-user metric: ``(mean, low, high)``."""
    values = np.asarray(per_user_values, dtype=np.float64)
    (means,) = bootstrap_means(np.random.default_rng(seed), [values], n_resamples)
    alpha = (1 - confidence) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
