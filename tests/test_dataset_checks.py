"""Point-in-time features, splits, negative sampling and the correctness checks (each check must be
able to fail: every one is shown catching a planted defect)."""

import math

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from configs import SplitConfig, SyntheticDataConfig
from workflows.checks import (
    CheckFailed,
    check_labels_agree,
    check_no_duplicate_pairs,
    check_point_in_time,
    check_temporal_split,
)
from workflows.point_in_time import add_point_in_time_counts, totals_as_of
from workflows.sources.synthetic import generate

CFG = SyntheticDataConfig(num_users=200, num_items=120, events_per_user=30, seed=21)


@pytest.fixture(scope="module")
def events():
    return generate(CFG).events


def ddf(frame, parts=3):
    return dd.from_pandas(frame, npartitions=parts)


def test_point_in_time_counts_use_only_strictly_earlier_events():
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2],
            "item_id": [7, 8, 7, 9, 7],
            "timestamp": [10, 20, 20, 30, 15],
            "click": [1, 0, 1, 1, 1],
            "watch_seconds": 0,
            "like": 0,
            "share": 0,
        }
    )
    out = add_point_in_time_counts(ddf(events, 2)).compute().sort_values(["timestamp", "user_id", "item_id"])
    # user 1: the two events at t=20 do not see each other (same timestamp), only the one at t=10.
    assert list(out["user_events_before"]) == [0, 0, 1, 1, 3]
    assert list(out["user_clicks_before"]) == [0, 0, 1, 1, 2]
    # item 7 at t=10 (u1), t=15 (u2), t=20 (u1).
    item7 = out[out["item_id"] == 7]
    assert list(item7["item_events_before"]) == [0, 1, 2] and list(item7["item_clicks_before"]) == [0, 1, 2]


def test_serving_totals_equal_the_point_in_time_value_at_the_cutoff(events):
    cutoff = int(events["timestamp"].quantile(0.8))
    users, items = totals_as_of(ddf(events), cutoff)
    probe = pd.DataFrame(
        {
            "user_id": users["user_id"].values[:1],
            "item_id": items["item_id"].values[:1],
            "timestamp": [cutoff],
            "click": [0],
            "watch_seconds": [0],
            "like": [0],
            "share": [0],
        }
    )
    both = add_point_in_time_counts(ddf(pd.concat([events, probe], ignore_index=True))).compute()
    row = both[
        (both["timestamp"] == cutoff)
        & (both["user_id"] == probe["user_id"][0])
        & (both["item_id"] == probe["item_id"][0])
    ].iloc[-1]
    assert row["user_events_before"] == users["user_events_before"].iloc[0]
    assert row["item_clicks_before"] == items["item_clicks_before"].iloc[0]


def test_point_in_time_probe_passes_and_catches_a_leaky_feature(events):
    record = check_point_in_time(ddf(events))
    assert record["passed"] and record["past_rows"] > 0 and record["future_rows_perturbed"] > 0

    def leaky(d):  # a feature computed over the whole log, future included
        totals = d.groupby("user_id")["click"].sum().rename("user_clicks_total").reset_index()
        return d.merge(totals, on="user_id", how="left")

    with pytest.raises(CheckFailed, match="changed"):
        check_point_in_time(ddf(events), compute=leaky, columns=["user_clicks_total"])


@pytest.mark.parametrize("leak", ["last_time", "distinct_items", "ever_liked", "own_click"])
def test_point_in_time_probe_catches_leaks_that_flipping_clicks_and_duplicating_hid(events, leak):
    # The probe flipped only the click and duplicated future events in place: a feature reading the
    # user's last time, distinct items, another signal's maximum, or the event's own outcome passed.
    def leaky(d):
        if leak == "own_click":
            d = add_point_in_time_counts(d)
            return d.assign(user_clicks_before=d["user_clicks_before"] + d["click"])
        column, how = {"last_time": ("timestamp", "max"), "distinct_items": ("item_id", "nunique")}.get(
            leak, ("like", "max")
        )
        totals = getattr(d.groupby("user_id")[column], how)().rename("user_total").reset_index()
        return d.merge(totals, on="user_id", how="left")

    columns = None if leak == "own_click" else ["user_total"]
    with pytest.raises(CheckFailed, match="changed"):
        check_point_in_time(ddf(events), compute=leaky, columns=columns)


@pytest.mark.parametrize("column", ["timestamp", "item_id"])
def test_point_in_time_probe_catches_a_feature_reading_the_next_event(events, column):
    # Future events were flipped in place, keeping their times and items: the time to the user's next
    # event, or the next item, read the future and passed.
    def leaky(d):
        def per_partition(p):
            p = p.sort_values(["user_id", "timestamp"])
            return p.assign(next_event=p.groupby("user_id")[column].shift(-1).fillna(-1))

        return d.shuffle(on="user_id").map_partitions(per_partition)

    with pytest.raises(CheckFailed, match="changed"):
        check_point_in_time(ddf(events), compute=leaky, columns=["next_event"])


def test_no_duplicate_pairs_check_catches_duplicates(events):
    with pytest.raises(CheckFailed, match="duplicate"):
        check_no_duplicate_pairs(ddf(events))
    assert check_no_duplicate_pairs(ddf(events.drop_duplicates(["user_id", "item_id"])))["passed"]


def test_label_check_catches_a_corrupted_label():
    raw = pd.DataFrame(
        {
            "click": [1, 0, 1],
            "watch_seconds": [50, 0, 10],
            "duration_seconds": [60, 60, 60],
            "like": [1, 0, 0],
            "share": [0, 0, 0],
        }
    )
    good = pd.DataFrame(
        {"click": [1, 0, 1], "watched": [1, 0, 0], "duration_watch": [1, 0, 0], "like": [1, 0, 0], "share": [0, 0, 0]}
    )
    assert check_labels_agree(ddf(raw, 1), ddf(good, 1), 0.75)["passed"]
    bad = good.assign(watched=[1, 0, 1])
    with pytest.raises(CheckFailed, match="watched"):
        check_labels_agree(ddf(raw, 1), ddf(bad, 1), 0.75)


@pytest.mark.parametrize("value", [0.9, np.nan])
def test_label_check_catches_a_fractional_or_missing_label(value):
    # Compared as int64, a label of 0.9 for an unclicked row truncated to 0 and agreed; NaN raised a cast error.
    raw = pd.DataFrame({"click": [1, 0, 1]})
    from workflows.spec import Layout

    layout = Layout(signals=("click",), binary_labels=("click",), watch=False, duration=False)
    with pytest.raises(CheckFailed, match="click"):
        check_labels_agree(ddf(raw, 1), ddf(raw.assign(click=[1.0, value, 1.0]), 1), 0.75, layout=layout)


def test_label_check_fails_when_a_label_column_is_missing():
    # It compared only the labels present: an output without "like" (or without any label) passed.
    from workflows.spec import Layout

    raw = pd.DataFrame({"click": [1, 0, 1], "like": [1, 0, 0]})
    layout = Layout(signals=("click", "like"), binary_labels=("click", "like"), watch=False, duration=False)
    assert check_labels_agree(ddf(raw, 1), ddf(raw, 1), 0.75, layout=layout)["labels"] == ["click", "like"]
    for broken in (raw[["click"]], pd.DataFrame({"other": [0, 0, 0]})):
        with pytest.raises(CheckFailed, match="missing"):
            check_labels_agree(ddf(raw, 1), ddf(broken, 1), 0.75, layout=layout)


# --- splits ----------------------------------------------------------------------------------------


def test_temporal_split_with_test_part_and_its_check(events):
    from workflows.splits import temporal_split

    split = temporal_split(ddf(events), SplitConfig(valid_fraction=0.1, test_fraction=0.1))
    train, valid, test = (p.compute() for p in (split.train, split.valid, split.test))
    assert len(train) + len(valid) + len(test) == len(events)
    assert train["timestamp"].max() < split.cutoff <= valid["timestamp"].min()
    assert valid["timestamp"].max() < split.details["test_cutoff"] <= test["timestamp"].min()
    assert check_temporal_split(split)["passed"]
    split.train = ddf(pd.concat([train, test.head(3)]))  # plant future events in training
    with pytest.raises(CheckFailed, match="cutoff"):
        check_temporal_split(split)
    # Test and validation swapped: both after the cutoff, but the test part precedes what is tuned on.
    split.train, split.valid, split.test = ddf(train), ddf(test), ddf(valid)
    with pytest.raises(CheckFailed, match="not before test"):
        check_temporal_split(split)


def test_a_temporal_split_that_ties_leave_a_part_empty_is_a_named_defect():
    """A log batched by the day: 4 of 10 events share the last timestamp, so the validation and test
    cutoffs were both that timestamp and the validation part had 0 rows; the pipeline stopped at the
    attribute join on it (``KeyError: "['age_band', ...] not in index"``). All events in one second
    left the training part empty."""
    from workflows.splits import temporal_split
    from workflows.validate import DatasetError

    frame = pd.DataFrame({"user_id": 1, "item_id": range(10), "timestamp": [0, 1, 2, 3, 4, 5, 9, 9, 9, 9]})
    with pytest.raises(DatasetError, match="leaves the validation part empty: .* share timestamp 9"):
        temporal_split(ddf(frame), SplitConfig(valid_fraction=0.1, test_fraction=0.1))
    with pytest.raises(DatasetError, match="leaves the training part empty: .* share timestamp 7"):
        temporal_split(ddf(frame.assign(timestamp=7)), SplitConfig(valid_fraction=0.1, test_fraction=0.0))
    # Without a test part, or with ties that leave every part some events, the split stands.
    split = temporal_split(ddf(frame), SplitConfig(valid_fraction=0.2, test_fraction=0.0))
    assert [len(p.compute()) for p in split.parts().values()] == [6, 4]
    split = temporal_split(ddf(frame.assign(timestamp=range(10))), SplitConfig(valid_fraction=0.1, test_fraction=0.1))
    assert all(len(p.compute()) for p in split.parts().values())


def test_random_split_is_per_user_80_10_10_and_reproducible(events):
    from workflows.splits import random_split

    unique = events.drop_duplicates(["user_id", "item_id", "timestamp"])
    cfg = SplitConfig(kind="random")
    split = random_split(ddf(unique), cfg)
    parts = [p.compute() for p in (split.train, split.valid, split.test)]
    assert sum(len(p) for p in parts) == len(unique)
    # The log repeats pairs (re-impressions); the split counts a user's distinct items.
    pair_counts = [p.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size() for p in parts]
    sizes = pd.concat([c.rename(n) for c, n in zip(pair_counts, "tvs")], axis=1).fillna(0)
    total = sizes.sum(axis=1)
    # Per user: exactly RecBole's counts for the user's own number of items.
    from evaluation.protocols import recbole_split_sizes

    want = np.array([recbole_split_sizes(int(n), cfg.ratios) for n in total])
    np.testing.assert_array_equal(sizes[["t", "v", "s"]].to_numpy().astype(int), want)
    # A user with few interactions still has a test item (2 -> 1/0/1, 5 -> 3/1/1); the old cut at
    # rank / size >= 0.9 gave users of 2-9 none.
    few = pd.DataFrame({"user_id": [1] * 2 + [2] * 5, "item_id": range(7), "timestamp": range(7)})
    small = [p.compute().groupby("user_id").size() for p in random_split(ddf(few, 1), cfg).parts().values()]
    assert [[int(p.get(u, 0)) for p in small] for u in (1, 2)] == [[1, 0, 1], [3, 1, 1]]
    keys = ["user_id", "item_id", "timestamp"]
    again = random_split(ddf(unique, 5), cfg).train.compute()  # other partitioning, same split
    pd.testing.assert_frame_equal(
        parts[0].sort_values(keys)[keys].reset_index(drop=True), again.sort_values(keys)[keys].reset_index(drop=True)
    )


def test_random_split_keeps_every_event_of_a_pair_in_one_part():
    """The random split ordered events, not pairs: a pair's re-impressions (and rows whose keys a
    canonical-id merge made identical) fell into train and test alike, so after dedup_pairs a held-out
    positive was a training positive too (and, seen, was removed from the evaluation's ranking)."""
    from workflows.splits import random_split

    rows = [(u, i, 1000 * u + 10 * i + k, int(k == 0)) for u in range(40) for i in range(5) for k in range(3)]
    rows += [(u, 9, 5, c) for u in range(40) for c in (0, 1)]  # one key twice, click 0 and 1
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "click"])
    split = random_split(ddf(frame, 2), SplitConfig(kind="random"))
    parts = {n: p.compute() for n, p in split.parts().items()}
    assert sum(len(p) for p in parts.values()) == len(frame)
    pairs = pd.concat([p[["user_id", "item_id"]].drop_duplicates().assign(part=n) for n, p in parts.items()])
    in_parts = pairs.groupby(["user_id", "item_id"])["part"].nunique()
    assert len(in_parts) == 40 * 6 and in_parts.max() == 1, f"{int((in_parts > 1).sum())} pairs in two parts"
    # ...and the per-user counts are RecBole's for 6 items: 4/1/1.
    assert [parts[n].drop_duplicates(["user_id", "item_id"]).shape[0] for n in parts] == [160, 40, 40]


def test_a_random_split_with_a_test_ratio_of_0_has_no_test_part(events):
    """ratios [0.8, 0.2, 0] gave an empty test part (no user gets a test item), and the pipeline
    stopped at the attribute join on it (``KeyError: "['age_band', ...] not in index"``); a temporal
    split with test_fraction 0 has no test part at all."""
    from workflows.splits import random_split

    unique = events.drop_duplicates(["user_id", "item_id", "timestamp"])
    split = random_split(ddf(unique), SplitConfig(kind="random", ratios=[0.8, 0.2, 0.0]))
    assert split.test is None and list(split.parts()) == ["train", "valid"]
    assert sum(len(p.compute()) for p in split.parts().values()) == len(unique)


def split_halves(events):
    """The log's distinct events and its first and second halves as split-file rows."""
    keys = ["user_id", "item_id", "timestamp"]
    unique = events.drop_duplicates(keys)
    n = len(unique)
    return unique, unique.iloc[: n // 2][keys], unique.iloc[n // 2 :][keys]


def split_files(tmp_path, train, valid) -> SplitConfig:
    """``train`` and ``valid`` written as an explicit split's files, and the split config naming them."""
    train.to_parquet(tmp_path / "train.parquet")
    valid.to_parquet(tmp_path / "valid.parquet")
    return SplitConfig(
        kind="explicit", train_file=str(tmp_path / "train.parquet"), valid_file=str(tmp_path / "valid.parquet")
    )


def test_explicit_split_reproduces_the_given_files(events, tmp_path):
    from workflows.splits import explicit_split

    keys = ["user_id", "item_id", "timestamp"]
    unique = events.drop_duplicates(keys)
    shuffled = unique.sample(frac=1.0, random_state=1)
    n = len(shuffled)
    cfg = split_files(tmp_path, shuffled.iloc[: n // 2][keys], shuffled.iloc[n // 2 :][keys])
    split = explicit_split(ddf(unique), cfg)
    got = split.train.compute()[keys].sort_values(keys).reset_index(drop=True)
    want = shuffled.iloc[: n // 2][keys].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    # An item the pipeline merged into another (a duplicate id): the file names it by its raw id.
    # With the pipeline's item map those events keep their part; without it they fall out.
    canonical = int(shuffled.iloc[0]["item_id"])
    raw = int(unique["item_id"].max()) + 1
    listed = shuffled.iloc[: n // 2][keys].copy()
    listed.loc[listed["item_id"] == canonical, "item_id"] = raw
    listed.to_parquet(tmp_path / "train.parquet")
    item_map = pd.DataFrame({"item_id": [canonical, raw], "canonical_item_id": [canonical, canonical]})
    mapped = explicit_split(ddf(unique), cfg, item_map).train.compute()[keys].sort_values(keys)
    pd.testing.assert_frame_equal(mapped.reset_index(drop=True), want)
    unmapped = explicit_split(ddf(unique), cfg).train.compute()
    assert len(unmapped) == len(want) - (want["item_id"] == canonical).sum() < len(want)
    # ...and the split says so: events of the log in no part, file rows that matched no event.
    lost = int((want["item_id"] == canonical).sum())
    details = explicit_split(ddf(unique), cfg).details
    assert details["events_in_no_part"] == lost and details["file_rows_matching_no_event"] == lost
    assert explicit_split(ddf(unique), cfg, item_map).details["events_in_no_part"] == 0
    # Two raw ids of one item can make events of two parts one (MovieLens: a user rated both copies of
    # a film in one second): it stays in training only, and the split says how many.
    moved = listed[listed["item_id"] == raw].head(1).assign(item_id=canonical)
    valid_file = pd.concat([shuffled.iloc[n // 2 :][keys], moved])
    valid_file.to_parquet(tmp_path / "valid.parquet")
    split = explicit_split(ddf(unique), cfg, item_map)
    assert split.details["events_kept_in_an_earlier_part"] == 1
    valid = split.valid.compute()[keys]
    assert len(valid.merge(moved, on=keys)) == 0 and len(split.train.compute()[keys].merge(moved, on=keys)) == 1
    shuffled.iloc[n // 2 :][keys].to_parquet(tmp_path / "valid.parquet")
    # An event listed in two parts would be trained on and evaluated on: refused, naming the files.
    from workflows.validate import DatasetError

    pd.concat([listed, shuffled.iloc[n // 2 : n // 2 + 3][keys]]).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match="lists events .*train.parquet lists too .*3 rows"):
        explicit_split(ddf(unique), cfg, item_map)
    with pytest.raises(FileNotFoundError, match="nope"):
        explicit_split(ddf(unique), SplitConfig(kind="explicit", train_file="nope.parquet", valid_file="x"))


SHARED_KEYS = {
    "train": pd.DataFrame({"user_id": [1, 2], "item_id": [10, 20], "timestamp": [100, 200]}),
    "valid": pd.DataFrame({"user_id": [2, 3], "item_id": [20, 30], "timestamp": [200, 300]}),
}


def test_events_shared_by_two_split_files_are_named_wherever_the_merge_puts_them():
    """The example event was read with ``head(1)``, the merge's first partition only: where it held
    no shared event, an IndexError (single positional indexer is out-of-bounds) instead of the defect."""
    from workflows import splits
    from workflows.validate import DatasetError

    keys = {name: ddf(frame) for name, frame in SHARED_KEYS.items()}
    with pytest.raises(DatasetError, match="lists events train.parquet lists too") as err:
        splits._refuse_shared_events(keys, {"train": "train.parquet", "valid": "valid.parquet"})
    assert err.value.defects[0].example == [2, 20, 200] and err.value.defects[0].rows == 1


class _DeviceSeries(pd.Series):
    """A series as cudf's: no conversion to host memory through ``tolist()``."""

    @property
    def _constructor(self):
        return _DeviceSeries

    def tolist(self):
        raise TypeError("cuDF does not support conversion to host memory via the `tolist()` method")


class _DeviceFrame(pd.DataFrame):
    """A frame as cudf's: its rows are device series; ``to_pandas()`` brings it to host memory."""

    @property
    def _constructor(self):
        return _DeviceFrame

    @property
    def _constructor_sliced(self):
        return _DeviceSeries

    def to_pandas(self):
        return pd.DataFrame(self)


def test_events_shared_by_two_split_files_are_named_on_cudf_partitions_too(monkeypatch):
    """The split files are read as cudf on a GPU machine: the example event of the defect was taken
    with ``.iloc[0].tolist()``, which cudf refuses (a TypeError instead of the DatasetError)."""
    from workflows import splits
    from workflows.validate import DatasetError

    merge = splits.dd.merge

    class OnDevice:
        def __init__(self, collection):
            self.collection, self.shape = collection, collection.shape

        def head(self, n, npartitions=1):
            return _DeviceFrame(self.collection.head(n, npartitions=npartitions))

    monkeypatch.setattr(splits.dd, "merge", lambda *a, **k: OnDevice(merge(*a, **k)))
    keys = {name: ddf(frame) for name, frame in SHARED_KEYS.items()}
    with pytest.raises(DatasetError, match="lists events train.parquet lists too") as err:
        splits._refuse_shared_events(keys, {"train": "train.parquet", "valid": "valid.parquet"})
    assert err.value.defects[0].example == [2, 20, 200] and err.value.defects[0].rows == 1


def test_an_explicit_split_file_that_matches_no_event_is_a_named_defect(events, tmp_path):
    """A valid file in milliseconds matched no event: the split returned an empty validation part and
    the pipeline stopped at the attribute join (``KeyError: "['age_band', ...] not in index"``), so the
    unmatched rows it reports were never seen; a train file so gave ``int(NaN)``."""
    from workflows.splits import explicit_split
    from workflows.validate import DatasetError

    unique, train, valid = split_halves(events)
    for name, (a, b) in {
        "valid": (train, valid.assign(timestamp=valid["timestamp"] * 1000)),
        "train": (train.assign(timestamp=train["timestamp"] * 1000), valid),
    }.items():
        cfg = split_files(tmp_path, a, b)
        with pytest.raises(DatasetError, match=f"{name}.parquet: no row matches an event of the log"):
            explicit_split(ddf(unique), cfg)


def test_invalid_split_kinds_are_named():
    with pytest.raises(ValueError, match="kind"):
        SplitConfig(kind="shuffled")
    with pytest.raises(ValueError, match="train_file"):
        SplitConfig(kind="explicit")


FEATURES = ["user_events_before", "user_clicks_before", "item_events_before", "item_clicks_before"]
WINDOW = ["user_events_last_1h", "user_clicks_last_1h"]


def workflow_config(split: dict):
    from configs import load_config

    return load_config(overrides={"workflow": {"split": split, "features": {"activity_windows": ["1h"]}}}).workflow


def counted_before(rows, counted):
    """Each row's features recounted in plain pandas over ``counted``: its strictly earlier events."""
    want = rows[["user_id", "item_id", "timestamp"]].reset_index(drop=True).copy()
    for key, names in (("user_id", FEATURES[:2]), ("item_id", FEATURES[2:])):
        pairs = want.reset_index().merge(counted[[key, "timestamp", "click"]], on=key, suffixes=("", "_c"))
        before = pairs[pairs["timestamp_c"] < pairs["timestamp"]].groupby("index")["click"]
        want[names[0]] = before.size().reindex(want.index, fill_value=0).values
        want[names[1]] = before.sum().reindex(want.index, fill_value=0).values
        if key == "user_id":
            recent = pairs[
                (pairs["timestamp_c"] < pairs["timestamp"]) & (pairs["timestamp_c"] >= pairs["timestamp"] - 3600)
            ]
            recent = recent.groupby("index")["click"]
            want[WINDOW[0]] = recent.size().reindex(want.index, fill_value=0).values
            want[WINDOW[1]] = recent.sum().reindex(want.index, fill_value=0).values
    return want


def test_features_under_an_explicit_split_count_only_earlier_training_events(tmp_path):
    """The features were computed on the whole log before the split: under a random or explicit split a
    training row counted the held-out events before it (their labels leaked into training features),
    while the serving tables count the training part only. Now every part counts earlier training
    events only: a user's held-out click before a training event does not raise its counts."""
    from workflows.pipeline import features_and_split
    from workflows.point_in_time import WEIGHT

    keys = ["user_id", "item_id", "timestamp"]
    log = pd.DataFrame(
        {  # user 1: a held-out click on 7 at t=10, then training events; user 2: a held-out click on 8
            "user_id": [1, 1, 1, 2, 2],
            "item_id": [7, 8, 9, 8, 9],
            "timestamp": [10, 20, 30, 15, 40],
            "click": [1, 0, 1, 1, 1],
        }
    ).assign(watch_seconds=0, like=0, share=0)
    valid = log["timestamp"].isin([10, 15])
    config = workflow_config(split_files(tmp_path, log[~valid][keys], log[valid][keys]).__dict__)
    split, counted = features_and_split(ddf(log, 2), config)
    train = split.train.compute().sort_values("timestamp")
    held = split.valid.compute().sort_values("timestamp")
    assert list(train.columns) == list(log.columns) + FEATURES + WINDOW == list(held.columns)
    # (1, 8, 20): no earlier training event of user 1 or item 8 (old code: 1 click of each, held out).
    assert train[FEATURES + WINDOW].values.tolist() == [[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert held[FEATURES + WINDOW].values.tolist() == [[0] * 6, [0] * 6]  # held-out rows count none either
    # The training rows' counts as of the end are the serving tables' totals (counted over the training part).
    users, items = totals_as_of(split.train, split.cutoff)
    assert users.set_index("user_id").loc[[1, 2]].values.tolist() == [[2, 1], [1, 1]]
    assert items.set_index("item_id").loc[[8, 9]].values.tolist() == [[1, 0], [2, 2]]
    weights = counted.compute().set_index(keys)[WEIGHT]
    assert weights.sort_index().tolist() == [0, 1, 1, 0, 1]


def test_features_under_a_random_split_count_only_earlier_training_events(events):
    """Random split of the synthetic log: every row of every part (and every sampled negative) has the
    counts of the training part's strictly earlier events; the held-out parts' events are never counted,
    and the point-in-time probe still passes on the log the features counted."""
    from workflows.pipeline import _negatives_with_features, event_feature_columns, event_features, features_and_split

    unique = events.drop_duplicates(["user_id", "item_id", "timestamp"])
    config = workflow_config({"kind": "random"})
    split, counted = features_and_split(ddf(unique), config)
    parts = {name: part.compute() for name, part in split.parts().items()}
    assert sum(len(p) for p in parts.values()) == len(unique) and list(parts) == ["train", "valid", "test"]
    train = parts["train"]
    for part in parts.values():
        got = part[FEATURES + WINDOW].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, counted_before(part, train)[FEATURES + WINDOW], check_dtype=False)
    # Counted over the whole log (the old order: features, then the split), training rows differ.
    whole = event_features(ddf(unique), config).compute()
    old = train[["user_id", "item_id", "timestamp"]].merge(whole, on=["user_id", "item_id", "timestamp"])
    assert (old["user_events_before"].values > counted_before(old, train)["user_events_before"].values).any()
    # Sampled negatives count the training events too, not the held-out ones.
    items = pd.DataFrame({"item_id": np.arange(1, CFG.num_items + 1)})
    config.negative_sampling.kind = "uniform"
    negatives = _negatives_with_features(split.train, counted, items, config, True).compute()
    assert len(negatives) > 0
    got = negatives[FEATURES + WINDOW].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, counted_before(negatives, train)[FEATURES + WINDOW], check_dtype=False)
    # The probe on the weighted log: no feature of the past moves when the future changes.
    columns = event_feature_columns(config)
    record = check_point_in_time(counted, compute=lambda d: event_features(d, config), columns=columns)
    assert record["passed"] and record["past_rows"] > 0


def test_a_random_split_without_event_features_is_the_split_alone_on_the_same_partitions(events):
    """No feature to count (configs/movielens-recbole.yaml): each part is the split's own, the same rows
    in the same partitions, so what is drawn per partition downstream (sampled negatives, seeded by the
    partition's number) is what it was before features were counted after the split."""
    from configs import load_config
    from workflows.pipeline import features_and_split
    from workflows.splits import split_events

    unique = events.drop_duplicates(["user_id", "item_id", "timestamp"])
    overrides = {"split": {"kind": "random"}, "features": {"point_in_time": False, "activity_windows": []}}
    config = load_config(overrides={"workflow": overrides}).workflow
    log = ddf(unique)
    split, _ = features_and_split(log, config)
    before = split_events(log.persist(), config.split)  # the old order: the feature-less log, then the split

    def rows(frame):  # the split's shuffle orders rows as they come: the same rows in any order
        return frame.sort_values(list(frame.columns)).reset_index(drop=True)

    for name, part in split.parts().items():
        old = before.parts()[name]
        assert part.npartitions == old.npartitions, name
        for i in range(part.npartitions):
            pd.testing.assert_frame_equal(rows(part.get_partition(i).compute()), rows(old.get_partition(i).compute()))


def test_features_under_a_temporal_split_are_computed_on_the_whole_log_as_before(events):
    """Under a temporal split every held-out event follows every training one: the features stay those
    of the whole log (held-out rows count the held-out events before them), computed before the split."""
    from workflows.pipeline import event_features, features_and_split
    from workflows.splits import split_events

    unique = events.drop_duplicates(["user_id", "item_id", "timestamp"])
    config = workflow_config({"kind": "temporal", "valid_fraction": 0.1, "test_fraction": 0.1})
    split, counted = features_and_split(ddf(unique), config)
    before = split_events(event_features(ddf(unique), config), config.split)
    assert split.cutoff == before.cutoff and split.details == before.details

    def rows(ddf):  # the shuffles order rows as they come; the same rows in any order
        frame = ddf.compute()
        return frame.sort_values(list(frame.columns)).reset_index(drop=True)

    for name, part in split.parts().items():
        pd.testing.assert_frame_equal(rows(part), rows(before.parts()[name]))
    pd.testing.assert_frame_equal(rows(counted), rows(event_features(ddf(unique), config)))
    valid = split.valid.compute()
    assert (valid[FEATURES + WINDOW].values == counted_before(valid, unique)[FEATURES + WINDOW].values).all()
    assert (
        valid["user_events_before"].values > counted_before(valid, split.train.compute())["user_events_before"].values
    ).any()


# --- negative sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_negatives_are_unseen_items_with_zero_signals(events, kind):
    from workflows.negative_sampling import sample_negatives

    items = pd.DataFrame({"item_id": np.arange(1, CFG.num_items + 1)})
    neg = sample_negatives(ddf(events), items, ratio=2.0, kind=kind, seed=3).compute()
    positives = int((events["click"] == 1).sum())
    # ratio 2 draws 2 per positive; draws that hit an item the user saw are dropped (small catalog: many).
    assert positives < len(neg) <= 2 * positives + 3
    seen = set(zip(events["user_id"], events["item_id"]))
    assert not any(pair in seen for pair in zip(neg["user_id"], neg["item_id"]))
    assert (neg[["click", "watch_seconds", "like", "share"]] == 0).all().all()
    assert list(neg.columns) == list(events.columns)


def test_negatives_avoid_pairs_seen_in_other_parts(events):
    from workflows.negative_sampling import sample_negatives

    # A validation part's negatives must not be items the user has in training either.
    items = pd.DataFrame({"item_id": np.arange(1, CFG.num_items + 1)})
    part, other = events.iloc[: len(events) // 5], events.iloc[len(events) // 5 :]
    neg = sample_negatives(ddf(part), items, ratio=4.0, kind="uniform", seed=5, seen=ddf(events)).compute()
    seen = set(zip(events["user_id"], events["item_id"]))
    assert len(neg) > 0 and not any(pair in seen for pair in zip(neg["user_id"], neg["item_id"]))
    assert set(neg["user_id"]) <= set(part.loc[part["click"] == 1, "user_id"])
    # Without `seen`, the same draw does pick pairs that only the other parts hold: the check above bites.
    unaware = sample_negatives(ddf(part), items, ratio=4.0, kind="uniform", seed=5).compute()
    only_other = set(zip(other["user_id"], other["item_id"])) - set(zip(part["user_id"], part["item_id"]))
    assert any(pair in only_other for pair in zip(unaware["user_id"], unaware["item_id"]))


def test_each_positive_gets_ratio_negatives_not_a_draw_with_replacement():
    from workflows.negative_sampling import sample_negatives

    # 100 users with one click each and a catalog none of them saw: no draw is dropped.
    events = pd.DataFrame({"user_id": np.arange(100), "item_id": 5000 + np.arange(100), "timestamp": 1000})
    events = events.assign(click=1, watch_seconds=0, like=0, share=0)
    items = pd.DataFrame({"item_id": np.arange(1, 121)})
    for ratio, counts in ((2.0, {2}), (2.5, {2, 3})):
        neg = sample_negatives(ddf(events, 2), items, ratio=ratio, kind="uniform", seed=3).compute()
        per_user = neg.groupby("user_id").size().reindex(events["user_id"], fill_value=0)
        # It was 0 to 6 at ratio 2: the positives were drawn with replacement.
        assert set(per_user) == counts, (ratio, per_user.min(), per_user.max())
        assert len(neg) == math.ceil(ratio * 50) * 2


def test_a_fractional_ratio_draws_its_share_not_one_more_by_float_rounding():
    from workflows.negative_sampling import sample_negatives

    # 0.07 * 100 is 7.000000000000001 in floats: ceil() drew 8 negatives for 100 positives.
    events = pd.DataFrame({"user_id": np.arange(100), "item_id": 5000 + np.arange(100), "timestamp": 1000})
    events = events.assign(click=1, watch_seconds=0, like=0, share=0)
    items = pd.DataFrame({"item_id": np.arange(1, 121)})
    neg = sample_negatives(ddf(events, 1), items, ratio=0.07, kind="uniform", seed=3).compute()
    assert len(neg) == 7


def test_popularity_sampler_prefers_popular_items(events):
    from workflows.negative_sampling import sample_negatives

    items = pd.DataFrame({"item_id": np.arange(1, CFG.num_items + 1)})
    counts = events["item_id"].value_counts()
    top = set(counts.index[:12])
    share = {}
    for kind in ("uniform", "popularity"):
        neg = sample_negatives(ddf(events), items, ratio=1.0, kind=kind, seed=4).compute()
        share[kind] = neg["item_id"].isin(top).mean()
    assert share["popularity"] > 2 * share["uniform"], share


@pytest.mark.parametrize("column", ["user_id", "timestamp"])
def test_an_explicit_split_file_with_text_or_datetime_keys_is_a_named_defect(events, tmp_path, column):
    """Ids written as text (or timestamps as datetimes) failed in the join with pandas' "You are trying
    to merge on int64 and object columns", naming neither the file nor the column."""
    from workflows.splits import explicit_split
    from workflows.validate import DatasetError

    unique, train, valid = split_halves(events)
    n = len(unique)
    if column == "user_id":
        valid = valid.astype({"user_id": str})
    else:
        valid = valid.assign(timestamp=pd.to_datetime(valid["timestamp"], unit="s"))
    cfg = split_files(tmp_path, train, valid)
    with pytest.raises(DatasetError, match=f"valid.parquet: column '{column}': must hold integers"):
        explicit_split(ddf(unique), cfg)
    # pyarrow-backed integers are integers: the join takes them as it did.
    split_files(tmp_path, train, split_halves(events)[2].astype("int64[pyarrow]"))
    assert len(explicit_split(ddf(unique), cfg).valid.compute()) == n - n // 2


def test_an_explicit_split_file_with_nullable_integer_keys_is_joined(events, tmp_path):
    """A file of pandas' nullable ``Int64`` columns (``convert_dtypes``) failed in the join with
    ``TypeError: int() argument must be ... not 'NAType'``."""
    from workflows.splits import explicit_split

    unique, train, valid = split_halves(events)
    cfg = split_files(tmp_path, train, valid.astype("Int64"))
    split = explicit_split(ddf(unique), cfg)
    assert len(split.valid.compute()) == len(valid) and len(split.train.compute()) == len(train)
    assert split.details["file_rows_matching_no_event"] == 0 and split.details["events_in_no_part"] == 0
