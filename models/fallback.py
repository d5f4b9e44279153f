"""The fallback for users the models never saw: recency-weighted popularity, plus content for new items.

Each positive event (click) counts ``0.5 ** (age / half_life)``, where ``age`` is the time between
the event and the newest event of the log (measured from the newest click: the same scores once
divided by the top one, without underflow), so what is popular now outranks what was popular a month
ago. Scores are divided by the top score, so they lie in [0, 1] like the rankers' scores (float32: 0
for an item whose clicks are all ~149 half-lives older than the top item's; still ranked by age).

Items of the catalog with no positive yet (new, or never clicked) have no popularity of their own;
``with_new_items`` gives them a content-based score instead: the mean popularity of the known items
of their category, times ``weight`` (< 1, because a category's appeal is weaker evidence than the
item's own clicks). So a new item of a hot category can still reach the fallback list.
"""

from __future__ import annotations

import numpy as np

SECONDS_PER_DAY = 86_400


def recency_weighted_popularity(events, half_life_days: float, label: str = "click"):
    """Return a frame ``item_id, score`` sorted by descending score (raw item ids).

    ``events`` is a pandas or cudf frame in the raw event schema (timestamps in seconds).
    """
    if not half_life_days > 0:
        raise ValueError(f"the recency half-life must be > 0 days, got {half_life_days}")
    positives = events[events[label] > 0]
    # Ages from the newest positive, not the newest event: the division by the top score below makes
    # the two equal, but a log whose clicks all lie ~1,075 half-lives before its newest event made every
    # weight underflow to 0 and every score 0 / 0 = NaN (served as NaN scores).
    newest = positives["timestamp"].max()
    age_days = (newest - positives["timestamp"]) / SECONDS_PER_DAY
    frame = positives[["item_id"]].copy()
    frame["half_lives"] = (age_days / half_life_days).astype("float64")
    # Ranked by log2 of the score, each item's weights taken from its newest click: scores below the
    # float32 range (~149 half-lives under the top one) are 0 once served, and were ranked as 0 too,
    # so clicks 3,000 days old went before clicks 2,000 days old (ties broken by item id).
    frame["newest"] = frame.groupby("item_id")["half_lives"].transform("min")
    frame["weight"] = 0.5 ** (frame["half_lives"] - frame["newest"])
    scores = frame.groupby("item_id").agg({"newest": "min", "weight": "sum"}).reset_index()
    scores["log2"] = np.log2(scores["weight"]) - scores["newest"]
    scores["score"] = (2.0 ** (scores["log2"] - scores["log2"].max())).astype("float32")
    scores = scores.sort_values(["log2", "item_id"], ascending=[False, True])
    return scores[["item_id", "score"]].reset_index(drop=True)


def top_popular(popularity, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most popular raw item ids (and scores), skipping ``exclude``."""
    ids = np.asarray(popularity["item_id"])
    scores = np.asarray(popularity["score"])
    if exclude is not None and len(exclude):
        keep = ~np.isin(ids, exclude)
        ids, scores = ids[keep], scores[keep]
    return ids[:k], scores[:k]


def with_new_items(popularity, items, content_column: str, weight: float):
    """``popularity`` extended by every item of ``items`` it lacks, scored by its ``content_column``.

    ``items`` has ``item_id`` (raw) and ``content_column``; a new item scores ``weight`` times the mean
    score of the scored items sharing its value (0 when none does). Sorted like ``popularity``, by
    descending score; of equal scores, ``popularity``'s items first, in its order, then the new ones by id.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"new-item weight must be in [0, 1], got {weight}")
    missing = [c for c in ("item_id", content_column) if c not in items.columns]
    if missing:
        raise ValueError(f"item table is missing column(s) {missing}")
    known = popularity.merge(items[["item_id", content_column]], on="item_id", how="inner")
    per_value = known.groupby(content_column)["score"].mean().reset_index()
    per_value["score"] = (per_value["score"] * weight).astype("float32")
    new = items[~items["item_id"].isin(popularity["item_id"])][["item_id", content_column]]
    new = new.merge(per_value, on=content_column, how="left").fillna({"score": 0.0})
    new = new[["item_id", "score"]].astype({"score": "float32"})
    new = new.sort_values(["score", "item_id"], ascending=[False, True]).reset_index(drop=True)
    # Of equal float32 scores, known items keep popularity's order (by the unrounded score, not the
    # item id), ahead of the new items. An explicit key, not a stable sort: cudf's sorts need not be.
    known = popularity[["item_id", "score"]].reset_index(drop=True)
    known["order"], new["order"] = known.index, new.index + len(known)
    out = concat_frames([known, new]).sort_values(["score", "order"], ascending=[False, True])
    return out.drop(columns="order").reset_index(drop=True)


def concat_frames(frames):
    from merlin.core.dispatch import concat

    return concat(frames, ignore_index=True)
