"""Ranking and classification metrics, vectorised over users.

Arrays come from the array module of the inputs (numpy on CPU; cupy arrays work the same way for
the element-wise parts), so the same code measures on GPU where there is one.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at_k(top_items: np.ndarray, relevant: list[set]) -> float:
    """Mean over users of |top-k ∩ relevant| / |relevant| (users with no relevant item skipped).

    ``top_items`` is ``[num_users, k]``; ``relevant[u]`` is the set of relevant ids of user ``u``.
    """
    values = [
        len(set(row.tolist()) & rel) / len(rel) for row, rel in zip(np.asarray(top_items), relevant) if rel
    ]
    if not values:
        raise ValueError("no user has a relevant item")
    return float(np.mean(values))
