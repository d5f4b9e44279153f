"""Metrics checked against hand-computed values and brute-force definitions."""

import numpy as np
import pytest

from evaluation import metrics as m

TOP = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
REL = [{2, 4, 100}, {9}, set()]  # user 3 has no relevant item: left out of every mean


def test_ranking_metrics_by_hand():
    assert m.recall_at_k(TOP, REL, per_user=True).tolist() == pytest.approx([2 / 3, 0.0])
    assert m.precision_at_k(TOP, REL, per_user=True).tolist() == pytest.approx([0.5, 0.0])
    assert m.hit_rate_at_k(TOP, REL, per_user=True).tolist() == [1.0, 0.0]
    assert m.mrr_at_k(TOP, REL, per_user=True).tolist() == pytest.approx([0.5, 0.0])
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    idcg = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert m.ndcg_at_k(TOP, REL, per_user=True).tolist() == pytest.approx([dcg / idcg, 0.0])
    assert m.recall_at_k(TOP, REL, k=2) == pytest.approx((1 / 3 + 0) / 2)


def test_perfect_ranking_scores_one():
    top = np.array([[7, 8, 1]])
    assert m.ndcg_at_k(top, [{7, 8}]) == pytest.approx(1.0)
    assert m.recall_at_k(top, [{7, 8}]) == 1.0 and m.mrr_at_k(top, [{7, 8}]) == 1.0


def test_no_relevant_item_at_all_is_an_error():
    with pytest.raises(ValueError, match="no user"):
        m.recall_at_k(TOP, [set(), set(), set()])


def test_classification_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = labels * 0.5 + rng.random(400)
    pos, neg = scores[labels], scores[~labels]
    brute_auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert m.roc_auc(labels, scores) == pytest.approx(brute_auc)
    order = np.argsort(-scores)
    hits = labels[order]
    brute_ap = (np.cumsum(hits) / np.arange(1, 401))[hits].mean()
    assert m.pr_auc(labels, scores) == pytest.approx(brute_ap)
    assert m.roc_auc([0, 1], [0.2, 0.9]) == 1.0


def test_full_ranking_removes_seen_items_and_sorts():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    top = m.full_ranking_top_k(scores, 2, exclude=[[0], []])
    assert top.tolist() == [[1, 2], [3, 2]]


def test_bootstrap_interval_contains_the_mean_and_narrows_with_data():
    rng = np.random.default_rng(1)
    small = m.bootstrap_ci(rng.random(50), seed=2)
    large = m.bootstrap_ci(rng.random(5000), seed=2)
    assert small[1] <= small[0] <= small[2]
    assert (large[2] - large[1]) < (small[2] - small[1])
