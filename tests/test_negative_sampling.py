"""The light ranker's negative sampler: positives kept, ``ratio`` negatives each, by strategy."""
import numpy as np
import pandas as pd
import pytest

from models.negative_sampling import sample_negatives


def _frame(n_users=50, n_items=40, rows=2000, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.zipf(1.6, size=rows) % n_items + 3  # skewed popularity
    return pd.DataFrame({
        "user_id": rng.integers(3, n_users + 3, size=rows),
        "item_id": items,
        "category": items % 5 + 3,  # an item attribute that must travel with the sampled item
        "click": rng.random(rows) < 0.3,
    }).astype({"click": "int64"})


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
