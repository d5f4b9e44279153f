import numpy as np
import pandas as pd
import pytest

from evaluation import protocols


def interactions(num_users=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = int(rng.integers(1, 40))
        rows += [(u, int(i), int(t)) for i, t in zip(rng.choice(500, n, replace=False), rng.integers(0, 10**6, n))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


# By hand from RecBole 1.2.1's ``Dataset._calcu_split_ids`` (floor the held-out shares, the rest to train,
# then test and validation each get one while their share is in (0, 1) and train keeps more than one).
@pytest.mark.parametrize(
    "total,expected",
    [(1, [1, 0, 0]), (2, [1, 0, 1]), (3, [1, 1, 1]), (4, [2, 1, 1]), (5, [3, 1, 1]), (6, [4, 1, 1])]
    + [(7, [5, 1, 1]), (8, [6, 1, 1]), (9, [7, 1, 1]), (10, [8, 1, 1]), (11, [9, 1, 1]), (12, [10, 1, 1])]
    + [(19, [17, 1, 1]), (20, [16, 2, 2]), (25, [21, 2, 2])],
)
def test_recbole_rounding(total, expected):
    assert protocols.recbole_split_sizes(total) == expected


def test_recbole_random_splits_every_user_by_the_rounding_and_loses_nothing():
    data = interactions()
    split = protocols.recbole_random(data, seed=1)
    assert sum(split.sizes().values()) == len(data)
    merged = pd.concat([split.train, split.valid, split.test])
    assert not merged.duplicated().any()
    for user, rows in data.groupby("user_id"):
        got = [int((part["user_id"] == user).sum()) for part in (split.train, split.valid, split.test)]
        assert got == protocols.recbole_split_sizes(len(rows))
    again = protocols.recbole_random(data, seed=1)
    pd.testing.assert_frame_equal(split.test, again.test)


def test_recbole_random_normalises_the_ratios_as_recbole_split_by_ratio_does():
    """RecBole's ``split_by_ratio`` divides the ratios by their sum ("no need to be normalized"): (8, 1, 1)
    is 80/10/10. Unnormalised, validation and test each took int(1 x n) = n of a user's n interactions and
    train -n, so the slicing put every interaction in test."""
    data = interactions()
    want = protocols.recbole_random(data, seed=1)
    for ratios in ((8, 1, 1), (80, 10, 10)):
        got = protocols.recbole_random(data, seed=1, ratios=ratios)
        assert got.sizes() == want.sizes()
        pd.testing.assert_frame_equal(got.test, want.test)
    with pytest.raises(ValueError, match="ratios"):
        protocols.recbole_random(data, ratios=(0, 0, 0))


def test_temporal_split_orders_the_parts_in_time():
    split = protocols.temporal(interactions(), 0.1, 0.1)
    assert split.train["timestamp"].max() < split.valid["timestamp"].min()
    assert split.valid["timestamp"].max() < split.test["timestamp"].min()


def test_explicit_split_reads_files_and_names_missing_columns(tmp_path):
    data = interactions(5)
    for name in ("train", "valid"):
        data.to_parquet(tmp_path / f"{name}.parquet")
    data[["user_id", "item_id"]].to_csv(tmp_path / "test.csv", index=False)
    split = protocols.explicit(tmp_path / "train.parquet", tmp_path / "valid.parquet", tmp_path / "test.csv")
    assert split.sizes() == {"train": len(data), "valid": len(data), "test": len(data)}
    data[["user_id"]].to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="item_id"):
        protocols.explicit(tmp_path / "bad.csv", tmp_path / "valid.parquet", tmp_path / "test.csv")


def test_recbole_random_splits_a_frame_whose_index_repeats_labels():
    """Two users' frames concatenated as they were (index 0..9 twice): rows were taken by label, so
    each part took both users' rows with that label, 40 rows out of 20, an interaction in train and
    test alike. The split must be that of the same frame with a fresh index."""
    first = pd.DataFrame({"user_id": [1] * 10, "item_id": range(10), "timestamp": range(10)})
    second = pd.DataFrame({"user_id": [2] * 10, "item_id": range(10, 20), "timestamp": range(10)})
    data = pd.concat([first, second])
    split = protocols.recbole_random(data, seed=1)
    assert split.sizes() == {"train": 16, "valid": 2, "test": 2}
    merged = pd.concat([split.train, split.valid, split.test])
    assert not merged.duplicated().any() and len(merged) == len(data)
    fresh = protocols.recbole_random(data.reset_index(drop=True), seed=1)
    for part in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(getattr(split, part), getattr(fresh, part))


def test_temporal_split_with_no_test_fraction_has_no_test_part():
    """A test fraction of 0 gave the events of the newest timestamp (the 1.0 quantile) as test, and
    they fell out of validation: a train/valid split lost its last events to a test part not asked for."""
    data = interactions()
    split = protocols.temporal(data, 0.1, 0.0)
    assert split.sizes()["test"] == 0
    assert split.sizes()["train"] + split.sizes()["valid"] == len(data)
    assert split.valid["timestamp"].max() == data["timestamp"].max()


def test_temporal_split_with_no_valid_and_no_test_fraction_keeps_everything_in_train():
    """Both fractions 0: the validation cut was the 1.0 quantile, so the events of the newest timestamp
    became a validation part not asked for, and train lost them."""
    data = interactions()
    split = protocols.temporal(data, 0.0, 0.0)
    assert split.sizes() == {"train": len(data), "valid": 0, "test": 0}
