"""Windowed activity features (``workflows/activity.py``): point-in-time in training, current at
serving, and the same value both ways for the same (user, time)."""

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from configs import FeatureConfig, SyntheticDataConfig
from workflows.activity import (
    add_activity_counts,
    column_names,
    encode,
    user_activity,
    window_counts,
)
from workflows.checks import CheckFailed, check_point_in_time
from workflows.point_in_time import WEIGHT
from workflows.sources.synthetic import generate

HOUR, DAY = 3600, 86400
WINDOWS = [HOUR, DAY, 7 * DAY]
NAMES = column_names(WINDOWS)


def frame(rows):
    out = pd.DataFrame(rows, columns=["user_id", "timestamp", "click"])
    return out.assign(item_id=np.arange(len(out)), watch_seconds=0, like=0, share=0)


def training_path(events: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """The pipeline's computation for rows at ``queries`` (user_id, timestamp): they are added as
    uncounted rows (as sampled negatives are) and get the counts of the real events before them."""
    real = events.assign(**{WEIGHT: 1})
    asked = queries.assign(click=0, item_id=-1, **{WEIGHT: 0}, _order=np.arange(len(queries)))
    both = pd.concat([real.assign(_order=-1), asked], ignore_index=True)
    out = add_activity_counts(dd.from_pandas(both, npartitions=3), WINDOWS).compute()
    return out[out[WEIGHT] == 0].sort_values("_order").reset_index(drop=True)


def test_an_event_at_the_rows_time_or_later_never_counts():
    base = 1_767_225_600
    events = frame(
        [
            (1, base - 8 * DAY, 1),  # outside every window
            (1, base - 2 * DAY, 1),  # 7 d only
            (1, base - HOUR, 0),  # exactly one hour before: inside 1 h (the window includes its start)
            (1, base - 10, 1),
            (1, base, 1),  # the row's own second: never
            (1, base + 5, 1),  # the future: never
            (2, base - 10, 1),  # another user
        ]
    )
    want = [2, 1, 2, 1, 3, 2]  # 1 h events, clicks; 24 h; 7 d
    offline = training_path(events, pd.DataFrame({"user_id": [1], "timestamp": [base]}))
    assert offline.loc[0, NAMES].tolist() == want
    mine = events[events["user_id"] == 1]
    online = user_activity(mine["timestamp"], mine["click"], base, WINDOWS)
    assert online.tolist() == encode(np.array(want)).tolist()
    # Rows of the log itself: the event at `base` sees the same as a query at `base`; the first sees nothing.
    log = add_activity_counts(dd.from_pandas(events, npartitions=2), WINDOWS).compute().set_index("item_id")
    assert log.loc[4, NAMES].tolist() == want and log.loc[0, NAMES].tolist() == [0] * 6
    # Serving at fractions of a second: the request is the row of its second (floor), so an event of
    # the same second does not count yet, and counts from the next second on.
    assert user_activity([base + 0.2], [1], base + 0.7, WINDOWS).tolist() == [0.0] * 6
    assert user_activity([base + 0.2], [1], base + 1.0, WINDOWS)[:2].tolist() == encode(np.array([1, 1])).tolist()


def test_grouped_counts_equal_a_direct_count_per_user():
    rng = np.random.default_rng(3)
    users, times = rng.integers(1, 6, 400), rng.integers(0, 10 * DAY, 400)
    clicks = rng.integers(0, 2, 400)
    q_users, q_times = rng.integers(1, 7, 50), rng.integers(0, 11 * DAY, 50)
    got = window_counts(times, clicks, q_times, WINDOWS, users, q_users)
    for j, (u, t) in enumerate(zip(q_users, q_times)):
        for i, w in enumerate(WINDOWS):
            inside = (users == u) & (times < t) & (times >= t - w)
            assert got[2 * i, j] == inside.sum() and got[2 * i + 1, j] == clicks[inside].sum()


def test_the_point_in_time_probe_covers_activity_and_catches_a_leak():
    events = dd.from_pandas(generate(SyntheticDataConfig(num_users=80, num_items=60, seed=5)).events, npartitions=3)
    record = check_point_in_time(events, compute=lambda d: add_activity_counts(d, WINDOWS), columns=NAMES)
    assert record["passed"] and record["past_rows"] > 0 and record["features"] == NAMES

    def peeks_a_day_ahead(d):  # counts events up to a day after the row
        early = d.assign(timestamp=d["timestamp"] - DAY, **{WEIGHT: d["timestamp"] * 0 + 1})
        both = add_activity_counts(dd.concat([early, d.assign(**{WEIGHT: d["timestamp"] * 0})]), WINDOWS)
        return both[both[WEIGHT] == 0].drop(columns=[WEIGHT])

    with pytest.raises(CheckFailed, match="user_events_last_24h"):
        check_point_in_time(events, compute=peeks_a_day_ahead, columns=NAMES)


def test_windows_are_configured_and_checked():
    assert FeatureConfig(activity_windows=["30m", "2d"]).activity_window_seconds == [1800, 2 * DAY]
    assert column_names([1800, 2 * DAY]) == [
        "user_events_last_30m",
        "user_clicks_last_30m",
        "user_events_last_48h",
        "user_clicks_last_48h",
    ]
    for bad in (["1w"], ["0h"], ["h"], ["1h", "60m"]):
        with pytest.raises(ValueError, match="activity_windows"):
            FeatureConfig(activity_windows=bad)


def test_pipeline_rows_carry_the_features_and_the_probe_checked_them(processed):
    probe = next(c for c in processed.summary["checks"] if c["check"] == "point_in_time")
    assert set(NAMES) <= set(probe["features"])
    # What the data carries is recorded: the checklist requires the probe from it, not from a training config.
    assert processed.summary["event_features"] == probe["features"]
    train = processed.train()
    assert train.schema.select_by_tag("activity").column_names == NAMES
    values = train.to_ddf()[NAMES].compute()
    assert (values.max() > 0).all() and (values.min() >= 0).all()
    assert set(NAMES) <= set(pd.read_parquet(processed.user_features).columns)


def test_heavy_ranker_uses_them_and_retrieval_does_not(model_version):
    manifest = model_version.manifest
    assert set(NAMES) <= set(manifest["heavy_ranker"]["features"])
    assert set(NAMES) <= set(manifest["features"]["user_continuous"])
    from serving.fast_inference import ServingFunction
    from serving.stages import import_tf

    tower = ServingFunction(import_tf(), model_version.path / "query_tower")
    assert not set(NAMES) & set(tower.input_names)


def test_training_and_serving_give_the_same_features(processed, model_version, triton_repo, raw_paths, tmp_path):
    """For the same (user, time): the training path (the pipeline's counts, then the fitted
    workflow's encoding) equals the serving path (FeatureLookup: the export's recent events plus
    live events, counted at ``now``)."""
    from serving.stages import FeatureLookup
    from workflows.live_store import LiveStore, ingest_events

    cutoff = int(processed.summary["cutoff"])
    recent = pd.read_parquet(processed.recent_events)
    raw = pd.read_parquet(raw_paths["events"])
    later = raw[raw["timestamp"] >= cutoff].drop_duplicates(["user_id", "timestamp", "item_id"])
    users = recent["user_id"].value_counts().index[:4].tolist()
    newcomer = 10**9 + 7  # a user the models never saw, active only after the export
    later = pd.concat(
        [
            later[later["user_id"].isin(users)],
            frame([(newcomer, cutoff + 60, 1), (newcomer, cutoff + 600, 0), (newcomer, cutoff + 900, 1)]),
        ]
    )[["user_id", "item_id", "timestamp", "click"]]
    store = LiveStore(tmp_path / "live.sqlite")
    live = later.assign(event=np.where(later["click"] > 0, "click", "view"))
    likes = live[live["click"] > 0].assign(event="like")  # a signal on a counted event: adds nothing
    ingest_events(store, pd.concat([live, likes])[["user_id", "item_id", "timestamp", "event"]])

    queries = []
    for user in [*users, newcomer]:
        own = later[later["user_id"] == user]["timestamp"].sort_values()
        tie = int(own.iloc[len(own) // 2]) if len(own) else cutoff + 7  # a time with an event of its own
        queries += [(user, t) for t in (cutoff, cutoff + HOUR + 17, tie, cutoff + 2 * DAY + 5, cutoff + 6 * DAY)]
    queries = pd.DataFrame(queries, columns=["user_id", "timestamp"])

    # Training path: counts as the pipeline computes them, encoded by the fitted workflow.
    events = pd.concat([recent, later[["user_id", "timestamp", "click"]]], ignore_index=True)
    counts = training_path(events.assign(item_id=0, watch_seconds=0, like=0, share=0), queries)
    workflow = processed.workflow().get_subworkflow("user_features")
    table = counts[["user_id", *NAMES]].copy()
    attributes = pd.read_parquet(raw_paths["users"])
    table = table.merge(attributes, on="user_id", how="left")
    for column in workflow.input_schema.column_names:
        if column not in table.columns:
            table[column] = 0
    from merlin.io import Dataset

    offline = workflow.transform(Dataset(table[workflow.input_schema.column_names])).to_ddf().compute()
    offline = offline[NAMES].to_numpy(dtype=np.float32)

    lookup = FeatureLookup(
        triton_repo / "feature_lookup" / str(model_version.version), live_store=str(tmp_path / "live.sqlite")
    )
    slots = lookup.activity_slots
    assert [lookup.features["user_continuous"][i] for i in slots] == NAMES
    online = []
    for user, t in queries.itertuples(index=False):
        lookup.clock = lambda t=t: float(t)
        out = lookup.run({"user_id": np.array([user], dtype=np.int64)})
        online.append(out["user_continuous"][slots])
    online = np.stack(online)
    np.testing.assert_array_equal(online, offline)
    assert (online > 0).any(axis=1).mean() > 0.5  # not vacuous: most (user, time) pairs had activity
    store.close()
