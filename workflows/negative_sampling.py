"""Sampled negatives for rankers: extra rows with every signal 0 for items the user never interacted with.

Logged impressions already hold real negatives (shown, not clicked). Sampled negatives add items the
user was never shown, which teaches a ranker what is *not* relevant at all. Two samplers:

    uniform      every catalog item equally likely
    popularity   items drawn in proportion to their training-event count, so popular items are not
                 taken as positive just for being popular

``ratio`` negatives are drawn per positive (clicked) row: ``floor(ratio)`` each, and one more for a seeded
share ``ratio - floor(ratio)`` of the positives; each negative copies the positive's user and timestamp.
Draws that hit an item the user interacted with are dropped (so the count is at most ``ceil(ratio)``
per positive). Deterministic for a given ``seed`` and partitioning.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

SIGNAL_COLUMNS = ["click", "watch_seconds", "like", "share"]


class _Pool:
    """Holds the candidate items; dask would otherwise try to align a frame argument with the partitions."""

    def __init__(self, items, weights):
        self.items, self.weights = items, weights


def _draw(df, pool: _Pool, ratio: float, seed: int, partition_info=None):
    items, weights = pool.items, pool.weights
    positives = df[df["click"] > 0][["user_id", "timestamp"]]
    # The ratio as the decimal it was written as: in floats 0.07 * 100 is 7.000000000000001 (ceil: 8 draws).
    n = int(math.ceil(Fraction(str(float(ratio))) * len(positives)))
    if n == 0 or len(items) == 0:
        return df.iloc[:0][["user_id", "item_id", "timestamp"]]
    part = partition_info["number"] if partition_info else 0
    # Every positive floor(ratio) times, plus a share without replacement: sampling all n with replacement
    # gave one positive 6 negatives at ratio 2 and others none. Two streams of one seed sequence: equal
    # seeds for both draws paired the k-th positive drawn with the k-th item.
    rows_seed, items_seed = np.random.SeedSequence([seed, part]).generate_state(2)
    whole, count = int(ratio), len(positives)
    extra = np.random.default_rng(rows_seed).choice(count, size=n - whole * count, replace=False)
    rows = np.concatenate([np.tile(np.arange(count), whole), np.sort(extra)])
    repeated = positives.iloc[rows].reset_index(drop=True)
    drawn = items.sample(n=len(repeated), replace=True, weights=weights, random_state=int(items_seed))
    repeated["item_id"] = drawn["item_id"].reset_index(drop=True).values
    return repeated[["user_id", "item_id", "timestamp"]]


def sample_negatives(
    events, items, ratio: float = 1.0, kind: str = "uniform", seed: int = 42, popularity=None, seen=None
):
    """Return a dask collection of negative rows in the events' columns (signals all 0).

    ``events``: dask event collection (raw schema, at least user_id, item_id, timestamp, signals);
    ``items``: a frame with the candidate ``item_id`` values (cudf or pandas);
    ``popularity``: for ``kind="popularity"``, a frame ``item_id, count`` (computed from ``events``
    when not given);
    ``seen``: dask collection of ``user_id, item_id`` pairs a negative must not be (default: the
    pairs of ``events``; for a validation part, pass training and validation pairs).
    """
    if kind not in ("uniform", "popularity"):
        raise ValueError(f"negative sampling kind must be 'uniform' or 'popularity', got {kind!r}")
    if ratio <= 0:
        raise ValueError(f"negative sampling ratio must be > 0, got {ratio}")
    candidates = items[["item_id"]].drop_duplicates().reset_index(drop=True)
    weights = None
    if kind == "popularity":
        if popularity is None:
            popularity = events.groupby("item_id").size().compute().reset_index()
            popularity.columns = ["item_id", "count"]
        candidates = candidates.merge(popularity, on="item_id", how="left").fillna(0)
        candidates = candidates[candidates["count"] > 0].reset_index(drop=True)
        weights = candidates["count"].astype("float64")
        weights = (weights / weights.sum()).values
    meta = events._meta[["user_id", "item_id", "timestamp"]]
    drawn = events.map_partitions(_draw, _Pool(candidates, weights), ratio, seed, meta=meta)
    # Anti-join against everything the user interacted with: a sampled "negative" must be unseen.
    seen = (events if seen is None else seen)[["user_id", "item_id"]].drop_duplicates().assign(_seen=1)
    drawn = drawn.merge(seen, on=["user_id", "item_id"], how="left")
    drawn = drawn[drawn["_seen"].isna()].drop(columns=["_seen"])
    for column in SIGNAL_COLUMNS:
        drawn[column] = drawn["timestamp"] * 0
    extra = [c for c in events.columns if c not in drawn.columns]
    for column in extra:  # other columns (features) are filled by the caller, e.g. point-in-time counts
        drawn[column] = drawn["timestamp"] * 0
    return drawn[list(events.columns)]
