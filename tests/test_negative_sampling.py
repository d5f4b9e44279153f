"""The rankers' negative samplers: the light ranker's (positives kept, ``ratio`` negatives each, by
strategy) and the heavy ranker's affinity hard negatives."""

import numpy as np
import pandas as pd
import pytest

from models.negative_sampling import affinity_negatives, sample_negatives


def _frame(n_users=50, n_items=40, rows=2000, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.zipf(1.6, size=rows) % n_items + 3  # skewed popularity
    return pd.DataFrame(
        {
            "user_id": rng.integers(3, n_users + 3, size=rows),
            "item_id": items,
            "category": items % 5 + 3,  # an item attribute that must travel with the sampled item
            "click": rng.random(rows) < 0.3,
        }
    ).astype({"click": "int64"})


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_each_positive_gets_ratio_negatives_with_consistent_item_features(strategy):
    frame = _frame()
    out = sample_negatives(frame, ["item_id", "category"], ratio=3, strategy=strategy, seed=1)
    n_pos = int((frame["click"] > 0).sum())
    assert (out["click"] == 1).sum() == n_pos and (out["click"] == 0).sum() == 3 * n_pos
    assert list(out.columns) == list(frame.columns)
    assert (out["category"] == out["item_id"] % 5 + 3).all()  # item attribute looked up, not copied
    assert set(out["item_id"]) <= set(frame["item_id"])
    # Each user keeps its number of rows: positives plus 3 negatives each.
    per_user = out.groupby("user_id").size()
    expected = frame[frame["click"] > 0].groupby("user_id").size() * 4
    pd.testing.assert_series_equal(per_user.sort_index(), expected.sort_index(), check_names=False)


def test_popularity_sampling_follows_item_frequency_and_uniform_does_not():
    frame = _frame(rows=20000)
    positives = frame[frame["click"] > 0]
    top_item = positives["item_id"].value_counts().index[0]
    share_in_positives = (positives["item_id"] == top_item).mean()
    shares = {}
    for strategy in ("uniform", "popularity"):
        out = sample_negatives(frame, ["item_id", "category"], ratio=4, strategy=strategy, seed=2)
        negatives = out[out["click"] == 0]
        shares[strategy] = (negatives["item_id"] == top_item).mean()
    n_items = frame["item_id"].nunique()
    assert abs(shares["uniform"] - 1 / n_items) < 0.01
    assert abs(shares["popularity"] - share_in_positives) < 0.03
    assert shares["popularity"] > 3 * shares["uniform"]


def test_sampling_is_seeded():
    frame = _frame()
    a = sample_negatives(frame, ["item_id", "category"], 2, "popularity", seed=5)
    b = sample_negatives(frame, ["item_id", "category"], 2, "popularity", seed=5)
    pd.testing.assert_frame_equal(a, b)


def test_bad_arguments_are_named():
    frame = _frame()
    with pytest.raises(ValueError, match="strategy"):
        sample_negatives(frame, ["item_id"], 2, "random")
    with pytest.raises(ValueError, match="negatives per positive"):
        sample_negatives(frame, ["item_id"], 0, "uniform")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['genre'\]"):
        sample_negatives(frame, ["item_id", "genre"], 2, "uniform")
    with pytest.raises(ValueError, match="no row has a positive"):
        sample_negatives(frame.assign(click=0), ["item_id"], 2, "uniform")


def test_affinity_negatives_are_the_users_top_unrated_items_with_their_own_features():
    # Users 0 and 1; items 0-4 have rows, item 5 has none (it cannot be drawn: no item features).
    frame = pd.DataFrame(
        {
            "user_id": [0, 0, 0, 1, 1],
            "age": [30, 30, 30, 50, 50],
            "item_id": [0, 1, 2, 3, 4],
            "category": [10, 11, 12, 13, 14],
            "click": [1, 1, 0, 1, 0],
            "like": [0, 1, 0, 0, 0],
        }
    )
    weights = np.zeros((6, 6), dtype=np.float32)
    weights[0, [2, 3, 4, 5]] = [0.1, 0.5, 0.9, 5.0]  # user 0 (items 0, 1): 5 > 4 > 3 > 2
    weights[1, [2, 3]] = [0.05, 0.2]
    weights[3, [0, 4]] = [-1.0, 0.3]  # user 1 (item 3): 4 > 1, 2 > 0
    negatives = affinity_negatives(frame, weights, 2, ["click", "like"], ["item_id", "category"])

    pairs = set(zip(negatives["user_id"], negatives["item_id"]))
    assert pairs == {(0, 4), (0, 3), (1, 4), (1, 1)} or pairs == {(0, 4), (0, 3), (1, 4), (1, 2)}
    assert (negatives[["click", "like"]] == 0).all().all()
    assert (negatives["category"] == negatives["item_id"] + 10).all()  # the item's own features
    assert (negatives["age"] == negatives["user_id"].map({0: 30, 1: 50})).all()  # the user's
    assert list(negatives.columns) == list(frame.columns) and dict(negatives.dtypes) == dict(frame.dtypes)
    # Never an item the user has a positive for; asking for more than exist gives what there is.
    many = affinity_negatives(frame, weights, 10, ["click", "like"], ["item_id", "category"])
    assert sorted(many[many["user_id"] == 0]["item_id"]) == [2, 3, 4]
    assert sorted(many[many["user_id"] == 1]["item_id"]) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="outside the 3 items"):
        affinity_negatives(frame, weights[:3, :3], 2, ["click"], ["item_id", "category"])


def test_affinity_negatives_of_a_frame_without_positives_are_none():
    # No user has a positive: no hard negatives (it crashed with numpy's "need at least one array").
    frame = pd.DataFrame({"user_id": [0, 1], "item_id": [0, 1], "category": [10, 11], "click": [0, 0]})
    negatives = affinity_negatives(frame, np.eye(3, dtype=np.float32), 2, ["click"], ["item_id", "category"])
    assert len(negatives) == 0
    assert list(negatives.columns) == list(frame.columns) and dict(negatives.dtypes) == dict(frame.dtypes)


def time_varying_frame(users: int = 30, items: int = 10) -> pd.DataFrame:
    """Rows in time order whose point-in-time and context columns change from row to row: each item's
    and user's first row holds the no-history value 0, later ones 1, 2, ..."""
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(users), 3)
    item = rng.integers(0, items, len(user))
    frame = pd.DataFrame({"user_id": user, "item_id": item, "click": 1})
    frame["hour"] = rng.integers(0, 24, len(frame))  # context: the event's own hour
    frame["user_rate"] = frame.groupby("user_id").cumcount().astype(np.float64)  # 0 on the first row
    frame["item_rate"] = frame.groupby("item_id").cumcount().astype(np.float64)
    frame["category"] = frame["item_id"] + 100  # static
    return frame


def copied_from_rows(negatives, frame, key, columns) -> bool:
    """Each negative's ``columns`` are those of some row of its ``key`` in ``frame``."""
    rows = set(map(tuple, frame[[key, *columns]].to_numpy().tolist()))
    return all(tuple(r) in rows for r in negatives[[key, *columns]].to_numpy().tolist())


def test_hard_negatives_copy_random_rows_not_the_first_no_history_one():
    # They copied the user's first positive row and the item's first row: every hard negative carried
    # the no-history prior (user_rate 0, item_rate 0) and the first event's hour, which no positive
    # but the first did, a shortcut. (Old code: all(negatives["item_rate"] == 0).)
    frame = time_varying_frame()
    weights = np.ones((10, 10), dtype=np.float32)
    negatives = affinity_negatives(frame, weights, 5, ["click"], ["item_id", "item_rate", "category"], seed=3)
    assert len(negatives) > 100
    assert (negatives["item_rate"] > 0).mean() > 0.5
    assert (negatives["user_rate"] > 0).mean() > 0.5
    assert copied_from_rows(negatives, frame, "item_id", ["item_rate", "category"])
    assert copied_from_rows(negatives, frame, "user_id", ["user_rate", "hour"])  # one positive row, whole
    again = affinity_negatives(frame, weights, 5, ["click"], ["item_id", "item_rate", "category"], seed=3)
    pd.testing.assert_frame_equal(negatives, again)


def test_light_ranker_negatives_take_item_columns_from_a_random_row_of_the_item():
    # (Old code: every sampled negative of an item had its first row's item_rate, 0.)
    frame = time_varying_frame()
    out = sample_negatives(frame, ["item_id", "item_rate", "category"], ratio=4, strategy="uniform", seed=7)
    negatives = out[out["click"] == 0]
    assert (negatives["item_rate"] > 0).mean() > 0.5
    assert copied_from_rows(negatives, frame, "item_id", ["item_rate", "category"])
    assert (negatives["category"] == negatives["item_id"] + 100).all()
    # Which items are drawn, and the shuffle, do not depend on what the item columns hold.
    flat = sample_negatives(
        frame.assign(item_rate=0.0), ["item_id", "item_rate", "category"], ratio=4, strategy="uniform", seed=7
    )
    assert list(flat["item_id"]) == list(out["item_id"]) and list(flat["user_id"]) == list(out["user_id"])
