"""Objective weights from retention: which offline signals go with users coming back, and the heavy
ranker's head weights that follow from it.

Churn is only measurable online; clicks, watch time, likes and shares are what the rankers can be
trained on. So, from a feedback log of the online loop (``online/feedback_log.py``), per user:

* the rate of each **offline-measurable signal** per impression: clicks, watch seconds, the
  duration-aware watch (clicked and watched at least the median fraction of clicks on items of the same
  duration bucket: the rule ``workflows/labels.py`` ``DurationAwareWatch`` learns, learned here
  from the log), likes and shares;
* whether the user **came back**: no ``churn`` event (a churned user stops asking, so one per user).

Then ``analyze_retention``: the simple (point-biserial) correlation of each rate with coming back,
with a Fisher-z 95% interval, and logistic regressions of coming back on the **standardised** rates
(one standard deviation across users each, so the coefficients are comparable; fitted by iteratively
reweighted least squares with Wald 95% intervals from the inverse Fisher information): one over all
signals (the full picture), one over the signals the heavy ranker has heads for (the rule's input:
a head's weight should reflect what its signal adds given the other heads').

The rule, ``derive_head_weights`` (pure):

    w_h  proportional to  beta_h   if the 95% interval of beta_h lies above 0 (significantly positive)
    w_h  = 0                       otherwise (interval includes 0, negative, or no measurement; no
                                   coefficient either for a signal that is a linear combination of
                                   the other heads' signals across users)
    normalised to sum 1; if no head qualifies, the current weights are kept and the reason says so.
    A regression that does not converge (separated data, or two signals so nearly collinear that the
    data cannot tell them apart: no finite optimum) reports no intervals, so no head qualifies. A pair
    of signals nearly collinear across users (|r| >= ``COLLINEAR_R``) that the fit kept is named in the
    notes with r and its variance inflation factor: their intervals are wide, so neither may qualify.

Why coefficients of a joint fit rather than correlations: clicks, watch time and duration-aware
watches move together (a watch needs a click), so each correlates with retention through the others;
the joint coefficient is what one head adds at fixed values of the rest, which is what its weight in
a sum does. Why only significant positive ones: a head whose link to retention cannot be told from
noise, or is negative, should not be optimised for on the strength of this analysis.

``with_head_weights`` publishes the same trained models as a new registry version with other head
weights (the heavy ranker combines its heads at serving, ``serving/stages.py`` ``HeavyRanker``), so
the A/B test (``online/ab_experiment.py`` ``serve_ab_test``) can put today's weights against the
derived ones without retraining; ``run_retention_weights`` (``scripts/retention_weights.py``) runs the
whole chain: simulate -> analyse -> derive -> A/B -> verdict.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats

# The offline-measurable signals, as per-impression rates per user. Heads of the heavy ranker are
# matched to them by name (a head with another name gets no measurement and so weight 0).
SIGNALS = ("click", "watch_seconds", "duration_watch", "like", "share")
OUTCOME = "returned"
# Two signals whose rates correlate at least this much across users (|r|; a pair's variance inflation
# factor 1 / (1 - r^2) >= 50, standard errors 7x those of uncorrelated signals) get a note naming them.
COLLINEAR_R = 0.99


# --------------------------------------------------------------------------------------------------
# Per-user signals from a feedback log


def duration_watch_thresholds(
    fraction: np.ndarray, duration: np.ndarray, bucket_edges=(60.0, 300.0, 1200.0), quantile: float = 0.5
) -> np.ndarray:
    """Per duration bucket, the ``quantile`` of the watch fraction of clicked impressions (the overall
    quantile for a bucket without clicks): ``DurationAwareWatch``'s thresholds, from arrays."""
    fraction, duration = np.asarray(fraction, dtype=np.float64), np.asarray(duration, dtype=np.float64)
    bucket = np.searchsorted(np.asarray(bucket_edges, dtype=np.float64), duration, side="right")
    overall = float(np.quantile(fraction, quantile)) if fraction.size else 1.0
    return np.array(
        [
            float(np.quantile(fraction[bucket == b], quantile)) if (bucket == b).any() else overall
            for b in range(len(bucket_edges) + 1)
        ]
    )


def per_user_signals(
    impressions: pd.DataFrame,
    feedback: pd.DataFrame,
    durations: pd.Series,
    bucket_edges=(60.0, 300.0, 1200.0),
    quantile: float = 0.5,
    arm: str | None = None,
    model_version: str | int | None = None,
) -> pd.DataFrame:
    """One row per user: ``requests``, ``impressions``, the rate of each of ``SIGNALS`` per impression,
    and ``returned`` (no churn event). ``durations`` maps item id to duration in seconds.

    ``impressions`` and ``feedback`` are ``FeedbackLog.impressions()`` / ``.feedback()``.

    ``arm``: analyse only the users served by that arm (the ``arm`` column of the impressions) and the
    feedback to that arm's responses. A log of several arms (an A/B test's, the feedback loop's live
    and holdout) is refused without one: each arm's ranker shapes both the signals and coming back, so
    pooled users relate the arms' differences to retention, not the signals'. Impressions of several
    model versions (a log spanning a rollout, or a promotion) are refused too, unless one is named.

    ``model_version``: analyse only the impressions served by that version (the ``model_version``
    column, compared as text) and the feedback to those responses; the arm check then applies to its
    rows (a version that served one arm needs no ``arm``). A user has no per-impression rate without an
    impression, so users whose responses were all empty are not rows."""
    from online.feedback_log import signals_per_item

    if impressions.empty:
        raise ValueError("the feedback log has no impressions to analyse")
    of_version = ""
    if model_version is not None:
        if "model_version" not in impressions.columns:
            raise ValueError("the impressions have no 'model_version' column to select a model version by")
        served = impressions["model_version"].astype(str)
        wanted = served == str(model_version)
        if not wanted.any():
            versions = sorted(served.unique().tolist(), key=lambda v: (len(v), v))
            raise ValueError(
                f"no impressions of model version {str(model_version)!r} in the log (versions: {versions})"
            )
        other = impressions.loc[~wanted, "request_id"].unique()
        impressions = impressions[wanted]
        feedback = feedback[~feedback["request_id"].isin(other)]
        of_version = f" of model version {str(model_version)!r}"
    arms = sorted(impressions["arm"].unique().tolist()) if "arm" in impressions.columns else []
    if arm is not None:
        if arm not in arms:
            raise ValueError(f"no impressions{of_version} of arm {arm!r} in the log's 'arm' column (arms: {arms})")
        other = impressions.loc[impressions["arm"] != arm, "request_id"].unique()
        impressions = impressions[impressions["arm"] == arm]
        # A churn after one of the arm's empty responses has no impression row: kept, by user, as before.
        feedback = feedback[~feedback["request_id"].isin(other)]
    elif len(arms) > 1:
        raise ValueError(
            f"the log's 'arm' column holds {len(arms)} arms {arms}{of_version}: their rankers differ, so pooling "
            "them relates the arms' differences to retention; name one (arm=..., e.g. the control arm)"
        )
    # The same holds within an arm that served two model versions (a rollout or a promotion in the log).
    versions = sorted(impressions["model_version"].astype(str).unique()) if "model_version" in impressions else []
    if len(versions) > 1:
        raise ValueError(
            f"the impressions analysed were served by {len(versions)} model versions {versions} (a rollout within "
            "the log?): their rankers differ, so pooling them relates the versions' differences to retention; "
            "name one (model_version=..., e.g. the version serving now)"
        )
    shown = impressions[["request_id", "user_id", "item_id"]].drop_duplicates(["request_id", "item_id"])
    per_item = signals_per_item(feedback)  # click, watch_seconds, like, share
    rows = shown.join(per_item, on=["request_id", "item_id"]).fillna(
        {"click": 0.0, "watch_seconds": 0.0, "like": 0.0, "share": 0.0}
    )
    duration = rows["item_id"].map(durations)
    if duration.isna().any():
        missing = sorted(rows.loc[duration.isna(), "item_id"].unique()[:5].tolist())
        raise ValueError(f"no duration for served item(s) {missing}...; pass every served item's duration")
    duration = duration.to_numpy(dtype=np.float64)
    fraction = rows["watch_seconds"].to_numpy() / np.maximum(duration, 1.0)
    clicked = rows["click"].to_numpy() > 0
    thresholds = duration_watch_thresholds(fraction[clicked], duration[clicked], bucket_edges, quantile)
    bucket = np.searchsorted(np.asarray(bucket_edges, dtype=np.float64), duration, side="right")
    rows["duration_watch"] = (clicked & (fraction >= thresholds[bucket])).astype(np.float64)

    g = rows.groupby("user_id")
    users = pd.DataFrame({"requests": g["request_id"].nunique(), "impressions": g.size()})
    for signal in SIGNALS:
        users[signal] = g[signal].sum() / users["impressions"]
    churned = set(feedback.loc[feedback["event"] == "churn", "user_id"].astype(np.int64))
    users[OUTCOME] = ~users.index.isin(list(churned))
    return users.reset_index()


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class LogitFit:
    """A logistic regression's coefficients (intercept first) with Wald standard errors."""

    names: list[str]
    coef: np.ndarray
    se: np.ndarray
    converged: bool
    iterations: int
    n: int
    aliased: list[str] = field(default_factory=list)  # linear combinations of earlier columns: coef and se NaN

    def table(self, z: float = stats.norm.ppf(0.975)) -> pd.DataFrame:
        out = pd.DataFrame({"signal": self.names, "coef": self.coef, "se": self.se})
        out["ci_low"], out["ci_high"] = self.coef - z * self.se, self.coef + z * self.se
        with np.errstate(over="ignore"):  # a fit that did not converge can run off: its odds ratio is inf
            out["odds_ratio"] = np.exp(self.coef)
        out["p_value"] = 2 * stats.norm.sf(np.abs(self.coef / np.where(self.se > 0, self.se, np.nan)))
        return out


def logistic_regression(X: np.ndarray, y: np.ndarray, names: list[str], max_iter: int = 50, tol: float = 1e-8):
    """Maximum-likelihood logistic regression with an intercept, by IRLS (Newton's method).

    Standard errors from the inverse Fisher information at the optimum. Perfectly separated data has
    no finite optimum: the fit stops at ``max_iter`` with ``converged=False`` and huge intervals.

    A column that is a linear combination of the intercept and the earlier columns (one signal a
    multiple of another across users, or more columns than users) has no coefficient of its own: it is
    left out of the fit and listed in ``aliased`` with coefficient and standard error NaN, as R's
    ``glm`` does. Fitted with it, the minimum-norm solution split the effect between the aliased
    columns and the pseudo-inverse gave each a small, finite standard error: significant-looking
    intervals for coefficients the data cannot tell apart."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, p) with n = len(y); got {X.shape} and {len(y)}")
    full = np.column_stack([np.ones(len(X)), X])
    kept = [0]
    for j in range(1, full.shape[1]):
        basis = full[:, kept]
        residual = full[:, j] - basis @ np.linalg.lstsq(basis, full[:, j], rcond=None)[0]
        if np.linalg.norm(residual) > 1e-8 * np.linalg.norm(full[:, j]):
            kept.append(j)
    A = full[:, kept]
    beta = np.zeros(A.shape[1])
    converged, iterations = False, 0
    while iterations < max_iter:
        iterations += 1
        p = special.expit(A @ beta)
        w = np.sqrt(np.clip(p * (1 - p), 1e-12, None))
        # The Newton step as weighted least squares on sqrt(W) A, not by solving A'WA: the normal
        # equations square A's condition number, and lstsq's cutoff then dropped the direction that
        # told two nearly collinear columns apart (relative residual a few 1e-8, kept by the check above)
        # and gave the minimum-norm split with tight intervals. Now such a fit does not converge.
        step = np.linalg.lstsq(A * w[:, None], (y - p) / w, rcond=None)[0]
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            converged = True
            break
    p = special.expit(A @ beta)
    # (A'WA)^-1 = R^-1 R^-T from the QR of sqrt(W) A, for the same reason; A has full column rank here.
    r = np.linalg.qr(A * np.sqrt(np.clip(p * (1 - p), 1e-12, None))[:, None], mode="r")
    r_inv = np.linalg.solve(r, np.eye(len(r)))
    se = np.sqrt(np.sum(r_inv**2, axis=1))
    all_names = ["intercept", *names]
    coef, se_all = np.full(full.shape[1], np.nan), np.full(full.shape[1], np.nan)
    coef[kept], se_all[kept] = beta, se
    aliased = [all_names[j] for j in range(full.shape[1]) if j not in kept]
    return LogitFit(all_names, coef, se_all, converged, iterations, len(y), aliased)


def correlation_with_ci(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Pearson correlation, its Fisher-z 95% interval and p-value (``nan`` for a constant column)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    # Constant means every value equal: the std of 300 floats 0.1 is 1.4e-17, not 0 (the mean is not exactly 0.1).
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    r = float(np.corrcoef(x, y)[0, 1])
    r_c = float(np.clip(r, -0.999999, 0.999999))
    half = stats.norm.ppf(0.975) / np.sqrt(n - 3)
    z = np.arctanh(r_c)
    p = float(2 * stats.norm.sf(abs(z) * np.sqrt(n - 3)))
    return r, float(np.tanh(z - half)), float(np.tanh(z + half)), p


@dataclass
class RetentionAnalysis:
    users: int
    returned_share: float
    signals: list[str]
    correlations: pd.DataFrame  # signal, mean, std, r, ci_low, ci_high, p_value
    all_signals: pd.DataFrame  # joint logistic regression over every signal (standardised)
    heads: pd.DataFrame  # joint logistic regression over the signals the heavy ranker has heads for
    head_signals: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "users": self.users,
            "returned_share": self.returned_share,
            "signals": self.signals,
            "head_signals": self.head_signals,
            "correlations": self.correlations.to_dict(orient="records"),
            "logit_all_signals": self.all_signals.to_dict(orient="records"),
            "logit_head_signals": self.heads.to_dict(orient="records"),
            "notes": self.notes,
        }


def _standardised_fit(
    users: pd.DataFrame, signals: list[str], notes: list[str], rule_input: bool = False
) -> pd.DataFrame:
    usable = [s for s in signals if np.ptp(users[s].to_numpy(dtype=np.float64)) > 0]  # not std: see correlation_with_ci
    # In the signals' order: a set's order changes with PYTHONHASHSEED, so two runs' retention.json differed.
    for s in (s for s in signals if s not in usable):
        notes.append(f"{s}: the same rate for every user; left out of the regression")
    if not usable:
        return pd.DataFrame(columns=["signal", "coef", "se", "ci_low", "ci_high", "odds_ratio", "p_value"])
    X = users[usable].to_numpy(dtype=np.float64)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    fit = logistic_regression(X, users[OUTCOME].to_numpy(), usable)
    if fit.aliased:
        notes.append(
            f"{fit.aliased}: a linear combination of the other signals of {usable} across users, so no "
            "coefficient of its own (NaN; the rule gives such a head 0)"
        )
    # Nearly collinear pairs the fit kept (not aliased): their standard errors are inflated by
    # sqrt(1 / (1 - r^2)) (the variance inflation factor of a pair), so their intervals are wide and
    # the rule gives both 0 with nothing else to say why; named here.
    corr = np.corrcoef(X, rowvar=False) if len(usable) > 1 else np.ones((1, 1))
    for i, j in zip(*np.triu_indices(len(usable), k=1)):
        a, b = usable[i], usable[j]
        if a in fit.aliased or b in fit.aliased or not abs(corr[i, j]) >= COLLINEAR_R:
            continue
        vif = 1.0 / max(1.0 - corr[i, j] ** 2, np.finfo(float).tiny)
        consequence = "so the rule may give neither head weight" if rule_input else "(not the rule's input)"
        notes.append(
            f"{a} and {b} are nearly collinear across users (r = {corr[i, j]:+.5f}, |r| >= {COLLINEAR_R}; variance "
            f"inflation {vif:.3g}): the regression can hardly tell them apart: their intervals are wide, "
            f"{consequence}"
        )
    table = fit.table()
    if not fit.converged:
        # Separated data (every user who liked came back, say): the separating coefficient runs off with a
        # huge Wald interval that includes 0, so the rule gave the strongest signal 0 and the rest all the
        # weight. No intervals then: the rule keeps the current weights.
        # Only the head-signal fit is the rule's input: the all-signals fit not converging changes no weight.
        consequence = "so the rule keeps the current weights" if rule_input else "(not the rule's input)"
        notes.append(
            f"logistic regression on {usable} did not converge (separated data, or nearly collinear signals?): "
            f"no intervals, {consequence}"
        )
        table[["ci_low", "ci_high", "p_value"]] = np.nan
    return table[table["signal"] != "intercept"].reset_index(drop=True)


def analyze_retention(
    users: pd.DataFrame, head_signals: list[str] | None = None, signals: tuple[str, ...] = SIGNALS
) -> RetentionAnalysis:
    """Correlations and standardised logistic regressions of ``returned`` on the per-user rates
    (``per_user_signals``). ``head_signals``: the signals the heavy ranker has heads for (default:
    click, duration_watch, like)."""
    # None is "not given"; [] is a heavy ranker with no measured head (its head regression is empty).
    if head_signals is None:
        head_signals = ["click", "duration_watch", "like"]
    head_signals = [s for s in head_signals if s in signals]
    # A missing value is no measurement: a NaN rate read as "the same rate for every user" (np.ptp is NaN)
    # and was left out with that note, its correlation NaN; a NaN outcome was True for the correlations
    # (astype(bool)) and NaN for the regression, whose IRLS then failed with a LinAlgError.
    bad = [s for s in signals if not np.isfinite(users[s].to_numpy(dtype=np.float64)).all()]
    if users[OUTCOME].isna().any():
        bad.append(OUTCOME)
    if bad:
        raise ValueError(
            f"{bad}: missing or non-finite values for some users (per_user_signals gives every user a value); "
            "drop or fill those users first"
        )
    y = users[OUTCOME].astype(bool).to_numpy()
    notes: list[str] = []
    if y.all() or not y.any():
        raise ValueError(
            f"every one of the {len(y)} users {'returned' if y.all() else 'churned'}: "
            "retention cannot be related to anything (simulate more days or more users)"
        )
    rows = []
    for s in signals:
        r, lo, hi, p = correlation_with_ci(users[s].to_numpy(), y)
        rows.append(
            {
                "signal": s,
                "mean": users[s].mean(),
                "std": users[s].std(),
                "r": r,
                "ci_low": lo,
                "ci_high": hi,
                "p_value": p,
            }
        )
    return RetentionAnalysis(
        users=len(users),
        returned_share=float(y.mean()),
        signals=list(signals),
        correlations=pd.DataFrame(rows),
        all_signals=_standardised_fit(users, list(signals), notes),
        heads=_standardised_fit(users, head_signals, notes, rule_input=True),
        head_signals=head_signals,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# The rule


@dataclass
class WeightDecision:
    weights: dict[str, float]  # what the heavy ranker should use (sums to 1)
    changed: bool  # False: the current weights were kept
    reason: str
    evidence: dict[str, dict] = field(default_factory=dict)  # per head: coef, ci, used or why not


def _rounded_shares(raw: dict[str, float], decimals: int) -> dict[str, float]:
    """``raw`` normalised to sum 1 and rounded to ``decimals``; the largest absorbs the rounding."""
    total = sum(raw.values())
    weights = {h: round(w / total, decimals) for h, w in raw.items()}
    largest = max(weights, key=weights.get)
    weights[largest] = round(weights[largest] + 1.0 - sum(weights.values()), decimals)
    return weights


def derive_head_weights(coefficients: pd.DataFrame, current: dict[str, float], decimals: int = 3) -> WeightDecision:
    """The heavy ranker's head weights from standardised retention coefficients (the module's rule).

    ``coefficients``: rows with ``signal``, ``coef``, ``ci_low``, ``ci_high`` (``analyze_retention``'s
    ``heads`` table); ``current``: today's ``{head: weight}`` (finite, >= 0, not all 0: else ValueError),
    whose heads are the ones weighed.
    A head gets weight proportional to its coefficient when its 95% interval lies above 0, else 0;
    the weights are normalised to sum 1 and rounded to ``decimals`` (the largest absorbs the rounding).
    No qualifying head: the current weights are kept, and ``reason`` says so."""
    if not current:
        raise ValueError("current weights must name at least one head")
    # As the config and with_head_weights require: all 0 divided by zero when compared with the derived
    # weights (ZeroDivisionError), and with no qualifying head was "kept" as weights that do not sum to 1;
    # a NaN weight read as a change and was kept as NaN.
    if not all(0 <= float(w) < float("inf") for w in current.values()) or sum(current.values()) <= 0:
        raise ValueError(f"current head weights must be finite, >= 0 and not all 0, got {current}")
    by_signal = {str(r["signal"]): r for r in coefficients.to_dict(orient="records")}
    raw, evidence = {}, {}
    for head in current:
        row = by_signal.get(head)
        if row is None:
            evidence[head] = {"used": False, "why": "no measured signal of this name"}
            raw[head] = 0.0
            continue
        coef, lo, hi = float(row["coef"]), float(row["ci_low"]), float(row["ci_high"])
        ok = bool(np.isfinite(lo) and lo > 0)
        why = "significantly positive" if ok else ("interval includes 0" if lo <= 0 <= hi else "negative")
        if not np.isfinite(lo):
            why = "no interval"
        evidence[head] = {"coef": coef, "ci_low": lo, "ci_high": hi, "used": ok, "why": why}
        raw[head] = coef if ok else 0.0
    total = sum(raw.values())
    if total <= 0:
        return WeightDecision(
            dict(current),
            False,
            "no head's signal is significantly positively related to retention (every 95% interval includes 0, "
            "is negative or is missing): the current weights are kept",
            evidence,
        )
    weights = _rounded_shares(raw, decimals)
    used = [h for h in raw if raw[h] > 0]
    # Compared as the heavy ranker uses them, normalised to sum 1: current weights 2 : 0 : 0 are the
    # derived 1 : 0 : 0, and calling them a change started an A/B test of two identical scores. Both
    # rounded alike: current 1 : 1 : 1 rounded plainly (0.333 each) differed from the derived equal
    # thirds, whose largest absorbs the rounding (0.334, 0.333, 0.333), and read as a change.
    return WeightDecision(
        weights,
        weights != _rounded_shares({h: float(w) for h, w in current.items()}, decimals),
        f"weights proportional to the significantly positive standardised coefficients of {used}; "
        f"0 for {[h for h in raw if raw[h] == 0] or 'none'}",
        evidence,
    )


# --------------------------------------------------------------------------------------------------
# A registry version with other head weights (same trained models)


def with_head_weights(model, registry_dir: str | Path, weights: dict[str, float], note: str = ""):
    """Publish ``model``'s trained parts as a new version of ``registry_dir`` whose heavy ranker
    combines its heads with ``weights`` (heads it has, weights finite and >= 0, not all 0); return it.

    Only the manifest's ``heavy_ranker.weights`` (what serving reads) and its record of the config
    change; the version stamps of the parts that carry one are rewritten to the new version, which
    ``models.registry.check_artifact_versions`` then accepts."""
    from models.item_affinity import META_FILE as AFFINITY_META
    from models.item_index import INDEX_META_FILE
    from models.registry import MANIFEST, ModelVersion, VersionWriter

    manifest = model.manifest
    heads = list(manifest["heavy_ranker"]["weights"])
    unknown = sorted(set(weights) - set(heads))
    if unknown:
        raise ValueError(f"the heavy ranker of version {model.version} has no head(s) {unknown}; heads: {heads}")
    # Not `w < 0`: NaN passes it (and inf normalises to inf / inf = NaN), publishing NaN scores.
    if not all(0 <= w < float("inf") for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"head weights must be finite, >= 0 and not all 0, got {weights}")
    total = float(sum(weights.values()))
    new = {h: float(weights.get(h, 0.0)) / total for h in heads}
    with VersionWriter(registry_dir) as out:
        for entry in Path(model.path).iterdir():
            if entry.name == MANIFEST:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, out.tmp / entry.name)
        for stamp in ("query_tower.json", INDEX_META_FILE, AFFINITY_META):
            path = out.tmp / stamp
            if path.exists():
                meta = json.loads(path.read_text())
                meta["version"] = out.version
                path.write_text(json.dumps(meta))
        fields = {k: v for k, v in manifest.items() if k not in ("version", "created_at")}
        fields["heavy_ranker"] = {**manifest["heavy_ranker"], "weights": new}
        config = json.loads(json.dumps(manifest.get("config", {})))
        if "heavy_ranker" in config:
            config["heavy_ranker"]["targets"] = [{"name": h, "weight": w} for h, w in new.items()]
        fields["config"] = config
        fields["reweighted_from"] = {"version": int(model.version), "note": note}
        out.write_manifest(**fields)
    return ModelVersion(Path(registry_dir) / str(out.version))


# --------------------------------------------------------------------------------------------------
# Report


def coefficient_table(analysis: RetentionAnalysis) -> pd.DataFrame:
    """One row per signal: correlation with its interval, and both regressions' coefficients."""
    corr = analysis.correlations.set_index("signal")

    def fmt(t, s):
        row = t[t["signal"] == s]
        if row.empty:
            return ""
        r = row.iloc[0]
        return f"{r['coef']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"

    return pd.DataFrame(
        [
            {
                "signal": s,
                "mean per impression": corr.loc[s, "mean"],
                "r with returning [95% CI]": f"{corr.loc[s, 'r']:+.3f} [{corr.loc[s, 'ci_low']:+.3f}, "
                f"{corr.loc[s, 'ci_high']:+.3f}]",
                "logit, all signals [95% CI]": fmt(analysis.all_signals, s),
                "logit, head signals [95% CI]": fmt(analysis.heads, s),
            }
            for s in analysis.signals
        ]
    )


def write_retention_report(result: dict, out_dir: str | Path, analysis: RetentionAnalysis) -> dict[str, Path]:
    """``retention.json`` (everything in ``result``) and ``retention.md`` (the tables and the verdict)."""
    from evaluation.report import json_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Standard JSON: a coefficient the data cannot give (an aliased or constant signal) is null, not
    # Python's NaN, which jq, JavaScript's JSON.parse and most JSON readers refuse.
    (out / "retention.json").write_text(json_text(result))
    md = [
        "# Objective weights from retention",
        "",
        f"{analysis.users} users, {analysis.returned_share:.1%} came back every day of the log "
        "(coefficients: log-odds of returning per standard deviation of the rate across users).",
        "",
        coefficient_table(analysis).to_markdown(index=False, floatfmt=".4f"),
        "",
    ]
    if analysis.notes:
        md += ["**Notes**:", "", *(f"- {note}" for note in analysis.notes), ""]
    decision = result.get("derived")
    if decision:
        md += [f"**Rule**: {decision['reason']}.", "", f"Derived weights: `{json.dumps(decision['weights'])}`", ""]
    if result.get("verdict"):
        md += [f"**Verdict**: {result['verdict']}", ""]
    (out / "retention.md").write_text("\n".join(md))
    return {"json": out / "retention.json", "markdown": out / "retention.md"}


# --------------------------------------------------------------------------------------------------
# The whole chain


def simulate_in_process(world, config, repo: Path, version: int, log_path: Path, users=None, simulation=None):
    """Simulated users served in-process by ``version``'s exported funnel (one arm), logged to
    ``log_path``; returns the simulator's outcome rows."""
    from types import SimpleNamespace

    from evaluation.offline import opened_funnel, run_funnel
    from online.feedback_log import FeedbackLog
    from online.simulator import UserSimulator

    # In-process stages (one SQLite connection, one TF graph each) are called from one thread.
    sim_cfg = dataclasses.replace(simulation or config.online.simulation, concurrency=1)
    # An exploring ordering stage (``serving.ordering.exploration_temperature`` > 0) draws from the
    # simulation's seed, as the feedback loop's do: served, it draws from fresh entropy, and the log
    # (so the analysis and the derived weights) differed between two runs with the same seeds.
    with opened_funnel(repo, version, seed=sim_cfg.seed) as stages:

        def recommend(user, k, arm):
            out = run_funnel(stages, int(user), k)
            return SimpleNamespace(
                item_ids=out["item_ids"],
                model_version=str(out["model_version"][0].decode()),
                served_by=out["served_by"][0].decode(),
            )

        population = world.users["user_id"].to_numpy() if users is None else np.asarray(users)
        log = FeedbackLog(log_path)
        try:
            return UserSimulator(world, config.synthetic, sim_cfg).run(population, recommend, lambda u: "control", log)
        finally:
            log.close()


def analyze_log(
    log_path: Path,
    world,
    config,
    head_signals: list[str],
    arm: str | None = None,
    model_version: str | int | None = None,
) -> tuple[pd.DataFrame, RetentionAnalysis]:
    """``per_user_signals`` and ``analyze_retention`` of the log at ``log_path``, of arm ``arm`` and
    model version ``model_version`` (a log of several arms is refused without an arm, one whose arm was
    served by several model versions, a log spanning a rollout or a promotion, without a version)."""
    from online.feedback_log import FeedbackLog

    log = FeedbackLog(log_path)
    try:
        impressions, feedback = log.impressions(), log.feedback()
    finally:
        log.close()
    durations = world.items.set_index("item_id")["duration_seconds"]
    labels = config.workflow.labels
    users = per_user_signals(
        impressions,
        feedback,
        durations,
        labels.duration_buckets,
        labels.duration_watch_quantile,
        arm=arm,
        model_version=model_version,
    )
    return users, analyze_retention(users, head_signals)


def run_retention_weights(
    config,
    workdir: str | Path,
    users: int | None = None,
    ab_users: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train once, simulate the loop, analyse retention, derive the head weights, A/B test them
    against today's (retention a guardrail), and return everything with the verdict."""
    from deployment.export import export_repository
    from models.train import train_all
    from online.ab_experiment import serve_ab_test
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.monotonic()
    world = generate(config.synthetic)
    raw = world.write_parquet(work / "raw")
    processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], work / "processed", config.workflow)
    control = train_all(processed, config, work / "registry", verbose=0)
    repo = export_repository(control, work / "triton_repo", replace=True)
    timings["train_and_export_s"] = time.monotonic() - started
    current = {h: float(w) for h, w in control.manifest["heavy_ranker"]["weights"].items()}
    log(
        f"model v{control.version} trained and exported in {timings['train_and_export_s']:.0f}s; head weights {current}"
    )

    started = time.monotonic()
    population = world.users["user_id"].to_numpy()[:users] if users else None
    log_path = work / "retention_log.sqlite"
    for stale in log_path.parent.glob(log_path.name + "*"):
        stale.unlink()
    outcomes = simulate_in_process(world, config, repo, control.version, log_path, population)
    per_user, analysis = analyze_log(log_path, world, config, [h for h in current if h in SIGNALS])
    timings["simulate_and_analyse_s"] = time.monotonic() - started
    log(
        f"simulated {outcomes['user_id'].nunique()} users, {len(outcomes):,} requests in "
        f"{timings['simulate_and_analyse_s']:.0f}s; {analysis.returned_share:.1%} came back every day"
    )
    decision = derive_head_weights(analysis.heads, current)
    log(f"derived weights {decision.weights} ({decision.reason})")
    result: dict = {
        "config": {
            "synthetic": dataclasses.asdict(config.synthetic),
            "simulation": dataclasses.asdict(config.online.simulation),
        },
        "model_version": int(control.version),
        "analysis": analysis.to_dict(),
        "current_weights": current,
        "derived": dataclasses.asdict(decision),
    }
    if not decision.changed:
        result["verdict"] = f"KEEP the hand weights {current}: {decision.reason}"
    else:
        treatment = with_head_weights(control, work / "registry", decision.weights, "derived from retention")
        exp = dataclasses.replace(
            config.online.experiment,
            name="objective-weights-from-retention",
            salt="retention-weights-1",
            treatment_overrides={
                "heavy_ranker": {"targets": [{"name": h, "weight": w} for h, w in decision.weights.items()]}
            },
        )
        ab_config = dataclasses.replace(
            config,
            online=dataclasses.replace(
                config.online,
                experiment=exp,
                simulation=dataclasses.replace(config.online.simulation, seed=config.online.simulation.seed + 1),
            ),
        )
        started = time.monotonic()
        ab = serve_ab_test(
            ab_config, work / "ab", world, control, treatment, repo=repo, users=ab_users, roll_out=False, log=log
        )
        timings["ab_test_s"] = time.monotonic() - started
        analysis_ab = ab["analysis"]
        tests = analysis_ab.tests.set_index("metric")
        result["ab"] = {
            "decision": analysis_ab.decision,
            "summary": analysis_ab.summary.to_dict(orient="records"),
            "tests": analysis_ab.tests.to_dict(orient="records"),
            "srm_p_value": analysis_ab.srm.p_value,
            "control_version": int(control.version),
            "treatment_version": int(treatment.version),
            "report": str(ab["paths"]["html"]),
        }
        wins = analysis_ab.decision.startswith("SHIP")
        retention = tests.loc["retention"]
        result["verdict"] = (
            (f"SHIP the derived weights {decision.weights}: " if wins else f"KEEP the hand weights {current}: ")
            + f"A/B says {analysis_ab.decision}; retention {retention['control']:.4f} -> {retention['treatment']:.4f} "
            f"(p={retention['p_value']:.2g})"
        )
        result["derived_wins"] = wins
    result["timings"] = timings
    result["paths"] = write_retention_report(result, work / "report", analysis)
    result["analysis_object"] = analysis  # not in the JSON: for printing the table
    log(result["verdict"])
    return result
