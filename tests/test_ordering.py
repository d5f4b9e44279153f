"""The ordering policy (serving/ordering.py): final score, exploration, per-category cap."""

import warnings

import numpy as np
import pytest

from configs import OrderingConfig, load_config
from serving import ordering


def test_percentile_is_the_share_of_candidates_at_or_below():
    candidates = np.array([0.1, 0.4, 0.2, 0.3])
    pct = ordering.percentile_among(np.array([0.4, 0.1, 0.25, -np.inf]), candidates)
    np.testing.assert_allclose(pct, [1.0, 0.25, 0.5, 0.0])
    assert ordering.percentile_among(np.array([0.3]), np.array([])).tolist() == [0.0]


def test_final_score_blends_heavy_score_and_retrieval_percentile():
    heavy = np.array([0.9, 0.2, 0.5])
    pct = np.array([0.0, 1.0, 0.5])
    np.testing.assert_allclose(ordering.final_scores(heavy, pct, 0.0), heavy, rtol=1e-6)
    np.testing.assert_allclose(ordering.final_scores(heavy, pct, 1.0), pct, rtol=1e-6)
    mixed = ordering.final_scores(heavy, pct, 0.5)
    np.testing.assert_allclose(mixed, [0.45, 0.6, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="retrieval percentiles"):
        ordering.final_scores(heavy, pct[:2], 0.5)


def test_final_score_adds_the_affinity_percentile_and_keeps_the_rest_for_the_heavy_ranker():
    heavy = np.array([0.9, 0.2, 0.5])
    retrieval = np.array([0.0, 1.0, 0.5])
    affinity = np.array([1 / 3, 1.0, 2 / 3])
    blended = ordering.final_scores(heavy, retrieval, 0.2, affinity, 0.6)
    np.testing.assert_allclose(blended, 0.2 * heavy + 0.2 * retrieval + 0.6 * affinity, rtol=1e-6)
    np.testing.assert_allclose(ordering.final_scores(heavy, None, 0.0, affinity, 1.0), affinity, rtol=1e-6)
    # The affinity can reorder what the heavy ranker put first.
    positions, _ = ordering.order_candidates(
        heavy, retrieval, 3, retrieval_weight=0.2, affinity_pct=affinity, affinity_weight=0.6
    )
    assert positions.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="affinity percentiles"):
        ordering.final_scores(heavy, retrieval, 0.2, None, 0.6)


def test_without_exploration_the_order_is_a_stable_sort():
    scores = np.array([0.2, 0.9, 0.2, 0.5])
    assert ordering.rank(scores).tolist() == [1, 3, 0, 2]


def test_exploration_samples_first_places_with_softmax_probabilities():
    scores = np.array([0.9, 0.6, 0.3, 0.0])
    temperature, draws = 0.3, 20_000
    rng = np.random.default_rng(0)
    firsts = np.bincount([ordering.rank(scores, temperature, rng)[0] for _ in range(draws)], minlength=4) / draws
    expected = np.exp(scores / temperature) / np.exp(scores / temperature).sum()
    np.testing.assert_allclose(firsts, expected, atol=0.01)
    # Every draw is a permutation: nothing dropped, nothing repeated.
    assert sorted(ordering.rank(scores, temperature, rng).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("temperature", [1e-310, 5e-324])
def test_a_subnormal_temperature_is_the_score_order_not_the_candidate_order(temperature):
    """``scores / temperature`` overflowed to inf for every score: the 'sample' came out in candidate
    order, 0.2 first. The limit T -> 0+ is the score order, exact ties in a random order."""
    scores = np.array([0.2, 0.9, 0.5, 0.95, 0.9], dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        orders = {tuple(ordering.rank(scores, temperature, np.random.default_rng(seed)).tolist()) for seed in range(20)}
    assert orders == {(3, 1, 4, 2, 0), (3, 4, 1, 2, 0)}
    assert not caught, [str(w.message) for w in caught]  # no overflow warning either


def test_per_category_cap_keeps_the_best_of_each_and_fills_from_other_categories():
    order = np.array([0, 1, 2, 3, 4, 5])  # best first
    categories = np.array([7, 7, 7, 8, 8, 9])
    assert ordering.cap_per_category(order, categories, 1, 3).tolist() == [0, 3, 5]
    assert ordering.cap_per_category(order, categories, 2, 4).tolist() == [0, 1, 3, 4]
    # Not enough categories for k: a shorter list, the rule is kept.
    assert ordering.cap_per_category(order, categories, 1, 5).tolist() == [0, 3, 5]
    assert ordering.cap_per_category(order, categories, 0, 4).tolist() == [0, 1, 2, 3]


def test_order_candidates_returns_positions_and_their_final_scores():
    heavy = np.array([0.1, 0.8, 0.7, 0.3])
    pct = np.array([1.0, 0.0, 0.5, 0.75])
    positions, scores = ordering.order_candidates(heavy, pct, 2, retrieval_weight=0.5)
    assert positions.tolist() == [2, 0]  # final scores 0.55, 0.4, 0.6, 0.525
    np.testing.assert_allclose(scores, [0.6, 0.55], rtol=1e-6)
    with pytest.raises(ValueError, match="categories"):
        ordering.order_candidates(heavy, pct, 2, max_per_category=1)


@pytest.mark.parametrize(
    "bad",
    [
        {"retrieval_weight": 1.5},
        {"retrieval_weight": -0.1},
        {"exploration_temperature": -1.0},
        {"max_per_category": -2},
        {"affinity_weight": 1.2},
        {"retrieval_weight": 0.5, "affinity_weight": 0.6},
    ],
)
def test_ordering_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValueError, match="serving.ordering"):
        OrderingConfig(**bad)
    with pytest.raises(ValueError, match="serving.ordering"):
        load_config(overrides={"serving": {"ordering": bad}})


def small_ordering_stage(folder, items: int, retrieval_k: int):
    """An ordering stage over a catalog of ``items`` random item vectors (raw id = encoded id + 1000)
    and a popularity table, with no affinity weights (the history query serves fresh users): the
    exported files the stage reads, no training."""
    import json

    import pandas as pd

    from models.item_index import build_index, save_index
    from models.registry import MANIFEST
    from serving.stages import Ordering

    ids = np.arange(items)
    stage, retrieval = folder / "ordering" / "1", folder / "retrieval" / "1"
    stage.mkdir(parents=True), retrieval.mkdir(parents=True)
    manifest = {"version": 1, "features": {"user_categorical": []}, "config": {"serving": {"retrieval_k": retrieval_k}}}
    (stage / MANIFEST).write_text(json.dumps(manifest))
    pd.DataFrame({"item_id": ids, "item_id_raw": ids + 1000}).to_parquet(stage / "item_features.parquet")
    popularity = pd.DataFrame({"item_id": ids[::-1] + 1000, "score": np.linspace(1.0, 0.01, items, dtype=np.float32)})
    popularity.to_parquet(stage / "popularity.parquet")
    vectors = np.random.default_rng(0).normal(size=(items, 8)).astype(np.float32)
    save_index(build_index(ids, vectors, items)[0], retrieval, 1)
    return Ordering(stage)


def test_a_fresh_history_list_shorter_than_k_is_filled_from_the_fallback(tmp_path):
    """The history query reads retrieval_k neighbours, and no order between retrieval_k and k is
    assumed (serving.retrieval_k): with retrieval_k 5 a new user with 4 live items asking for 15 of a
    60-item catalog got 8 items; the rest now comes from the fallback, never a seen item, scored below."""
    stage = small_ordering_stage(tmp_path, items=60, retrieval_k=5)
    empty = np.zeros(0, dtype=np.int64)
    seen = np.array([1, 2, 3, 4])
    out = stage.run(
        {
            "user_known": np.array([False]),
            "k": np.array([15], dtype=np.int32),
            "seen_items": seen,
            **{name: empty for name in ("candidate_ids", "filtered_ids", "light_ids", "exclude_item_ids")},
            **{name: np.zeros(0, dtype=np.float32) for name in ("heavy_scores", "retrieval_scores")},
        }
    )
    items, scores = out["item_ids"].tolist(), out["scores"]
    assert out["served_by"][0] == b"history_query"
    assert len(items) == len(set(items)) == 15
    assert not set(items) & set((seen + 1000).tolist()) and np.all(np.diff(scores) <= 0)


def test_the_history_query_searches_with_one_openmp_thread(tmp_path):
    """The ordering stub searches the retrieval index for a new user's history query; retrieval set
    faiss to one OpenMP thread in its own process, ordering did not, so each of its single-query
    searches ran a team of one thread per core (measured here: flat top-300 over 50k vectors 10 ms
    with 2 threads, 1 ms with 1)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)  # a fresh stub's default (one per core); tests may have set 1 already
    try:
        stage = small_ordering_stage(tmp_path, items=60, retrieval_k=5)
        assert stage.item_vectors() is not None
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


def test_a_known_user_left_without_candidates_gets_the_fallbacks_scores_as_an_unknown_user_does(tmp_path):
    """A known user whose candidates the filters, exclusions or takedowns all removed is served the
    whole popularity fallback (``served_by = fallback``): the same items as an unknown user with the
    same history and exclusions, and now the same scores, the fallback's popularity scores. They were
    rank scores, 1 - i / (n + 1) (0.98, 0.96, ... here), where the unknown user got 0.95, 0.92, ...:
    a client thresholding or merging on ``scores`` read one fallback list as far stronger than the other."""
    import pandas as pd

    stage = small_ordering_stage(tmp_path, items=60, retrieval_k=5)
    empty = np.zeros(0, dtype=np.int64)
    seen = np.array([59, 57])  # raw 1059, 1057: the two most popular; under fresh_history_min_items

    def ask(known: bool):
        return stage.run(
            {
                "user_known": np.array([known]),
                "k": np.array([10], dtype=np.int32),
                "seen_items": seen,
                "exclude_item_ids": np.array([1058, 1055]),
                **{name: empty for name in ("candidate_ids", "filtered_ids", "light_ids")},
                **{name: np.zeros(0, dtype=np.float32) for name in ("heavy_scores", "retrieval_scores")},
            }
        )

    known, unknown = ask(True), ask(False)
    assert known["served_by"][0] == unknown["served_by"][0] == b"fallback"
    assert known["item_ids"].tolist() == unknown["item_ids"].tolist()
    assert not {1059, 1057, 1058, 1055} & set(known["item_ids"].tolist()) and len(known["item_ids"]) == 10
    popularity = pd.read_parquet(tmp_path / "ordering" / "1" / "popularity.parquet").set_index("item_id")["score"]
    expected = popularity.loc[known["item_ids"]].to_numpy(np.float32)
    np.testing.assert_array_equal(unknown["scores"], expected)
    np.testing.assert_array_equal(known["scores"], expected)  # old code: 0.98, 0.96, ... (rank scores)


def test_stage_counts_say_the_candidate_stages_served_an_unknown_user_nothing(tmp_path):
    """A user the models never saw is served from their fresh history or the popularity fallback; the
    ensemble still ran the candidate stages on out-of-vocabulary features, and ``stage_counts``
    reported those unused lists (catalog 588 -> retrieval 300 -> filters 300 -> light_ranker 200 ->
    final 10 in ``make demo``) as if they had produced the list. They now count 0; a known user's
    counts are still the stages' own, also where the whole list is the fallback's."""
    stage = small_ordering_stage(tmp_path, items=60, retrieval_k=5)
    candidates = np.arange(5, dtype=np.int64)

    def ask(known: bool, seen, light=candidates[:3], exclude=()):
        return stage.run(
            {
                "user_known": np.array([known]),
                "k": np.array([4], dtype=np.int32),
                "seen_items": np.asarray(seen, dtype=np.int64),
                "exclude_item_ids": np.asarray(exclude, dtype=np.int64),
                "candidate_ids": candidates,
                "retrieval_scores": np.linspace(1, 0.5, 5, dtype=np.float32),
                "filtered_ids": candidates[:4],
                "light_ids": light,
                "heavy_scores": np.linspace(0.9, 0.1, len(light), dtype=np.float32),
            }
        )

    fallback = ask(False, [])
    assert fallback["served_by"][0] == b"fallback"
    assert fallback["stage_counts"].tolist() == [60, 0, 0, 0, 4]
    history = ask(False, [10, 11, 12, 13, 14])  # at least fresh_history_min_items (3): the history query
    assert history["served_by"][0] == b"history_query"
    assert history["stage_counts"].tolist() == [60, 0, 0, 0, 4]
    known = ask(True, [])  # 3 ranked, one topped up from the fallback
    assert known["served_by"][0] == b"model" and known["stage_counts"].tolist() == [60, 5, 4, 3, 4]
    emptied = ask(True, [], light=candidates[:0])
    assert emptied["served_by"][0] == b"fallback" and emptied["stage_counts"].tolist() == [60, 5, 4, 0, 4]
