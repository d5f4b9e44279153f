"""Windowed activity features: how many events (impressions) and clicks the user had in the last
1 h / 24 h / 7 d (``features.activity_windows``), the seed's "user activity in the last X hours".

One definition, used by both sides, so training and serving cannot drift apart:

    window_counts(event_times, event_clicks, query_times, windows)   the counts
    encode(counts)                                                    the model input: log1p(count)

Training (``add_activity_counts``) calls ``window_counts`` once per partition of the event log,
shuffled by user: every row gets the counts of its user's events strictly before its own timestamp
(an event in the row's own second never counts, as with the point-in-time counts), with the
row's user as the group. Serving (``serving/stages.py`` ``FeatureLookup``) calls it for one user at
``now`` over the events the export stored (the user's events in the longest window before the end
of the training data, ``recent_events``) plus the user's live events (``live_activity``).

Time is whole seconds, as in the event log: a request at ``now`` is the row the log would record at
``floor(now)``, and it counts the events of earlier seconds, ``floor(now) - window <= floor(t) <
floor(now)``; so a live event counts from the next second on, as a training row never sees events of
its own second.

    user_events_last_<w>   events of the user in the window                (USER, CONTINUOUS)
    user_clicks_last_<w>   clicks of the user in the window                (USER, CONTINUOUS)

Both go into the models as ``log1p(count)`` with no fitted statistics (a normalisation fitted on
the training rows would have to travel to serving, one more place to disagree). They are also tagged
``ACTIVITY_TAG``: the heavy ranker takes them (it takes every user feature); the candidate
generator's query tower leaves them out (``models/candidate_generator.py``).

The arrays may be numpy or cupy (cudf partitions give cupy), so the training path runs on either.
"""

from __future__ import annotations

import numpy as np

from workflows.point_in_time import WEIGHT

ACTIVITY_TAG = "activity"
# Live-store events (``workflows/live_store.py``) that are activity events, and whether each is a
# click. watch_seconds, like and share describe an event already counted (its view or click).
LIVE_ACTIVITY = {"view": 0, "click": 1}


def window_label(seconds: int) -> str:
    """``3600 -> "1h"``, ``86400 -> "24h"``, ``604800 -> "7d"``: the largest unit that divides it
    (hours up to 48, so "24h" stays "24h")."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds % size == 0 and not (unit == "d" and seconds < 3 * 86400):
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: every whole second count divides by 1")


def column_names(windows: list[int]) -> list[str]:
    """The feature columns for ``windows`` (seconds): per window, events then clicks."""
    out = []
    for seconds in windows:
        label = window_label(int(seconds))
        out += [f"user_events_last_{label}", f"user_clicks_last_{label}"]
    return out


def _module(values):
    if type(values).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _seconds(xp, values):
    values = xp.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(xp.int64)
    return xp.floor(values).astype(xp.int64)


def window_counts(event_times, event_clicks, query_times, windows, event_groups=None, query_groups=None):
    """Events and clicks in each window before each query: int64 ``[2 * len(windows), len(queries)]``,
    rows in ``column_names(windows)`` order.

    ``event_times`` / ``event_clicks`` (0/1) are the events, in any order; ``query_times`` the
    moments asked about. With ``event_groups`` / ``query_groups`` (user ids), a query counts only the
    events of its own group. Vectorised: one sort of the events and two ``searchsorted`` per window.
    """
    xp = _module(query_times)
    windows = [int(w) for w in windows]
    queries = _seconds(xp, query_times)
    times = _seconds(xp, event_times)
    out = xp.zeros((2 * len(windows), len(queries)), dtype=xp.int64)
    if len(times) == 0 or len(queries) == 0 or not windows:
        return out
    clicks = xp.asarray(event_clicks).astype(xp.int64)
    if event_groups is None:
        keys, bases = times, xp.zeros(len(queries), dtype=xp.int64)
    else:
        # One sorted key per (group, time): group code * span + time offset, span > any time range asked.
        n = len(times)
        _, codes = xp.unique(xp.concatenate([xp.asarray(event_groups), xp.asarray(query_groups)]), return_inverse=True)
        codes = codes.reshape(-1).astype(xp.int64)
        low = int(min(times.min(), queries.min())) - max(windows)
        span = int(max(times.max(), queries.max())) - low + 1
        if int(codes.max() + 1) * span >= 2**62:
            raise ValueError(f"activity windows: {int(codes.max()) + 1} users x {span} s does not fit an int64 key")
        keys = codes[:n] * span + (times - low)
        bases = codes[n:] * span - low
    order = xp.argsort(keys)
    keys = keys[order]
    zero = xp.zeros(1, dtype=xp.int64)
    cumulative_clicks = xp.concatenate([zero, xp.cumsum(clicks[order])])
    upper = xp.searchsorted(keys, bases + queries, side="left")  # strictly before the query's second
    for i, seconds in enumerate(windows):
        lower = xp.searchsorted(keys, bases + queries - seconds, side="left")
        out[2 * i] = upper - lower
        out[2 * i + 1] = cumulative_clicks[upper] - cumulative_clicks[lower]
    return out


def encode(counts):
    """The model input of a count: ``log1p``, as float32 (numpy/cupy arrays, pandas/cudf series)."""
    return np.log1p(counts.astype("float32"))


class Encode:
    """Picklable NVTabular ``LambdaOp`` body: ``encode`` on a count column of the event log."""

    def __call__(self, col, df):
        return encode(col)


def user_activity(event_times, event_clicks, now: float, windows) -> np.ndarray:
    """The encoded features of one user at ``now`` (serving): float32, ``column_names`` order."""
    counts = window_counts(
        np.asarray(event_times), np.asarray(event_clicks), np.array([now], dtype=np.float64), windows
    )
    return encode(counts[:, 0])


def live_activity(kinds, times) -> tuple[np.ndarray, np.ndarray]:
    """``(times, clicks)`` of the live-store rows that are activity events (``LIVE_ACTIVITY``)."""
    kinds = np.asarray(kinds, dtype=object)
    keep = np.isin(kinds, list(LIVE_ACTIVITY))
    clicks = np.array([LIVE_ACTIVITY[k] for k in kinds[keep]], dtype=np.int64)
    return np.asarray(times, dtype=np.float64)[keep], clicks


def _host_or_device(series):
    return series.values if hasattr(series, "values_host") else series.to_numpy()


def _partition_counts(df, windows: list[int], names: list[str]):
    """One partition (every event of its users): the counts columns added. Rows with ``WEIGHT`` 0
    (sampled negatives, held-out rows under a random or explicit split) get counts but are not counted."""
    users, times = _host_or_device(df["user_id"]), _host_or_device(df["timestamp"])
    clicks = _host_or_device(df["click"])
    if WEIGHT in df.columns:
        counted = _host_or_device(df[WEIGHT] > 0)
        counts = window_counts(times[counted], clicks[counted], times, windows, users[counted], users)
    else:
        counts = window_counts(times, clicks, times, windows, users, users)
    df = df.copy()
    for i, name in enumerate(names):
        df[name] = counts[i]
    return df


def add_activity_counts(events, windows: list[int]):
    """The dask event collection with the ``column_names(windows)`` count columns added."""
    if not windows:
        return events
    out = events.shuffle(on="user_id", npartitions=events.npartitions)
    return out.map_partitions(_partition_counts, list(windows), column_names(windows))


def recent_events(events, as_of: int, windows: list[int]):
    """The events serving needs to count from ``as_of`` on: each user's ``user_id, timestamp, click``
    in the longest window before ``as_of`` (a computed frame, sorted by user and time)."""
    past = events[(events["timestamp"] < as_of) & (events["timestamp"] >= as_of - max(windows))]
    frame = past[["user_id", "timestamp", "click"]].compute()
    return frame.sort_values(["user_id", "timestamp"]).reset_index(drop=True)


def counts_as_of(recent, as_of: int, windows: list[int]):
    """Per user of ``recent``, the counts at ``as_of`` (what a row at ``as_of`` gets in training)."""
    users = recent[["user_id"]].drop_duplicates().reset_index(drop=True)
    ids = _host_or_device(users["user_id"])
    queries = ids * 0 + int(as_of)
    counts = window_counts(
        _host_or_device(recent["timestamp"]),
        _host_or_device(recent["click"]),
        queries,
        windows,
        _host_or_device(recent["user_id"]),
        ids,
    )
    for i, name in enumerate(column_names(windows)):
        users[name] = counts[i]
    return users
