import numpy as np
import pytest

from evaluation import popularity_bias as pb


def test_item_share_curve_counts_the_head():
    # item 0 gets 6 of 10 recommendations, items 1..4 one each
    recs = np.array([0] * 6 + [1, 2, 3, 4])
    curve = pb.item_share_curve(recs, shares=(0.5, 0.6, 0.7, 1.0))
    assert curve == {0.5: 1, 0.6: 1, 0.7: 2, 1.0: 5}


def test_gini_and_coverage_extremes():
    assert pb.gini(np.arange(10), 10) == pytest.approx(0.0)
    assert pb.gini(np.zeros(10, dtype=int), 10) == pytest.approx(0.9)  # (n-1)/n for one item
    assert pb.catalog_coverage(np.array([[1, 2], [2, 3]]), 10) == 0.3


def test_popularity_lift_is_one_when_recommending_the_profile():
    pop = np.array([10, 1, 5, 2])
    assert pb.popularity_lift(np.array([[0, 2]]), [{0, 2}], pop).tolist() == [1.0]
    assert pb.popularity_lift(np.array([[0, 0]]), [{1}], pop).tolist() == [10.0]


def test_preference_parity_detects_a_popularity_biased_scorer():
    rng = np.random.default_rng(0)
    num_users, num_items = 200, 50
    popular = np.zeros(num_items, dtype=bool)
    popular[:10] = True
    liked = [set(rng.choice(num_items, 6, replace=False).tolist()) for _ in range(num_users)]
    fair = rng.random((num_users, num_items))
    biased = fair + popular * 0.5
    fair_share, users = pb.preference_parity(fair, liked, popular)
    biased_share, _ = pb.preference_parity(biased, liked, popular)
    assert users > 50
    assert abs(fair_share - 0.5) < 0.05 and biased_share > 0.75
