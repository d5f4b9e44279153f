"""The peers recover structure that a planted ground truth puts in the data."""

import numpy as np

from evaluation.metrics import full_ranking_top_k, recall_at_k
from evaluation.peers import ALS, EASE, Popularity, interaction_matrix


def planted_blocks(num_users=300, num_items=120, blocks=4, seed=0):
    """Users interact mostly inside their block of items: a signal any personalised peer must find."""
    rng = np.random.default_rng(seed)
    user_block = rng.integers(0, blocks, num_users)
    size = num_items // blocks
    rows, cols = [], []
    for u in range(num_users):
        inside = rng.choice(size, 12, replace=False) + user_block[u] * size
        outside = rng.integers(0, num_items, 2)
        rows += [u] * 14
        cols += inside.tolist() + outside.tolist()
    rows, cols = np.array(rows), np.array(cols)
    test = rng.random(len(rows)) < 0.2
    train = interaction_matrix(rows[~test], cols[~test], num_users, num_items)
    held_out = [set(cols[test & (rows == u)].tolist()) for u in range(num_users)]
    seen = [train[u].indices for u in range(num_users)]
    return train, held_out, seen


def test_personalised_peers_beat_popularity_on_planted_structure():
    train, held_out, seen = planted_blocks()
    users = np.arange(train.shape[0])
    recall = {}
    for peer in (Popularity(), EASE(reg_weight=10.0), ALS(factors=8, iterations=10)):
        top = full_ranking_top_k(peer.fit(train).scores(users), 10, exclude=seen)
        recall[peer.name] = recall_at_k(top, held_out)
    assert recall["EASE"] > 2 * recall["Pop"], recall
    assert recall["ALS"] > 2 * recall["Pop"], recall


def test_ease_has_zero_diagonal():
    train, _, _ = planted_blocks(num_users=50, num_items=80)
    ease = EASE(reg_weight=5.0).fit(train)
    assert np.allclose(np.diag(ease.item_weights), 0.0)


class ListedFunnel:
    """A stand-in for the exported funnel's stages: one ordering stage serving fixed raw-id lists."""

    name = "ordering"

    def __init__(self, lists: dict):
        from types import SimpleNamespace

        self.lists, self.limits = lists, SimpleNamespace(max_k=100)

    def run(self, x):
        return {"item_ids": np.asarray(self.lists[int(x["user_id"][0])], dtype=np.int64)[: int(x["k"][0])]}


def item_table(folder, raw_ids):
    import pandas as pd

    pd.DataFrame({"item_id": np.arange(1, len(raw_ids) + 1), "item_id_raw": raw_ids}).to_parquet(
        folder / "item_features.parquet"
    )
    return folder


def test_the_funnel_never_serves_a_validation_item_no_training_row_holds(tmp_path):
    """The peers cannot rank an item only the validation part holds (it has no column); the funnel's
    catalog can. It is the user's, excluded from ranking like every validation item: its place goes
    to the next item, here the held-out one."""
    import pandas as pd

    from evaluation import offline
    from evaluation.pipeline import funnel_results

    train = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [10, 11, 12, 13]})
    valid = pd.DataFrame({"user_id": [1], "item_id": [99]})  # no training row holds item 99
    test = pd.DataFrame({"user_id": [1], "item_id": [12]})
    data = offline.Interactions.from_split(train, test, also_seen=valid)
    funnel = ListedFunnel({1: [99, 12, 13], 2: [10, 11]})
    result, _ = funnel_results(
        "funnel", None, 1, item_table(tmp_path, [10, 11, 12, 13, 99]), data, (1,), None, 20, [funnel], parity=False
    )
    assert result.metrics["recall@1"] == 1.0


def test_the_served_stage_reports_the_lists_own_length(tmp_path):
    """The funnel table's "candidates kept" of the served top-K is the lists' mean length, not K:
    a funnel that serves short lists is seen to."""
    import pandas as pd

    from evaluation import offline
    from evaluation.pipeline import funnel_results

    train = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [10, 11, 12, 13]})
    test = pd.DataFrame({"user_id": [1, 2], "item_id": [12, 10]})
    data = offline.Interactions.from_split(train, test)
    funnel = ListedFunnel({1: [12], 2: [10, 11, 13]})  # user 1's list holds 1 item of the 2 asked
    _, stages = funnel_results(
        "funnel", None, 1, item_table(tmp_path, [10, 11, 12, 13]), data, (2,), None, 20, [funnel], parity=False
    )
    assert stages["final"]["mean_size"] == 1.5
