"""Read an A/B test from the feedback log: per-arm metrics, their tests, validity checks, a decision.

The log the server wrote is the source of truth (``ab_router`` logged every impression with its arm
and model version, ``feedback`` every reaction), not the client's own counts. From it, per user:
requests, impressions, clicks, watch time, likes and shares, and whether they churned. Then:

* **validity first**: the sample-ratio-mismatch test of users per arm (holdout included) against the
  designed shares; a mismatch makes every other number untrustworthy;
* **primary metric** CTR, treatment vs control, with users as the unit (delta-method variance of
  clicks / impressions; the two-proportion z-test over impressions is shown beside it and is too
  optimistic, because one user's impressions are not independent); the planned sample size
  (users per arm for ``min_detectable_ctr_lift`` at ``alpha``/``power``, from the control's per-user
  spread) decides between
  "keep running" and "no detectable difference";
* **secondary**: watch minutes per user (Welch t-test and bootstrap interval over users), likes and
  shares per request (Welch), retention (users who never churned, z-test), and CTR with a bootstrap
  interval that resamples users (impressions of one user are not independent);
* **guardrails**: watch time and retention must not get significantly worse, whatever CTR says;
* **holdout vs control**: the 1-2% kept on the control model, which after a rollout is the only
  yardstick left for the long term;
* **popularity concentration per arm**: item-share curve and Gini of what each arm served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from configs import ExperimentConfig
from evaluation import popularity_bias as pb
from online import ab_testing as ab
from serving.assignment import HOLDOUT, Rollout


def per_user(impressions: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, user): requests, impressions, clicks, watch_seconds, likes, shares, churned."""
    imp = impressions.groupby(["arm", "user_id"]).agg(
        requests=("request_id", "nunique"), impressions=("item_id", "size")
    )
    arm_of = impressions.drop_duplicates("request_id").set_index("request_id")["arm"]
    fb = feedback.assign(arm=feedback["request_id"].map(arm_of))
    sums = fb.pivot_table(index=["arm", "user_id"], columns="event", values="value", aggfunc="sum", fill_value=0)
    sums = sums.reindex(columns=["click", "watch_seconds", "like", "share", "churn"], fill_value=0)
    users = imp.join(sums, how="left").fillna(0)
    users = users.rename(columns={"click": "clicks", "like": "likes", "share": "shares"})
    users["churned"] = users.pop("churn") > 0
    return users.reset_index()


def arm_summary(users: pd.DataFrame) -> pd.DataFrame:
    g = users.groupby("arm")
    return pd.DataFrame(
        {
            "users": g.size(),
            "requests": g["requests"].sum(),
            "impressions": g["impressions"].sum(),
            "ctr": g["clicks"].sum() / g["impressions"].sum(),
            "watch_minutes_per_user": g["watch_seconds"].mean() / 60,
            "likes_shares_per_request": ((users["likes"] + users["shares"]) / users["requests"])
            .groupby(users["arm"])
            .mean(),
            "retention": 1.0 - g["churned"].mean(),
        }
    ).reset_index()


def ctr_bootstrap(c: pd.DataFrame, t: pd.DataFrame, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the CTR difference, resampling users (clustered)."""
    rng = np.random.default_rng(seed)
    cc, ci = c["clicks"].to_numpy(), c["impressions"].to_numpy()
    tc, ti = t["clicks"].to_numpy(), t["impressions"].to_numpy()
    diffs = np.empty(n)
    for b in range(n):
        a, z = rng.integers(0, len(cc), len(cc)), rng.integers(0, len(tc), len(tc))
        diffs[b] = tc[z].sum() / max(ti[z].sum(), 1) - cc[a].sum() / max(ci[a].sum(), 1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


@dataclass
class ABAnalysis:
    summary: pd.DataFrame
    tests: pd.DataFrame
    srm: ab.SRMResult
    holdout_vs_control: dict | None
    required_users_per_arm: int
    observed_users_per_arm: int
    decision: str
    concentration: pd.DataFrame
    daily: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_dict(self) -> dict:
        return {
            "decision": self.decision,
            "summary": self.summary.to_dict(orient="records"),
            "tests": self.tests.to_dict(orient="records"),
            "srm": self.srm.__dict__,
            "holdout_vs_control": self.holdout_vs_control,
            "required_users_per_arm": self.required_users_per_arm,
            "observed_users_per_arm": self.observed_users_per_arm,
            "concentration": self.concentration.to_dict(orient="records"),
        }


def analyze(
    impressions: pd.DataFrame,
    feedback: pd.DataFrame,
    rollout: Rollout,
    config: ExperimentConfig,
    catalog_size: int,
    control: str = "control",
    treatment: str = "treatment",
) -> ABAnalysis:
    users = per_user(impressions, feedback)
    summary = arm_summary(users)
    by_arm = {arm: users[users["arm"] == arm] for arm in users["arm"].unique()}
    if control not in by_arm or treatment not in by_arm:
        raise ValueError(f"the log has arms {sorted(by_arm)}; both {control!r} and {treatment!r} are needed")
    c, t = by_arm[control], by_arm[treatment]

    def ctr_test(a: pd.DataFrame, b: pd.DataFrame) -> ab.TestResult:
        # Users are the randomised unit: CTR's variance over users (delta method), not over impressions.
        return ab.ratio_delta_test(a["clicks"], a["impressions"], b["clicks"], b["impressions"], "ctr", config.alpha)

    primary = ctr_test(c, t)
    naive = ab.two_proportion_ztest(
        int(c["clicks"].sum()),
        int(c["impressions"].sum()),
        int(t["clicks"].sum()),
        int(t["impressions"].sum()),
        "ctr, impressions as trials (z-test, too optimistic)",
        config.alpha,
    )
    tests = [
        primary,
        naive,
        ab.welch_ttest(c["watch_seconds"] / 60, t["watch_seconds"] / 60, "watch_minutes_per_user", config.alpha),
        ab.welch_ttest(
            (c["likes"] + c["shares"]) / c["requests"],
            (t["likes"] + t["shares"]) / t["requests"],
            "likes_shares_per_request",
            config.alpha,
        ),
        ab.two_proportion_ztest(
            int((~c["churned"]).sum()), len(c), int((~t["churned"]).sum()), len(t), "retention", config.alpha
        ),
    ]
    table = pd.DataFrame([r.to_dict() for r in tests])
    low, high = ctr_bootstrap(c, t)
    watch = ab.bootstrap_diff(c["watch_seconds"] / 60, t["watch_seconds"] / 60)
    table["bootstrap_low"] = [low, np.nan, watch[1], np.nan, np.nan]
    table["bootstrap_high"] = [high, np.nan, watch[2], np.nan, np.nan]

    observed = {arm: len(frame) for arm, frame in by_arm.items()}
    srm = ab.sample_ratio_mismatch(observed, rollout.experiment.expected_shares())
    # Users per arm for the planned CTR lift, from the control's per-user spread of CTR (delta method).
    _, user_std = ab.ratio_user_std(c["clicks"], c["impressions"])
    required = ab.sample_size_means(user_std, config.min_detectable_ctr_lift, config.alpha, config.power)
    observed_users = int(min(len(c), len(t)))
    decision = ab.decide(
        primary, srm, required, observed_users, config.alpha, unit="users", guardrails=[tests[2], tests[4]]
    )  # watch time and retention must not get worse
    holdout = None
    if HOLDOUT in by_arm and len(by_arm[HOLDOUT]) >= 2:
        holdout = ctr_test(by_arm[HOLDOUT], c).to_dict()
        holdout["metric"] = "ctr: control (treatment side) vs holdout"

    rows = []
    for arm, frame in impressions.groupby("arm"):
        items = frame["item_id"].to_numpy()
        curve = pb.item_share_curve(items)
        rows.append(
            {
                "arm": arm,
                "distinct items": int(len(np.unique(items))),
                "items for 50% of recs": curve.get(0.5),
                "items for 90% of recs": curve.get(0.9),
                "gini": pb.gini(pd.factorize(items)[0], max(catalog_size, len(np.unique(items)))),
                "coverage": len(np.unique(items)) / catalog_size,
            }
        )
    return ABAnalysis(summary, table, srm, holdout, required, observed_users, decision, pd.DataFrame(rows))


def daily_ctr(outcomes: pd.DataFrame) -> pd.DataFrame:
    """CTR per arm per simulated day (from the simulator's own outcome rows)."""
    g = outcomes.groupby(["day", "arm"])
    return (g["clicks"].sum() / g["impressions"].sum()).rename("ctr").reset_index()


def write_ab_report(
    analysis: ABAnalysis, out_dir: str | Path, title: str, context: dict, outcomes: pd.DataFrame | None = None
) -> dict[str, Path]:
    """``report.html`` / ``report.md`` / ``analysis.json`` with the decision, tables and plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.report import figure_png, write_document

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    srm = analysis.srm
    validity = pd.DataFrame(
        [
            {
                "check": "sample ratio (users per arm vs design)",
                "chi2": srm.chi2,
                "p_value": srm.p_value,
                "mismatch": srm.mismatch,
                "observed": json.dumps(srm.observed),
                "expected shares": json.dumps({k: round(v, 4) for k, v in srm.expected_shares.items()}),
            },
            {
                "check": "planned sample size (users per arm)",
                "chi2": np.nan,
                "p_value": np.nan,
                "mismatch": analysis.observed_users_per_arm < analysis.required_users_per_arm,
                "observed": str(analysis.observed_users_per_arm),
                "expected shares": f"required {analysis.required_users_per_arm}",
            },
        ]
    )
    sections = [
        ("Per arm", analysis.summary),
        ("Treatment vs control", analysis.tests),
        ("Validity", validity),
        ("Popularity concentration of what each arm served", analysis.concentration),
    ]
    if analysis.holdout_vs_control:
        sections.append(("Holdout (control model) vs control arm", pd.DataFrame([analysis.holdout_vs_control])))
    plots = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    arms = analysis.summary
    ax.bar(arms["arm"], arms["ctr"], color=["#4c72b0", "#dd8452", "#55a868"][: len(arms)])
    ax.set_ylabel("CTR")
    ax.set_title("CTR per arm")
    plots.append(("CTR per arm", figure_png(fig)))
    if outcomes is not None and not outcomes.empty:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for arm, frame in daily_ctr(outcomes).groupby("arm"):
            ax.plot(frame["day"], frame["ctr"], marker="o", label=arm)
        ax.set_xlabel("simulated day")
        ax.set_ylabel("CTR")
        ax.legend()
        plots.append(("CTR per simulated day", figure_png(fig)))
    context = {"decision": analysis.decision, **context}
    paths = write_document(out, title, context, sections, plots)
    (out / "analysis.json").write_text(json.dumps(analysis.to_dict(), indent=2, default=str))
    return {**paths, "json": out / "analysis.json"}
