"""Statistics of an A/B test: is the treatment better, is the test even valid, and was it big enough?

two_proportion_ztest  rates such as CTR or retention (pooled z-test, Wald interval of the lift)
ratio_delta_test      a ratio of per-user sums such as CTR = clicks / impressions, with users as
                      the unit (delta method): a user's impressions are not independent trials
mean_test             a mean over users such as watch time per user or retention (0/1 per user)
welch_ttest           means (unequal variances), the textbook test with no small-group guard
permutation_p_value   the studentized permutation test ``ratio_delta_test`` and ``mean_test`` use
                      when a group is small
always_valid_p_value  a p-value that may be looked at again and again as data arrives (mSPRT),
                      for monitors that re-test continuously (the degradation alert)
bootstrap_diff        percentile interval of any statistic's difference
sample_size_proportions / sample_size_means   users per arm for a given effect, alpha and power
sample_ratio_mismatch chi-square test of arm sizes against the designed split; a mismatch means
                      assignment or logging is broken and no other number can be trusted
decide                a plain decision from the above

Small groups. The normal and t approximations are anti-conservative for a small group of skewed
per-user values: an A/A check (``tests/test_ab_aa.py``: the same model in every arm, 1,000 users
with heterogeneous CTR and activity, 400 salts) rejected the 2% holdout (about 20 users) against the
control arm 10% of the time at alpha 0.05 for CTR (the delta method's normal test), 9% for retention
and 6.5% for watch time. So when either group has fewer than ``PERMUTATION_BELOW_USERS`` users,
``ratio_delta_test`` and ``mean_test`` take their p-value from a studentized permutation test (users
re-randomised between the two groups; exact for an A/A comparison, where the assignment is the only
difference, and asymptotically right when the groups' spreads differ): 3.5-5.5% in the same check.
With fewer than ``MIN_USERS`` users in a group there is no p-value ("too few users to tell"), only
the minimum detectable effect at the current sizes; with enough users, neither is there for a group
with a per-user value that is not finite or a ratio over no impression, and the method says which.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

# Below this many users in the smaller group, p-values come from a permutation test (see above); at
# and above it the t approximation held its rate in the A/A check (4-5.5% at about 490 users per arm).
PERMUTATION_BELOW_USERS = 200
PERMUTATIONS = 2000  # re-randomisations per permutation test: p-values to about +-0.005 near 0.05
MIN_USERS = 2  # per group, to estimate a spread at all
TOO_FEW = "too few users to tell"


@dataclass
class TestResult:
    metric: str
    control: float
    treatment: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    statistic: float
    method: str = ""
    n_control: int = 0
    n_treatment: int = 0
    # the smallest true difference this comparison finds with the given power (80% unless told) at its alpha and sizes
    min_detectable_effect: float = float("nan")
    std_error: float = float("nan")  # of the difference (delta method)

    def to_dict(self) -> dict:
        return asdict(self)


def two_proportion_ztest(
    successes_c: int, n_c: int, successes_t: int, n_t: int, metric: str = "rate", alpha: float = 0.05
) -> TestResult:
    if min(n_c, n_t) <= 0:
        raise ValueError("both arms need at least one trial")
    p_c, p_t = successes_c / n_c, successes_t / n_t
    pooled = (successes_c + successes_t) / (n_c + n_t)
    se_pooled = np.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    z = (p_t - p_c) / se_pooled if se_pooled > 0 else 0.0
    p_value = 2 * stats.norm.sf(abs(z))
    se = np.sqrt(p_c * (1 - p_c) / n_c + p_t * (1 - p_t) / n_t)
    half = stats.norm.ppf(1 - alpha / 2) * se
    diff = p_t - p_c
    return TestResult(metric, p_c, p_t, diff, diff - half, diff + half, float(p_value), float(z), std_error=float(se))


def ratio_user_std(num, den) -> tuple[float, float]:
    """sum(num) / sum(den) and the standard deviation of one user's contribution to it (delta method;
    the ratio's variance with n users is std**2 / n)."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(x) < 2 or y.sum() <= 0:
        raise ValueError("each arm needs at least two users with a positive denominator")
    mx, my = x.mean(), y.mean()
    cov = np.cov(x, y, ddof=1)
    var = (cov[0, 0] - 2 * (mx / my) * cov[0, 1] + (mx / my) ** 2 * cov[1, 1]) / my**2
    return float(mx / my), float(np.sqrt(max(var, 0.0)))


def ratio_delta_test(
    num_c,
    den_c,
    num_t,
    den_t,
    metric: str = "ratio",
    alpha: float = 0.05,
    n_resamples: int = PERMUTATIONS,
    seed: int = 0,
    power: float = 0.8,
) -> TestResult:
    """sum(num) / sum(den) per arm, variance by the delta method over users (Deng et al., 2018,
    "Applying the delta method in metric analytics"); ``num_*``/``den_*`` hold one value per user.

    The interval is the delta method's with a t quantile (Welch-Satterthwaite degrees of freedom of
    the linearised per-user values); the p-value is the t test's, or, when a group has fewer than
    ``PERMUTATION_BELOW_USERS`` users, a studentized permutation test's (``permutation_p_value``)."""
    return _compare(num_c, den_c, num_t, den_t, metric, alpha, n_resamples, seed, power)


def mean_test(
    control,
    treatment,
    metric: str = "mean",
    alpha: float = 0.05,
    n_resamples: int = PERMUTATIONS,
    seed: int = 0,
    power: float = 0.8,
) -> TestResult:
    """A difference of means over users (watch minutes per user; retention as 0/1 per user): Welch's
    t test, or a studentized permutation test when a group is small (``ratio_delta_test`` with a
    denominator of one per user)."""
    c = np.asarray(control, dtype=float)
    t = np.asarray(treatment, dtype=float)
    return _compare(c, np.ones_like(c), t, np.ones_like(t), metric, alpha, n_resamples, seed, power)


def _group(num, den) -> tuple[float, float, float, int]:
    """Ratio, its delta-method variance, the variance of one user's linearised value, and users."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    n = len(x)
    if n == 0 or y.sum() <= 0:
        return float("nan"), float("nan"), float("nan"), n
    r = x.sum() / y.sum()
    if n < 2:
        return float(r), float("nan"), float("nan"), n
    linear = (x - r * y) / y.mean()  # the delta method's per-user contribution to the ratio
    unit = float(linear.var(ddof=1))
    return float(r), unit / n, unit, n


def _untestable(num_c, den_c, num_t, den_t) -> str:
    """Why a comparison has no p-value: too few users (``TOO_FEW``), or with enough of them a
    per-user value that is not finite or an arm whose denominators sum to 0 (no impression served)."""
    groups = {"control": (num_c, den_c), "treatment": (num_t, den_t)}
    if min(len(np.asarray(num, dtype=float)) for num, _ in groups.values()) < MIN_USERS:
        return TOO_FEW
    for arm, (num, den) in groups.items():
        x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
        bad = int((~np.isfinite(x) | ~np.isfinite(y)).sum())
        if bad:
            return f"no test: {bad} of the {arm} arm's {len(x)} per-user values are not finite"
        if y.sum() <= 0:
            return f"no test: the {arm} arm's denominators sum to {y.sum():g}, no impression served, so no ratio"
    return "no test: the per-user spread is not finite"


def _compare(num_c, den_c, num_t, den_t, metric, alpha, n_resamples, seed, power) -> TestResult:
    r_c, v_c, unit_c, n_c = _group(num_c, den_c)
    r_t, v_t, unit_t, n_t = _group(num_t, den_t)
    diff = r_t - r_c
    z_a, z_b = special.ndtri(1 - alpha / 2), special.ndtri(power)
    if min(n_c, n_t) < MIN_USERS or not np.isfinite(v_c + v_t):
        # No spread to test against: the detectable effect at these sizes, from whichever group has one.
        unit = np.nanmax([unit_c, unit_t]) if np.isfinite([unit_c, unit_t]).any() else float("nan")
        se = np.sqrt(unit * (1 / max(n_c, 1) + 1 / max(n_t, 1)))
        nan = float("nan")
        why = _untestable(num_c, den_c, num_t, den_t)
        return TestResult(metric, r_c, r_t, diff, nan, nan, nan, nan, why, n_c, n_t, float((z_a + z_b) * se))
    se = float(np.sqrt(v_c + v_t))
    if se > 0:
        df = (v_c + v_t) ** 2 / (v_c**2 / (n_c - 1) + v_t**2 / (n_t - 1))
    else:
        df = float(n_c + n_t - 2)
    statistic = diff / se if se > 0 else 0.0
    t_a = special.stdtrit(df, 1 - alpha / 2)
    if min(n_c, n_t) < PERMUTATION_BELOW_USERS:
        p = permutation_p_value(num_c, den_c, num_t, den_t, n_resamples, seed)
        method = f"studentized permutation ({n_resamples})"
    else:
        p = float(2 * special.stdtr(df, -abs(statistic))) if se > 0 else (1.0 if diff == 0 else 0.0)
        method = "delta method, t (Welch df)"
    return TestResult(
        metric,
        r_c,
        r_t,
        diff,
        diff - t_a * se,
        diff + t_a * se,
        float(p),
        float(statistic),
        method,
        n_c,
        n_t,
        float((t_a + z_b) * se),
        se,
    )


def _studentized(sums_a: np.ndarray, n_a, sums_b: np.ndarray, n_b) -> np.ndarray:
    """(ratio_b - ratio_a) / se from per-group sums of x, y, x*x, y*y, x*y (last axis)."""

    def ratio_var(sums, n):
        sx, sy, sxx, syy, sxy = np.moveaxis(sums, -1, 0)
        mx, my = sx / n, sy / n
        r = sx / sy
        cxx, cyy, cxy = (sxx - n * mx * mx) / (n - 1), (syy - n * my * my) / (n - 1), (sxy - n * mx * my) / (n - 1)
        return r, np.maximum(cxx - 2 * r * cxy + r * r * cyy, 0.0) / (my * my * n)

    with np.errstate(divide="ignore", invalid="ignore"):
        r_a, v_a = ratio_var(sums_a, n_a)
        r_b, v_b = ratio_var(sums_b, n_b)
        t = (r_b - r_a) / np.sqrt(v_a + v_b)
    # Equal ratios with no spread: no evidence either way; unequal ones with no spread: all of it.
    return np.where(np.isnan(t), 0.0, t)


def permutation_p_value(num_a, den_a, num_b, den_b, n_resamples: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a), by re-randomising users
    between the two groups (group sizes kept) ``n_resamples`` times and comparing the studentized
    difference (delta-method standard error) with the observed one; a resample exactly as extreme
    counts half (mid-p). Seeded: the same data give the same p-value."""
    xa, ya = np.asarray(num_a, dtype=float), np.asarray(den_a, dtype=float)
    xb, yb = np.asarray(num_b, dtype=float), np.asarray(den_b, dtype=float)
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    values = np.stack([x, y, x * x, y * y, x * y], axis=1)
    n, n_a = len(x), len(xa)
    total = values.sum(axis=0)
    observed = _studentized(values[:n_a].sum(axis=0), n_a, values[n_a:].sum(axis=0), n - n_a)
    rng = np.random.default_rng(seed)
    small = min(n_a, n - n_a)  # draw the smaller group; the other is the rest
    if small * small <= 4 * n:
        chosen = _distinct_rows(n, small, n_resamples, rng)
    else:  # the smallest of random keys: a uniform subset, O(n) a row
        chosen = rng.random((n_resamples, n)).argpartition(small, axis=1)[:, :small]
    drawn = values[chosen].sum(axis=1)
    rest = total - drawn
    if small == n_a:
        resampled = _studentized(drawn, n_a, rest, n - n_a)
    else:
        resampled = _studentized(rest, n_a, drawn, n - n_a)
    # mid-p: a tie counts half. Binary outcomes (retention) tie often, and counting ties in full made
    # the test conservative (2% false positives at 5% in the A/A check).
    size = abs(observed)
    if np.isfinite(size):
        tol = 1e-9 * max(size, 1.0)
        above = np.count_nonzero(np.abs(resampled) > size + tol)
        ties = np.count_nonzero(np.abs(np.abs(resampled) - size) <= tol)
    else:  # both groups without spread and apart: only a resample that splits them as well ties
        above, ties = 0, np.count_nonzero(np.isinf(resampled))
    return float((above + 0.5 * (ties + 1)) / (n_resamples + 1))


def _distinct_rows(n: int, m: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` uniform random m-subsets of ``range(n)``: draws with replacement, redrawing any row
    that repeats an index (at least one row in eight passes while m * m <= 4 * n)."""
    out = rng.integers(0, n, size=(rows, m))
    check = np.arange(rows)
    while len(check):
        ordered = np.sort(out[check], axis=1)
        check = check[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        out[check] = rng.integers(0, n, size=(len(check), m))
    return out


def always_valid_p_value(difference, std_error, tau):
    """A p-value for "the difference is 0" that stays valid however often it is recomputed as data
    arrives: the mixture sequential probability ratio test (mSPRT; Johari, Koomen, Pekelis and
    Walsh, "Always valid inference", Operations Research 2022) with a normal mixture N(0, tau^2)
    over the true difference, on the normal approximation of ``difference`` (standard error
    ``std_error``)::

        V = std_error^2,  Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 * difference^2 / (2 V (V + tau^2)))
        p = min(1, 1 / Lambda)

    Under no difference Lambda is a martingale, so the chance that p *ever* falls below alpha, at any
    of any number of looks, is at most alpha (Ville's inequality). A fixed-sample p-value recomputed
    every minute is not: an A/A monitor alerting on it fires sooner or later (docs/monitoring.md).
    ``tau`` is the size of difference the test is tuned to find soonest; far smaller ones take
    longer than a fixed-sample test would. Groups without spread (``std_error`` 0) give 1 for no
    difference and 0 for any, as the one-look tests do; NaN for a missing value or ``tau`` <= 0.
    Scalars give a float; arrays (one value per look, say) broadcast."""
    d, se, tau = (np.asarray(x, dtype=float) for x in (difference, std_error, tau))
    with np.errstate(all="ignore"):
        v, t2 = se**2, tau**2
        log_lambda = 0.5 * np.log(v / (v + t2)) + t2 * d**2 / (2 * v * (v + t2))
        p = np.where(se > 0, np.minimum(1.0, np.exp(-log_lambda)), np.where(d == 0, 1.0, 0.0))
        p = np.where(np.isfinite(d) & np.isfinite(se) & (se >= 0) & (tau > 0), p, np.nan)
    return float(p) if p.ndim == 0 else p


def welch_ttest(control, treatment, metric: str = "mean", alpha: float = 0.05) -> TestResult:
    c, t = np.asarray(control, dtype=float), np.asarray(treatment, dtype=float)
    if len(c) < 2 or len(t) < 2:
        raise ValueError("each arm needs at least two observations")
    # An arm of one repeated value has no spread and that value as its mean, exactly: computed, its
    # variance was 0 or 1e-34 by rounding (scipy's p-value NaN, 1 or ~1e-33 for the same data) and
    # its mean 0.1 or 0.10000000000000002 by the arm's size. NaN data keeps a NaN variance.
    constant_c, constant_t = np.ptp(c) == 0, np.ptp(t) == 0
    vc = 0.0 if constant_c else c.var(ddof=1) / len(c)
    vt = 0.0 if constant_t else t.var(ddof=1) / len(t)
    mean_c = c[0] if constant_c else c.mean()
    mean_t = t[0] if constant_t else t.mean()
    diff = mean_t - mean_c
    if vc + vt == 0:
        # No spread in either arm, as the module's other tests: no difference is no evidence (p = 1),
        # any difference certain (p = 0); the interval is the difference itself.
        p = 1.0 if diff == 0 else 0.0
        return TestResult(metric, mean_c, mean_t, diff, diff, diff, p, 0.0, std_error=0.0)
    res = stats.ttest_ind(t, c, equal_var=False)
    df = (vc + vt) ** 2 / (vc**2 / (len(c) - 1) + vt**2 / (len(t) - 1))
    half = stats.t.ppf(1 - alpha / 2, df) * np.sqrt(vc + vt)
    return TestResult(
        metric,
        mean_c,
        mean_t,
        diff,
        diff - half,
        diff + half,
        float(res.pvalue),
        float(res.statistic),
        std_error=float(np.sqrt(vc + vt)),
    )


def bootstrap_diff(
    control, treatment, statistic=np.mean, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    c, t = np.asarray(control, dtype=float), np.asarray(treatment, dtype=float)
    diffs = np.array(
        [
            statistic(t[rng.integers(0, len(t), len(t))]) - statistic(c[rng.integers(0, len(c), len(c))])
            for _ in range(n_resamples)
        ]
    )
    a = (1 - confidence) / 2
    return float(statistic(t) - statistic(c)), float(np.quantile(diffs, a)), float(np.quantile(diffs, 1 - a))


def sample_size_proportions(
    baseline: float, min_detectable_effect: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Users per arm to detect an absolute lift ``min_detectable_effect`` of a rate (two-sided)."""
    p1, p2 = baseline, baseline + min_detectable_effect
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    p_bar = (p1 + p2) / 2
    n = (z_a * np.sqrt(2 * p_bar * (1 - p_bar)) + z_b * np.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2
    return int(np.ceil(n / min_detectable_effect**2))


def sample_size_means(std: float, min_detectable_effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return int(np.ceil(2 * ((z_a + z_b) * std / min_detectable_effect) ** 2))


# Below this many users expected in an arm, the sample-ratio p-value is simulated (the textbook rule for
# the chi-square approximation); enough draws to resolve p-values well below the 0.001 threshold.
SRM_MIN_EXPECTED = 5
SRM_DRAWS = 100_000


@dataclass
class SRMResult:
    observed: dict[str, int]
    expected_shares: dict[str, float]
    chi2: float
    p_value: float
    mismatch: bool


def sample_ratio_mismatch(
    observed: dict[str, int], expected_shares: dict[str, float], threshold: float = 0.001
) -> SRMResult:
    """Chi-square goodness of fit of arm sizes; p below ``threshold`` (conventionally 0.001) is an SRM.

    An arm designed to get no one (a holdout of 0) takes no part in the test, unless someone landed in
    it: then the split is broken whatever the other counts say (p = 0). So is a user in an arm the
    design does not have. Where an arm expects fewer than ``SRM_MIN_EXPECTED`` users, the statistic's
    p-value is simulated (``SRM_DRAWS`` multinomial draws under the design), not read off the chi-square."""
    arms = list(expected_shares)
    counts = np.array([observed.get(a, 0) for a in arms], dtype=float)
    shares = np.array([expected_shares[a] for a in arms], dtype=float)
    stray = sum(n for a, n in observed.items() if a not in expected_shares)
    if stray or (counts[shares == 0] > 0).any():
        return SRMResult(dict(observed), dict(expected_shares), float("inf"), 0.0, True)
    counts, shares = counts[shares > 0], shares[shares > 0]
    if len(counts) < 2 or counts.sum() == 0:  # one arm, or no one yet: nothing to compare
        return SRMResult(dict(observed), dict(expected_shares), 0.0, 1.0, False)
    expected = counts.sum() * shares / shares.sum()
    chi2, p = stats.chisquare(counts, expected)
    if expected.min() < SRM_MIN_EXPECTED:
        # The chi-square tail is far too thin for an arm expecting a user or two (a tiny holdout): 2 holdout
        # users where 0.1 were expected read p = 1e-8, while the split gives 2 or more 0.5% of the time. So
        # the same statistic's tail comes from multinomial draws under the design (seeded: reproducible).
        draws = np.random.default_rng(0).multinomial(int(counts.sum()), shares / shares.sum(), size=SRM_DRAWS)
        simulated = ((draws - expected) ** 2 / expected).sum(axis=1)
        at_least = np.count_nonzero(simulated >= chi2 - 1e-9 * max(chi2, 1.0))
        p = (at_least + 1) / (SRM_DRAWS + 1)
    return SRMResult(dict(observed), dict(expected_shares), float(chi2), float(p), bool(p < threshold))


def decide(
    primary: TestResult,
    srm: SRMResult,
    required_per_arm: int,
    observed_per_arm: int,
    alpha: float = 0.05,
    higher_is_better: bool = True,
    unit: str = "users",
    guardrails: list[TestResult] = (),
) -> str:
    """One plain sentence: invalid, underpowered, ship, do not ship, or no detectable difference.

    ``guardrails`` (higher is better, e.g. retention, watch time): the treatment must not make any of
    them significantly worse, whatever the primary metric says. ``primary``'s interval is read as the
    ``1 - alpha`` one its test gives at this ``alpha``."""
    if srm.mismatch:
        return f"INVALID: sample ratio mismatch (p={srm.p_value:.2g}); fix assignment/logging before reading results"
    harmed = [g for g in guardrails if g.p_value < alpha and g.difference < 0]
    if harmed:
        worst = ", ".join(f"{g.metric} {g.control:.4g} -> {g.treatment:.4g} (p={g.p_value:.2g})" for g in harmed)
        return f"DO NOT SHIP: the treatment harms guardrail metric(s): {worst}"
    if not np.isfinite(primary.p_value):  # too few users for a test: nothing is decided, however many were planned
        return (
            f"KEEP RUNNING: {primary.metric} cannot be tested yet ({primary.method or 'no p-value'}) with "
            f"{observed_per_arm:,} {unit} per arm; {required_per_arm:,} are needed for the planned power"
        )
    better = primary.difference > 0 if higher_is_better else primary.difference < 0
    ci = f"{100 * (1 - alpha):.3g}% CI"  # the tests' interval is the 1 - alpha one
    if primary.p_value < alpha:
        verdict = "SHIP the treatment" if better else "DO NOT SHIP: the treatment is worse"
        return (
            f"{verdict}: {primary.metric} {primary.control:.4f} -> {primary.treatment:.4f} "
            f"(diff {primary.difference:+.4f}, {ci} [{primary.ci_low:+.4f}, {primary.ci_high:+.4f}], "
            f"p={primary.p_value:.2g})"
        )
    if observed_per_arm < required_per_arm:
        return (
            f"KEEP RUNNING: no significant difference yet (p={primary.p_value:.2g}) with {observed_per_arm:,} "
            f"{unit} per arm; {required_per_arm:,} are needed for the planned power"
        )
    return (
        f"NO DETECTABLE DIFFERENCE at the planned power: {primary.metric} diff {primary.difference:+.4f} "
        f"({ci} [{primary.ci_low:+.4f}, {primary.ci_high:+.4f}], p={primary.p_value:.2g}); keep the control"
    )
