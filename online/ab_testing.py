"""Statistics of an A/B test: is the treatment better, is the test even valid, and was it big enough?

two_proportion_ztest  rates such as CTR or retention (pooled z-test, Wald interval of the lift)
ratio_delta_test      a ratio of per-user sums such as CTR = clicks / impressions, with users as
                      the unit (delta method): a user's impressions are not independent trials
welch_ttest           means such as watch time per user (unequal variances)
bootstrap_diff        percentile interval of any statistic's difference
sample_size_proportions / sample_size_means   users per arm for a given effect, alpha and power
sample_ratio_mismatch chi-square test of arm sizes against the designed split; a mismatch means
                      assignment or logging is broken and no other number can be trusted
decide                a plain decision from the above
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


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
    return TestResult(metric, p_c, p_t, p_t - p_c, p_t - p_c - half, p_t - p_c + half, float(p_value), float(z))


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


def ratio_delta_test(num_c, den_c, num_t, den_t, metric: str = "ratio", alpha: float = 0.05) -> TestResult:
    """sum(num) / sum(den) per arm, variance by the delta method over users (Deng et al., 2018,
    "Applying the delta method in metric analytics"); ``num_*``/``den_*`` hold one value per user."""
    r_c, s_c = ratio_user_std(num_c, den_c)
    r_t, s_t = ratio_user_std(num_t, den_t)
    se = np.sqrt(s_c**2 / len(num_c) + s_t**2 / len(num_t))
    z = (r_t - r_c) / se if se > 0 else 0.0
    half = stats.norm.ppf(1 - alpha / 2) * se
    return TestResult(
        metric, r_c, r_t, r_t - r_c, r_t - r_c - half, r_t - r_c + half, float(2 * stats.norm.sf(abs(z))), float(z)
    )


def welch_ttest(control, treatment, metric: str = "mean", alpha: float = 0.05) -> TestResult:
    c, t = np.asarray(control, dtype=float), np.asarray(treatment, dtype=float)
    if len(c) < 2 or len(t) < 2:
        raise ValueError("each arm needs at least two observations")
    res = stats.ttest_ind(t, c, equal_var=False)
    vc, vt = c.var(ddof=1) / len(c), t.var(ddof=1) / len(t)
    df = (vc + vt) ** 2 / (vc**2 / (len(c) - 1) + vt**2 / (len(t) - 1)) if vc + vt > 0 else len(c) + len(t) - 2
    half = stats.t.ppf(1 - alpha / 2, df) * np.sqrt(vc + vt)
    diff = t.mean() - c.mean()
    return TestResult(
        metric, c.mean(), t.mean(), diff, diff - half, diff + half, float(res.pvalue), float(res.statistic)
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
    """Chi-square goodness of fit of arm sizes; p below ``threshold`` (conventionally 0.001) is an SRM."""
    arms = list(expected_shares)
    counts = np.array([observed.get(a, 0) for a in arms], dtype=float)
    shares = np.array([expected_shares[a] for a in arms], dtype=float)
    chi2, p = stats.chisquare(counts, counts.sum() * shares / shares.sum())
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
    them significantly worse, whatever the primary metric says."""
    if srm.mismatch:
        return f"INVALID: sample ratio mismatch (p={srm.p_value:.2g}); fix assignment/logging before reading results"
    harmed = [g for g in guardrails if g.p_value < alpha and g.difference < 0]
    if harmed:
        worst = ", ".join(f"{g.metric} {g.control:.4g} -> {g.treatment:.4g} (p={g.p_value:.2g})" for g in harmed)
        return f"DO NOT SHIP: the treatment harms guardrail metric(s): {worst}"
    better = primary.difference > 0 if higher_is_better else primary.difference < 0
    if primary.p_value < alpha:
        verdict = "SHIP the treatment" if better else "DO NOT SHIP: the treatment is worse"
        return (
            f"{verdict}: {primary.metric} {primary.control:.4f} -> {primary.treatment:.4f} "
            f"(diff {primary.difference:+.4f}, 95% CI [{primary.ci_low:+.4f}, {primary.ci_high:+.4f}], "
            f"p={primary.p_value:.2g})"
        )
    if observed_per_arm < required_per_arm:
        return (
            f"KEEP RUNNING: no significant difference yet (p={primary.p_value:.2g}) with {observed_per_arm:,} "
            f"{unit} per arm; {required_per_arm:,} are needed for the planned power"
        )
    return (
        f"NO DETECTABLE DIFFERENCE at the planned power: {primary.metric} diff {primary.difference:+.4f} "
        f"(95% CI [{primary.ci_low:+.4f}, {primary.ci_high:+.4f}], p={primary.p_value:.2g}); keep the control"
    )
