"""Item-to-item affinity (models/item_affinity.py): EASE weights, versioned, scored over a history."""

import numpy as np
import pandas as pd
import pytest

from evaluation.peers import EASE, interaction_matrix
from models import item_affinity
from models.item_index import VersionMismatchError


def _interactions(seed=0, users=60, items=25, per_user=6):
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(users), per_user)
    cols = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    return rows, cols, items


def test_weights_are_the_ease_closed_form_with_zero_diagonal():
    rows, cols, items = _interactions()
    weights = item_affinity.fit(rows, cols, items, reg_weight=10.0, max_items=100)
    x = interaction_matrix(rows, cols, rows.max() + 1, items)
    # Steck 2019: P = (X'X + lambda I)^-1, B = -P / diag(P) column by column, diagonal 0.
    inverse = np.linalg.inv((x.T @ x).toarray() + 10.0 * np.eye(items))
    expected = -inverse / np.diag(inverse)
    np.fill_diagonal(expected, 0.0)
    assert weights.dtype == np.float32 and weights.shape == (items, items)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    # The EASE peer of the offline evaluation serves the same weights.
    peer = EASE(reg_weight=10.0).fit(x)
    np.testing.assert_allclose(weights, peer.item_weights, rtol=1e-5, atol=1e-6)
    assert not np.diag(weights).any()
    # A repeated interaction counts once, as in the peer's binary matrix.
    again = item_affinity.fit(np.append(rows, rows[0]), np.append(cols, cols[0]), items, 10.0, 100)
    np.testing.assert_array_equal(again, weights)


def test_dropout_is_edlae_a_penalty_growing_with_the_items_count():
    """EDLAE (Steck 2020): dropping each input item with probability p adds p / (1 - p) x the item's
    count to its L2 penalty; 0 is EASE. The closed form computed here from the Gram matrix."""
    rows, cols, items = _interactions(seed=2)
    x = interaction_matrix(rows, cols, rows.max() + 1, items).toarray()
    gram = x.T @ x
    p, reg = 0.4, 10.0
    inverse = np.linalg.inv(gram + np.diag(reg + p / (1 - p) * np.diag(gram)))
    expected = -inverse / np.diag(inverse)
    np.fill_diagonal(expected, 0.0)
    weights = item_affinity.fit(rows, cols, items, reg_weight=reg, max_items=100, dropout=p)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(
        item_affinity.fit(rows, cols, items, reg, 100, dropout=0.0), item_affinity.fit(rows, cols, items, reg, 100)
    )
    # The extra penalty holds popular items back: their outgoing weights shrink more than rare ones'.
    ease = item_affinity.fit(rows, cols, items, reg_weight=reg, max_items=100)
    counts = np.diag(gram)
    shrink = np.abs(weights).sum(axis=1) / np.abs(ease).sum(axis=1)
    assert shrink[counts.argmax()] < shrink[counts.argmin()]
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        item_affinity.fit(rows, cols, items, reg_weight=reg, max_items=100, dropout=1.0)


def test_affinity_of_a_history_is_the_users_row_of_x_times_b():
    rows, cols, items = _interactions(seed=1)
    weights = item_affinity.fit(rows, cols, items, reg_weight=5.0, max_items=100)
    history = np.unique(cols[rows == 3])
    candidates = np.array([0, 7, 24, 13])
    x = np.zeros(items)
    x[history] = 1
    np.testing.assert_allclose(item_affinity.scores(weights, history, candidates), (x @ weights)[candidates], rtol=1e-5)
    assert item_affinity.scores(weights, np.zeros(0, np.int64), candidates).tolist() == [0.0] * 4
    # A history naming an item twice (a direct call to the ordering stage) still counts it once: the
    # binary row of X, as the weights were fitted and the hard negatives read it.
    twice = np.concatenate([history, history[:2]])
    np.testing.assert_allclose(item_affinity.scores(weights, twice, candidates), (x @ weights)[candidates], rtol=1e-5)
    with pytest.raises(ValueError, match="candidate ids outside the 25 items"):
        item_affinity.scores(weights, history, np.array([25]))
    with pytest.raises(ValueError, match="history ids outside"):
        item_affinity.scores(weights, np.array([-1]), candidates)


def test_items_that_go_together_get_positive_affinity():
    # Items 0 and 1 always come together, 2 and 3 together, never across pairs.
    rows = np.repeat(np.arange(40), 2)
    cols = np.where(np.arange(80) % 2 == 0, 0, 1) + 2 * (np.repeat(np.arange(40), 2) % 2)
    weights = item_affinity.fit(rows, cols, 4, reg_weight=1.0, max_items=10)
    assert weights[0, 1] > 0.5 and weights[2, 3] > 0.5
    assert weights[0, 2] <= 0 and weights[1, 3] <= 0
    assert item_affinity.scores(weights, np.array([0]), np.array([1, 2, 3])).argmax() == 0


def test_catalog_above_max_items_and_bad_settings_are_refused():
    rows, cols, items = _interactions()
    with pytest.raises(ValueError, match="item_affinity.max_items=10"):
        item_affinity.fit(rows, cols, items, reg_weight=10.0, max_items=10)
    with pytest.raises(ValueError, match="reg_weight must be > 0"):
        item_affinity.fit(rows, cols, items, reg_weight=0.0, max_items=100)
    with pytest.raises(ValueError, match=r"item ids must lie in \[0, 5\)"):
        item_affinity.fit(rows, cols, 5, reg_weight=1.0, max_items=100)


def test_saved_weights_load_memory_mapped_and_refuse_another_runs_version(tmp_path):
    rows, cols, items = _interactions()
    weights = item_affinity.fit(rows, cols, items, reg_weight=10.0, max_items=100)
    item_affinity.save(weights, tmp_path, version=7, reg_weight=10.0)
    loaded, meta = item_affinity.load(tmp_path, expected_version=7)
    assert isinstance(loaded, np.memmap) and meta == {"version": 7, "items": items, "reg_weight": 10.0, "dropout": 0.0}
    np.testing.assert_array_equal(loaded, weights)
    with pytest.raises(VersionMismatchError, match="item_affinity"):
        item_affinity.load(tmp_path, expected_version=8)


def test_fit_from_history_uses_the_encoded_ids_of_the_catalog():
    # Raw ids 100..104 encoded as 3..7 (Categorify keeps 0-2 for padding, null, out-of-vocabulary).
    catalog = pd.DataFrame({"item_id_raw": np.arange(100, 105), "item_id": np.arange(3, 8)})
    history = pd.DataFrame({"user_id_raw": [9, 9, 5, 5, 5, 7], "item_id_raw": [100, 101, 100, 101, 104, 999]})
    weights = item_affinity.fit_from_history(history, catalog, reg_weight=1.0, max_items=100)
    assert weights.shape == (8, 8)
    encoded_rows = np.array([0, 0, 1, 1, 1])  # the raw item 999 is not in the catalog: dropped
    expected = item_affinity.fit(encoded_rows, np.array([3, 4, 3, 4, 7]), 8, 1.0, 100)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights[3, 4] > 0 and not weights[:3].any() and not weights[:, :3].any()


def test_training_skips_a_catalog_above_max_items_unless_the_ordering_needs_it(tmp_path):
    from configs import load_config
    from models.train import train_item_affinity

    catalog = pd.DataFrame({"item_id_raw": np.arange(100, 110), "item_id": np.arange(3, 13)})
    history = pd.DataFrame({"user_id_raw": [1, 1, 2, 2], "item_id_raw": [100, 101, 101, 102]})
    small = load_config(overrides={"item_affinity": {"max_items": 13}})
    assert train_item_affinity(history, catalog, small, tmp_path, 3) == {
        "items": 13,
        "reg_weight": 250.0,
        "dropout": 0.0,
    }
    assert item_affinity.load(tmp_path, expected_version=3)[0].shape == (13, 13)
    unused = load_config(overrides={"item_affinity": {"max_items": 12}})
    assert train_item_affinity(history, catalog, unused, tmp_path / "none", 3) is None
    needed = load_config(
        overrides={"item_affinity": {"max_items": 12}, "serving": {"ordering": {"affinity_weight": 0.5}}}
    )
    with pytest.raises(ValueError, match="max_items=12"):
        train_item_affinity(history, catalog, needed, tmp_path / "none", 3)
