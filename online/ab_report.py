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
  shares per request (Welch), retention (users who never churned; Welch t, or a permutation test for
  small groups), and CTR with a bootstrap
  interval that resamples users (impressions of one user are not independent);
* **guardrails**: watch time and retention must not get significantly worse, whatever CTR says;
* **holdout vs control**: the 1-2% kept on the control model, which after a rollout is the only
  yardstick left for the long term (CTR, watch minutes per user, retention: ``holdout_tests``);
* **popularity concentration per arm**: item-share curve and Gini of what each arm served.

Every comparison takes users as the unit and keeps its false-positive rate at the sizes the defaults
produce, the 2% holdout's 20 users included (``online/ab_testing.py``: permutation p-values for small
groups; the A/A check is ``tests/test_ab_aa.py``). The impression-level z-test is shown for contrast
only and decides nothing.

The same holdout comparison runs continuously for monitoring: ``live_vs_holdout`` compares, per
model version serving live users, those users with the holdout over the same period, and
``HoldoutMonitor`` publishes the result for Prometheus (``docs/monitoring.md``), where the
``LiveBelowHoldout`` alert watches it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from configs import ExperimentConfig
from evaluation import popularity_bias as pb
from online import ab_testing as ab
from online.feedback_log import POSTGRES_COLUMNS, SQLITE_COLUMNS
from serving.assignment import HOLDOUT, Rollout
from workflows.live_store import Database, is_postgres


def per_user(
    impressions: pd.DataFrame, feedback: pd.DataFrame, empty_responses: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per (arm, user): requests, impressions, clicks, watch_seconds, likes, shares, churned.

    ``empty_responses`` (``FeedbackLog.empty_responses()``): responses with no items. Each is a request
    of its arm with no impressions, and a churn sent about it counts; without them a user whose
    responses were all empty vanished from the arm (and from the SRM count), and a churn after an
    empty response was dropped, so that arm's retention read too high."""
    imp = impressions.groupby(["arm", "user_id"]).agg(
        requests=("request_id", "nunique"), impressions=("item_id", "size")
    )
    arm_of = impressions.drop_duplicates("request_id").set_index("request_id")["arm"]
    if empty_responses is not None and not empty_responses.empty:
        empty = empty_responses.drop_duplicates("request_id")
        empty = empty[~empty["request_id"].isin(arm_of.index)]  # a request is logged one way or the other
        extra = empty.groupby(["arm", "user_id"]).agg(requests=("request_id", "size"))
        imp = imp.add(extra.assign(impressions=0), fill_value=0).astype(np.int64)
        arm_of = pd.concat([arm_of, empty.set_index("request_id")["arm"]])
    # float: an empty frame's object column fails to aggregate (a pandas FutureWarning, an error later)
    fb = feedback.assign(arm=feedback["request_id"].map(arm_of), value=feedback["value"].astype("float64"))
    sums = fb.pivot_table(index=["arm", "user_id"], columns="event", values="value", aggfunc="sum", fill_value=0)
    sums = sums.reindex(columns=["click", "watch_seconds", "like", "share", "churn"], fill_value=0)
    users = imp.join(sums, how="left").fillna(0)
    users = users.rename(columns={"click": "clicks", "like": "likes", "share": "shares"})
    users["churned"] = users.pop("churn") > 0
    return users.reset_index()


def versions_by_arm(impressions: pd.DataFrame, empty_responses: pd.DataFrame | None = None) -> dict[str, list[str]]:
    """arm -> the model versions that served it in the log's rows (as logged, text, in version order).
    Empty for frames without ``model_version``."""
    frames = [f for f in (impressions, empty_responses) if f is not None and not f.empty]
    if not frames or any("model_version" not in f.columns for f in frames):
        return {}
    served = pd.concat([f[["arm", "model_version"]].astype(str) for f in frames]).drop_duplicates()
    return {
        arm: sorted(versions, key=lambda v: (len(v), v)) for arm, versions in served.groupby("arm")["model_version"]
    }


def served_versions(impressions: pd.DataFrame, empty_responses: pd.DataFrame | None = None) -> dict[str, str]:
    """arm -> the model version(s) that served it in the log's rows (``versions_by_arm``, several joined
    by ", ")."""
    return {arm: ", ".join(versions) for arm, versions in versions_by_arm(impressions, empty_responses).items()}


def arm_summary(users: pd.DataFrame, versions: dict[str, str] | None = None) -> pd.DataFrame:
    """Per arm: users, requests, impressions, ctr, watch minutes per user, likes and shares per request,
    retention. With ``versions`` (``served_versions``), a ``model_version`` column (text) after ``arm``:
    the version that served each arm (missing where unknown)."""
    g = users.groupby("arm")
    summary = pd.DataFrame(
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
    if versions is not None:
        summary.insert(1, "model_version", summary["arm"].map(versions).astype(object))
    return summary


def ctr_bootstrap(
    c: pd.DataFrame, t: pd.DataFrame, n: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """``confidence`` interval of the CTR difference, resampling users (clustered)."""
    rng = np.random.default_rng(seed)
    cc, ci = c["clicks"].to_numpy(), c["impressions"].to_numpy()
    tc, ti = t["clicks"].to_numpy(), t["impressions"].to_numpy()
    if ci.sum() <= 0 or ti.sum() <= 0:  # a group with no impression has no CTR: it is not 0, and no interval
        return float("nan"), float("nan")
    diffs = np.empty(n)
    for b in range(n):
        a, z = rng.integers(0, len(cc), len(cc)), rng.integers(0, len(tc), len(tc))
        diffs[b] = tc[z].sum() / max(ti[z].sum(), 1) - cc[a].sum() / max(ci[a].sum(), 1)
    a = (1 - confidence) / 2
    return float(np.quantile(diffs, a)), float(np.quantile(diffs, 1 - a))


def arm_tests(
    c: pd.DataFrame,
    t: pd.DataFrame,
    alpha: float = 0.05,
    n_resamples: int = ab.PERMUTATIONS,
    power: float = 0.8,
) -> list[ab.TestResult]:
    """Treatment vs control over per-user rows (``per_user``): CTR (the primary metric), CTR with
    impressions as trials (for contrast only: too optimistic), watch minutes per user, likes and
    shares per request, retention. Each result's ``min_detectable_effect`` is at ``power``."""
    return [
        # Users are the randomised unit: CTR's variance over users (delta method), not over impressions.
        ab.ratio_delta_test(
            c["clicks"], c["impressions"], t["clicks"], t["impressions"], "ctr", alpha, n_resamples, power=power
        ),
        impression_ztest(c, t, alpha),
        ab.mean_test(
            c["watch_seconds"] / 60, t["watch_seconds"] / 60, "watch_minutes_per_user", alpha, n_resamples, power=power
        ),
        ab.mean_test(
            (c["likes"] + c["shares"]) / c["requests"],
            (t["likes"] + t["shares"]) / t["requests"],
            "likes_shares_per_request",
            alpha,
            n_resamples,
            power=power,
        ),
        ab.mean_test(
            ~c["churned"].astype(bool), ~t["churned"].astype(bool), "retention", alpha, n_resamples, power=power
        ),
    ]


def impression_ztest(c: pd.DataFrame, t: pd.DataFrame, alpha: float = 0.05) -> ab.TestResult:
    """CTR with impressions as trials (``ab.two_proportion_ztest``), for contrast only."""
    metric = "ctr, impressions as trials (z-test, too optimistic; decides nothing)"
    clicks_c, trials_c = int(c["clicks"].sum()), int(c["impressions"].sum())
    clicks_t, trials_t = int(t["clicks"].sum()), int(t["impressions"].sum())
    if min(trials_c, trials_t) == 0:  # an arm served only empty responses so far: no trials (the z-test raises)
        nan = float("nan")
        ctr_c, ctr_t = (k / n if n else nan for k, n in ((clicks_c, trials_c), (clicks_t, trials_t)))
        empty = " and ".join(arm for arm, n in (("control", trials_c), ("treatment", trials_t)) if not n)
        why = f"no test: the {empty} arm served no impression"
        return ab.TestResult(metric, ctr_c, ctr_t, ctr_t - ctr_c, nan, nan, nan, nan, why)
    return ab.two_proportion_ztest(clicks_c, trials_c, clicks_t, trials_t, metric, alpha)


HOLDOUT_METRICS = ("ctr", "watch_minutes_per_user", "retention")
# The relative gap (live vs holdout) the degradation alert's sequential test is tuned to find soonest:
# the mixture's spread ``tau`` is this times the larger group value (``ab.always_valid_p_value``).
# Measured (docs/monitoring.md, 10,000 users a day): 0.1 / 0.25 / 0.5 found a 10% drop after a median
# of 2.8 / 3.0 / 3.25 days, with 0.45% / 0.25% / 0.2% of A/A runs alerting within 30 days.
MONITOR_EFFECT = 0.25
# HoldoutMonitorDown (monitoring/prometheus/funnel-alerts.yml) fires when the last comparison is older
# than this: a monitor computing less often would keep it firing (tests/test_monitoring.py holds the two equal).
HOLDOUT_STALE_S = 900


def holdout_tests(
    holdout: pd.DataFrame,
    live: pd.DataFrame,
    alpha: float = 0.05,
    n_resamples: int = ab.PERMUTATIONS,
    power: float = 0.8,
) -> list[ab.TestResult]:
    """Live users vs the holdout (``control`` = holdout, ``treatment`` = live, ``difference`` = the
    live-minus-holdout gap) for ``HOLDOUT_METRICS``, over per-user rows. The holdout is small (2% by
    default), so these are permutation tests (``online/ab_testing.py``)."""
    h, v = holdout, live
    return [
        ab.ratio_delta_test(
            h["clicks"], h["impressions"], v["clicks"], v["impressions"], "ctr", alpha, n_resamples, power=power
        ),
        ab.mean_test(
            h["watch_seconds"] / 60, v["watch_seconds"] / 60, "watch_minutes_per_user", alpha, n_resamples, power=power
        ),
        ab.mean_test(
            ~h["churned"].astype(bool), ~v["churned"].astype(bool), "retention", alpha, n_resamples, power=power
        ),
    ]


def of_experiment(frame: pd.DataFrame, experiment: str | None) -> pd.DataFrame:
    """The rows of ``experiment`` in ``FeedbackLog.impressions()`` or ``.empty_responses()``, and those
    of unknown experiment ('': an in-process simulation, or a log written before the column existed),
    which only their time can tell apart. All rows for None, or a frame without the column."""
    if experiment is None or "experiment" not in frame.columns:
        return frame
    return frame[frame["experiment"].isin([experiment, ""])]


def one_version_per_arm(
    impressions: pd.DataFrame, empty_responses: pd.DataFrame | None = None, experiment: str | None = None
) -> None:
    """Refuse rows in which one arm was served by more than one model version.

    ``roll_out_treatment`` keeps the experiment (its name, its arms) and moves every arm but the holdout
    to the treatment's version, so the log of an experiment that was shipped holds "control" rows of the
    control's version before the rollout and of the treatment's after it (a promotion of the served
    version, or rows of unknown experiment from another period, do the same). Pooled, the control arm's
    CTR, watch time and retention mix both models and the test compares the treatment with itself in
    part; the comparison is the experiment's period before the rollout."""
    served = versions_by_arm(impressions, empty_responses)
    mixed = {arm: versions for arm, versions in served.items() if len(versions) > 1}
    if mixed:
        named = "; ".join(f"arm {arm!r} by model versions {versions}" for arm, versions in sorted(mixed.items()))
        of = f" of experiment {experiment!r}" if experiment is not None else ""
        raise ValueError(
            f"the rows{of} were served {named}: a log spanning a rollout (roll_out_treatment moves every arm "
            "but the holdout to the treatment's version under the same experiment) or a promotion. Pooled, an "
            "arm's figures mix two models; analyse the rows logged before the rollout, with the rollout the "
            "experiment started with: before_rollout(impressions, feedback, rollout, empty_responses) returns them"
        )


def one_arm_per_user(users: pd.DataFrame, experiment: str | None = None) -> None:
    """Refuse ``per_user`` rows in which one user is in more than one arm.

    An experiment assigns each user to one arm for its whole life, so a user found in two arms was
    reassigned mid-experiment: it was started again under the same name with another salt or other
    shares (a ramp), or rows of unknown experiment ('') from another period were read with it. Such a
    user is two rows, one per arm, in every comparison and in the sample-ratio check (counted twice,
    each arm's figures carrying the other arm's exposure), and the tests take the rows as independent
    units; a new salt at the same shares even passes the sample-ratio check with the moved users
    (about half) in both arms. The comparison is one assignment's period: cut the rows by time."""
    arms = users.groupby("user_id")["arm"].nunique()
    moved = arms[arms > 1]
    if len(moved):
        of = f" of experiment {experiment!r}" if experiment is not None else ""
        some = ", ".join(str(u) for u in moved.index[:5])
        raise ValueError(
            f"{len(moved)} of {len(arms)} users in the rows{of} are in more than one arm (users {some}"
            f"{', ...' if len(moved) > 5 else ''}): the assignment changed mid-experiment (started again under "
            "the same name with another salt or other shares, or rows of unknown experiment from another period). "
            "A user is one unit of one arm; analyse the rows of one assignment's period (cut them by time)"
        )


def before_rollout(
    impressions: pd.DataFrame,
    feedback: pd.DataFrame,
    rollout: Rollout,
    empty_responses: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """The rows of an experiment's log from before it was rolled out, for ``analyze``: ``(impressions,
    feedback, empty_responses)`` cut where an arm was first served by a version other than ``rollout``'s
    (the rollout the experiment started with; the holdout's is ``control_version``).

    Impressions and empty responses are kept when logged before the first response (of ``rollout``'s
    experiment, ``of_experiment``) by another version than its arm's, feedback when it is about a kept
    response (a click on a slate served before the rollout counts, whenever it came). A log without such
    a response is returned whole, as is one without ``model_version``. Rows of unknown experiment ('')
    from before the experiment, served by an older version, cut everything: cut those by the
    experiment's start time first."""
    frames = [f for f in (impressions, empty_responses) if f is not None]
    if any("model_version" not in f.columns for f in frames):
        return impressions, feedback, empty_responses
    versions = {arm: str(int(v)) for arm, v in rollout.versions_by_arm().items()}
    cut = np.inf
    for frame in frames:
        rows = of_experiment(frame, rollout.experiment.name)
        expected = rows["arm"].map(versions)
        moved = expected.notna() & (rows["model_version"].astype(str) != expected)
        if moved.any():
            cut = min(cut, float(rows.loc[moved, "ts"].min()))
    if not np.isfinite(cut):
        return impressions, feedback, empty_responses
    impressions = impressions[impressions["ts"] < cut]
    kept = impressions["request_id"]
    if empty_responses is not None:
        empty_responses = empty_responses[empty_responses["ts"] < cut]
        kept = pd.concat([kept, empty_responses["request_id"]])
    return impressions, feedback[feedback["request_id"].isin(kept)], empty_responses


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
    holdout: pd.DataFrame = field(default_factory=pd.DataFrame)  # holdout_tests(holdout, control arm)

    def to_dict(self) -> dict:
        return {
            "decision": self.decision,
            "summary": self.summary.to_dict(orient="records"),
            "tests": self.tests.to_dict(orient="records"),
            "srm": self.srm.__dict__,
            "holdout_vs_control": self.holdout_vs_control,
            "holdout": self.holdout.to_dict(orient="records"),
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
    empty_responses: pd.DataFrame | None = None,
) -> ABAnalysis:
    """``empty_responses``: ``FeedbackLog.empty_responses()`` (requests without impressions; ``per_user``).

    Only ``rollout``'s experiment is read (``of_experiment``): another experiment logged into the same
    log at the same time, with the same arm names, is left out. Rows of unknown experiment ('') are
    kept, so a log from before the column must still be cut by its start time, as before.

    Each arm must have been served by one model version (``one_version_per_arm``): a log that spans
    ``roll_out_treatment`` holds the control arm on the control's version before it and on the
    treatment's after, under the same experiment, and is refused; pass the rows logged before the rollout
    (``before_rollout``, with the rollout the experiment started with). A user found in more than one
    arm (the experiment restarted under its name with another salt or shares) is refused too
    (``one_arm_per_user``)."""
    impressions = of_experiment(impressions, rollout.experiment.name)
    if empty_responses is not None:
        empty_responses = of_experiment(empty_responses, rollout.experiment.name)
    one_version_per_arm(impressions, empty_responses, rollout.experiment.name)
    users = per_user(impressions, feedback, empty_responses)
    one_arm_per_user(users, rollout.experiment.name)
    summary = arm_summary(users, served_versions(impressions, empty_responses))
    by_arm = {arm: users[users["arm"] == arm] for arm in users["arm"].unique()}
    if control not in by_arm or treatment not in by_arm:
        raise ValueError(f"the log has arms {sorted(by_arm)}; both {control!r} and {treatment!r} are needed")
    c, t = by_arm[control], by_arm[treatment]

    tests = arm_tests(c, t, config.alpha, power=config.power)
    primary = tests[0]
    table = pd.DataFrame([r.to_dict() for r in tests])
    # At the tests' level (1 - alpha), as their ci_low / ci_high beside it: a fixed 95% disagreed with them.
    low, high = ctr_bootstrap(c, t, confidence=1 - config.alpha)
    watch = ab.bootstrap_diff(c["watch_seconds"] / 60, t["watch_seconds"] / 60, confidence=1 - config.alpha)
    table["bootstrap_low"] = [low, np.nan, watch[1], np.nan, np.nan]
    table["bootstrap_high"] = [high, np.nan, watch[2], np.nan, np.nan]

    observed = {arm: len(frame) for arm, frame in by_arm.items()}
    srm = ab.sample_ratio_mismatch(observed, rollout.experiment.expected_shares())
    # Users per arm for the planned CTR lift, from the control's per-user spread of CTR (delta method).
    control_impressions = c["impressions"].sum()
    if len(c) >= 2 and control_impressions > 0:
        control_ctr, user_std = ab.ratio_user_std(c["clicks"], c["impressions"])
    else:  # one control user, or only empty responses so far (ratio_user_std raises): the binomial one below
        nan = float("nan")
        control_ctr, user_std = (float(c["clicks"].sum() / control_impressions) if control_impressions else nan), nan
    if not user_std > 0:  # no spread yet (no clicks at all, say): the binomial one at the planned CTRs
        # No CTR at all yet (the control showed nothing): p = 0.5, the widest binomial spread.
        p = min(control_ctr + config.min_detectable_ctr_lift / 2, 0.5) if np.isfinite(control_ctr) else 0.5
        user_std = float(np.sqrt(p * (1 - p) / (c["impressions"].mean() or 1)))
    required = ab.sample_size_means(user_std, config.min_detectable_ctr_lift, config.alpha, config.power)
    observed_users = int(min(len(c), len(t)))
    decision = ab.decide(
        primary, srm, required, observed_users, config.alpha, unit="users", guardrails=[tests[2], tests[4]]
    )  # watch time and retention must not get worse
    holdout, holdout_table = None, pd.DataFrame()
    if HOLDOUT in by_arm:
        results = holdout_tests(by_arm[HOLDOUT], c, config.alpha, power=config.power)
        holdout_table = pd.DataFrame([r.to_dict() for r in results])
        holdout = results[0].to_dict()
        holdout["metric"] = "ctr: control (treatment side) vs holdout"
        # The retraining pipeline keeps the holdout on its model across candidates: not always the control arm's.
        holdout["holdout_version"] = int(rollout.control_version)
        if control in rollout.versions:
            holdout["control_version"] = int(rollout.versions[control])

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
    return ABAnalysis(
        summary, table, srm, holdout, required, observed_users, decision, pd.DataFrame(rows), holdout=holdout_table
    )


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

    from evaluation.report import figure_png, json_text, write_document

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
    if not analysis.holdout.empty:
        h = analysis.holdout_vs_control or {}
        versions = ("holdout_version", "control_version")
        heading = "Holdout vs control arm"
        if all(k in h for k in versions):
            heading = "Holdout (v{}) vs control arm (v{})".format(*(h[k] for k in versions))
        sections.append((heading, analysis.holdout))
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
    # Standard JSON: a test with too few users (NaN) or an SRM check of an empty arm (inf) writes null.
    (out / "analysis.json").write_text(json_text(analysis.to_dict()))
    return {**paths, "json": out / "analysis.json"}


# Live vs holdout, continuously: what the LiveBelowHoldout alert watches (docs/monitoring.md).

REQUESTS_SQL = """
SELECT request_id, MIN(ts) AS ts, MIN(user_id) AS user_id, MIN(arm) AS arm, MIN(model_version) AS model_version,
       COUNT(*) AS impressions
FROM impressions WHERE ts >= ?{only} GROUP BY request_id
"""
# The reactions to the responses logged in ``{table}`` since the bound time, one row per request.
# ``{only}``: '' (every experiment), or ``OF_EXPERIMENT``.
_REACTIONS_TO = """
SELECT request_id,
       SUM(CASE WHEN event = 'click' THEN value ELSE 0 END) AS clicks,
       SUM(CASE WHEN event = 'watch_seconds' THEN value ELSE 0 END) AS watch_seconds,
       SUM(CASE WHEN event = 'like' THEN value ELSE 0 END) AS likes,
       SUM(CASE WHEN event = 'share' THEN value ELSE 0 END) AS shares,
       MAX(CASE WHEN event = 'churn' THEN 1 ELSE 0 END) AS churned
FROM feedback WHERE request_id IN (SELECT request_id FROM {table} WHERE ts >= ?{{only}}) GROUP BY request_id
"""
REACTIONS_SQL = _REACTIONS_TO.format(table="impressions")
# Responses with no items (``FeedbackLog.empty_responses``): requests of their arm with 0 impressions,
# and the churns sent about them. A log from before they were logged (2026-12-06) lacks the table.
EMPTY_REQUESTS_SQL = """
SELECT request_id, ts, user_id, arm, model_version, 0 AS impressions FROM empty_responses WHERE ts >= ?{only}
"""
EMPTY_REACTIONS_SQL = _REACTIONS_TO.format(table="empty_responses")
# One experiment's rows, and those of unknown experiment ('': logged before the column existed).
OF_EXPERIMENT = " AND experiment IN (?, '')"
REQUEST_COLUMNS = [
    "request_id",
    "ts",
    "user_id",
    "arm",
    "model_version",
    "impressions",
    "clicks",
    "watch_seconds",
    "likes",
    "shares",
    "churned",
]


def _only(columns: list[str], since: float, experiment: str | None) -> tuple[dict, tuple]:
    """``logged_requests``' SQL filter and parameters: every row when ``experiment`` is None or the log's
    ``impressions`` (``columns``) predates the experiment column (every row's experiment is unknown)."""
    if experiment is None or "experiment" not in columns:
        return {"only": ""}, (since,)
    return {"only": OF_EXPERIMENT}, (since, experiment)


def logged_requests(log_path: str | Path, since: float = 0.0, experiment: str | None = None) -> pd.DataFrame:
    """One row per logged response since ``since`` (epoch seconds), an empty one (0 impressions)
    included: its user, arm, model version, impressions and the reactions to it. ``log_path`` is a
    SQLite file (opened read-only: a monitor never writes to the server's log) or the
    ``postgresql://`` DSN that several replicas share. ``experiment``: only that experiment's
    responses, and those of unknown experiment ('', a log from before the column: ``since`` cuts those),
    not another experiment's logged at the same time; None: every response."""
    if is_postgres(log_path):
        import psycopg

        db = Database(log_path)  # no schema: reading only
        try:
            only, params = _only([r[0] for r in db.query(POSTGRES_COLUMNS, ("impressions",))], since, experiment)
            requests = db.frame(REQUESTS_SQL.format(**only), params)
            reactions = db.frame(REACTIONS_SQL.format(**only), params)
            try:
                empty = [db.frame(sql.format(**only), params) for sql in (EMPTY_REQUESTS_SQL, EMPTY_REACTIONS_SQL)]
            except psycopg.errors.UndefinedTable:  # a log from before empty responses were logged
                empty = []
        except psycopg.errors.UndefinedTable:  # no server has created the log's tables yet
            return pd.DataFrame(columns=REQUEST_COLUMNS)
        finally:
            db.close()
    else:
        path = Path(log_path)
        if not path.exists():
            return pd.DataFrame(columns=REQUEST_COLUMNS)
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            only, params = _only([r[0] for r in con.execute(SQLITE_COLUMNS, ("impressions",))], since, experiment)
            requests = pd.read_sql_query(REQUESTS_SQL.format(**only), con, params=params)
            reactions = pd.read_sql_query(REACTIONS_SQL.format(**only), con, params=params)
            try:
                empty = [
                    pd.read_sql_query(sql.format(**only), con, params=params)
                    for sql in (EMPTY_REQUESTS_SQL, EMPTY_REACTIONS_SQL)
                ]
            except pd.errors.DatabaseError as err:  # a log from before empty responses were logged
                if "no such table" not in str(err):
                    raise
                empty = []
        except pd.errors.DatabaseError as err:  # a log the server has not created its tables in yet
            if "no such table" in str(err):
                return pd.DataFrame(columns=REQUEST_COLUMNS)
            raise
        finally:
            con.close()
    # Without the empty responses, a user served only those vanished and a churn on one was dropped.
    if empty and not empty[0].empty:
        requests = pd.concat([requests, empty[0]], ignore_index=True)
        if not empty[1].empty:
            reactions = pd.concat([reactions, empty[1]], ignore_index=True)
    out = requests.merge(reactions, on="request_id", how="left")
    for column in ("clicks", "watch_seconds", "likes", "shares", "churned"):
        out[column] = out[column].fillna(0)
    out["churned"] = out["churned"].astype(bool)
    return out[REQUEST_COLUMNS]


def users_of(requests: pd.DataFrame) -> pd.DataFrame:
    """Per-user rows (``per_user``'s columns, less ``arm``) from ``logged_requests`` rows."""
    g = requests.groupby("user_id")
    return pd.DataFrame(
        {
            "requests": g.size(),
            "impressions": g["impressions"].sum(),
            "clicks": g["clicks"].sum(),
            "watch_seconds": g["watch_seconds"].sum(),
            "likes": g["likes"].sum(),
            "shares": g["shares"].sum(),
            "churned": g["churned"].any(),
        }
    ).reset_index()


def live_vs_holdout(
    requests: pd.DataFrame,
    alpha: float = 0.05,
    n_resamples: int = ab.PERMUTATIONS,
    min_users: int = ab.MIN_USERS,
    effect: float = MONITOR_EFFECT,
) -> pd.DataFrame:
    """For every model version that served users outside the holdout: those users vs the holdout's
    users over the same period (from the version's first to its last logged response), by
    ``holdout_tests``. One row per (version, metric): live and holdout values, the gap (live minus
    holdout), its interval and p-value, users per group, the minimum detectable effect.

    The same period, because users churn over time: a version that served only the last day must not
    be compared with a holdout that has had a week to churn. A user in both groups over that period (a
    log spanning two experiments whose holdout salts differ, which reshuffles the holdout) is in neither.

    One model version on the holdout side: ``holdout_version`` is the version that served the holdout
    at the end of the period. Where the holdout was served by another version earlier in it (an
    experiment started with a new control moved the holdout along), the comparison starts after that
    version's last holdout response, for both groups: before 2026-12-07 the holdout's users were
    pooled over both versions, a yardstick of two models that the table did not name.

    ``p_value`` is a one-look test, right for a report read once. A monitor recomputes the comparison
    every minute for weeks, and alerting on that p-value fires sooner or later with equal models
    (17-19% of A/A runs within 30 days per metric, docs/monitoring.md). ``sequential_p_value`` is what
    an alert may watch: the larger of ``p_value`` and the always-valid p-value of the gap
    (``ab.always_valid_p_value``, tuned to a gap of ``effect`` times the larger group value) times the
    number of metrics (Bonferroni: the alert watches all three)."""
    columns = [
        "version",
        "metric",
        "live",
        "holdout",
        "difference",
        "ci_low",
        "ci_high",
        "p_value",
        "sequential_p_value",
        "min_detectable_effect",
        "method",
        "users_live",
        "users_holdout",
        "holdout_version",
        "since",
        "until",
    ]
    if requests.empty:
        return pd.DataFrame(columns=columns)
    in_holdout = requests["arm"] == HOLDOUT
    held, live = requests[in_holdout], requests[~in_holdout]
    rows = []
    for version, served in live.groupby("model_version"):
        since, until = float(served["ts"].min()), float(served["ts"].max())
        same_period = held[(held["ts"] >= since) & (held["ts"] <= until)]
        holdout_version = ""
        if not same_period.empty:
            holdout_version = str(same_period.loc[same_period["ts"].idxmax(), "model_version"])
            other = same_period[same_period["model_version"].astype(str) != holdout_version]
            if not other.empty:  # the holdout moved to another version during the period: its last stretch only
                start = float(other["ts"].max())
                same_period, served = same_period[same_period["ts"] > start], served[served["ts"] > start]
                since = float(served["ts"].min())
        # A log spanning two holdout salts (each reshuffles the holdout) holds users held out under one
        # and live under the other: in both groups they are no independent sample of either, so left out.
        both = np.intersect1d(same_period["user_id"].unique(), served["user_id"].unique())
        same_period, served = (r[~r["user_id"].isin(both)] for r in (same_period, served))
        h, v = users_of(same_period), users_of(served)
        if len(h) < min_users:
            results = [
                ab.TestResult(m, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, ab.TOO_FEW)
                for m in HOLDOUT_METRICS
            ]
        else:
            results = holdout_tests(h, v, alpha, n_resamples)
        for r in results:
            rows.append(
                {
                    "version": str(version),
                    "metric": r.metric,
                    "live": r.treatment,
                    "holdout": r.control,
                    "difference": r.difference,
                    "ci_low": r.ci_low,
                    "ci_high": r.ci_high,
                    "p_value": r.p_value,
                    "sequential_p_value": sequential_p_value(r, effect, len(results)),
                    "min_detectable_effect": r.min_detectable_effect,
                    "method": r.method,
                    "users_live": len(v),
                    "users_holdout": len(h),
                    "holdout_version": holdout_version,
                    "since": since,
                    "until": until,
                }
            )
    return pd.DataFrame(rows, columns=columns)


def sequential_p_value(result: ab.TestResult, effect: float, metrics: int) -> float:
    """``live_vs_holdout``'s ``sequential_p_value`` of one metric's comparison (``sequential_p``)."""
    scale = max(abs(result.control), abs(result.treatment))
    return float(sequential_p(result.p_value, result.difference, result.std_error, scale, effect, metrics))


def sequential_p(p_value, difference, std_error, scale, effect: float, metrics: int):
    """Valid at every look (the always-valid p-value, Bonferroni over ``metrics``) and never below the
    one-look ``p_value``, which also guards the small holdout where the normal approximation is
    anti-conservative. The mixture's spread is ``effect`` times ``scale``, the larger group value
    (the holdout's may be 0: retention when every holdout user churned); both groups at 0 is no gap.
    Scalars or arrays (one value per look: ``benchmarks/benchmark_holdout_alert.py``)."""
    p_value, scale = np.asarray(p_value, dtype=float), np.asarray(scale, dtype=float)
    always = ab.always_valid_p_value(difference, std_error, effect * scale)
    with np.errstate(invalid="ignore"):
        out = np.maximum(p_value, np.minimum(1.0, metrics * always))
        out = np.where(np.isfinite(p_value) & np.isfinite(scale) & (scale == 0), 1.0, out)
    return float(out) if out.ndim == 0 else out


# How long after the log's latest live response a version that served none of it stops being exported.
RETIRED_AFTER_S = 3600.0


class HoldoutMonitor:
    """``live_vs_holdout`` of the server's feedback log as Prometheus metrics, for a sidecar exporter
    (``scripts/monitor.py``). Recomputed at most every ``interval_s`` however often it is scraped;
    ``window_s`` limits it to the last so many seconds of the log (None: the whole log).

        online_holdout_value{version, metric, group="live"|"holdout"}  the metric per group
        online_holdout_p_value{version, metric}                         the test of the gap, one look
        online_holdout_sequential_p_value{version, metric}              valid at every look (the alert's)
        online_holdout_min_detectable_effect{version, metric}           at the current sizes
        online_holdout_users{version, group}                            users per group
        online_holdout_updated_timestamp_seconds                        when it was last computed

    Each per-version series also carries ``holdout_version``, the model version the holdout was served
    by in the comparison (``live_vs_holdout``).

    A version whose last live response is more than ``retired_after_s`` older than the log's latest
    one (a rollout or rollback moved the live users on) drops out of the export: its comparison no
    longer changes, and a LiveBelowHoldout firing on it kept firing for a model nothing served.
    Relative to the log, not the clock, so a quiet night drops nothing (None: keep every version).

    The gap itself (live minus holdout) and the alert are Prometheus rules
    (``monitoring/prometheus/funnel-alerts.yml``). Per-user spreads, which a valid test needs, are not
    in the server's counters (they are per arm totals), hence a reader of the log."""

    def __init__(
        self,
        log_path: str | Path,
        window_s: float | None = None,
        interval_s: float = 60.0,
        alpha: float = 0.05,
        n_resamples: int = ab.PERMUTATIONS,
        effect: float = MONITOR_EFFECT,
        retired_after_s: float | None = RETIRED_AFTER_S,
    ):
        self.log_path = log_path if is_postgres(log_path) else Path(log_path)
        self.effect = effect
        self.retired_after_s = retired_after_s
        self.window_s = window_s
        self.interval_s = interval_s
        self.alpha = alpha
        self.n_resamples = n_resamples
        self._lock = threading.Lock()
        self._table: pd.DataFrame | None = None
        self._updated = 0.0
        self.last_error: str | None = None

    def table(self) -> pd.DataFrame:
        with self._lock:  # one computation at a time, however many scrapes arrive
            now = time.time()
            if self._table is None or now - self._updated >= self.interval_s:
                since = now - self.window_s if self.window_s else 0.0
                table = live_vs_holdout(
                    logged_requests(self.log_path, since), self.alpha, self.n_resamples, effect=self.effect
                )
                if self.retired_after_s is not None and not table.empty:
                    table = table[table["until"] >= table["until"].max() - self.retired_after_s]
                self._table = table.reset_index(drop=True)
                self._updated = now
            return self._table

    def exposition(self) -> str:
        from serving.metrics import render_metrics

        try:
            table = self.table()
        except Exception as err:  # a log being rotated, a locked file: report it, keep serving the rest
            self.last_error = f"{type(err).__name__}: {err}"
            # The time of the last comparison that worked (0: none) stays exported, so its age grows and
            # HoldoutMonitorDown fires while the comparison keeps failing (without it, it never could).
            return render_metrics(
                [
                    ("online_holdout_errors", "gauge", "The last holdout comparison failed", [({}, 1)]),
                    (
                        "online_holdout_updated_timestamp_seconds",
                        "gauge",
                        "When the comparison was computed",
                        [({}, self._updated)],
                    ),
                ]
            )
        self.last_error = None
        values, p_values, sequential, mde, users = [], [], [], [], {}
        for row in table.itertuples():
            # The holdout's model version is part of each series: a comparison against another one is another series.
            version = {"version": row.version, "holdout_version": row.holdout_version}
            labels = {**version, "metric": row.metric}
            values += [({**labels, "group": "live"}, row.live), ({**labels, "group": "holdout"}, row.holdout)]
            p_values.append((labels, row.p_value))
            sequential.append((labels, row.sequential_p_value))
            mde.append((labels, row.min_detectable_effect))
            users[row.version] = [
                ({**version, "group": "live"}, row.users_live),
                ({**version, "group": "holdout"}, row.users_holdout),
            ]
        return render_metrics(
            [
                (
                    "online_holdout_value",
                    "gauge",
                    "Live users' and the holdout's metric, per live model version",
                    values,
                ),
                ("online_holdout_p_value", "gauge", "p-value of the live-minus-holdout gap (users as unit)", p_values),
                (
                    "online_holdout_sequential_p_value",
                    "gauge",
                    "p-value of the gap valid however often it is recomputed (always valid, over the three metrics)",
                    sequential,
                ),
                (
                    "online_holdout_min_detectable_effect",
                    "gauge",
                    "Smallest gap the comparison finds with 80% power at its current sizes",
                    mde,
                ),
                ("online_holdout_users", "gauge", "Users per group of the comparison", sum(users.values(), [])),
                (
                    "online_holdout_updated_timestamp_seconds",
                    "gauge",
                    "When the comparison was computed",
                    [({}, self._updated)],
                ),
                ("online_holdout_errors", "gauge", "The last holdout comparison failed", [({}, 0)]),
            ]
        )
