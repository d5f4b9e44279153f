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


def test_nan_scores_are_refused_by_both_aucs():
    # ROC-AUC was NaN (the report said "one class only") and PR-AUC ranked the NaN last: 1.0 here
    labels, scores = [1, 0, 1, 0], [0.9, np.nan, 0.2, 0.1]
    with pytest.raises(ValueError, match="1 of 4 scores are NaN"):
        m.pr_auc(labels, scores)
    with pytest.raises(ValueError, match="1 of 4 scores are NaN"):
        m.roc_auc(labels, scores)
    assert m.roc_auc([1, 0, 1, 0], [np.inf, np.inf, 0.2, 0.1]) == pytest.approx(0.625)  # inf is a score


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


def test_a_user_only_in_the_validation_part_lends_no_items_to_another_user():
    """``also_seen`` may hold users neither train nor test has (a temporal split's validation-only
    users). Their items used to land on a neighbouring user's row: user 3's only held-out item was
    counted as seen, and user 3 dropped out of the evaluation; an id above all others crashed."""
    import pandas as pd

    from evaluation.offline import Interactions

    train = pd.DataFrame({"user_id": [1, 1, 3, 3], "item_id": [10, 11, 10, 12]})
    test = pd.DataFrame({"user_id": [1, 3], "item_id": [12, 11]})
    for stranger in (2, 9):
        data = Interactions.from_split(train, test, also_seen=pd.DataFrame({"user_id": [stranger], "item_id": [11]}))
        assert [data.item_ids[s].tolist() for s in data.seen] == [[10, 11], [10, 12]]
        assert [sorted(data.item_ids[list(r)].tolist()) for r in data.relevant] == [[12], [11]]
        assert data.relevant_counts.tolist() == [1, 1]


def test_held_out_items_no_model_was_trained_on_count_in_the_denominators():
    """RecBole's recall and NDCG count every held-out item; item 99 is in no training row, so no list
    can hold it, and user 1 has found one of two."""
    import pandas as pd

    from evaluation.offline import Interactions

    data = Interactions.from_split(
        pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 12]}),
        pd.DataFrame({"user_id": [1, 1, 2], "item_id": [12, 99, 10]}),
    )
    assert data.relevant_counts.tolist() == [2, 1]
    top = np.array([[data.cols([12])[0], -1], [data.cols([10])[0], -1]])
    counts = data.relevant_counts
    assert m.recall_at_k(top, data.relevant, num_relevant=counts, per_user=True).tolist() == [0.5, 1.0]
    ndcg = m.ndcg_at_k(top, data.relevant, num_relevant=counts, per_user=True)
    assert ndcg.tolist() == pytest.approx([1 / (1 + 1 / np.log2(3)), 1.0])
    assert m.recall_at_k(top, data.relevant, per_user=True).tolist() == [1.0, 1.0]  # the old, inflated figure
    with pytest.raises(ValueError, match="at least as many"):
        m.recall_at_k(top, data.relevant, num_relevant=[0, 1])


def test_an_item_repeated_in_a_list_is_one_hit():
    assert m.recall_at_k(np.array([[3, 3]]), [{3}]) == 1.0
    assert m.ndcg_at_k(np.array([[3, 3]]), [{3}]) == pytest.approx(1.0)
    assert m.recall_at_k(np.array([[3, 3, 5]]), [{3, 7}]) == 0.5
    assert m.ndcg_at_k(np.array([[3, 3, 5]]), [{3, 7}]) == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert m.repeated(np.array([[5, 3, 5, 3, 1]])).tolist() == [[False, False, True, True, False]]


def test_an_item_listed_twice_as_relevant_is_one_relevant_item():
    # the repeat counted in the denominators: recall 0.5 and NDCG 0.613 for the one item found first
    assert m.recall_at_k(np.array([[5, 1]]), [[5, 5]]) == 1.0
    assert m.ndcg_at_k(np.array([[5, 1]]), [[5, 5]]) == pytest.approx(1.0)
    assert m.recall_at_k(np.array([[5, 1], [2, 3]]), [[5, 5, 7], [3, 3]], per_user=True).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="at least as many"):
        m.recall_at_k(np.array([[5, 1]]), [[5, 5, 7]], num_relevant=[1])


def test_short_lists_precision_divides_by_k_and_excluded_items_never_fill_a_list():
    top = m.full_ranking_top_k(np.array([[0.9, 0.1, 0.5]]), 10)
    assert top.tolist() == [[0, 2, 1]]
    assert m.precision_at_k(top, [{0}], k=10) == pytest.approx(0.1)
    assert m.precision_at_k(top, [{0}]) == pytest.approx(1 / 3)  # no k: the list's own length
    # three of four items seen: one left, then no item (-1), not the seen ones
    top = m.full_ranking_top_k(np.array([[0.4, 0.3, 0.2, 0.1]]), 3, exclude=[[0, 1, 2]])
    assert top.tolist() == [[3, -1, -1]]


def test_tied_scores_go_lower_column_first_whatever_k_is_asked():
    """Popularity counts tie: which of the items tied at the k-th place made the list was the
    partition's choice, so the same recommender's NDCG@10 moved when NDCG@20 was asked too (0.0980
    and 0.0983 on a shop log's Pop). The rule is a stable sort's: the lower column first."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(200, 300)).astype(np.float32)  # many ties at every place
    seen = [list(rng.choice(300, size=20, replace=False)) for _ in range(200)]
    masked = np.where([np.isin(np.arange(300), s) for s in seen], -np.inf, scores)
    want = np.argsort(-masked, axis=1, kind="stable")
    want = np.where(np.take_along_axis(masked, want, axis=1) == -np.inf, -1, want)  # the excluded: no item
    for k in (1, 10, 20, 299):
        assert (m.full_ranking_top_k(scores, k, exclude=seen) == want[:, :k]).all(), k
    assert (
        m.full_ranking_top_k(scores, 20, exclude=seen)[:, :10] == m.full_ranking_top_k(scores, 10, exclude=seen)
    ).all()
    relevant = [set(rng.choice(300, size=5, replace=False)) for _ in range(200)]
    ndcg = [m.ndcg_at_k(m.full_ranking_top_k(scores, k, exclude=seen), relevant, 10) for k in (10, 20)]
    assert ndcg[0] == ndcg[1]
    # Fewer than k left after the excluded ones: the rest is -1, the left ones lower column first.
    assert m.full_ranking_top_k(np.ones((1, 4)), 3, exclude=[[1, 2]]).tolist() == [[0, 3, -1]]


def test_ndcg_at_k_normalises_by_k_places_when_the_list_is_narrower_than_k():
    """A catalog of 3 trained items ranked for K = 10 (``full_ranking_top_k`` returns 3 columns) and
    a user with 5 held-out items, 2 of them never trained on: the ideal list holds 5 hits in its 10
    places, as for the same list padded with -1. It used to be cut to the list's 3 places: NDCG 1.0."""
    top = m.full_ranking_top_k(np.array([[0.9, 0.5, 0.1]]), 10)
    assert top.shape == (1, 3)
    discounts = 1 / np.log2(np.arange(2, 12))
    expected = discounts[:3].sum() / discounts[:5].sum()
    padded = np.c_[top, np.full((1, 7), -1)]
    for ranked in (top, padded):
        assert m.ndcg_at_k(ranked, [{0, 1, 2}], k=10, num_relevant=[5]) == pytest.approx(expected)
    assert m.ndcg_at_k(top, [{0, 1, 2}], num_relevant=[5]) == pytest.approx(1.0)  # no k: the list's own length


def test_float64_scores_are_ranked_at_their_own_precision():
    """Scores closer than float32 resolves were cast to float32 and tied, so the lower column went
    first although the other scored more: [[0]] here, where column 1 is the best."""
    scores = np.array([[0.5, 0.5 + 1e-9, 0.1], [1000.0, 1000.0 + 1e-6, 999.0]])
    assert m.full_ranking_top_k(scores, 2).tolist() == [[1, 0], [1, 0]]
    assert m.full_ranking_top_k(scores, 1, exclude=[[2], [1]]).tolist() == [[1], [0]]
    # Integer scores above float32's exact range keep their order too.
    big = np.array([[2**24, 2**24 + 1]], dtype=np.int64)
    assert m.full_ranking_top_k(big, 1).tolist() == [[1]]


def test_a_nan_score_is_refused_not_ranked_among_the_fillers():
    """NaN has no place in the order: a NaN item came after the -1 fillers ([[2, 4, 3, -1, 1]]), or
    a -1 before the NaN items ([[-1, 0, 1]]). It is refused as the classification metrics refuse it."""
    scores = np.array([[0.5, np.nan, 0.9, 0.1, 0.3]])
    with pytest.raises(ValueError, match=r"1 of 5 scores are NaN \(first: row 0, item column 1\)"):
        m.full_ranking_top_k(scores, 5, exclude=[[0]])
    with pytest.raises(ValueError, match="NaN"):
        m.full_ranking_top_k(np.array([[np.nan, np.nan, 0.9]]), 3, exclude=[[2]])
    # A NaN only on an excluded (already seen) item leaves the order whole.
    assert m.full_ranking_top_k(scores, 4, exclude=[[1]]).tolist() == [[2, 0, 4, 3]]


def _old_bootstrap_means(values_list, n_resamples, seed):
    """The resampling as it was before it was chunked: one ``(n_resamples, n)`` draw."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values_list[0]), size=(n_resamples, len(values_list[0])))
    return [v[idx].mean(axis=1) for v in values_list]


def test_bootstrap_resamples_in_chunks_give_the_single_draw_to_the_bit(monkeypatch):
    """Chunks of rows drawn one after another from the same generator are the single 2-D draw: the
    interval, the means and the generator's state after are the same, also with a partial last chunk."""
    rng = np.random.default_rng(3)
    a, b = rng.random(3001), rng.random(3001).astype(np.float32)
    ref_a, ref_b = _old_bootstrap_means([a, b], 999, seed=4)
    for cells in (1, 1 << 14, 1 << 40):  # one row per chunk, 5 rows (999 = 199 x 5 + 4), one chunk
        monkeypatch.setattr(m, "BOOTSTRAP_CHUNK_CELLS", cells)
        gen = np.random.default_rng(4)
        got_a, got_b = m.bootstrap_means(gen, [a, b], 999)
        assert np.array_equal(got_a, ref_a) and np.array_equal(got_b, ref_b) and got_b.dtype == ref_b.dtype
        old_gen = np.random.default_rng(4)
        old_gen.integers(0, 3001, size=(999, 3001))
        assert gen.integers(0, 1 << 30, 8).tolist() == old_gen.integers(0, 1 << 30, 8).tolist()
        ref_ci = (a.mean(), *np.quantile(_old_bootstrap_means([a], 999, seed=4)[0], [0.025, 0.975]))
        assert m.bootstrap_ci(a, n_resamples=999, seed=4) == tuple(float(x) for x in ref_ci)
    # The report's paired interval: two peers, one generator, drawn one peer after the other.
    from evaluation.offline import Result
    from evaluation.report import headline

    c = rng.random(3001)
    results = [
        Result(name, {"ndcg@10": float(v.mean())}, per_user={"ndcg@10": v})
        for name, v in (("funnel", a), ("p", b), ("q", c))
    ]
    old_gen, expected = np.random.default_rng(0), []
    for v in (b, c):
        idx = old_gen.integers(0, 3001, size=(1000, 3001))
        low, high = np.quantile(a[idx].mean(axis=1) - v[idx].mean(axis=1), [0.025, 0.975])
        expected.append(f"{a.mean() - v.mean():+.4f} [{low:+.4f}, {high:+.4f}]")
    assert headline(results, 10)["difference (95% CI)"].tolist() == expected


def test_bootstrap_memory_does_not_grow_with_resamples_times_users(monkeypatch):
    """``bootstrap_ci`` (about 10 calls per model) and the report's paired headline interval used to
    hold an int64 index array and a float array of resamples x users each: 1.6 GB apiece at 200,000
    users and 1,000 resamples. Resampled in chunks, the largest temporaries are bounded by the chunk."""
    import tracemalloc

    from evaluation.offline import Result
    from evaluation.report import headline

    cells = 1 << 18  # 2 MB of int64 per chunk
    monkeypatch.setattr(m, "BOOTSTRAP_CHUNK_CELLS", cells, raising=False)
    rng = np.random.default_rng(5)
    n = 20_000  # x 1,000 resamples: 160 MB per whole array
    a, b = rng.random(n), rng.random(n)
    results = [
        Result("funnel", {"ndcg@10": a.mean()}, per_user={"ndcg@10": a}),
        Result("pop", {"ndcg@10": b.mean()}, per_user={"ndcg@10": b}),
    ]
    for run in (lambda: m.bootstrap_ci(a, n_resamples=1000), lambda: headline(results, 10, n_resamples=1000)):
        tracemalloc.start()
        try:
            run()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 8 * cells, peak  # a few chunk-sized arrays, not 2 x 160 MB
