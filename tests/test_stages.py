"""The funnel's stages run as plain Python on an exported repository (no server)."""

import numpy as np
import pandas as pd
import pytest

from deployment.export import STAGE_ARTIFACTS
from serving import stages
from serving.request import RequestError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def funnel(triton_repo, model_version):
    v = str(model_version.version)
    return {name: stages.STAGES[name](triton_repo / name / v) for name in STAGE_ARTIFACTS}


def run_funnel(funnel, user_id, k):
    x = {"user_id": np.array([user_id], dtype=np.int64), "k": np.array([k], dtype=np.int32)}
    for name in stages.FUNNEL:
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
    catalog, retrieved, filtered, light, final = out["stage_counts"].tolist()
    assert catalog >= retrieved == small_config.serving.retrieval_k >= filtered
    assert light == min(filtered, small_config.serving.light_ranker_k) and final == 10


def test_a_known_users_list_emptied_by_filters_is_filled_from_the_fallback(funnel, model_version):
    """A request excluding every candidate retrieval found (or most of them) left a known user with
    an empty (or short) list while the catalog held unseen items: the rest now comes from the
    popularity fallback, never an excluded, seen or listed item, scored below the model's items."""
    history = pd.read_parquet(model_version.path / "user_history.parquet")
    user = int(history["user_id_raw"].iloc[0])
    seen = set(history.loc[history["user_id_raw"] == user, "item_id_raw"])
    raw = funnel["ordering"].raw_ids
    first = run_funnel(funnel, user, 10)
    candidates = raw[np.asarray(first["candidate_ids"]).reshape(-1)]

    def ask(excluded):
        x = {"user_id": np.array([user], dtype=np.int64), "k": np.array([10], dtype=np.int32)}
        x["exclude_item_ids"] = np.asarray(excluded, dtype=np.int64)
        for name in stages.FUNNEL:
            x.update(funnel[name].run(x))
        return x

    emptied = ask(candidates)
    assert emptied["served_by"][0] == b"fallback" and len(emptied["item_ids"]) == 10
    assert not (set(emptied["item_ids"].tolist()) & (set(candidates.tolist()) | seen))
    popular = pd.read_parquet(model_version.path / "popularity.parquet")["item_id"]
    assert emptied["item_ids"].tolist() == [i for i in popular if i not in seen and i not in set(candidates)][:10]

    kept = first["item_ids"][:3]
    short = ask(np.setdiff1d(candidates, kept))  # three candidates left for the model
    assert short["served_by"][0] == b"model" and len(short["item_ids"]) == 10
    assert sorted(short["item_ids"][:3].tolist()) == sorted(kept.tolist())
    filled = set(short["item_ids"][3:].tolist())
    assert len(filled) == 7 and not filled & (set(candidates.tolist()) | seen)
    assert np.all(np.diff(short["scores"]) <= 0) and short["scores"][3] < short["scores"][2]


def test_unknown_user_gets_the_popularity_fallback(funnel, model_version):
    out = run_funnel(funnel, 10**9, 5)
    assert out["served_by"][0] == b"fallback"
    popular = pd.read_parquet(model_version.path / "popularity.parquet")["item_id"].head(5).tolist()
    assert out["item_ids"].tolist() == popular


def test_a_user_the_active_users_filter_dropped_is_never_served_what_they_clicked(
    funnel, processed, small_data, small_config
):
    """A user with too few recent clicks is left out of training (workflow.active_users) and served as
    unknown; their training-period clicks never reached ``seen_items``, so the popularity fallback
    served them back (5 of the 25 such users of this world). The export's store now holds their history."""
    cutoff = processed.summary["cutoff"]
    canonical = pd.read_parquet(processed.item_id_map).set_index("item_id")["canonical_item_id"]
    trained = set(pd.read_parquet(processed.train_events)["user_id"])
    events = small_data.events
    clicks = events[(events["timestamp"] < cutoff) & (events[small_config.training.history_event] > 0)]
    clicks = clicks[~clicks["user_id"].isin(trained)].assign(item_id=lambda f: canonical.loc[f["item_id"]].to_numpy())
    assert clicks["user_id"].nunique() >= 10  # the world has such users
    # Their history is kept one row per (user, item), as a trained user's: not every raw event.
    fallback = pd.read_parquet(processed.fallback_events)
    assert not fallback.duplicated(["user_id", "item_id"]).any() and not set(fallback["user_id"]) & trained
    raw = funnel["ordering"].raw_ids
    for user, group in clicks.groupby("user_id"):
        out = run_funnel(funnel, int(user), 10)
        assert not out["user_known"][0]
        clicked = set(group["item_id"].tolist()) & set(raw[raw >= 0].tolist())
        assert clicked <= set(raw[out["seen_items"]].tolist()), user
        assert not clicked & set(out["item_ids"].tolist()), user


@pytest.mark.parametrize("k", [0, -3, 51])
def test_out_of_range_k_is_a_request_error(funnel, k):
    with pytest.raises(RequestError, match="k must be between 1 and 50"):
        run_funnel(funnel, 1, k)


def test_multi_valued_user_id_is_a_request_error(funnel):
    with pytest.raises(RequestError, match="exactly one value"):
        funnel["feature_lookup"].run({"user_id": np.array([1, 2])})


def test_filtering_removes_seen_items(funnel):
    out = funnel["filtering"].run({"candidate_ids": np.array([5, 6, 7, 8]), "seen_items": np.array([6, 8])})
    assert out["filtered_ids"].tolist() == [5, 7]


def test_rankers_handle_an_empty_candidate_list(funnel):
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    light = funnel["light_ranker"].run({**lookup, "filtered_ids": np.zeros(0, dtype=np.int64)})
    assert light["light_ids"].shape == (0,) and light["light_scores"].shape == (0,)
    heavy = funnel["heavy_ranker"].run({**lookup, **light})
    assert heavy["heavy_scores"].shape == (0,)


def test_light_ranker_keeps_its_best_candidates_for_the_heavy_ranker(funnel, small_config):
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    ids = np.arange(3, 83, dtype=np.int64)  # 80 encoded item ids (0-2 are reserved by Categorify)
    out = funnel["light_ranker"].run({**lookup, "filtered_ids": ids})
    keep = small_config.serving.light_ranker_k
    assert len(out["light_ids"]) == keep and set(out["light_ids"]) <= set(ids)
    scores = out["light_scores"]
    assert ((scores >= 0) & (scores <= 1)).all() and np.all(np.diff(scores) <= 0)
    # What it dropped scores no higher than what it kept.
    from models.heads import head_outputs

    target = small_config.light_ranker.target
    all_scores = head_outputs(funnel["light_ranker"].predict(lookup, ids), [target])[target]
    dropped = all_scores[~np.isin(ids, out["light_ids"])]
    assert dropped.max() <= scores.min()


def test_heavy_score_is_the_weighted_sum_of_its_heads(funnel, model_version):
    from models.heads import head_outputs

    stage = funnel["heavy_ranker"]
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    ids = np.arange(3, 23, dtype=np.int64)
    members = stage.members  # the first member alone (test_models checks the ensemble's mean)
    try:
        stage.members = members[:1]
        score = stage.run({**lookup, "light_ids": ids})["heavy_scores"]
    finally:
        stage.members = members
    weights = model_version.manifest["heavy_ranker"]["weights"]
    assert abs(sum(weights.values()) - 1.0) < 1e-6 and len(weights) >= 2
    heads = head_outputs(stage.predict(lookup, ids), list(weights))
    expected = sum(w * heads[t] for t, w in weights.items())
    np.testing.assert_allclose(score, expected, rtol=1e-5)


def test_ranker_rejects_ids_outside_the_catalog(funnel):
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    with pytest.raises(RequestError, match="outside the catalog"):
        funnel["heavy_ranker"].run({**lookup, "light_ids": np.array([10**6])})


def test_stage_models_refuse_user_features_outside_their_vocabulary_or_not_finite(funnel, model_version):
    """The query tower and the rankers, called on their own, name the bad user feature (an
    out-of-range embedding id was TensorFlow's INTERNAL; a NaN scored every candidate NaN), and
    retrieval refuses a query embedding that is not finite."""
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    names = model_version.manifest["features"]["user_categorical"]
    cardinality = {c["name"]: c["cardinality"] for c in model_version.manifest["schema"] if "cardinality" in c}
    j = names.index("age_band")
    ids = funnel["retrieval"].run(funnel["query_tower"].run(lookup))["candidate_ids"][:5]
    calls = {
        "query_tower": lambda x: funnel["query_tower"].run(x),
        "query_tower batched": lambda x: funnel["query_tower"].run_batch([lookup, x]),
        "light_ranker": lambda x: funnel["light_ranker"].run({**x, "filtered_ids": ids}),
        "heavy_ranker": lambda x: funnel["heavy_ranker"].run({**x, "light_ids": ids}),
        "heavy_ranker batched": lambda x: funnel["heavy_ranker"].run_batch(
            [{**lookup, "light_ids": ids}, {**x, "light_ids": ids}]
        ),
    }
    for call in calls.values():
        for bad in (cardinality["age_band"], -1):
            categorical = lookup["user_categorical"].copy()
            categorical.reshape(-1)[j] = bad
            with pytest.raises(RequestError, match=rf"user feature age_band = {bad} is outside its vocabulary"):
                call({**lookup, "user_categorical": categorical})
        continuous = lookup["user_continuous"].astype(np.float32).copy()
        continuous.reshape(-1)[0] = np.nan
        with pytest.raises(RequestError, match="is not finite"):
            call({**lookup, "user_continuous": continuous})
        call(lookup)  # the lookup's own features still pass
    query = funnel["query_tower"].run(lookup)["query_embedding"].copy()
    query[0] = np.inf
    with pytest.raises(RequestError, match="query_embedding must be finite"):
        funnel["retrieval"].run({"query_embedding": query})
    with pytest.raises(RequestError, match="query_embedding must be finite"):
        funnel["retrieval"].run_batch([funnel["query_tower"].run(lookup), {"query_embedding": query}])


def test_retrieval_refuses_a_query_whose_inner_products_would_overflow(funnel, small_config):
    """A finite query of 3e38s overflowed faiss's float32 inner products: 16 of retrieval_k
    candidates came back, ranked by garbage scores, and no error."""
    retrieval = funnel["retrieval"]
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    query = funnel["query_tower"].run(lookup)["query_embedding"].reshape(-1)
    huge = np.full_like(query, 3e38)
    with pytest.raises(RequestError, match="query_embedding has norm .* would overflow float32"):
        retrieval.run({"query_embedding": huge})
    with pytest.raises(RequestError, match="would overflow float32"):
        retrieval.run_batch([{"query_embedding": query}, {"query_embedding": huge}])
    # The largest query it accepts still gets retrieval_k candidates, every score finite.
    largest = (query / np.linalg.norm(query) * retrieval.max_query_norm * 0.999).astype(np.float32)
    for q in (query, largest):
        out = retrieval.run({"query_embedding": q})
        assert len(out["candidate_ids"]) == small_config.serving.retrieval_k
        assert np.isfinite(out["retrieval_scores"]).all()


def test_ordering_refuses_ids_outside_the_catalog_and_scores_that_are_not_finite(funnel, model_version):
    """What a direct call to the ordering stage could pass that the ensemble never does."""
    request = known_user_request(funnel, model_version)
    ordering = funnel["ordering"]
    hole = np.flatnonzero(ordering.raw_ids < 0)  # encoded ids the catalog does not use, if any
    for bad in [-1, len(ordering.raw_ids), *hole[:1].tolist()]:
        ids = request["light_ids"].copy()
        ids[0] = bad
        with pytest.raises(RequestError, match="light_ids hold an item id outside the catalog"):
            ordering.run({**request, "light_ids": ids})
    scores = request["heavy_scores"].copy()
    scores[0] = np.nan
    with pytest.raises(RequestError, match="heavy_scores must be finite"):
        ordering.run({**request, "heavy_scores": scores})
    assert len(ordering.run(request)["item_ids"]) == 10


def ordering_with(triton_repo, model_version, tmp_path, **policy):
    """The ordering stage of the export with ``serving.ordering`` changed in its manifest."""
    import json
    import shutil

    folder = tmp_path / "ordering"
    shutil.copytree(triton_repo / "ordering" / str(model_version.version), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"]["serving"]["ordering"] = {**manifest["config"]["serving"].get("ordering", {}), **policy}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return stages.Ordering(folder)


def known_user_request(funnel, model_version, k=10):
    user = int(pd.read_parquet(model_version.path / "user_history.parquet")["user_id_raw"].iloc[0])
    out = run_funnel(funnel, user, k)
    return out


def test_ordering_blends_in_where_retrieval_placed_each_candidate(funnel, triton_repo, model_version, tmp_path):
    from evaluation import offline

    request = known_user_request(funnel, model_version)
    by_retrieval = ordering_with(triton_repo, model_version, tmp_path / "r", retrieval_weight=1.0).run(request)
    # Weight 1: the heavy ranker's candidates in retrieval's order.
    position = {c: i for i, c in enumerate(request["candidate_ids"].tolist())}
    raw = funnel["ordering"].raw_ids
    expected = sorted(request["light_ids"].tolist(), key=lambda c: position[c])[:10]
    assert by_retrieval["item_ids"].tolist() == raw[expected].tolist()
    # Half and half: served scores are the blend, descending, in [0, 1]; the offline scorer
    # (preference parity) gives the served items the same scores.
    blended = ordering_with(triton_repo, model_version, tmp_path / "b", retrieval_weight=0.5)
    out = blended.run(request)
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all() and np.all(np.diff(out["scores"]) <= 0)
    # Retrieval's scores as a direct call could pass them: refused where the blend reads them, as the
    # heavy ranker's are (a NaN or inf was taken and shifted every candidate's percentile: another list).
    for bad in (np.nan, np.inf, -np.inf):
        scores = request["retrieval_scores"].copy()
        scores[0] = bad
        with pytest.raises(RequestError, match="retrieval_scores must be finite"):
            blended.run({**request, "retrieval_scores": scores})
    stages_ = [blended if s.name == "ordering" else s for s in offline.load_funnel(triton_repo, model_version.version)]
    encoded = pd.Series(np.arange(len(raw)), index=raw).loc[out["item_ids"]].to_numpy()
    np.testing.assert_allclose(offline.final_scores(stages_, request, encoded), out["scores"], rtol=1e-4, atol=1e-6)


def test_ordering_blends_in_the_item_affinity_of_the_users_history(funnel, triton_repo, model_version, tmp_path):
    from evaluation import offline
    from evaluation.peers import EASE, interaction_matrix

    request = known_user_request(funnel, model_version)
    by_affinity = ordering_with(
        triton_repo, model_version, tmp_path / "a", retrieval_weight=0.0, affinity_weight=1.0
    ).run(request)
    # Weight 1: the heavy ranker's candidates in the order of EASE's score for this user, computed
    # here from the registry's training history with the evaluation's own EASE peer.
    history = pd.read_parquet(model_version.path / "user_history.parquet")
    items = pd.read_parquet(model_version.path / "item_features.parquet")
    encoded = history.merge(items[["item_id_raw", "item_id"]], on="item_id_raw")
    users = pd.factorize(encoded["user_id_raw"])[0]
    x = interaction_matrix(users, encoded["item_id"], users.max() + 1, int(items["item_id"].max()) + 1)
    reg = model_version.manifest["item_affinity"]["reg_weight"]
    row = users[(encoded["user_id_raw"] == request["user_id"][0]).to_numpy()][0]
    ease = EASE(reg).fit(x).scores([row])[0]
    raw = funnel["ordering"].raw_ids
    encoded_of = pd.Series(np.arange(len(raw)), index=raw)
    served = ease[encoded_of.loc[by_affinity["item_ids"]].to_numpy()]
    best = np.sort(ease[request["light_ids"]])[::-1]
    np.testing.assert_allclose(served, best[:10], rtol=1e-4, atol=1e-5)  # the 10 best, best first
    assert best[0] > best[-1] + 0.1  # the affinity does separate the candidates
    # A blend of all three: served scores in [0, 1], descending, and the offline scorer agrees.
    blended = ordering_with(triton_repo, model_version, tmp_path / "b", retrieval_weight=0.2, affinity_weight=0.6)
    out = blended.run(request)
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all() and np.all(np.diff(out["scores"]) <= 0)
    stages_ = [blended if s.name == "ordering" else s for s in offline.load_funnel(triton_repo, model_version.version)]
    encoded = encoded_of.loc[out["item_ids"]].to_numpy()
    np.testing.assert_allclose(offline.final_scores(stages_, request, encoded), out["scores"], rtol=1e-4, atol=1e-6)
    with pytest.raises(RequestError, match="seen_items"):
        blended.run({k: v for k, v in request.items() if k != "seen_items"})


def test_ordering_caps_items_per_category(funnel, triton_repo, model_version, tmp_path):
    request = known_user_request(funnel, model_version)
    capped = ordering_with(triton_repo, model_version, tmp_path, max_per_category=1).run(request)
    items = pd.read_parquet(model_version.path / "item_features.parquet").set_index("item_id_raw")
    categories = items.loc[capped["item_ids"], "category"].tolist()
    assert len(categories) == len(set(categories)) > 1
    # Each category is represented by its best candidate: the uncapped list's first of that category.
    uncapped = funnel["ordering"].run({**request, "k": np.array([50], dtype=np.int32)})["item_ids"].tolist()
    first_of = {}
    for item in uncapped:
        first_of.setdefault(items.loc[item, "category"], item)
    assert all(first_of[c] == i for c, i in zip(categories, capped["item_ids"].tolist()) if c in first_of)


def test_the_category_cap_holds_for_the_fallback_and_fresh_history_lists_too(triton_repo, model_version, tmp_path):
    """serving.ordering.max_per_category is a rule for every list served: the popularity fallback and
    the fresh-history list of users the models never saw used to ignore it (3 and 6 items of one
    category in a list of 10 with max_per_category 1)."""
    ordering = ordering_with(triton_repo, model_version, tmp_path, max_per_category=1)
    items = pd.read_parquet(model_version.path / "item_features.parquet")
    category = dict(zip(items["item_id_raw"], items["category"]))
    empty = np.zeros(0, dtype=np.int64)
    request = {
        "user_known": np.array([False]),
        "k": np.array([10], dtype=np.int32),
        **{name: empty for name in ("candidate_ids", "filtered_ids", "light_ids")},
        **{name: np.zeros(0, dtype=np.float32) for name in ("heavy_scores", "retrieval_scores")},
    }
    history = np.sort(items["item_id"].to_numpy())[:5]  # enough live history for fresh_history
    for seen, served_by in ((empty, b"fallback"), (history, b"fresh_history")):
        out = ordering.run({**request, "seen_items": seen})
        assert out["served_by"][0] == served_by
        categories = [category[i] for i in out["item_ids"].tolist()]
        assert len(categories) == len(set(categories)) == min(10, items["category"].nunique()), (served_by, categories)


def test_exploration_samples_different_lists_from_the_same_candidates(funnel, triton_repo, model_version, tmp_path):
    request = known_user_request(funnel, model_version)
    explore = ordering_with(triton_repo, model_version, tmp_path, exploration_temperature=0.05)
    lists = {tuple(explore.run(request)["item_ids"].tolist()) for _ in range(20)}
    raw = funnel["ordering"].raw_ids
    assert len(lists) > 1
    assert all(set(x) <= set(raw[request["light_ids"]].tolist()) and len(x) == 10 for x in lists)


def test_filtering_drops_the_items_the_request_excludes(funnel, model_version):
    items = pd.read_parquet(model_version.path / "item_features.parquet")
    encoded, raw = items["item_id"].to_numpy()[:4], items["item_id_raw"].to_numpy()[:4]
    out = funnel["filtering"].run(
        {
            "candidate_ids": encoded,
            "seen_items": np.zeros(0, np.int64),
            "exclude_item_ids": np.array([raw[1], raw[3], 10**12]),
        }
    )
    assert out["filtered_ids"].tolist() == [encoded[0], encoded[2]]
    with pytest.raises(RequestError, match="exclude_item_ids must be integer"):
        funnel["filtering"].run(
            {"candidate_ids": encoded, "seen_items": np.zeros(0, np.int64), "exclude_item_ids": np.array([1.5])}
        )


def test_a_stage_process_loads_tensorflow_without_jax_or_keras_and_answers_alike(
    funnel, triton_repo, model_version, tmp_path
):
    """A stage stub is a fresh process: ``import_tf`` marks JAX and Keras absent during TensorFlow's
    import (neither is used to call a SavedModel's signature), saving about 0.8 s of each 4.3 s
    import at every stub start, and removes the marks afterwards. The query tower and the heavy
    ranker loaded that way give what this process gives; both packages still import afterwards."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    user = int(pd.read_parquet(model_version.path / "user_history.parquet")["user_id_raw"].iloc[0])
    x = {"user_id": np.array([user], dtype=np.int64)}
    x.update(funnel["feature_lookup"].run(x))
    want = funnel["query_tower"].run(x)["query_embedding"]
    x["light_ids"] = np.arange(3, 23, dtype=np.int64).reshape(1, -1)
    want_heavy = funnel["heavy_ranker"].run(x)["heavy_scores"]
    np.savez(tmp_path / "x.npz", **{k: np.asarray(v) for k, v in x.items()})
    version = str(model_version.version)
    code = (
        "import sys, json, numpy as np\n"
        "from serving import stages\n"
        f"x = dict(np.load({str(tmp_path / 'x.npz')!r}))\n"
        f"out = stages.STAGES['query_tower']({str(triton_repo / 'query_tower' / version)!r}).run(x)\n"
        f"heavy = stages.STAGES['heavy_ranker']({str(triton_repo / 'heavy_ranker' / version)!r}).run(x)\n"
        "loaded = sorted(m for m in ('jax', 'keras') if m in sys.modules)\n"
        "import jax  # the marks are gone: both still import for whoever wants them\n"
        "import tensorflow as tf\n"
        "tf.keras.layers.Dense(1)  # tf.keras loads Keras on first use\n"
        "print(json.dumps({'loaded': loaded, 'embedding': out['query_embedding'].tolist(),\n"
        "                  'heavy': heavy['heavy_scores'].tolist()}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []  # TensorFlow's import loaded neither
    assert np.allclose(np.asarray(got["embedding"]), want, atol=1e-6)
    assert np.allclose(np.asarray(got["heavy"]), np.asarray(want_heavy), atol=1e-6)
