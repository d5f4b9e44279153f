import numpy as np
import pandas as pd

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
