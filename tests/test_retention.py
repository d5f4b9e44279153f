"""Objective weights from retention: the rule, the analysis on logs whose truth is planted, and the
reweighted model version served in-process."""

import dataclasses
import filecmp
import json
import shutil
import uuid

import numpy as np
import pandas as pd
import pytest

from online.retention import (
    SIGNALS,
    analyze_retention,
    derive_head_weights,
    logistic_regression,
    per_user_signals,
)

HAND = {"click": 0.4, "duration_watch": 0.4, "like": 0.2}


def coefs(**rows):
    """``signal=(coef, ci_low, ci_high)`` -> the table ``derive_head_weights`` reads."""
    return pd.DataFrame([{"signal": s, "coef": c, "ci_low": lo, "ci_high": hi} for s, (c, lo, hi) in rows.items()])


# ---------------------------------------------------------------------------------------------- the rule


def test_weights_are_proportional_to_the_significantly_positive_coefficients():
    d = derive_head_weights(coefs(click=(0.6, 0.2, 1.0), duration_watch=(0.3, 0.05, 0.55), like=(0.2, -0.1, 0.5)), HAND)
    assert d.changed
    assert d.weights == {"click": 0.667, "duration_watch": 0.333, "like": 0.0}
    assert d.evidence["like"]["why"] == "interval includes 0" and not d.evidence["like"]["used"]


def test_negative_and_unmeasured_heads_get_nothing():
    d = derive_head_weights(coefs(click=(-0.5, -0.9, -0.1), duration_watch=(0.4, 0.1, 0.7)), {**HAND, "watched": 0.1})
    assert d.weights == {"click": 0.0, "duration_watch": 1.0, "like": 0.0, "watched": 0.0}
    assert d.evidence["click"]["why"] == "negative"
    assert d.evidence["like"]["why"] == d.evidence["watched"]["why"] == "no measured signal of this name"


def test_no_significant_signal_keeps_the_current_weights_and_says_so():
    d = derive_head_weights(coefs(click=(0.1, -0.2, 0.4), duration_watch=(-0.3, -0.6, -0.01), like=(0, -1, 1)), HAND)
    assert not d.changed and d.weights == HAND
    assert "current weights are kept" in d.reason
    empty = derive_head_weights(coefs(), HAND)
    assert not empty.changed and empty.weights == HAND
    with pytest.raises(ValueError, match="at least one head"):
        derive_head_weights(coefs(click=(1, 0.5, 1.5)), {})


def test_weights_equal_to_the_current_ones_are_not_a_change():
    d = derive_head_weights(coefs(click=(0.4, 0.1, 0.7), duration_watch=(0.4, 0.1, 0.7), like=(0.2, 0.1, 0.3)), HAND)
    assert d.weights == HAND and not d.changed
    # The heavy ranker normalises its weights: 2 : 0 : 0 is the derived 1 : 0 : 0, no A/B test needed.
    only_click = coefs(click=(0.8, 0.5, 1.1), duration_watch=(0.1, -0.2, 0.4), like=(0.1, -0.2, 0.4))
    same = derive_head_weights(only_click, {"click": 2.0, "duration_watch": 0.0, "like": 0.0})
    assert same.weights == {"click": 1.0, "duration_watch": 0.0, "like": 0.0} and not same.changed
    # Equal thirds: rounded alike on both sides (the largest absorbs the rounding), so 1 : 1 : 1 is no change.
    thirds = coefs(click=(0.3, 0.1, 0.5), duration_watch=(0.3, 0.1, 0.5), like=(0.3, 0.1, 0.5))
    equal = derive_head_weights(thirds, {"click": 1.0, "duration_watch": 1.0, "like": 1.0})
    assert equal.weights == {"click": 0.334, "duration_watch": 0.333, "like": 0.333} and not equal.changed


# ------------------------------------------------------------------------------------------ the statistics


def test_logistic_regression_recovers_known_coefficients_with_honest_intervals():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-(0.5 + 1.0 * X[:, 0])))
    fit = logistic_regression(X, y, ["a", "b"])
    table = fit.table().set_index("signal")
    assert fit.converged and fit.n == 4000
    assert table.loc["a", "coef"] == pytest.approx(1.0, abs=0.15) and table.loc["a", "ci_low"] > 0.8
    assert table.loc["intercept", "coef"] == pytest.approx(0.5, abs=0.15)
    assert abs(table.loc["b", "coef"]) < 0.15
    # The 95% intervals hold their coverage over repeated samples (Wald, inverse Fisher information).
    covered = {"a": 0, "b": 0}
    for seed in range(100):
        rng = np.random.default_rng(seed + 1)
        X = rng.normal(size=(1000, 2))
        y = rng.random(1000) < 1 / (1 + np.exp(-(0.5 + 1.0 * X[:, 0])))
        t = logistic_regression(X, y, ["a", "b"]).table().set_index("signal")
        covered["a"] += t.loc["a", "ci_low"] < 1.0 < t.loc["a", "ci_high"]
        covered["b"] += t.loc["b", "ci_low"] < 0.0 < t.loc["b", "ci_high"]
    assert 88 <= covered["a"] <= 99 and 88 <= covered["b"] <= 99, covered


def test_a_signal_that_is_a_multiple_of_another_gets_no_coefficient_and_no_weight():
    """Like rate exactly 0.3 x click rate for every user: the data cannot tell the two apart. The
    minimum-norm fit split click's effect in half between them, with small finite standard errors from
    the pseudo-inverse, so both looked significant and the rule gave like half the weight."""
    rng = np.random.default_rng(0)
    n = 400
    click, dw = rng.gamma(2, 0.1, n), rng.gamma(2, 0.05, n)
    returned = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 8 * click)))
    users = pd.DataFrame({"click": click, "duration_watch": dw, "like": 0.3 * click, "returned": returned})
    users["watch_seconds"], users["share"] = rng.gamma(2, 10, n), rng.gamma(1, 0.01, n)
    analysis = analyze_retention(users)
    heads = analysis.heads.set_index("signal")
    assert np.isnan(heads.loc["like", "coef"]) and np.isnan(heads.loc["like", "ci_low"])
    assert any("like" in note and "linear combination" in note for note in analysis.notes)
    # click keeps the coefficient of the fit without like.
    X = users[["click", "duration_watch"]].to_numpy()
    alone = logistic_regression((X - X.mean(axis=0)) / X.std(axis=0), returned, ["click", "duration_watch"])
    assert heads.loc["click", "coef"] == pytest.approx(alone.coef[1], rel=1e-6)
    d = derive_head_weights(analysis.heads, HAND)
    assert d.weights == {"click": 1.0, "duration_watch": 0.0, "like": 0.0}, d
    assert d.evidence["like"]["why"] == "no interval"


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the run-off fit's odds ratio overflowed exp with a warning
def test_a_signal_just_short_of_a_multiple_of_another_is_not_split_with_significant_intervals():
    """Like rate 0.3 x click rate plus noise of 3e-8 of its spread: just above the aliasing check's
    tolerance, so like was kept, but the fit solved the normal equations A'WA (A's condition number
    squared) with lstsq, whose cutoff dropped the one direction that tells the two apart: the
    minimum-norm split again, click and like each +0.297 [+0.226, +0.368], and the rule gave like half
    the weight. Solved on sqrt(W) A, the fit finds no finite optimum that tells the two apart (the
    coefficients run off in opposite directions), says so, and the rule keeps the current weights."""
    rng = np.random.default_rng(3)
    n = 1000
    click, dw = rng.beta(3, 8, n), rng.beta(2, 20, n)
    returned = rng.random(n) < 1 / (1 + np.exp(-(0.3 + 0.6 * (click - click.mean()) / click.std())))
    like = 0.3 * click + 3e-8 * 0.3 * click.std() * rng.normal(size=n)
    users = pd.DataFrame({"click": click, "duration_watch": dw, "like": like, "returned": returned})
    users["watch_seconds"], users["share"] = rng.gamma(2, 10, n), rng.gamma(1, 0.01, n)
    analysis = analyze_retention(users)
    heads = analysis.heads.set_index("signal")
    assert not heads.loc["like", "ci_low"] > 0, heads
    assert any("did not converge" in note and "collinear" in note for note in analysis.notes)
    d = derive_head_weights(analysis.heads, HAND)
    assert not d.evidence["like"]["used"] and not d.changed and d.weights == HAND, d


def test_the_report_is_standard_json_with_null_for_what_the_data_cannot_give(tmp_path):
    """The aliased signal's coefficient is NaN, and ``retention.json`` held it as Python's bare NaN,
    which is not JSON: jq, JavaScript's JSON.parse and strict readers refuse the whole file."""
    from online.retention import write_retention_report

    rng = np.random.default_rng(0)
    n = 400
    click = rng.gamma(2, 0.1, n)
    users = pd.DataFrame({"click": click, "duration_watch": rng.gamma(2, 0.05, n), "like": 0.3 * click})
    users["returned"] = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 8 * click)))
    users["watch_seconds"], users["share"] = rng.gamma(2, 10, n), np.zeros(n)  # share: constant, r is NaN
    analysis = analyze_retention(users)
    decision = derive_head_weights(analysis.heads, HAND)
    result = {"analysis": analysis.to_dict(), "derived": dataclasses.asdict(decision), "weights": np.float32(0.5)}
    path = write_retention_report(result, tmp_path, analysis)["json"]
    text = path.read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in retention.json"))
    heads = {row["signal"]: row for row in strict["analysis"]["logit_head_signals"]}
    assert heads["like"]["coef"] is None and heads["click"]["coef"] > 0
    share = {row["signal"]: row for row in strict["analysis"]["correlations"]}["share"]
    assert share["r"] is None and strict["weights"] == 0.5 and strict["derived"]["weights"]["click"] == 1.0


def test_separated_data_keeps_the_current_weights():
    """Every user who liked came back (quasi-complete separation): the like coefficient has no finite
    estimate and its Wald interval ran to +-1e5, "includes 0", so the rule gave click all the weight
    and like, the signal that predicts returning perfectly, nothing."""
    rng = np.random.default_rng(2)
    n = 300
    click, dw = rng.gamma(2, 0.1, n), rng.gamma(2, 0.05, n)
    like = np.where(rng.random(n) < 0.1, rng.gamma(2, 0.02, n), 0.0)
    returned = (rng.random(n) < 1 / (1 + np.exp(-0.5 * (click - click.mean()) / click.std()))) | (like > 0)
    users = pd.DataFrame({"click": click, "duration_watch": dw, "like": like, "returned": returned})
    users["watch_seconds"], users["share"] = rng.gamma(2, 10, n), rng.gamma(1, 0.01, n)
    analysis = analyze_retention(users)
    assert any("did not converge" in note for note in analysis.notes)
    assert analysis.heads["ci_low"].isna().all()
    d = derive_head_weights(analysis.heads, HAND)
    assert not d.changed and d.weights == HAND, d


def planted_log(n_users=1500, per_user=20, seed=3):
    """A feedback log whose users differ independently in how often they click, how much of what they
    click they watch, and how often they like; only the watching decides whether they come back."""
    rng = np.random.default_rng(seed)
    durations = pd.Series(rng.choice([30.0, 120.0, 600.0, 2400.0], size=50), index=np.arange(1, 51))
    click_p = rng.uniform(0.1, 0.6, n_users)
    watch_mu = rng.uniform(-2.0, 2.0, n_users)  # the user's typical watch fraction, on the logit scale
    like_p = rng.uniform(0.0, 0.4, n_users)
    imp, fb = [], []
    for u in range(n_users):
        for r in range(per_user // 10):
            rid = uuid.UUID(int=int(rng.integers(2**63)) * 1000 + u * 10 + r).hex
            items = rng.choice(durations.index, 10, replace=False)
            imp += [(rid, u, int(i), p) for p, i in enumerate(items)]
            for i in items[rng.random(10) < click_p[u]]:
                frac = 1 / (1 + np.exp(-(watch_mu[u] + 0.5 * rng.normal())))
                fb += [(rid, u, int(i), "click", 1.0), (rid, u, int(i), "watch_seconds", round(frac * durations[i]))]
                if rng.random() < like_p[u]:
                    fb.append((rid, u, int(i), "like", 1.0))
        if rng.random() > 1 / (1 + np.exp(-(0.3 + 1.2 * watch_mu[u]))):
            fb.append((rid, u, -1, "churn", 1.0))
    impressions = pd.DataFrame(imp, columns=["request_id", "user_id", "item_id", "position"])
    feedback = pd.DataFrame(fb, columns=["request_id", "user_id", "item_id", "event", "value"])
    return impressions, feedback, durations


def test_a_log_where_watching_alone_keeps_users_gives_the_watch_head_the_weight():
    impressions, feedback, durations = planted_log()
    users = per_user_signals(impressions, feedback, durations)
    assert len(users) == 1500 and set(SIGNALS) <= set(users.columns)
    assert (users["impressions"] == 20).all()
    # The duration-aware watch is a subset of clicks, about half of them (the median rule).
    assert (users["duration_watch"] <= users["click"]).all()
    assert users["duration_watch"].sum() / users["click"].sum() == pytest.approx(0.5, abs=0.05)
    analysis = analyze_retention(users, ["click", "duration_watch", "like"])
    heads = analysis.heads.set_index("signal")
    assert heads.loc["duration_watch", "ci_low"] > 0
    assert heads.loc["like", "ci_low"] < 0 < heads.loc["like", "ci_high"]
    corr = analysis.correlations.set_index("signal")
    assert corr.loc["duration_watch", "ci_low"] > 0 and corr.loc["like", "ci_low"] < 0 < corr.loc["like", "ci_high"]
    d = derive_head_weights(analysis.heads, HAND)
    assert d.changed and d.weights["duration_watch"] == 1.0 and d.weights["like"] == 0.0, d


def test_a_log_where_nothing_matters_keeps_the_hand_weights():
    impressions, feedback, durations = planted_log(n_users=600)
    rng = np.random.default_rng(11)
    feedback = feedback[feedback["event"] != "churn"]
    # Churn at random, independent of every signal.
    churned = pd.DataFrame({"user_id": np.flatnonzero(rng.random(600) < 0.4)})
    last = impressions.drop_duplicates("user_id", keep="last").set_index("user_id")["request_id"]
    churn = churned.assign(request_id=last.reindex(churned["user_id"]).to_numpy(), item_id=-1, event="churn", value=1.0)
    users = per_user_signals(impressions, pd.concat([feedback, churn]), durations)
    d = derive_head_weights(analyze_retention(users).heads, HAND)
    assert not d.changed and d.weights == HAND


def test_unanalysable_logs_are_refused_with_the_reason():
    impressions, feedback, durations = planted_log(n_users=50)
    with pytest.raises(ValueError, match="every one of the 50 users returned"):
        analyze_retention(per_user_signals(impressions, feedback[feedback["event"] != "churn"], durations))
    with pytest.raises(ValueError, match="no duration for served item"):
        per_user_signals(impressions, feedback, durations.iloc[:10])


# ------------------------------------------------------------------- the reweighted version, served in-process


def test_a_reweighted_version_serves_the_same_models_with_the_derived_weights(model_version, small_data, tmp_path):
    from deployment.export import export_repository
    from evaluation.offline import load_funnel, run_funnel
    from models.item_affinity import META_FILE as AFFINITY_META
    from models.item_index import INDEX_META_FILE
    from models.registry import check_artifact_versions
    from online.retention import with_head_weights

    registry = tmp_path / "registry"
    shutil.copytree(model_version.path, registry / "1")  # the shared fixture is read-only
    from models.registry import ModelVersion

    v1 = ModelVersion(registry / "1")
    heads = list(v1.manifest["heavy_ranker"]["weights"])
    with pytest.raises(ValueError, match="no head"):
        with_head_weights(v1, registry, {"share": 1.0})
    # All weight on the last head: unlike version 1's weights, whatever the default is.
    v2 = with_head_weights(v1, registry, {heads[-1]: 1.0}, "test")
    assert v2.version == 2 and check_artifact_versions(v2) == 2
    manifest = v2.manifest
    assert manifest["heavy_ranker"]["weights"] == {h: (1.0 if h == heads[-1] else 0.0) for h in heads}
    assert manifest["heavy_ranker"]["weights"] != v1.manifest["heavy_ranker"]["weights"]
    assert manifest["reweighted_from"]["version"] == 1
    assert [t["weight"] for t in manifest["config"]["heavy_ranker"]["targets"]] == [0.0] * (len(heads) - 1) + [1.0]
    # The same trained models: every file but the manifest and the version stamps is version 1's, byte for byte.
    stamps = {"manifest.json", "query_tower.json", INDEX_META_FILE, AFFINITY_META}
    files = sorted(p.relative_to(v1.path) for p in v1.path.rglob("*") if p.is_file() and p.name not in stamps)
    assert any(f.parts[0] == "heavy_ranker" for f in files), files[:10]
    assert sorted(p.relative_to(v2.path) for p in v2.path.rglob("*") if p.is_file() and p.name not in stamps) == files
    different = [f for f in files if not filecmp.cmp(v1.path / f, v2.path / f, shallow=False)]
    assert not different, different
    repo = export_repository(v2, tmp_path / "repo")
    stages = load_funnel(repo, 2)
    heavy = next(s for s in stages if s.name == "heavy_ranker")
    assert heavy.weights == manifest["heavy_ranker"]["weights"]
    user = int(small_data.users["user_id"].iloc[0])
    out = run_funnel(stages, user, 5)
    assert out["model_version"][0].decode() == "2" and len(out["item_ids"]) == 5
    assert json.loads((repo / "export.json").read_text())["version"] == 2


def test_a_heavy_ranker_without_a_measured_head_gets_no_head_regression():
    """``run_retention_weights`` passes the heads that are signals; a heavy ranker whose heads are none
    of them (e.g. only ``watched``) passed ``[]``, which read as "not given": the report's head-signal
    regression was fitted over click, duration_watch and like, heads the ranker does not have."""
    rng = np.random.default_rng(0)
    n = 300
    click = rng.gamma(2, 0.1, n)
    users = pd.DataFrame({s: rng.gamma(2, 0.05, n) for s in SIGNALS}).assign(click=click)
    users["returned"] = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 8 * click)))
    analysis = analyze_retention(users, [])
    assert analysis.head_signals == [] and analysis.heads.empty, analysis.heads
    assert len(analysis.all_signals) == len(SIGNALS)
    d = derive_head_weights(analysis.heads, {"watched": 1.0})
    assert not d.changed and d.weights == {"watched": 1.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_head_weights_publish_no_version(tmp_path, bad):
    """NaN passed ``w < 0`` and ``sum > 0`` (inf normalised to inf / inf = NaN): a version whose heavy
    ranker scores every candidate NaN was published. The config refuses such weights; so does this."""
    from models.registry import ModelVersion, list_versions
    from online.retention import with_head_weights

    registry = tmp_path / "registry"
    (registry / "1").mkdir(parents=True)
    heavy = {"targets": ["click", "like"], "weights": {"click": 0.5, "like": 0.5}}
    manifest = {"version": 1, "heavy_ranker": heavy, "config": {"heavy_ranker": {"targets": []}}}
    (registry / "1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="finite"):
        with_head_weights(ModelVersion(registry / "1"), registry, {"click": bad, "like": 1.0})
    assert list_versions(registry) == [1]


def test_a_separated_non_head_signal_does_not_say_the_rule_keeps_the_weights():
    """Every user who shared came back: the all-signals regression does not converge, but the rule reads
    the head-signal one (no share head), which does, and derives new weights. The note on the
    all-signals fit said "so the rule keeps the current weights", contradicting the decision."""
    rng = np.random.default_rng(2)
    n = 300
    click = rng.gamma(2, 0.1, n)
    share = np.where(rng.random(n) < 0.1, rng.gamma(2, 0.02, n), 0.0)
    returned = (rng.random(n) < 1 / (1 + np.exp(-(click - click.mean()) / click.std()))) | (share > 0)
    users = pd.DataFrame({s: rng.gamma(2, 0.05, n) for s in SIGNALS}).assign(click=click, share=share)
    users["returned"] = returned
    analysis = analyze_retention(users)
    d = derive_head_weights(analysis.heads, HAND)
    assert d.changed and d.weights == {"click": 1.0, "duration_watch": 0.0, "like": 0.0}, d
    (note,) = [n for n in analysis.notes if "did not converge" in n]
    assert "share" in note and "keeps the current weights" not in note, note


def test_a_signal_with_the_same_rate_for_every_user_is_not_measured():
    """Every user liked 1 of their 10 impressions: the like rate is 0.1 for all of them, but the mean of
    300 floats 0.1 is not exactly 0.1, so ``std == 0`` missed it. The correlation read r = 0.000 with an
    interval of [-0.113, +0.113] and p = 1 (a measurement of no link, where there is no information at
    all), and the regression called the signal a linear combination of the others."""
    rng = np.random.default_rng(1)
    n = 300
    users = pd.DataFrame({s: rng.random(n) for s in SIGNALS}).assign(like=0.1)
    users["returned"] = rng.random(n) < 1 / (1 + np.exp(-(4 * users["click"] - 2)))
    analysis = analyze_retention(users)
    like = analysis.correlations.set_index("signal").loc["like"]
    assert np.isnan(like["r"]) and np.isnan(like["ci_low"]) and np.isnan(like["p_value"]), like
    assert "like" not in set(analysis.heads["signal"]) and "like" not in set(analysis.all_signals["signal"])
    assert any(note.startswith("like: the same rate for every user") for note in analysis.notes), analysis.notes
    assert not any("linear combination" in note for note in analysis.notes), analysis.notes


def test_the_in_process_simulation_with_exploration_repeats(monkeypatch, tmp_path):
    """The loaded ordering stage explores from fresh entropy (served requests get a fresh draw each):
    with ``serving.ordering.exploration_temperature`` > 0 the retention run's simulated log, and so
    the analysis and derived weights, differed between two runs with the same seeds. The stages now
    explore from ``online.simulation.seed``, as the feedback loop's do."""
    import evaluation.offline
    from configs import SimulationConfig, load_config
    from online.feedback_log import FeedbackLog
    from online.retention import simulate_in_process
    from workflows.sources.synthetic import generate

    class Exploring:  # an ordering stage as load_funnel gives it: unseeded unless with_policy seeds a copy
        name, policy = "ordering", None

        def __init__(self, seed=None):
            self.rng = np.random.default_rng(seed)

        def with_policy(self, policy, seed=None):
            return Exploring(seed)

    def run_funnel(stages, user, k):
        items = stages[0].rng.choice(np.arange(1, 41), k, replace=False)
        return {"item_ids": items, "model_version": np.array([b"1"]), "served_by": np.array([b"funnel"])}

    seeds = []

    def load_funnel(repo, version, seed=0):  # seeds an exploring ordering, as the real one does
        seeds.append(seed)
        return [Exploring().with_policy(None, seed)]

    monkeypatch.setattr(evaluation.offline, "load_funnel", load_funnel)
    monkeypatch.setattr(evaluation.offline, "run_funnel", run_funnel)
    config = load_config(overrides={"synthetic": {"num_users": 30, "num_items": 40, "events_per_user": 5, "seed": 3}})
    world = generate(config.synthetic)
    slates = []
    for run in ("a", "b"):
        simulate_in_process(
            world, config, tmp_path, 1, tmp_path / f"{run}.sqlite", simulation=SimulationConfig(days=2, seed=7)
        )
        log = FeedbackLog(tmp_path / f"{run}.sqlite")
        slates.append(log.impressions().sort_values(["user_id", "ts", "position"])[["user_id", "item_id"]])
        log.close()
    assert slates[0]["item_id"].tolist() == slates[1]["item_id"].tolist()
    assert seeds == [7, 7]  # the simulation's seed, not load_funnel's default (0)


@pytest.mark.parametrize("column", ["like", "returned"])
def test_a_missing_value_is_refused_not_read_as_a_constant_signal(column):
    """A NaN like rate made np.ptp NaN, so like was left out as "the same rate for every user" and its
    correlation was NaN; a NaN outcome was "returned" for the correlations and broke the regression
    (LinAlgError)."""
    rng = np.random.default_rng(0)
    n = 200
    users = pd.DataFrame({s: rng.gamma(2, 0.1, n) for s in SIGNALS})
    users["returned"] = (rng.random(n) < 0.5).astype(object)
    users.loc[7, column] = np.nan
    with pytest.raises(ValueError, match=rf"\['{column}'\]: missing or non-finite"):
        analyze_retention(users)


@pytest.mark.parametrize("current", [{"click": 0.0, "like": 0.0}, {"click": -1.0, "like": 1.0}, {"click": np.nan}])
def test_current_weights_that_no_heavy_ranker_accepts_are_refused(current):
    """All-zero current weights divided by zero when compared with the derived ones (ZeroDivisionError),
    negative ones too; a NaN current weight read as a change. The config refuses all three."""
    significant = coefs(click=(0.5, 0.1, 0.9))
    with pytest.raises(ValueError, match="finite, >= 0 and not all 0"):
        derive_head_weights(significant, current)
    with pytest.raises(ValueError, match="finite, >= 0 and not all 0"):
        derive_head_weights(coefs(), current)  # nothing qualifies: not "kept" as weights that do not sum to 1


def test_the_notes_on_constant_signals_are_in_the_signals_order_in_every_process():
    """They came from a set, whose order of strings changes with PYTHONHASHSEED: two runs of the same
    log wrote retention.json with its notes in different orders."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import numpy as np, pandas as pd\n"
        "from online.retention import analyze_retention, SIGNALS\n"
        "rng = np.random.default_rng(0)\n"
        "u = pd.DataFrame({s: rng.gamma(2, 0.1, 100) for s in SIGNALS})\n"
        "u['returned'] = rng.random(100) < 0.5\n"
        "u[['like', 'share', 'watch_seconds']] = 0.0\n"
        "print([n.split(':')[0] for n in analyze_retention(u).notes][:3])\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    for seed in ("3",):  # an order other than the signals' on the old code
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(["watch_seconds", "like", "share"]), (seed, out.stdout)


def test_a_log_of_several_arms_is_analysed_one_arm_at_a_time():
    """An A/B test's log (or the feedback loop's, live and holdout) holds users served by different
    rankers; the analysis pooled them in one regression, so the arms' difference (here: every user of
    the treatment arm churns) was read as the signals' relation to coming back. A log of
    several arms is now refused unless one is named, and naming one analyses exactly that arm."""
    imp_c, fb_c, durations = planted_log(n_users=400)
    imp_t, fb_t, _ = planted_log(n_users=400, seed=5)
    imp_t = imp_t.assign(user_id=imp_t["user_id"] + 10_000, request_id="t" + imp_t["request_id"])
    fb_t = fb_t.assign(user_id=fb_t["user_id"] + 10_000, request_id="t" + fb_t["request_id"])
    last = imp_t.drop_duplicates("user_id", keep="last")[["request_id", "user_id"]]
    churn_t = last.assign(item_id=-1, event="churn", value=1.0)
    fb_t = pd.concat([fb_t[fb_t["event"] != "churn"], churn_t], ignore_index=True)
    impressions = pd.concat([imp_c.assign(arm="control"), imp_t.assign(arm="treatment")], ignore_index=True)
    feedback = pd.concat([fb_c, fb_t], ignore_index=True)

    with pytest.raises(ValueError, match=r"'arm' column holds 2 arms \['control', 'treatment'\]"):
        per_user_signals(impressions, feedback, durations)
    with pytest.raises(ValueError, match="no impressions of arm 'holdout'"):
        per_user_signals(impressions, feedback, durations, arm="holdout")

    control = per_user_signals(impressions, feedback, durations, arm="control")
    alone = per_user_signals(imp_c.assign(arm="control"), fb_c, durations)
    pd.testing.assert_frame_equal(control, alone)
    treatment = per_user_signals(impressions, feedback, durations, arm="treatment")
    assert len(treatment) == 400 and not treatment["returned"].any()
    # A single-arm log (the retention run's own) needs no arm, as before.
    assert len(per_user_signals(imp_c.assign(arm="control"), fb_c, durations)) == 400


def test_an_arm_that_served_two_model_versions_is_not_pooled():
    """A deployment's log spanning a rollout holds one arm served by two model versions (the control arm on
    v1, then on the shipped v2); the analysis pooled them, relating the versions' difference to coming back
    as the arm check above does for two arms. It is refused now, naming the versions."""
    imp, fb, durations = planted_log(n_users=400)
    rolled = imp.assign(arm="control", model_version=np.where(imp["user_id"] < 200, "1", "2"))
    with pytest.raises(ValueError, match=r"2 model versions \['1', '2'\]"):  # old code: no error
        per_user_signals(rolled, fb, durations, arm="control")
    one = per_user_signals(rolled[rolled["model_version"] == "2"], fb, durations)
    assert len(one) == 200


def test_a_log_spanning_a_rollout_is_analysed_one_model_version_at_a_time(tmp_path):
    """``analyze_log`` refused a log whose arm was served by two model versions (a rollout or a promotion
    within it) and offered no way to analyse one version's rows: its docstring sent the user to
    ``per_user_signals``, rebuilding the durations and label settings by hand. ``model_version=`` names
    the version, as ``arm=`` names the arm, and the refusal says so."""
    from types import SimpleNamespace

    from configs import load_config
    from online.feedback_log import FeedbackLog
    from online.retention import analyze_log

    imp, fb, durations = planted_log(n_users=400)
    version = np.where(imp["user_id"] < 200, "1", "2")  # the control arm on v1, then on the shipped v2
    log = FeedbackLog(tmp_path / "log.sqlite")
    for (rid, user, v), rows in imp.assign(model_version=version).groupby(["request_id", "user_id", "model_version"]):
        log.log_impressions(rid, int(user), rows.sort_values("position")["item_id"].tolist(), v, "control", "model")
    log.log_feedback_many(list(fb.itertuples(index=False, name=None)))
    log.close()
    world = SimpleNamespace(items=pd.DataFrame({"item_id": durations.index, "duration_seconds": durations.values}))
    config = load_config()
    heads = ["click", "duration_watch", "like"]

    with pytest.raises(ValueError, match=r"2 model versions \['1', '2'\].*model_version="):
        analyze_log(tmp_path / "log.sqlite", world, config, heads)
    users, analysis = analyze_log(tmp_path / "log.sqlite", world, config, heads, model_version=2)  # old: TypeError
    labels = config.workflow.labels
    v2 = imp[version == "2"].assign(arm="control", model_version="2")
    alone = per_user_signals(v2, fb, durations, labels.duration_buckets, labels.duration_watch_quantile)
    pd.testing.assert_frame_equal(users, alone)
    assert len(users) == 200 and analysis.users == 200
    assert (users["user_id"] >= 200).all()
    same, _ = analyze_log(tmp_path / "log.sqlite", world, config, heads, arm="control", model_version="2")
    pd.testing.assert_frame_equal(same, users)
    with pytest.raises(ValueError, match=r"no impressions of model version '3' .*\['1', '2'\]"):
        analyze_log(tmp_path / "log.sqlite", world, config, heads, model_version=3)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_nearly_collinear_pair_is_named_in_the_notes():
    """Watch seconds 600 x the click rate plus 1% noise (r = 0.99995): the fit converges, but both
    intervals are a hundred times wider than a lone signal's and include 0, so the rule gave both heads 0
    (kept the current weights) and no note said why. Now a note names the pair; the weights are as before."""
    rng = np.random.default_rng(0)
    n = 1000
    click = rng.beta(3, 8, n)
    watch = 600 * click + 6 * click.std() * rng.normal(size=n)
    returned = rng.random(n) < 1 / (1 + np.exp(-(0.3 + 0.6 * (click - click.mean()) / click.std())))
    users = pd.DataFrame({"click": click, "watch_seconds": watch, "duration_watch": rng.beta(2, 20, n)})
    users["like"], users["share"], users["returned"] = rng.beta(2, 20, n), rng.gamma(1, 0.01, n), returned
    current = {"click": 0.4, "watch_seconds": 0.4, "like": 0.2}
    analysis = analyze_retention(users, list(current))
    named = [n for n in analysis.notes if n.startswith("click and watch_seconds are nearly collinear")]
    assert len(named) == 2, analysis.notes  # old code: no note at all
    assert "r = +0.99995" in named[1] and "the rule may give neither head weight" in named[1], named
    assert "(not the rule's input)" in named[0], named
    d = derive_head_weights(analysis.heads, current)
    assert not d.changed and d.weights == current, d  # the rule is unchanged
    # Ordinary, less correlated signals get no such note.
    plain = analyze_retention(users.assign(watch_seconds=rng.gamma(2, 10, n)), list(current))
    assert not any("collinear across users" in n for n in plain.notes), plain.notes
