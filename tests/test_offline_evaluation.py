"""The offline evaluation runner on the session's synthetic world."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from evaluation import offline
from evaluation.peers import EASE, Popularity


@pytest.fixture(scope="module")
def data(small_data):
    events = small_data.events
    clicks = events[events["click"] == 1]
    cutoff = clicks["timestamp"].quantile(0.8)
    return offline.Interactions.from_split(clicks[clicks["timestamp"] < cutoff], clicks[clicks["timestamp"] >= cutoff])


def test_peer_results_carry_metrics_intervals_slices_and_bias(data, small_data):
    users = np.arange(len(data.user_ids))
    res = {}
    for peer in (Popularity(), EASE(reg_weight=50.0)):
        scores = peer.fit(data.matrix()).scores(users)
        res[peer.name] = offline.evaluate_scores(
            peer.name, scores, data, ks=(10,), user_attributes=small_data.users, n_bootstrap=100
        )
    ease = res["EASE"]
    assert ease.metrics["ndcg@10_low"] <= ease.metrics["ndcg@10"] <= ease.metrics["ndcg@10_high"]
    assert set(ease.slices["attribute"]) == {"age_band", "gender", "location"}
    # Each slice is the mean NDCG@10 of that group's users, computed here from the ranked lists.
    from evaluation import metrics as m

    ranked = m.full_ranking_top_k(EASE(reg_weight=50.0).fit(data.matrix()).scores(users), 10, exclude=data.seen)
    tested = np.array([len(r) > 0 for r in data.relevant])
    per_user = m.RANKING_METRICS["ndcg"](ranked, data.relevant, k=10, per_user=True)
    gender = small_data.users.set_index("user_id")["gender"].reindex(data.user_ids[tested]).astype(str).to_numpy()
    table = ease.slices[ease.slices["attribute"] == "gender"].set_index("value")
    for value in np.unique(gender):
        assert table.loc[value, "users"] == (gender == value).sum()
        assert table.loc[value, "ndcg@10"] == pytest.approx(per_user[gender == value].mean())
    assert (table["users"] * table["ndcg@10"]).sum() / table["users"].sum() == pytest.approx(ease.metrics["ndcg@10"])
    gaps = offline.slice_gaps(ease.slices, "ndcg@10").set_index("attribute")
    assert gaps.loc["gender", "gap"] == pytest.approx(table["ndcg@10"].max() - table["ndcg@10"].min())
    assert gaps.loc["gender", "worst"] == table["ndcg@10"].idxmin()
    # Popularity recommends nearly the same items to everyone (only seen items differ per user).
    assert res["Pop"].bias["coverage"] < ease.bias["coverage"]
    assert res["Pop"].bias["item_share_curve"][1.0] < ease.bias["item_share_curve"][1.0]
    assert res["Pop"].bias["gini"] > ease.bias["gini"]
    assert 0 <= ease.bias["preference_parity"] <= 1


@pytest.mark.slow
def test_served_funnel_lists_evaluate_like_any_recommender(triton_repo, model_version, data):
    users = data.user_ids[:40]
    lists = offline.served_top_k(triton_repo, model_version.version, users, 10)
    assert offline.ensemble_order(triton_repo)[0] == "feature_lookup"
    assert all(len(x) == 10 for x in lists)
    top = offline.columns_from_raw(lists, data, 10)
    assert (top >= -1).all() and (top[top >= 0] < len(data.item_ids)).all()
    sub = offline.Interactions(
        data.train[data.train["user_id"].isin(users)], data.test[data.test["user_id"].isin(users)], users, data.item_ids
    )
    result = offline.evaluate_top_k("funnel", top, sub, ks=(10,), n_bootstrap=50)
    assert 0 <= result.metrics["recall@10"] <= 1
    # The scorer preference parity uses for the funnel gives the served items their served scores.
    stages = offline.load_funnel(triton_repo, model_version.version)
    out = offline.run_funnel(stages, int(users[0]), 10)
    order = np.argsort(-np.asarray(out["heavy_scores"]), kind="stable")[:10]
    encoded = np.asarray(out["light_ids"])[order]
    np.testing.assert_allclose(
        offline.final_scores(stages, out, encoded), np.asarray(out["scores"]), rtol=1e-4, atol=1e-6
    )


@pytest.mark.slow
def test_ordering_variants_are_measured_on_the_same_export(triton_repo, model_version, data):
    from evaluation.pipeline import funnel_results, ordering_results

    variants = (("cap 1", {"max_per_category": 1}), ("explore", {"exploration_temperature": 0.1}))
    args = (triton_repo, model_version.version, model_version.path, data, (10,))
    stages = offline.load_funnel(triton_repo, model_version.version)
    table = ordering_results(*args, n_bootstrap=50, variants=variants, stages=stages)
    # The export has item affinity weights and serves without them: the switched-on row comes last.
    assert table["ordering"].tolist() == ["as served", "cap 1", "explore", "item affinity 0.5"]
    measured = table.drop(columns="ordering").set_index(table["ordering"])
    assert (measured.loc["item affinity 0.5"] - measured.loc["as served"]).abs().max() > 0
    served, _ = funnel_results("served", *args, n_bootstrap=50, parity=False, stages=stages)
    assert table.loc[0, "ndcg@10"] == pytest.approx(served.metrics["ndcg@10"])  # the served policy is back
    spans = table.set_index("ordering").filter(like="categories per top-10").iloc[:, 0]
    assert spans["cap 1"] > spans["as served"]
    # Exploration is drawn from a seeded generator: the same table twice; another seed differs.
    again = ordering_results(*args, n_bootstrap=50, variants=variants[1:], stages=stages)
    assert again.loc[1, "ndcg@10"] == pytest.approx(table.loc[2, "ndcg@10"])
    other = ordering_results(*args, n_bootstrap=50, variants=variants[1:], seed=1, stages=stages)
    assert other.loc[1, "ndcg@10"] != pytest.approx(table.loc[2, "ndcg@10"], abs=1e-9)
    # One item per category: every item of a capped list is another category.
    capped = stages[:-1] + [stages[-1].with_policy(dataclasses.replace(stages[-1].policy, max_per_category=1))]
    items = pd.read_parquet(model_version.path / "item_features.parquet").set_index("item_id_raw")["category"]
    outputs = [offline.run_funnel(capped, int(user), 10) for user in data.user_ids[:40]]
    by_model = [out["item_ids"] for out in outputs if out["served_by"][0] == b"model"]
    assert by_model and all(items.reindex(ids).is_unique for ids in by_model)


@pytest.mark.slow
def test_rankers_are_reported_with_roc_and_pr_auc_per_head(model_version, processed):
    from evaluation.rankers import ranker_table

    table = ranker_table(model_version.path, model_version.manifest, processed.valid())
    heads = list(model_version.manifest["heavy_ranker"]["weights"])
    members = model_version.manifest["heavy_ranker"]["members"]  # every ensemble member, each head
    assert members == ["heavy_ranker", "heavy_ranker_1"]
    assert table["ranker"].tolist() == ["light_ranker"] + [m for m in members for _ in heads]
    trained = model_version.manifest["metrics"]["heavy_ranker"]
    for i, member in enumerate(members):  # the ROC-AUC training recorded, recomputed from the saved model
        rows = table[table["ranker"] == member].set_index("head")
        for head in heads:
            recorded = trained[f"member{i}_auc_{head}" if i else f"auc_{head}"]
            assert rows.loc[head, "ROC-AUC"] == pytest.approx(recorded, abs=2e-3)
    heavy = table[table["ranker"] == "heavy_ranker"].set_index("head")
    click = heavy.loc["click"]
    assert click["ROC-AUC"] > 0.6 and click["PR-AUC"] > click["positive share"] > 0


def test_report_has_tables_and_embedded_plots(data, tmp_path):
    from evaluation.report import write_report

    users = np.arange(len(data.user_ids))
    results = [
        offline.evaluate_scores(p.name, p.fit(data.matrix()).scores(users), data, ks=(10,), n_bootstrap=50)
        for p in (Popularity(), EASE(reg_weight=50.0))
    ]
    paths = write_report(results, tmp_path, "synthetic", context={"protocol": "temporal"})
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 2 and "EASE" in html and "Popularity bias" in html
    md = paths["markdown"].read_text()
    assert "| EASE" in md and "ndcg@10" in md
