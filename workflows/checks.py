"""Correctness checks the pipeline runs on its own output; each raises ``CheckFailed`` naming the
problem, or returns a small record for ``summary.json``.

    no_duplicate_pairs   training data has one row per (user, item)
    labels_agree         every label column equals what its definition gives on the raw signals
    temporal_split       no held-out event before the cutoff, no training event after it
    point_in_time        perturbing events at or after a time t leaves every feature of the events
                         before t unchanged (so no feature reads the future)
"""

from __future__ import annotations

import dask
import dask.dataframe as dd
import pandas as pd

from workflows.point_in_time import POINT_IN_TIME_COLUMNS, WEIGHT, add_point_in_time_counts
from workflows.spec import RAW_LAYOUT, Layout


class CheckFailed(AssertionError):
    """A correctness check found a defect in the data the pipeline produced."""


def _record(name: str, **details) -> dict:
    return {"check": name, "passed": True, **details}


def check_no_duplicate_pairs(events) -> dict:
    rows, pairs = dask.compute(events.shape[0], events[["user_id", "item_id"]].drop_duplicates().shape[0])
    if rows != pairs:
        raise CheckFailed(f"training data has {rows - pairs} duplicate (user, item) rows out of {rows}")
    return _record("no_duplicate_pairs", rows=int(rows))


def check_labels_agree(raw, transformed, watch_threshold: float, duration_op=None, layout: Layout = RAW_LAYOUT) -> dict:
    """Compare labels with raw signals row by row (the workflow keeps row order within a part).

    ``raw`` has the signals (and ``duration_seconds`` when there are watch labels); ``transformed``
    the label columns. ``duration_op`` is the fitted ``DurationAwareWatch`` whose thresholds define
    ``duration_watch``. ``layout`` (``workflows/spec.py``) says which labels exist (default: the raw
    schema's click, watched, duration_watch, like, share).
    """
    inputs = list(dict.fromkeys([*layout.binary_labels, *(n for n, _ in layout.thresholds)]))
    if layout.watch_labels:
        inputs += ["watch_seconds", "duration_seconds"]
    r = raw[inputs].compute().reset_index(drop=True)
    labels = list(layout.labels)
    missing = [c for c in labels if c not in transformed.columns]
    if missing:  # a label the layout defines but the output lacks would be compared with nothing
        raise CheckFailed(f"label check: label column(s) {missing} missing from the transformed data")
    t = transformed[labels].compute().reset_index(drop=True)
    if len(r) != len(t):
        raise CheckFailed(f"label check: {len(t)} transformed rows for {len(r)} raw rows")
    expected = {name: r[name] > 0 for name in layout.binary_labels}
    expected.update({name: r[name] >= threshold for name, threshold in layout.thresholds})
    if layout.watch_labels:
        fraction = r["watch_seconds"] / r["duration_seconds"].clip(lower=1)
        # As a fraction, as the label is: watch_threshold * duration can round past a whole second.
        expected["watched"] = fraction >= watch_threshold
    if duration_op is not None and "duration_watch" in labels:
        threshold = r["duration_seconds"].astype("float64") * 0.0
        bucket = r["duration_seconds"] * 0
        for edge in duration_op.bucket_edges:
            bucket = bucket + (r["duration_seconds"] >= edge).astype("int64")
        for b, value in enumerate(duration_op.thresholds):
            threshold = threshold + (bucket == b).astype("float64") * value
        expected["duration_watch"] = (r["click"] > 0) & (fraction >= threshold)
    mismatches = {}
    for name, want in expected.items():
        if name in labels:
            # As floats: an int cast truncated a label of 0.9 (or True for 1.5) to agree, and raised on NaN.
            bad = int((t[name].astype("float64") != want.astype("float64")).sum())
            if bad:
                mismatches[name] = bad
    if mismatches:
        raise CheckFailed(f"labels disagree with raw signals (rows per label): {mismatches}")
    return _record("labels_agree", rows=int(len(t)), labels=sorted(expected.keys() & set(labels)))


def check_temporal_split(split) -> dict:
    train_max = int(split.train["timestamp"].max().compute())
    if train_max >= split.cutoff:
        raise CheckFailed(f"a training event at {train_max} is not before the cutoff {split.cutoff}")
    for name, part in split.parts().items():
        if name == "train":
            continue
        first = part["timestamp"].min().compute()
        if first == first and int(first) < split.cutoff:  # first != first: empty part (NaN)
            raise CheckFailed(f"{name} has an event at {int(first)}, before the cutoff {split.cutoff}")
    if split.test is not None:  # the held-out parts in time order too: a test event before a validation one is tuned on
        valid_max, test_min = dask.compute(split.valid["timestamp"].max(), split.test["timestamp"].min())
        if valid_max == valid_max and test_min == test_min and int(valid_max) >= int(test_min):
            raise CheckFailed(f"valid has an event at {int(valid_max)}, not before test's first at {int(test_min)}")
    return _record("temporal_split", cutoff=int(split.cutoff))


def _sorted_features(ddf, columns):
    keys = [c for c in ddf.columns if c not in columns]  # the event's own columns: ids, time, signals
    keys = [c for c in ("user_id", "item_id", "timestamp") if c in keys] + [
        c for c in keys if c not in ("user_id", "item_id", "timestamp")
    ]  # ids and time first: a row flipped at the probe time still lines up with its original
    frame = ddf[keys + columns].compute()
    return frame.sort_values(keys + columns).reset_index(drop=True)


def _perturbed_signals(frame, skip):
    """``frame`` with every numeric column but ``skip`` replaced by ``1 - value`` (0/1 signals flip)."""
    return frame.assign(
        **{c: 1 - frame[c] for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c].dtype)}
    )


def check_point_in_time(events, at: int | None = None, compute=add_point_in_time_counts, columns=None) -> dict:
    """Recompute features after changing the future; features of the past must not move.

    Every event at or after ``at`` (default: the median timestamp) has every signal flipped (each
    numeric column but ids, time and weights becomes ``1 - value``), those after ``at`` move past the
    end of the log under new item ids, and a copy of each is added later still, so any feature that
    reads the future would change: its sums and counts, its maxima and last times, its distinct
    items, the time or item of a next event. The events at ``at`` itself
    are compared too: a feature of theirs may read only earlier events, so one that reads the
    event's own (flipped) outcome changes.
    """
    columns = columns or POINT_IN_TIME_COLUMNS
    if at is None:
        from workflows.splits import exact_quantiles

        at = exact_quantiles(events["timestamp"], [0.5])[0]
    base = events[[c for c in events.columns if c not in columns]]
    future = base[base["timestamp"] >= at]
    flipped = future.map_partitions(_perturbed_signals, {"user_id", "item_id", "timestamp", WEIGHT})
    last_time, last_item = dask.compute(base["timestamp"].max(), base["item_id"].max())
    shift = int(last_time) - int(at) + 1
    # Flipped in place, the events after ``at`` kept their times and items: a feature reading the next
    # event's time or item (time to the next event) did not move. They move past the log's end instead.
    after = flipped["timestamp"] > at
    moved = flipped.assign(timestamp=flipped["timestamp"].where(~after, flipped["timestamp"] + shift))
    later = flipped.assign(timestamp=flipped["timestamp"] + 2 * shift)
    if pd.api.types.is_integer_dtype(base["item_id"].dtype):  # items never seen: distinct counts change
        moved = moved.assign(item_id=moved["item_id"].where(~after, moved["item_id"] + (int(last_item) + 1)))
        later = later.assign(item_id=later["item_id"] + (int(last_item) + 1))
    perturbed = dd.concat([base[base["timestamp"] < at], moved, later])
    before = _sorted_features(compute(base), columns)
    after = _sorted_features(compute(perturbed), columns)
    before, after = before[before["timestamp"] <= at], after[after["timestamp"] <= at]
    if len(before) != len(after):
        raise CheckFailed(f"point-in-time probe: {len(before)} vs {len(after)} past rows")
    changed = {c: int((before[c].values != after[c].values).sum()) for c in columns}
    if any(changed.values()):
        raise CheckFailed(f"features of events up to {at} changed when only outcomes or later events did: {changed}")
    return _record(
        "point_in_time",
        probe_time=int(at),
        past_rows=int(len(before)),
        features=columns,
        future_rows_perturbed=int(future.shape[0].compute()),
    )
