import numpy as np
import pandas as pd

from configs import SyntheticDataConfig
from evaluation.metrics import roc_auc
from workflows.schema import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS
from workflows.sources.synthetic import generate

CFG = SyntheticDataConfig(num_users=200, num_items=150, events_per_user=30, seed=3)


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate(CFG), generate(CFG)
    pd.testing.assert_frame_equal(a.events, b.events)
    c = generate(SyntheticDataConfig(**{**CFG.__dict__, "seed": 4}))
    assert not a.events["item_id"].equals(c.events["item_id"])


def test_tables_follow_the_raw_schema():
    data = generate(CFG)
    assert list(data.events.columns) == EVENT_COLUMNS
    assert list(data.users.columns) == USER_COLUMNS
    assert list(data.items.columns) == ITEM_COLUMNS
    assert data.events["timestamp"].is_monotonic_increasing
    assert set(data.events["user_id"]) <= set(data.users["user_id"])
    assert set(data.events["item_id"]) <= set(data.items["item_id"])


def test_signals_are_consistent():
    e = generate(CFG).events
    duration = e["item_id"].map(generate(CFG).items.set_index("item_id")["duration_seconds"])
    assert (e.loc[e["click"] == 0, "watch_seconds"] == 0).all()
    assert (e["watch_seconds"] <= duration).all()
    assert (e["like"] <= e["click"]).all() and (e["share"] <= e["like"]).all()


def test_latent_preferences_drive_clicks():
    data = generate(CFG)
    affinity = data.true_affinity(data.events["user_id"].values, data.events["item_id"].values)
    # The ground truth must be learnable: far above chance (0.5), the ceiling a model can reach.
    assert roc_auc(data.events["click"].values, affinity) > 0.75


def test_true_top_items_are_sorted_by_affinity():
    data = generate(CFG)
    top = data.true_top_items(5, 10)
    scores = data.true_affinity(np.full(10, 5), top)
    assert np.all(np.diff(scores) <= 1e-12)
