"""The fallback for users the models never saw: recency-weighted popularity.

Each positive event (click) counts ``0.5 ** (age / half_life)``, where ``age`` is the time between
the event and the newest event of the log, so what is popular now outranks what was popular a month
ago. Scores are divided by the top score, so they lie in (0, 1] like the rankers' scores.
"""
from __future__ import annotations

import numpy as np

SECONDS_PER_DAY = 86_400


def recency_weighted_popularity(events, half_life_days: float, label: str = "click"):
    """Return a frame ``item_id, score`` sorted by descending score (raw item ids).

    ``events`` is a pandas or cudf frame in the raw event schema.
    """
    positives = events[events[label] > 0]
    newest = events["timestamp"].max()
    age_days = (newest - positives["timestamp"]) / SECONDS_PER_DAY
    weights = 0.5 ** (age_days / half_life_days)
    frame = positives[["item_id"]].copy()
    frame["score"] = weights.astype("float64")
    scores = frame.groupby("item_id")["score"].sum().reset_index()
    scores["score"] = (scores["score"] / scores["score"].max()).astype("float32")
    return scores.sort_values(["score", "item_id"], ascending=[False, True]).reset_index(drop=True)


def top_popular(popularity, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most popular raw item ids (and scores), skipping ``exclude``."""
    ids = np.asarray(popularity["item_id"])
    scores = np.asarray(popularity["score"])
    if exclude is not None and len(exclude):
        keep = ~np.isin(ids, exclude)
        ids, scores = ids[keep], scores[keep]
    return ids[:k], scores[:k]
