"""Point-in-time activity and popularity counts: for every event, counted only from events strictly
before it (earlier timestamp), so no training example sees its own outcome or the future.

    user_events_before   impressions the user had before this event        (USER, CONTINUOUS)
    user_clicks_before   clicks the user made before this event            (USER, CONTINUOUS)
    item_events_before   times the item was shown before this event        (ITEM, CONTINUOUS)
    item_clicks_before   clicks the item got before this event             (ITEM, CONTINUOUS)

Computed with a dask shuffle by user (then by item) and a per-partition sorted cumulative sum, on
cudf or pandas partitions alike. Events sharing a timestamp see the same (earlier-only) counts.
Serving uses the same counts as of the end of the training data (``totals_as_of``).
"""

from __future__ import annotations

USER_COUNTS = ["user_events_before", "user_clicks_before"]
ITEM_COUNTS = ["item_events_before", "item_clicks_before"]
POINT_IN_TIME_COLUMNS = USER_COUNTS + ITEM_COUNTS
# Optional 0/1 column: rows with 0 get features but are not counted (sampled negatives; held-out rows
# under a random or explicit split, ``workflows.pipeline.features_and_split``).
WEIGHT = "_counts"


def _counts_before(df, key: str, names: list[str]):
    # A fresh index: after the shuffle a partition's index repeats, and the assignments below align
    # on it (pandas' scans keep the rows' order and index; a unique index leaves nothing to chance).
    df = df.sort_values([key, "timestamp"]).reset_index(drop=True)
    weight = df[WEIGHT] if WEIGHT in df.columns else (df["timestamp"] * 0 + 1)
    df["_w"] = weight.astype("int64")
    df["_c"] = (df["click"] * df["_w"]).astype("int64")
    grouped = df.groupby(key)
    df[names[0]] = grouped["_w"].cumsum() - df["_w"]
    df[names[1]] = grouped["_c"].cumsum() - df["_c"]
    # Ties: an event must not count another event of the same second; take the count at the tie's start.
    ties = df.groupby([key, "timestamp"])
    for name in names:
        df[name] = ties[name].transform("min").astype("int64")
    return df.drop(columns=["_w", "_c"])


def add_point_in_time_counts(events):
    """Return the dask event collection with the four ``*_before`` columns added."""
    out = events
    for key, names in (("user_id", USER_COUNTS), ("item_id", ITEM_COUNTS)):
        out = out.shuffle(on=key, npartitions=out.npartitions)
        out = out.map_partitions(_counts_before, key, names)
    return out


def totals_as_of(events, as_of: int):
    """Per-user and per-item counts of the events strictly before ``as_of`` (computed frames).

    These are the values the point-in-time features would have for an event at ``as_of``: what the
    serving tables carry, so serving sees the features the models were trained with.
    """
    past = events[events["timestamp"] < as_of][["user_id", "item_id", "click"]]
    past = past.assign(_n=past["click"] * 0 + 1)
    users = past.groupby("user_id").agg({"_n": "sum", "click": "sum"}).compute().reset_index()
    users.columns = ["user_id", *USER_COUNTS]
    items = past.groupby("item_id").agg({"_n": "sum", "click": "sum"}).compute().reset_index()
    items.columns = ["item_id", *ITEM_COUNTS]
    return users, items
