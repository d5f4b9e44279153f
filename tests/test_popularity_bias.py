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


def test_measures_a_split_cannot_support_say_why_instead_of_crashing():
    from evaluation.metrics import NotApplicable, pr_auc, roc_auc

    popular = np.array([True, True, False, False])
    scores = np.random.default_rng(0).random((3, 4))
    # Leave-one-out: one held-out item per user, so no user has a (popular, unpopular) pair.
    with pytest.raises(NotApplicable, match="one held-out item per user"):
        pb.preference_parity(scores, [{0}, {2}, {3}], popular)
    with pytest.raises(NotApplicable, match="every item counts as popular"):
        pb.preference_parity(scores, [{0, 1}], np.ones(4, dtype=bool))
    # An item the scorer could not score (-inf) is no half-win: user 1's pair is left out.
    scores[1, 0] = -np.inf
    share, users = pb.preference_parity(scores, [{0, 2}, {0, 3}], popular)
    assert users == 1 and share == float(scores[0, 0] > scores[0, 2])
    with pytest.raises(NotApplicable, match="both positive and negative"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(NotApplicable, match="at least one positive"):
        pr_auc([0, 0], [0.1, 0.2])
    # Padding (-1) of short lists is not a recommendation; lists with nothing in them have no Gini.
    assert pb.gini(np.array([[0, 1, -1]]), 2) == pytest.approx(pb.gini(np.array([[0, 1]]), 2))
    assert pb.item_share_curve(np.array([[0, -1, -1]]), shares=(1.0,)) == {1.0: 1}
    with pytest.raises(NotApplicable, match="no list recommends anything"):
        pb.gini(np.full((2, 3), -1), 5)


def test_preference_parity_counts_an_item_scored_plus_inf():
    """Only -inf (unscorable) and NaN leave a pair out; ``isfinite`` dropped a +inf score too, so a
    user whose popular item the scorer ranked above everything had no pair at all."""
    popular = np.array([True, False, False])
    share, users = pb.preference_parity(np.array([[np.inf, 0.1, 0.2]]), [{0, 1, 2}], popular)
    assert (share, users) == (1.0, 1)
    share, users = pb.preference_parity(
        np.array([[0.5, np.nan, 0.2], [0.1, 0.3, -np.inf]]), [{0, 1, 2}, {0, 1, 2}], popular
    )
    assert (share, users) == (0.5, 2)  # user 0: 0.5 > 0.2; user 1: 0.1 < 0.3
