"""The offline evaluation runner on the session's synthetic world."""

import copy
import dataclasses
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

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


def test_a_staged_version_loads_while_the_funnel_serves_a_fused_one(tmp_path, monkeypatch):
    """Mid-rollout from the seven stage models to the fused funnel (docs/serving.md): ``funnel`` has
    one step, ``fused_funnel``, while staged version 1 is still served as ``funnel_v1``. Loading
    version 1 for evaluation or the checklist read ``funnel``'s steps: KeyError 'fused_funnel'."""
    from types import SimpleNamespace

    from deployment.export import TRITON_REPO_SOURCE, fused_ensemble, pin_ensemble, write_version_ensemble
    from serving import stages

    staged = pin_ensemble((TRITON_REPO_SOURCE / "funnel" / "config.pbtxt").read_text(), 1)
    write_version_ensemble(tmp_path, staged, 1)
    (tmp_path / "funnel").mkdir()
    (tmp_path / "funnel" / "config.pbtxt").write_text(pin_ensemble(fused_ensemble(staged), 2))
    built = {name: (lambda folder, name=name, **_: SimpleNamespace(name=name, folder=folder)) for name in stages.FUNNEL}
    monkeypatch.setattr(stages, "STAGES", built)
    loaded = offline.load_funnel(tmp_path, 1)
    assert [s.name for s in loaded] == stages.FUNNEL
    assert all(s.folder == tmp_path / s.name / "1" for s in loaded)


def test_an_exploring_ordering_replays_the_same_lists_every_load(tmp_path, monkeypatch):
    """With ``serving.ordering.exploration_temperature`` > 0 the loaded ordering stage sampled from
    fresh entropy, so an evaluation, the tuning step or the checklist gave other figures on every run
    of the same export. ``load_funnel`` seeds it (``seed``, 0 by default)."""
    from types import SimpleNamespace

    from deployment.export import TRITON_REPO_SOURCE, pin_ensemble, write_version_ensemble
    from serving import stages

    class Ordering:  # as the stage does: fresh entropy unless with_policy gets a seed
        name = "ordering"

        def __init__(self, folder=None, policy=None, seed=None, **_):
            self.policy = policy or SimpleNamespace(exploration_temperature=0.5)
            self.folder, self.rng = folder, np.random.default_rng(seed)

        def with_policy(self, policy, seed=None):
            return Ordering(self.folder, policy, seed)

    write_version_ensemble(tmp_path, pin_ensemble((TRITON_REPO_SOURCE / "funnel" / "config.pbtxt").read_text(), 1), 1)
    built = {name: (lambda folder, name=name, **_: SimpleNamespace(name=name, folder=folder)) for name in stages.FUNNEL}
    monkeypatch.setattr(stages, "STAGES", {**built, "ordering": Ordering})

    def draws(**kwargs):
        (ordering,) = [s for s in offline.load_funnel(tmp_path, 1, **kwargs) if s.name == "ordering"]
        return ordering.rng.random(5).tolist()

    assert draws() == draws()
    assert draws(seed=1) != draws(seed=2)


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
    # The windowed activity features (on in the test model) are counted at the end of the training data,
    # as a request at the start of the held-out period would have them; at the wall clock, every window empty.
    import time

    lookup = stages[0]
    assert lookup.clock() == model_version.manifest["data_summary"]["cutoff"]
    wall = time.time()
    assert any(not np.array_equal(lookup.user_activity(int(u)), lookup.user_activity(int(u), now=wall)) for u in users)


def test_offline_stages_count_activity_at_the_end_of_the_training_data():
    """The feature lookup's clock stops at its ``activity_since`` (the manifest's cutoff); without a
    cutoff it stays the wall clock. Other stages are left alone."""
    import time
    from types import SimpleNamespace

    lookup = SimpleNamespace(name="feature_lookup", clock=time.time, activity_since=1_000_000.0)
    other = SimpleNamespace(name="ordering", clock=time.time, activity_since=5.0)
    assert offline.at_training_end([lookup, other]) == [lookup, other]
    assert lookup.clock() == 1_000_000.0 and other.clock is time.time
    no_cutoff = SimpleNamespace(name="feature_lookup", clock=time.time, activity_since=-np.inf)
    offline.at_training_end([no_cutoff])
    assert no_cutoff.clock is time.time


@pytest.mark.slow
def test_ordering_variants_are_measured_on_the_same_export(triton_repo, model_version, data):
    from evaluation.pipeline import funnel_results, ordering_results, served_categories

    variants = (("cap 1", {"max_per_category": 1}), ("explore", {"exploration_temperature": 0.1}))
    args = (triton_repo, model_version.version, model_version.path, data, (10,))
    stages = offline.load_funnel(triton_repo, model_version.version)
    table = ordering_results(*args, n_bootstrap=50, variants=variants, stages=stages)
    # The export has item affinity weights and serves without them: the switched-on row comes last.
    assert table["ordering"].tolist() == ["as served", "cap 1", "explore", "item affinity 0.5"]
    measured = table.drop(columns="ordering").set_index(table["ordering"])
    assert (measured.loc["item affinity 0.5"] - measured.loc["as served"]).abs().max() > 0
    categories = served_categories(stages)
    served, _ = funnel_results("served", *args, n_bootstrap=50, parity=False, stages=stages, categories=categories)
    assert table.loc[0, "ndcg@10"] == pytest.approx(served.metrics["ndcg@10"])  # the served policy is back
    # The evaluation's own served result as the first row (not evaluated twice): the same row.
    reused = ordering_results(*args, n_bootstrap=50, variants=variants[:1], stages=stages, as_served=served)
    pd.testing.assert_frame_equal(reused.iloc[:2], table.iloc[:2])
    without = dataclasses.replace(served, bias={k: v for k, v in served.bias.items() if k != "categories_per_list"})
    with pytest.raises(ValueError, match="categories=served_categories"):
        ordering_results(*args, variants=(), stages=stages, as_served=without)
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


def leave_one_out(data: offline.Interactions, users=None) -> offline.Interactions:
    """The same training part, and one held-out click per user (the first): leave-one-out's shape."""
    test = data.test.sort_values("timestamp").groupby("user_id").head(1)
    train = data.train
    if users is not None:
        train, test = train[train["user_id"].isin(users)], test[test["user_id"].isin(users)]
    return offline.Interactions.from_split(train, test)


def test_leave_one_out_split_reports_what_it_cannot_support_and_every_other_figure(data, small_data, tmp_path):
    from evaluation.report import write_report

    loo = leave_one_out(data)
    assert max(len(r) for r in loo.relevant) == 1
    users = small_data.users.assign(country="one")  # a slice with one group has no best-worst gap
    results = [
        offline.evaluate_scores(
            p.name,
            p.fit(loo.matrix()).scores(np.arange(len(loo.user_ids))),
            loo,
            ks=(10,),
            user_attributes=users,
            n_bootstrap=50,
        )
        for p in (Popularity(), EASE(reg_weight=50.0))
    ]
    for r in results:
        assert r.bias["preference_parity"] is None and r.bias["preference_parity_users"] == 0
        assert "one held-out item per user" in r.not_applicable["preference_parity"]
        assert r.not_applicable["slice gap by country"] == "every evaluated user is in one group"
        assert {"gini", "coverage", "popularity_lift", "item_share_curve"} <= {
            key for key, v in r.bias.items() if v is not None
        }
        assert 0 <= r.metrics["ndcg@10_low"] <= r.metrics["ndcg@10"] <= r.metrics["ndcg@10_high"]
    assert "country" not in set(offline.slice_gaps(results[1].slices, "ndcg@10")["attribute"])
    paths = write_report(results, tmp_path, "leave-one-out", served="EASE")
    page = paths["html"].read_text()
    assert "Not applicable on this split" in page and "as in leave-one-out" in page
    # Without a tuning step, the section says so.
    assert "not run: this model version records no tuning step" in page
    assert json.loads(paths["json"].read_text())["tuning"] == "not run"
    assert "preference_parity" in paths["markdown"].read_text()


@pytest.mark.slow
def test_evaluation_pipeline_finishes_on_a_leave_one_out_split(
    model_version, triton_repo, processed, small_config, small_data, data, tmp_path, monkeypatch
):
    """The new user's crash: one held-out rating per user. The shared trained funnel is evaluated
    (no retraining) on 40 users' leave-one-out split: every figure but preference parity comes out.
    With the progress bars off, as a quiet script runs (a disabled bar has no postfix: it crashed).
    With the mitigation table: three candidate generators retrained beside the served one, whose row
    is the served funnel's (the table once marked the configured pair, not the served one)."""
    from evaluation.pipeline import evaluate_split, served_variant

    monkeypatch.setenv("TQDM_DISABLE", "1")

    config = copy.deepcopy(small_config)
    config.training.mlflow_tracking_uri = (tmp_path / "mlruns").as_uri()  # the shared registry stays as it is
    config.candidate_generator.epochs = 1  # only the variants train: the table's shape is tested, not their quality
    loo = leave_one_out(data, users=data.user_ids[:40])
    run = evaluate_split(
        processed, loo.train, loo.test, small_data.users, config, tmp_path, ks=(10,), mitigation=True,
        n_bootstrap=50, title="leave-one-out", context={"protocol": "one held-out click per user"},
        trained=(model_version, triton_repo),
    )  # fmt: skip
    mitigation = pd.DataFrame(run["mitigation"])
    pairs = list(zip(mitigation["sampled_negatives"], mitigation["logq_correction"]))
    assert len(set(pairs)) == 4 and mitigation["served"].sum() == 1
    served = mitigation[mitigation["served"]].iloc[0]
    assert (served["sampled_negatives"], served["logq_correction"]) == served_variant(config, run["model"].manifest)
    assert served["ndcg@10"] == run["results"][-1].metrics["ndcg@10"]
    retrieval_k = small_config.serving.retrieval_k  # the trained funnel's export: the configured length
    assert mitigation[f"retrieval recall@{retrieval_k}"].between(0, 1).all()
    assert {"ndcg@10", "recall@10", "gini@10", "coverage@10", "items for 50% of top-10 recs"} <= set(mitigation)
    assert [r.name for r in run["results"]] == ["Pop", "EASE", "ALS", "funnel (served)"]
    for r in run["results"]:
        assert r.bias["preference_parity"] is None and "as in leave-one-out" in r.not_applicable["preference_parity"]
        assert 0 <= r.metrics["ndcg@10"] <= 1 and r.bias["gini"] is not None
    assert 0 <= run["stages"]["candidate_ids"]["recall"] <= 1 and len(run["ordering"]) >= 2
    page = run["paths"]["html"].read_text()
    assert "Not applicable on this split" in page and page.count("as in leave-one-out") == 4
    assert all(f"<td>{peer}</td>" in page for peer in ("Pop", "EASE", "ALS"))  # the headline compares all
    # the tuning step's search when the model version records one, else "not run"
    assert ("trials on the validation part" in page) != ("records no tuning step" in page)


@pytest.fixture(scope="module")
def stand_in(data, small_data):
    """What a report is written from, without training: Pop, EASE and a stand-in for the served
    funnel (EASE with another regularisation), per-stage figures of the shape ``funnel_results`` returns."""
    rows = np.arange(len(data.user_ids))
    peers = (Popularity(), EASE(reg_weight=50.0), EASE(reg_weight=5.0))
    results = [
        offline.evaluate_scores(
            name,
            p.fit(data.matrix()).scores(rows),
            data,
            ks=(10, 20),
            user_attributes=small_data.users,
            n_bootstrap=100,
        )
        for name, p in zip(("Pop", "EASE", "funnel (served)"), peers)
    ]
    stages = {
        "candidate_ids": {"mean_size": 100.0, "recall": 0.61},
        "filtered_ids": {"mean_size": 93.0, "recall": 0.58},
        "light_ids": {"mean_size": 30.0, "recall": 0.37},
        "final": {"mean_size": 10.0, "recall": results[-1].metrics["recall@10"]},
        "ms_per_user": 4.2,
    }
    return results, stages


def stand_in_report(stand_in, out, tuning):
    """A report with every section from the stand-in's figures."""
    from evaluation.report import write_report

    results, stages = stand_in
    return results, write_report(
        results, out, "synthetic", {"protocol": "temporal"}, ks=(10, 20), stages=stages, tuning=tuning
    )


def test_report_leads_with_the_headline_and_draws_every_section(stand_in, tmp_path):
    from evaluation.report import headline

    trials = [{"params": {"affinity_weight": w}, "metric": 0.05 + w * (1 - w) / 10} for w in (0.0, 0.25, 0.5, 0.75)]
    edge = [{"knob": "serving.ordering.affinity_weight", "value": 0.75, "side": "largest"}]
    record = {"metric": "ndcg@10", "trials": trials, "at_edge": edge}
    results, paths = stand_in_report(stand_in, tmp_path / "tuned", record)
    page = paths["html"].read_text()
    # accuracy with error bars, the funnel, slices, the item-share curve, the tuning search
    assert page.count("data:image/png;base64,") == 5
    assert page.index("Headline") < page.index("Accuracy") < page.index("The funnel, stage by stage")
    widths = [
        len(re.findall(r"<th[ >]", table.split("</thead>")[0]))
        for table in re.findall(r"<table.*?</table>", page, re.S)
    ]
    assert (
        widths and max(widths) <= 7 and "{" not in page.split("<body>")[1].split("<h2>Setup")[0]
    )  # narrow tables, no JSON
    head = headline(results, 10).set_index("peer")
    assert list(head.index) == ["Pop", "EASE"] and all(row in page for row in head["difference (95% CI)"])
    funnel, pop = results[-1].metrics["ndcg@10"], results[0].metrics["ndcg@10"]
    assert head.loc["Pop", "funnel / peer"] == pytest.approx(funnel / pop)
    for _, row in head.iterrows():  # "beats" only when the paired interval of the difference is above 0
        low, high = (float(x) for x in re.findall(r"[-+]\d\.\d+", row["difference (95% CI)"])[1:])
        assert row["verdict"] == ("beats" if low > 0 else "loses to" if high < 0 else "within noise of")
    best = page.split("<h2>Tuning search</h2>")[1].split("</table>")[0]
    assert "at the edge: affinity_weight 0.75 is the largest value searched" in best  # models.tuning.at_edge
    assert best.count("<td>affinity_weight=") == 4 and best.index("affinity_weight=0.5") < best.index(
        "affinity_weight=0.25"
    )


def test_tuning_search_is_read_from_any_stored_shape():
    from evaluation.report import tuning_plot, tuning_searches, tuning_table

    trial = {"params": {"a": 1}, "metric": 0.5}
    assert tuning_searches(None) == [] and tuning_searches({}) == []
    assert tuning_searches([trial])[0]["trials"] == [{"params": {"a": 1}, "value": 0.5}]
    nested = tuning_searches(
        {"blend": {"metric": "ndcg@10", "trials": [trial]}, "logq": [{"logq_strength": 0.5, "value": 0.3}]}
    )
    assert [s["name"] for s in nested] == ["blend", "logq"] and nested[0]["metric"] == "ndcg@10"
    assert nested[1]["trials"] == [{"params": {"logq_strength": 0.5}, "value": 0.3}]
    # The training run's record (``models/tuning.py``): the metric under its own name, a grid of knobs.
    grid = [
        {"params": {"serving.ordering.affinity_weight": a, "item_affinity.reg_weight": r}, "ndcg_at_10": a / r}
        for a in (0.0, 0.5)
        for r in (100.0, 250.0)
    ]
    record = {"metric": "ndcg_at_10", "trials": grid, "chosen": grid[2]["params"], "best": 0.005}
    (search,) = tuning_searches(record)
    assert search["metric"] == "ndcg_at_10" and [t["value"] for t in search["trials"]] == [0, 0, 0.005, 0.002]
    assert search["chosen"] == grid[2]["params"] and len(tuning_plot(search)) > 1000
    assert search["at_edge"] == []  # a record from before the edge check reads as "nothing at an edge"
    assert tuning_table(search).loc[0, "params"] == "affinity_weight=0.5, reg_weight=100"


def test_mitigation_tables_served_row_is_the_candidate_generator_the_tuning_step_chose():
    """A search over sampled negatives can serve a pair other than the configured one; the table's
    served row (and the variant not retrained) must be that pair (a MovieLens run once labelled the
    served figures with the configured 4096 sampled negatives while serving 0)."""
    from configs import load_config
    from evaluation.pipeline import mitigation_variants, served_variant

    config = load_config("configs/movielens-recbole.yaml")
    assert (config.candidate_generator.sampled_negatives, config.candidate_generator.logq_correction) == (4096, True)
    chose_none = {"tuning": {"chosen": {"candidate_generator.sampled_negatives": 0}}}
    assert served_variant(config, chose_none) == (0, True)
    assert served_variant(config, {"tuning": {"chosen": {"candidate_generator.logq_strength": 1.0}}}) == (4096, True)
    assert served_variant(config, {}) == (4096, True)  # a version that did not tune serves its config
    assert served_variant(config, chose_none) in mitigation_variants(config.candidate_generator)
    # A count the search chose that is not the configured one still gets its row, marked served.
    chose_1024 = {"tuning": {"chosen": {"candidate_generator.sampled_negatives": 1024}}}
    served = served_variant(config, chose_1024)
    assert served == (1024, True)
    cg = config.candidate_generator
    assert mitigation_variants(cg, served) == [(0, False), (0, True), (1024, False), (1024, True)]
    assert mitigation_variants(cg, (0, True)) == [(0, False), (0, True), (4096, False), (4096, True)]


def test_a_logq_strength_of_0_is_no_correction_in_the_mitigation_table():
    """``tuning.logq_strength`` needs ``logq_correction`` on, so a search of the correction on and off
    lists strength 0. Chosen, the version serves no correction, yet its row was marked logQ on, and
    both "logQ on" variants were retrained at strength 0: the table compared the correction off with
    itself. The served pair now reads logQ off, and a logQ-on row has a strength > 0."""
    from configs import load_config
    from evaluation.pipeline import mitigation_variants, served_variant, variant_config

    config = load_config("configs/movielens-recbole.yaml")  # logQ on, strength 1.5, 4096 sampled negatives
    off = {"tuning": {"chosen": {"candidate_generator.logq_strength": 0.0}}}
    assert served_variant(config, off) == (4096, False)  # old code: (4096, True)
    assert served_variant(config, off) in mitigation_variants(config.candidate_generator, served_variant(config, off))
    for sampled, logq in mitigation_variants(config.candidate_generator, served_variant(config, off)):
        cg = variant_config(config, off, sampled, logq).candidate_generator
        assert (cg.sampled_negatives, cg.logq_correction) == (sampled, logq)
        assert not logq or cg.logq_strength == 1.5  # the configured strength, not the chosen 0
    # Otherwise the logQ-on rows keep the strength the version serves, the other knobs its tuned values.
    knobs = {"candidate_generator.logq_strength": 1.0, "serving.ordering.retrieval_weight": 0.3}
    chosen = {"tuning": {"chosen": knobs}}
    variant = variant_config(config, chosen, 0, True)
    assert variant.candidate_generator.logq_strength == 1.0 and variant.serving.ordering.retrieval_weight == 0.3
    assert variant.seed == config.seed and variant.candidate_generator.epochs == config.candidate_generator.epochs
    # Strength 0 configured too: the logQ-on rows use 1, the unbiased correction.
    config.candidate_generator.logq_strength = 0.0
    assert variant_config(config, off, 0, True).candidate_generator.logq_strength == 1.0


# Runs first in the page (injected into a copy): records script errors and failed resources as they
# happen, and after the load event every image that did not decode, into a <pre> that --dump-dom prints.
PROBE = """<script>
var problems = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  problems.push(t && t.tagName ? "failed to load: " + t.tagName + " " + (t.alt || "") : "script error: " + e.message);
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (i) {
    if (!(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)) problems.push("broken image: " + i.alt);
  });
  var pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({images: images.length, problems: problems});
  document.body.appendChild(pre);
});
</script>"""


def render_in_chromium(page: Path, work: Path) -> dict:
    """Load ``page`` in headless Chromium and return ``{"images": n, "problems": [...]}`` as the
    browser saw it (image decoding, script errors). Fails if the probe never reported."""
    work.mkdir(parents=True, exist_ok=True)
    probed = work / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    # --no-sandbox: the tests may run as root (CI containers), where Chromium's sandbox refuses to start
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={work / 'profile'}"]
    command += ["--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run([*command, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page never finished loading in Chromium: {dom.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make services installs it)")
def test_report_renders_in_a_browser_without_broken_images_or_script_errors(stand_in, tmp_path):
    trials = [{"params": {"logq_strength": w}, "metric": 0.05 + w / 20} for w in (0.0, 0.5, 1.0)]
    _, paths = stand_in_report(stand_in, tmp_path / "report", trials)
    seen = render_in_chromium(paths["html"], tmp_path / "browser")
    assert seen == {"images": 5, "problems": []}
    # The check can fail: one image's data cut short and a script that throws are both caught.
    page = paths["html"].read_text()
    start = page.index("base64,") + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(
        page[:start]
        + "iVBORw0KGgo"
        + page[page.index("'", start) :].replace("</body>", "<script>undefinedFunction()</script></body>")
    )
    seen = render_in_chromium(broken, tmp_path / "browser-broken")
    assert seen["images"] == 5
    assert any(p.startswith("broken image: Accuracy") for p in seen["problems"])
    assert any("undefinedFunction" in p for p in seen["problems"])


def test_a_numeric_attribute_with_many_values_is_sliced_by_quartile_not_per_value():
    # A spec's continuous user attribute (a lifetime value) gave one slice per user and a "gap" of
    # 1.0 between two users; text attributes gave one slice per text.
    rng = np.random.default_rng(0)
    n = 200
    train = pd.DataFrame({"user_id": np.repeat(np.arange(n), 5), "item_id": rng.integers(0, 50, n * 5)})
    test = pd.DataFrame({"user_id": np.arange(n), "item_id": rng.integers(0, 50, n)})
    data = offline.Interactions.from_split(train, test)
    value = rng.lognormal(3, 1, n).round(2)
    segment = rng.choice(["new", "vip"], n)
    users = pd.DataFrame(
        {"user_id": np.arange(n), "segment": segment, "lifetime_value": value, "age": np.minimum(value // 20, 5)}
    )
    users.loc[3, "lifetime_value"] = np.nan  # a user without the attribute: its own group
    scores = rng.random((n, len(data.item_ids)))
    result = offline.evaluate_scores("random", scores, data, ks=(10,), user_attributes=users, n_bootstrap=20)
    groups = result.slices.groupby("attribute")["value"].apply(sorted)
    assert groups["segment"] == ["new", "vip"]
    assert len(groups["lifetime_value"]) == 5 and groups["lifetime_value"][:4] == [
        v for v in groups["lifetime_value"] if v.startswith("Q")
    ]
    assert "nan" in groups["lifetime_value"]
    evaluated = int((data.relevant_counts > 0).sum())
    assert result.slices.groupby("attribute")["users"].sum().eq(evaluated).all()
    few = users["age"].nunique()
    assert few <= offline.MAX_VALUE_GROUPS and len(groups["age"]) == few  # few values: one group each


def test_evaluate_spec_slices_by_attributes_not_by_user_text(tmp_path, monkeypatch):
    from configs import load_config
    from evaluation import pipeline
    from workflows import pipeline as workflow_pipeline
    from workflows.spec import spec_from_dict

    pd.DataFrame({"u": [1, 2, 3], "i": [5, 6, 5], "t": [10, 20, 30]}).to_csv(tmp_path / "e.csv", index=False)
    users = {"u": [1, 2, 3], "segment": ["a", "b", "a"], "bio": ["likes tea", "likes jazz", "x"]}
    pd.DataFrame(users).to_csv(tmp_path / "users.csv", index=False)
    spec = spec_from_dict(
        {
            "events": {"path": "e.csv", "user_id": "u", "item_id": "i", "timestamp": "t"},
            "users": {"path": "users.csv", "categorical": ["segment"], "text": ["bio"]},
        },
        root=str(tmp_path),
    )
    seen = {}
    monkeypatch.setattr(workflow_pipeline, "prepare_dataset", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "evaluate_temporal", lambda processed, events, users, *a, **k: seen.update(u=users))
    pipeline.evaluate_spec(spec, load_config(), tmp_path / "out", mitigation=False)
    assert list(seen["u"].columns) == ["user_id", "segment"]


def test_headline_ratio_over_a_peer_at_zero_is_inf_only_when_the_funnel_is_above_zero():
    """0 / 0 read as inf: a funnel and a peer that both score NDCG 0 came out "infx" better."""
    from evaluation.report import headline, headline_sentence

    def result(name, per_user):
        per_user = np.asarray(per_user, dtype=np.float64)
        mean = float(per_user.mean())
        metrics = {"ndcg@10": mean, "ndcg@10_low": mean, "ndcg@10_high": mean}
        return offline.Result(name, metrics, per_user={"ndcg@10": per_user})

    results = [result("Pop", [0, 0, 0, 0]), result("EASE", [0.1, 0, 0.2, 0]), result("funnel", [0, 0, 0, 0])]
    head = headline(results, 10).set_index("peer")
    assert np.isnan(head.loc["Pop", "funnel / peer"]) and head.loc["EASE", "funnel / peer"] == 0.0
    assert "within noise of Pop (ratio n/a," in headline_sentence(head.reset_index(), results[-1], 10)
    results[-1] = result("funnel", [0.1, 0, 0, 0])
    head = headline(results, 10)
    assert head.set_index("peer").loc["Pop", "funnel / peer"] == np.inf
    # The sentence read "within noise of Pop (infx, ...)".
    assert "within noise of Pop (the peer at 0, +0.0250" in headline_sentence(head, results[-1], 10)


def test_markdown_report_prints_n_a_for_a_figure_that_is_not_applicable(tmp_path):
    """tabulate's missingval replaces None only, so the bias table's NaN (not applicable) read "nan"
    in report.md while report.html read "n/a"."""
    from evaluation.report import write_report

    per_user = np.array([0.1, 0.0, 0.2, 0.0])
    metrics = {"ndcg@10": 0.075, "ndcg@10_low": 0.0, "ndcg@10_high": 0.15}
    results = [offline.Result(name, dict(metrics), per_user={"ndcg@10": per_user}) for name in ("Pop", "funnel")]
    results[0].bias = {"item_share_curve": {0.5: 1, 1.0: 2}, "gini": 0.9, "coverage": 0.1, "popularity_lift": 2.0}
    results[1].bias = {**results[0].bias, "preference_parity": None}
    markdown = write_report(results, tmp_path, "t")["markdown"].read_text()
    bias = markdown.split("## Popularity bias")[1].split("##")[0]
    assert "nan" not in bias and bias.count("n/a") == 2 and "0.9000" in bias


def test_results_json_is_standard_json_with_a_figure_the_data_cannot_give(tmp_path):
    """A figure that is not finite (a bias figure NaN, a stage's AUC of one class) was written into
    ``results.json`` as Python's ``NaN``, which jq and JavaScript's ``JSON.parse`` refuse: null now."""
    from evaluation.report import write_report

    def refuse(constant):
        raise ValueError(f"not standard JSON: {constant}")

    per_user = np.array([0.1, 0.0, 0.2, 0.0])
    metrics = {"ndcg@10": 0.075, "ndcg@10_low": 0.0, "ndcg@10_high": 0.15}
    results = [offline.Result(name, dict(metrics), per_user={"ndcg@10": per_user}) for name in ("Pop", "funnel")]
    for r in results:
        r.bias = {"gini": 0.9, "popularity_lift": float("nan")}
    stages = {"heavy_auc": np.float32("nan"), "ms_per_user": np.float64(1.5)}
    path = write_report(results, tmp_path, "t", stages=stages)["json"]
    written = json.loads(path.read_text(), parse_constant=refuse)
    assert written["results"][1]["bias"] == {"gini": 0.9, "popularity_lift": None}
    assert written["stages"] == {"heavy_auc": None, "ms_per_user": 1.5}


def test_peers_score_in_chunks_with_the_same_figures_and_skip_ease_above_its_item_cap(data, monkeypatch):
    """Each peer's scores were one users x items matrix (and the funnel's parity scores another, in
    float64), and EASE's dense items x items solve ran at any catalog size: at 200,000 users and
    50,000 items that is 40-80 GB each, after the funnel had trained. Peers now score per chunk of
    users, and EASE is not run above ``item_affinity.max_items``, with the reason in the notes."""
    from evaluation.pipeline import peer_results

    whole, none_skipped = peer_results(data, (10, 20), n_bootstrap=20)
    assert none_skipped == {} and [r.name for r in whole] == ["Pop", "EASE", "ALS"]
    monkeypatch.setattr(offline, "CHUNK_CELLS", len(data.item_ids) * 7)  # chunks of 7 users
    chunked, _ = peer_results(data, (10, 20), n_bootstrap=20)
    for a, b in zip(whole, chunked):
        assert a.metrics == pytest.approx(b.metrics, rel=1e-6, nan_ok=True), a.name
        assert a.bias["preference_parity"] == pytest.approx(b.bias["preference_parity"]), a.name
    assert whole[1].bias["preference_parity"] is not None  # measured, not skipped
    capped, skipped = peer_results(data, (10,), n_bootstrap=20, ease_max_items=len(data.item_ids) - 1)
    assert [r.name for r in capped] == ["Pop", "ALS"]
    assert skipped == {
        "EASE (every figure)": f"not run: {len(data.item_ids):,} items > item_affinity.max_items "
        f"{len(data.item_ids) - 1:,} (a dense items x items solve, as the funnel's item affinity)"
    }


@pytest.mark.parametrize("fused", [False, True])
def test_offline_replays_read_the_repositorys_own_live_store_not_the_deployments(tmp_path, monkeypatch, fused):
    """A ``$FUNNEL_STORE_URL`` where the evaluation, the tuning step or the checklist ran (the serving
    image, a shell that ingests events) had the replayed funnel open that deployment's store: one of
    its takedowns dropped an item from a user's list, one live click another (seen on a copy of the
    demo export). The tuning step alone guarded against it, by emptying the environment."""
    from serving import fused as fused_module
    from serving import stages as stage_module
    from serving.interface import FUSED
    from workflows.live_store import STORE_ENV

    opened = {}

    def fake(name):
        def build(artifacts, live_store=None, **kwargs):
            opened[name] = live_store
            return type("Stage", (), {"name": name})()

        return build

    repo = tmp_path / "triton_repo"
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "deployment-live.sqlite"))
    if fused:
        (repo / FUSED / "1").mkdir(parents=True)
        monkeypatch.setattr(
            fused_module,
            "FusedFunnel",
            lambda folder, live_store=None: opened.update(fused=live_store) or type("F", (), {"stages": []})(),
        )
    else:
        repo.mkdir()
        names = ["feature_lookup", "query_tower", "ordering"]
        monkeypatch.setattr(stage_module, "STAGES", {name: fake(name) for name in names})
        monkeypatch.setattr(offline, "ensemble_order", lambda repo, ensemble="funnel": names)
    offline.load_funnel(repo, 1)
    own = str(tmp_path / "triton_repo-live.sqlite")
    expected = {"fused": own} if fused else {"feature_lookup": own, "query_tower": None, "ordering": own}
    assert opened == expected


def test_canonical_ids_beyond_2_53_are_kept_exactly(tmp_path):
    """An event whose item the map lacks made the mapped column float64: ids beyond 2**53 (64-bit
    hashes) came back rounded to another id, and three items became one."""
    from evaluation.pipeline import canonical

    big = 2**62
    pd.DataFrame({"item_id": [big + 3], "canonical_item_id": [big + 1]}).to_parquet(tmp_path / "map.parquet")
    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [big + 1, big + 3, big + 5]})
    assert canonical(frame, tmp_path / "map.parquet")["item_id"].tolist() == [big + 1, big + 1, big + 5]


def test_a_slice_value_with_dollar_signs_is_plotted_as_text_not_math(tmp_path, monkeypatch):
    """matplotlib reads text between two "$" as mathtext: a spend band "$0-$50k" was drawn "0-50k"
    in italics, and one whose "$...$" is not valid mathtext stopped the whole report at savefig."""
    from evaluation import report

    values = ["$0-$50k", "$50k+ (top 5% $)"]
    slices = pd.DataFrame({"attribute": ["spend"] * 2, "value": values, "users": [3, 4], "ndcg@10": [0.1, 0.2]})
    metrics = {"ndcg@10": 0.15, "ndcg@10_low": 0.1, "ndcg@10_high": 0.2}
    result = offline.Result("funnel", metrics, slices=slices, per_user={"ndcg@10": np.array([0.1, 0.2])})
    drawn = []
    render = report.figure_png
    monkeypatch.setattr(
        report,
        "figure_png",
        lambda fig: drawn.extend(t.get_text() for ax in fig.axes for t in ax.get_xticklabels()) or render(fig),
    )
    paths = report.write_report([result], tmp_path, "spend bands")
    assert "data:image/png;base64," in paths["html"].read_text()
    labels = [label.split("\n")[0] for label in drawn if "(n=" in label]
    assert labels == [value.replace("$", r"\$") for value in values]  # an escaped "$" is drawn as "$"


def test_evaluate_spec_refuses_a_temporal_split_without_a_test_period(tmp_path, monkeypatch):
    """test_fraction 0: the period after the cutoff is the validation part the tuning step chose on,
    so scoring it would report the tuned figures; refused like an explicit split without test_file."""
    from configs import load_config
    from evaluation import pipeline
    from workflows import pipeline as workflow_pipeline
    from workflows.spec import spec_from_dict

    pd.DataFrame({"u": [1, 2, 3], "i": [5, 6, 5], "t": [10, 20, 30]}).to_csv(tmp_path / "e.csv", index=False)
    spec = spec_from_dict(
        {"events": {"path": "e.csv", "user_id": "u", "item_id": "i", "timestamp": "t"}}, str(tmp_path)
    )
    scored = []
    monkeypatch.setattr(workflow_pipeline, "prepare_dataset", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "evaluate_temporal", lambda *a, **k: scored.append(a))
    config = load_config(None, {"workflow": {"split": {"valid_fraction": 0.2, "test_fraction": 0.0}}})
    with pytest.raises(ValueError, match="test_fraction"):
        pipeline.evaluate_spec(spec, config, tmp_path / "out", mitigation=False)
    assert not scored


def test_a_k_beyond_what_the_funnel_serves_is_refused_before_training(small_config, data, tmp_path, monkeypatch):
    """At K > serving.max_k the served lists stop at max_k while the peers' go on: the funnel's
    recall@K and NDCG@K were silently measured on lists cut short. Refused before anything trains."""
    from evaluation import pipeline

    trained = []
    monkeypatch.setattr(pipeline, "train_and_export", lambda *a, **k: trained.append(a) or pytest.fail("trained"))
    k = small_config.serving.max_k + 1
    with pytest.raises(ValueError, match="serving.max_k"):
        pipeline.evaluate_split(
            None, data.train, data.test, None, small_config, tmp_path, ks=(10, k), mitigation=False,
            n_bootstrap=10, title="t", context={},
        )  # fmt: skip
    assert not trained


def test_a_slice_value_with_a_pipe_or_a_newline_keeps_its_markdown_row_whole(tmp_path):
    """report.md's tables came from tabulate as they were: a slice value (user data) "a|b" added a
    cell to its row, and one with a newline broke the row in two; report.html escaped both."""
    from evaluation import report

    values = ["north|south", "east\nwest"]
    slices = pd.DataFrame({"attribute": ["re|gion"] * 2, "value": values, "users": [3, 4], "ndcg@10": [0.1, 0.2]})
    metrics = {"ndcg@10": 0.15, "ndcg@10_low": 0.1, "ndcg@10_high": 0.2}
    result = offline.Result("funnel | v2", metrics, slices=slices, per_user={"ndcg@10": np.array([0.1, 0.2])})
    markdown = report.write_report([result], tmp_path, "regions")["markdown"].read_text()
    gaps = markdown.split("## Slices")[1].split("\n## ")[0]
    rows = [line for line in gaps.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", row)) for row in rows]  # cells split on the unescaped pipes
    assert len(rows) == 3 and len(set(cells)) == 1, gaps
    assert r"| re\|gion " in rows[2] and r"east<br>west" in rows[2] and r"north\|south" in rows[2]
    accuracy = markdown.split("## Accuracy")[1].split("\n## ")[0]
    assert r"| funnel \| v2 " in accuracy  # a model's name too
    # the writer itself: numbers and "n/a" as before, a backslash of the value's own kept as text
    table = pd.DataFrame({"name": [r"a\|b", "c"], "x": [0.5, np.nan]})
    first, second = report._table_md(table).splitlines()[2:]
    assert first.startswith(r"| a\\\|b ") and first.endswith("|   0.5000 |") and second.endswith("| n/a      |")


def test_a_rerun_into_the_same_out_folder_replays_with_an_empty_live_store(tmp_path, monkeypatch):
    """The export into ``--out``/triton_repo replaces the repository but keeps the live store beside it:
    a second ``scripts/evaluate.py --out`` into the same folder replayed the new export with the
    takedowns and live events written there since the first run, not as a fresh folder would."""
    from deployment import export
    from evaluation import pipeline, tuning
    from workflows.live_store import LiveStore, store_beside

    repo = tmp_path / "triton_repo"

    def fake_export(model, out_repo, replace=False):
        Path(out_repo).mkdir(exist_ok=True)
        return Path(out_repo)

    monkeypatch.setattr(tuning, "train_tuned", lambda processed, config, registry_dir: "model")
    monkeypatch.setattr(export, "export_repository", fake_export)
    pipeline.train_and_export(None, None, tmp_path / "registry", repo)  # the first run
    live = LiveStore(store_beside(repo))  # since then: a takedown and a live click on that repository
    live.set_takedown(7, True, "test", "operator")
    live.append_events([(1, 8, 1.0e9, "click", 1.0)], source="ingest")
    live.close()
    model, again = pipeline.train_and_export(None, None, tmp_path / "registry", repo)  # the rerun
    assert (model, again) == ("model", repo)
    rerun = LiveStore(store_beside(repo))
    assert rerun.taken_down().tolist() == [] and len(rerun.events()) == 0
    rerun.close()
    # The old store is kept aside, not deleted: an --out that is a deployment's folder keeps its takedowns.
    (kept,) = [p for p in tmp_path.glob("triton_repo-live.sqlite.replaced-*") if p.suffix.startswith(".replaced")]
    old = LiveStore(str(kept))
    assert old.taken_down().tolist() == [7] and len(old.events()) == 1
    old.close()


def test_a_wal_left_alone_by_a_crash_is_moved_aside_with_the_store(tmp_path):
    """Only a -wal (the store's main file gone after a crash): it stayed where the rerun's new store
    would meet it."""
    from evaluation.pipeline import clear_live_store
    from workflows.live_store import store_beside

    repo = tmp_path / "triton_repo"
    wal = Path(store_beside(repo) + "-wal")
    wal.write_bytes(b"left over")
    kept = clear_live_store(repo)
    assert kept is not None and not wal.exists() and Path(f"{kept}-wal").read_bytes() == b"left over"
    assert clear_live_store(repo) is None  # nothing left to move


def test_a_scorer_with_a_nan_score_is_refused_naming_it_and_the_user_row(monkeypatch):
    """A NaN score was ranked after the -1 fillers of the user's list and measured as an item."""
    train = pd.DataFrame({"user_id": np.repeat(np.arange(6), 2), "item_id": np.tile([0, 1], 6)})
    train = pd.concat([train, pd.DataFrame({"user_id": [5, 5], "item_id": [2, 3]})])  # columns 0 to 3
    test = pd.DataFrame({"user_id": np.arange(5), "item_id": np.full(5, 3)})
    data = offline.Interactions.from_split(train, test)
    scores = np.random.default_rng(0).random((6, len(data.item_ids)))
    scores[4, 2] = np.nan  # user 4 has not seen item 2
    monkeypatch.setattr(offline, "CHUNK_CELLS", 2 * len(data.item_ids))  # chunks of two users
    with pytest.raises(ValueError, match=r"broken, users from row 4: 1 of .* \(first: row 0, item column 2\)"):
        offline.evaluate_scores("broken", scores, data, ks=(2,), n_bootstrap=5)


def test_the_evaluation_closes_the_stages_it_loads_and_leaves_given_ones_open(monkeypatch):
    """Stages loaded in-process hold the online store's and the live store's connections: what
    ``served_top_k``, the checklist and ``funnel_results`` load themselves they close when done
    (old code: never closed, open until garbage collection); stages a caller passes stay open."""
    from evaluation import checklist, pipeline

    class Stage:
        name = "ordering"
        policy = dataclasses.make_dataclass("P", [("exploration_temperature", float)])(0.0)

        def __init__(self):
            self.closed = 0

        def close(self):
            self.closed += 1

    loaded = []

    def load_funnel(repo, version, **kwargs):
        loaded.append([Stage()])
        return loaded[-1]

    monkeypatch.setattr(offline, "load_funnel", load_funnel)
    monkeypatch.setattr(offline, "run_funnel", lambda stages, user, k: {"item_ids": [1], "scores": np.array([0.5])})
    offline.served_top_k("repo", 1, [1, 2], 10)
    checklist.check_scores_in_unit_range(Path("repo"), 1, [1])
    assert [s.closed for (s,) in loaded] == [1, 1]  # old code: [0, 0]

    class Done(Exception):
        pass

    def stop(*args, **kwargs):
        raise Done

    monkeypatch.setattr(pd, "read_parquet", stop)  # funnel_results' first read: after the stages are loaded
    with pytest.raises(Done):
        pipeline.funnel_results("f", "repo", 1, Path("m"), None, [10])
    assert loaded[-1][0].closed == 1  # closed even when the evaluation fails
    given = [Stage()]
    with pytest.raises(Done):
        pipeline.funnel_results("f", "repo", 1, Path("m"), None, [10], stages=given)
    assert given[0].closed == 0


def test_preference_parity_leaves_out_users_without_a_training_row():
    """A user only the held-out part holds has no training row: EASE scored each of their items 0, and
    each (popular, unpopular) pair counted as a tie (0.5), while the funnel leaves out users it does not
    know. Users 1-4 train; user 9 is new. Item 10 is the popular one (top 20% by training users)."""
    train = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 4], "item_id": [10, 11, 10, 12, 10, 13, 11]})
    test = pd.DataFrame({"user_id": [4, 4, 9, 9], "item_id": [10, 12, 10, 12]})
    data = offline.Interactions.from_split(train, test)
    peer = EASE().fit(data.matrix())
    assert not peer.scores([4]).any()  # the new user: every item 0
    result = offline.evaluate_scorer("EASE", peer.scores, data, ks=(2,), n_bootstrap=5)
    assert result.bias["preference_parity_users"] == 1  # user 4 only (old code: 2, user 9's tie with it)
    liked = peer.scores([3])[0, data.cols([10, 12])]
    assert result.bias["preference_parity"] == (1.0 if liked[0] > liked[1] else 0.0 if liked[0] < liked[1] else 0.5)
    assert data.in_training.tolist() == [True, True, True, True, False]


def test_mitigation_variants_read_the_served_funnels_live_store_at_the_training_end(tmp_path, monkeypatch):
    """``_with_retrieval_of`` built a variant's feature lookup with no store: it read
    ``$FUNNEL_STORE_URL`` where set (else the variant repository's own store), not the store
    ``load_funnel`` gave the served funnel, and its clock stayed the wall clock."""
    from evaluation.pipeline import _with_retrieval_of
    from serving import stages as stage_module
    from workflows.live_store import STORE_ENV

    opened = {}

    def fake(name):
        def build(artifacts, live_store=None, **kwargs):
            opened[name] = live_store
            return type("Stage", (), {"name": name, "activity_since": 100.0, "clock": None})()

        return build

    names = ["feature_lookup", "query_tower", "retrieval", "ordering"]
    monkeypatch.setattr(stage_module, "STAGES", {name: fake(name) for name in names})
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "deployment-live.sqlite"))
    served = [type("Stage", (), {"name": name})() for name in names]
    chosen = str(tmp_path / "triton_repo-live.sqlite")
    variant = _with_retrieval_of(served, tmp_path / "variant_repo", 2, chosen)
    assert opened == {"feature_lookup": chosen, "query_tower": None, "retrieval": None}  # old: no store given
    assert variant[-1] is served[-1]  # the ordering is shared
    assert variant[0].clock() == 100.0


def test_a_user_without_a_training_row_gets_the_popularity_list_from_ease_and_als_as_from_pop():
    """Hand-built temporal split: users 1 and 2 warm, user 9 cold (test only), item 99 a cold-item
    positive of user 1. Columns 10..14. EASE and ALS have nothing to rank for user 9 (every score 0, or
    an untrained factor), so the tie rule gave them the lowest columns [10, 11] and the hit on 11 at
    place 2 counted by chance; they now serve Pop's list, as the funnel's fallback does. User 1's cold
    item 99 stays in every denominator; user 3, with no held-out item, is left out of every figure and
    every slice."""
    from evaluation.pipeline import peer_results

    train = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 3], "item_id": [10, 11, 11, 12, 12, 13, 14]})
    test = pd.DataFrame({"user_id": [1, 1, 2, 9], "item_id": [12, 99, 13, 11]})
    data = offline.Interactions.from_split(train, test)
    assert data.relevant_counts.tolist() == [2, 1, 0, 1] and data.in_training.tolist() == [True, True, True, False]
    attrs = pd.DataFrame({"user_id": [1, 2, 3, 9], "group": ["a", "a", "b", "b"]})
    results, _ = peer_results(data, (2,), user_attributes=attrs, n_bootstrap=5)
    by = {r.name: r for r in results}
    d = 1 / np.log2(3)  # the discount of place 2
    # Pop's list (counts 11: 2, 12: 2, 10/13/14: 1): user 1 [12, 13], user 2 [10, 13], user 9 [11, 12].
    pop = [1 / (1 + d), d / 1, 1.0]  # user 1: hit at 1 of 2 relevant (99 unreachable); user 2: hit at 2
    np.testing.assert_allclose(by["Pop"].per_user["ndcg@2"], pop)
    np.testing.assert_allclose(by["Pop"].per_user["recall@2"], [0.5, 1.0, 1.0])
    for name in ("EASE", "ALS"):  # user 9: Pop's [11, 12], the hit at place 1
        np.testing.assert_allclose(by[name].per_user["recall@2"][2], 1.0)
        np.testing.assert_allclose(by[name].per_user["ndcg@2"][2], 1.0)  # old code: 0.6309 (list [10, 11])
    # EASE: user 1 ranks 12 first (after 11, which it has), user 2 finds 13 second.
    np.testing.assert_allclose(by["EASE"].per_user["ndcg@2"], [1 / (1 + d), d, 1.0])
    assert by["EASE"].metrics["ndcg@2"] == pytest.approx((1 / (1 + d) + d + 1) / 3)
    for r in results:  # the same three users in the headline and the slices
        assert len(r.per_user["ndcg@2"]) == 3
        assert r.slices.set_index("value")["users"].to_dict() == {"a": 2, "b": 1}
        assert r.slices.set_index("value")["ndcg@2"]["b"] == pytest.approx(r.per_user["ndcg@2"][2])


def test_the_report_setup_counts_new_users_and_held_out_items_no_model_was_trained_on():
    """The report said how many users were evaluated, not how many of them no model had seen (the
    funnel's fallback, the peers' popularity list) nor how many held-out positives no list can hold."""
    train = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 3], "item_id": [10, 11, 11, 12, 12, 13, 14]})
    test = pd.DataFrame({"user_id": [1, 1, 2, 9, 3], "item_id": [12, 99, 13, 11, 12]})  # user 3: seen again
    data = offline.Interactions.from_split(train, test)
    assert data.setup_counts() == {  # old code: no setup_counts (only "users evaluated", in the pipeline)
        "users evaluated": 3,
        "users evaluated without a training row": 1,
        "held-out positives": 4,
        "held-out positives of items the training part never saw": 1,
    }


def test_a_figure_not_applicable_in_every_row_reads_n_a_in_the_html_as_in_the_markdown(tmp_path):
    """A column of the ordering or mitigation table whose figure is not applicable in every row (the
    popularity lift when no evaluated user has a training row: ``_trade_off`` gives None) is a column
    of None, which ``DataFrame.to_html`` printed "None" (its na_rep covers NaN only); report.md read "n/a"."""
    from evaluation.pipeline import _trade_off
    from evaluation.report import write_report

    per_user = np.array([0.1, 0.0, 0.2, 0.0])
    metrics = {"ndcg@10": 0.075, "ndcg@10_low": 0.0, "ndcg@10_high": 0.15, "recall@10": 0.5}
    results = [offline.Result(name, dict(metrics), per_user={"ndcg@10": per_user}) for name in ("Pop", "funnel")]
    for r in results:
        r.bias = {"item_share_curve": {0.5: 1, 1.0: 2}, "gini": 0.9, "coverage": 0.1, "popularity_lift": None}
    ordering = pd.DataFrame([{"ordering": r.name, **_trade_off(r, (10,)), "note": None} for r in results])
    paths = write_report(results, tmp_path, "t", extra_tables={"Ordering policy": ordering})
    page, markdown = paths["html"].read_text(), paths["markdown"].read_text()
    table = page.split("<h2>Ordering policy</h2>")[1].split("</table>")[0]
    assert "None" not in table and table.count("<td>n/a</td>") == 4 and "<td>0.9000</td>" in table
    assert "<td>None</td>" not in page
    assert markdown.split("## Ordering policy")[1].split("\n## ")[0].count("n/a") == 4


def test_the_trade_off_tables_and_the_bias_section_name_the_k_of_every_top_k_figure(tmp_path):
    """The mitigation and ordering tables labelled NDCG and recall with their K (``ndcg@10``) but the
    bias figures beside them ("gini", "coverage", "popularity lift", "items for 50% of recs") with none,
    while ``offline.evaluate_top_k`` measures those over the top ``max(ks)``: with ks (10, 20) a row
    read as the top 10's figures were the top 20's. The "Popularity bias" section said no K either.
    Now every label names its K, from the run's ks."""
    from evaluation.pipeline import _trade_off
    from evaluation.report import write_report

    per_user = np.array([0.1, 0.0, 0.2, 0.0])
    metrics = {f"{m}@{k}{end}": 0.1 for m in ("ndcg", "recall") for k in (5, 30) for end in ("", "_low", "_high")}
    results = [
        offline.Result(name, dict(metrics), per_user={"ndcg@5": per_user, "ndcg@30": per_user})
        for name in ("Pop", "funnel")
    ]
    for r in results:
        r.bias = {"item_share_curve": {0.5: 1, 1.0: 2}, "gini": 0.9, "coverage": 0.1, "popularity_lift": 1.5}
    bias = write_report(results, tmp_path / "plain", "t", ks=(5, 30))["markdown"].read_text()
    assert "Over each model's top-30 lists" in bias.split("## Popularity bias")[1].split("\n## ")[0]
    row = _trade_off(results[1], (5, 30))
    assert list(row) == [
        "ndcg@5",
        "recall@5",
        "items for 50% of top-30 recs",
        "gini@30",
        "coverage@30",
        "popularity lift@30",
    ]
    table = pd.DataFrame([{"ordering": r.name, **_trade_off(r, (5, 30))} for r in results])
    markdown = write_report(results, tmp_path, "t", ks=(5, 30), extra_tables={"Ordering policy": table})[
        "markdown"
    ].read_text()
    header = markdown.split("## Ordering policy")[1].strip().splitlines()[0]
    assert "gini@30" in header and "popularity lift@30" in header and "recall@5" in header
    assert "Over each model's top-30 lists" in markdown.split("## Popularity bias")[1].split("\n## ")[0]
