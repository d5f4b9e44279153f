"""The raw schema: the tables the synthetic world and the MovieLens mapping write.

Any other event log is read through a dataset spec (``workflows/spec.py``, ``docs/own-data.md``);
this schema is one such spec, ``configs/datasets/raw-schema.yaml``. The validation of a spec's files
(every defect, one error) is ``workflows/validate.py``; ``check_columns`` and ``check_event_values``
below are the raw schema's own quick checks, for frames already in memory.

events: one row per impression
    user_id (int64), item_id (int64), timestamp (int64, unix seconds), click (0/1),
    watch_seconds (int64, 0 when not clicked), like (0/1), share (0/1)
users: one row per user
    user_id (int64), age_band (str), gender (str), location (str)
items: one row per item
    item_id (int64), category (str), duration_seconds (int64), title (str)
"""

from __future__ import annotations

EVENT_COLUMNS = ["user_id", "item_id", "timestamp", "click", "watch_seconds", "like", "share"]
USER_COLUMNS = ["user_id", "age_band", "gender", "location"]
ITEM_COLUMNS = ["item_id", "category", "duration_seconds", "title"]

USER_CATEGORICAL = ["age_band", "gender", "location"]
ITEM_CATEGORICAL = ["category"]
ITEM_CONTINUOUS = ["duration_seconds"]
SIGNALS = ["click", "watch_seconds", "like", "share"]


def check_columns(df, required: list[str], table: str) -> None:
    """Fail with a message naming the missing columns, instead of a KeyError deep in a workflow."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{table} table is missing column(s) {missing}; raw schema needs {required}")


def check_event_values(ddf) -> None:
    """Fail with a message naming the column when signals are out of range (one pass over the log).

    click, like and share must be 0/1; watch_seconds and timestamp must not be negative.
    """
    import dask

    binary = ["click", "like", "share"]
    lows, highs = dask.compute(
        {c: ddf[c].min() for c in binary + ["watch_seconds", "timestamp"]}, {c: ddf[c].max() for c in binary}
    )
    for column in binary:
        if lows[column] < 0 or highs[column] > 1:
            raise ValueError(f"events.{column} must be 0 or 1, found values in [{lows[column]}, {highs[column]}]")
    for column in ("watch_seconds", "timestamp"):
        if lows[column] < 0:
            raise ValueError(f"events.{column} must not be negative, found {lows[column]}")
