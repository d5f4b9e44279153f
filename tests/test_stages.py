"""The funnel's stages run as plain Python on an exported repository (no server)."""
import numpy as np
import pandas as pd
import pytest

from serving import stages
from serving.export import STAGE_ARTIFACTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def funnel(triton_repo, model_version):
    v = str(model_version.version)
    return {name: stages.STAGES[name](triton_repo / name / v) for name in STAGE_ARTIFACTS}


def run_funnel(funnel, user_id, k):
    x = {"user_id": np.array([user_id], dtype=np.int64), "k": np.array([k], dtype=np.int32)}
    for name in ("feature_lookup", "query_tower", "retrieval", "filtering", "ranker", "ordering"):
        x.update(funnel[name].run(x))
    return x


def test_known_user_gets_k_unseen_items_with_descending_scores(funnel, model_version, small_config):
    history = pd.read_parquet(model_version.path / "user_history.parquet")
    user = int(history["user_id_raw"].iloc[0])
    out = run_funnel(funnel, user, 10)
    assert out["served_by"][0] == b"model"
    assert len(out["item_ids"]) == 10
    scores = out["scores"]
    assert ((scores >= 0) & (scores <= 1)).all() and np.all(np.diff(scores) <= 0)
    seen = set(history.loc[history["user_id_raw"] == user, "item_id_raw"])
    assert not seen & set(out["item_ids"].tolist())
    catalog, retrieved, filtered, final = out["stage_counts"].tolist()
    assert catalog >= retrieved == small_config.serving.retrieval_k >= filtered >= final == 10


def test_unknown_user_gets_the_popularity_fallback(funnel, model_version):
    out = run_funnel(funnel, 10**9, 5)
    assert out["served_by"][0] == b"fallback"
    popular = pd.read_parquet(model_version.path / "popularity.parquet")["item_id"].head(5).tolist()
    assert out["item_ids"].tolist() == popular


@pytest.mark.parametrize("k", [0, -3, 51])
def test_out_of_range_k_is_a_request_error(funnel, k):
    with pytest.raises(stages.RequestError, match="k must be between 1 and 50"):
        run_funnel(funnel, 1, k)


def test_multi_valued_user_id_is_a_request_error(funnel):
    with pytest.raises(stages.RequestError, match="exactly one value"):
        funnel["feature_lookup"].run({"user_id": np.array([1, 2])})


def test_filtering_removes_seen_items(funnel):
    out = funnel["filtering"].run({"candidate_ids": np.array([5, 6, 7, 8]), "seen_items": np.array([6, 8])})
    assert out["filtered_ids"].tolist() == [5, 7]


def test_ranker_handles_an_empty_candidate_list(funnel):
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    out = funnel["ranker"].run({**lookup, "filtered_ids": np.zeros(0, dtype=np.int64)})
    assert out["ranker_scores"].shape == (0,)
