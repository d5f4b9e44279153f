import numpy as np
import pandas as pd
import pytest

from models.fallback import SECONDS_PER_DAY, recency_weighted_popularity, top_popular


def test_recent_clicks_outrank_old_ones_and_scores_are_in_0_1():
    now = 100 * SECONDS_PER_DAY
    events = pd.DataFrame(
        {
            # item 1: three clicks a month ago; item 2: two clicks today; item 3: never clicked
            "item_id": [1, 1, 1, 2, 2, 3],
            "timestamp": [now - 30 * SECONDS_PER_DAY] * 3 + [now, now, now],
            "click": [1, 1, 1, 1, 1, 0],
        }
    )
    pop = recency_weighted_popularity(events, half_life_days=7)
    assert pop["item_id"].tolist() == [2, 1]
    assert pop["score"].iloc[0] == 1.0 and 0 < pop["score"].iloc[1] < 1


def test_top_popular_skips_excluded_items():
    pop = pd.DataFrame({"item_id": [5, 6, 7, 8], "score": [1.0, 0.5, 0.2, 0.1]})
    ids, scores = top_popular(pop, 2, exclude=np.array([6]))
    assert ids.tolist() == [5, 7] and scores.tolist() == [1.0, 0.2]


def test_new_items_get_the_popularity_of_their_category_discounted():
    from models.fallback import with_new_items

    pop = pd.DataFrame({"item_id": [1, 2, 3], "score": np.array([1.0, 0.6, 0.2], dtype="float32")})
    items = pd.DataFrame({"item_id": [1, 2, 3, 10, 11], "category": ["a", "a", "b", "a", "c"]})
    out = with_new_items(pop, items, "category", weight=0.5)
    scores = dict(zip(out["item_id"], out["score"]))
    assert set(scores) == {1, 2, 3, 10, 11}
    assert scores[10] == np.float32(0.5 * (1.0 + 0.6) / 2)  # new item of the hot category "a"
    assert scores[11] == 0.0  # a category with no clicks at all
    assert scores[1] == 1.0 and scores[3] == np.float32(0.2)  # known items keep their own score
    assert out["score"].is_monotonic_decreasing and out["item_id"].tolist()[:2] == [1, 2]
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all()


def test_a_half_life_that_is_not_positive_is_refused():
    """A half-life of 0 made every score NaN; a negative one ranked old clicks above recent ones.
    The config refuses both, and a new-item weight outside [0, 1] (refused only at the end of a
    training run, by ``with_new_items``)."""
    from configs import load_config

    day = 86_400
    events = pd.DataFrame({"item_id": [1, 2, 2], "timestamp": [10 * day, 0, 0], "click": [1, 1, 1]})
    for half_life in (0.0, -7.0):
        with pytest.raises(ValueError, match="half-life"):
            recency_weighted_popularity(events, half_life)
        with pytest.raises(ValueError, match="serving.fallback_window_days"):
            load_config(overrides={"serving": {"fallback_window_days": half_life}})
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match="serving.fallback_new_item_weight"):
            load_config(overrides={"serving": {"fallback_new_item_weight": weight}})


def test_clicks_long_before_the_newest_event_still_get_finite_scores():
    """Ages counted from the newest event made every weight of a log whose clicks all lie ~1,075
    half-lives before it underflow to 0, and every score 0 / 0 = NaN."""
    day = SECONDS_PER_DAY
    events = pd.DataFrame({"item_id": [1, 2, 3], "timestamp": [0, day, 2_000 * day], "click": [1, 1, 0]})
    pop = recency_weighted_popularity(events, half_life_days=1)
    assert pop["item_id"].tolist() == [2, 1]
    assert np.isfinite(pop["score"]).all() and pop["score"].iloc[0] == 1.0
    assert pop["score"].iloc[1] == 0.5  # one half-life older than item 2's click


def test_clicks_too_old_for_a_float32_score_keep_their_recency_order():
    """Scores below float32's range (~149 half-lives under the top: 3 years at the default 7 days)
    were all 0, and the served list put them, and never-clicked items, in item id order: a click
    3,000 days old before one 2,000 days old."""
    from models.fallback import with_new_items

    day = SECONDS_PER_DAY
    events = pd.DataFrame({"item_id": [9, 5, 3], "timestamp": [3_000 * day, 1_000 * day, 0], "click": [1, 1, 1]})
    pop = recency_weighted_popularity(events, half_life_days=7)
    assert pop["item_id"].tolist() == [9, 5, 3]
    assert pop["score"].is_monotonic_decreasing and pop["score"].iloc[0] == 1.0
    items = pd.DataFrame({"item_id": [9, 5, 3, 4, 1], "category": ["a", "b", "b", "c", "c"]})
    out = with_new_items(pop, items, "category", weight=0.5)
    # 4 and 1: categories without a click (score 0), after every clicked item, by id
    assert out["item_id"].tolist() == [9, 5, 3, 1, 4]
