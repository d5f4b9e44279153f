#!/usr/bin/env python
"""The degradation alert's error rates when the comparison is recomputed again and again.

``LiveBelowHoldout`` (monitoring/prometheus/funnel-alerts.yml) fires when live users' metric is below
the holdout's with p < 0.05 for 6 hours straight, and the sidecar recomputes the comparison over the
whole log every minute (``online.ab_report.HoldoutMonitor``). This simulates that rule, side by side:

    one-look    the p-value a report reads once (what the alert watched before)
    sequential  ``live_vs_holdout``'s ``sequential_p_value`` (``online.ab_report.sequential_p``): the
                larger of the one-look p and the always-valid p-value times the three
                metrics, its mixture tuned to a gap of ``--effect`` times the group value

Users arrive at ``--users-per-day`` (Poisson), ``--holdout`` of them in the holdout; each user has a
0/1 outcome (retention-like, ``--rate`` in the holdout, ``rate * (1 - drop)`` live); the alert looks
every 15 minutes. ``drop`` 0 is an A/A run: every alert is false. Tests use the normal approximation
(the holdout reaches the 200 users of the t regime within a day at 10,000 users a day). Prints one
JSON document: per scenario and rule, the share of runs that fired within ``--days`` and the median
day of the first alert.

    python -m benchmarks.benchmark_holdout_alert
    python -m benchmarks.benchmark_holdout_alert --drops 0 0.1 --users-per-day 10000 --days 30
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats

from configs.cli import positive_int
from online.ab_report import HOLDOUT_METRICS, MONITOR_EFFECT, sequential_p

STEP_H = 0.25  # a look every 15 minutes (the sidecar: every minute; 6 h straight either way)
FOR_H = 6.0  # the alert's `for`
MIN_HOLDOUT = 20  # looks before the holdout has this many users are skipped


def simulate(
    drop: float,
    users_per_day: int,
    holdout: float,
    days: int,
    runs: int,
    rate: float = 0.7,
    effect: float = MONITOR_EFFECT,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Both rules on the same simulated runs: {rule: {"fired": share, "median_day": day}}."""
    rng = np.random.default_rng(seed)
    # Prometheus fires once the condition has held FOR_H since the look that first found it true:
    # FOR_H / STEP_H looks after that one, so that many + 1 true looks in a row
    steps, need = int(days * 24 / STEP_H), int(FOR_H / STEP_H) + 1
    arrivals_h = rng.poisson(users_per_day * holdout * STEP_H / 24, (runs, steps))
    arrivals_l = rng.poisson(users_per_day * (1 - holdout) * STEP_H / 24, (runs, steps))
    n_h, n_l = np.cumsum(arrivals_h, 1), np.cumsum(arrivals_l, 1)
    s_h = np.cumsum(rng.binomial(arrivals_h, rate), 1)
    s_l = np.cumsum(rng.binomial(arrivals_l, rate * (1 - drop)), 1)
    with np.errstate(all="ignore"):
        m_h, m_l = s_h / n_h, s_l / n_l
        se = np.sqrt(m_h * (1 - m_h) / n_h + m_l * (1 - m_l) / n_l)
        gap = m_l - m_h
        one_look = np.where(se > 0, 2 * stats.norm.sf(np.abs(gap / se)), np.where(gap == 0, 1.0, 0.0))
    sequential = sequential_p(one_look, gap, se, np.maximum(m_h, m_l), effect, len(HOLDOUT_METRICS))
    looked = n_h >= MIN_HOLDOUT
    out = {}
    for rule, p in (("one-look", one_look), ("sequential", sequential)):
        below = looked & (gap < 0) & (p < alpha)
        streak, first = np.zeros(runs, int), np.full(runs, np.nan)
        for step in range(steps):
            streak = np.where(below[:, step], streak + 1, 0)
            first[(streak >= need) & np.isnan(first)] = (step + 1) * STEP_H / 24
        fired = np.isfinite(first)
        out[rule] = {
            "fired": round(float(fired.mean()), 4),
            "median_day": round(float(np.median(first[fired])), 2) if fired.any() else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25], help="relative drops")
    parser.add_argument("--users-per-day", type=positive_int, nargs="+", default=[2000, 10000])
    parser.add_argument("--holdout", type=float, default=0.02, help="share of users in the holdout")
    parser.add_argument("--rate", type=float, default=0.7, help="the holdout's share of users with outcome 1")
    parser.add_argument("--days", type=positive_int, default=30)
    parser.add_argument("--runs", type=positive_int, default=2000, help="simulated runs per scenario")
    parser.add_argument("--effect", type=float, default=MONITOR_EFFECT, help="gap the sequential test is tuned to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.holdout < 1:
        parser.error(f"argument --holdout: must be in (0, 1), got {args.holdout}")
    if not 0 < args.rate < 1:
        parser.error(f"argument --rate: must be in (0, 1), got {args.rate}")
    if not 0 < args.effect < float("inf"):  # at 0 or below the sequential p is NaN: a rule that never fires
        parser.error(f"argument --effect: must be > 0, got {args.effect}")
    if any(not 0 <= d < 1 for d in args.drops):
        parser.error(f"argument --drops: each must be in [0, 1), got {args.drops}")
    start = time.perf_counter()
    scenarios = [
        {
            "drop": drop,
            "users_per_day": users,
            **simulate(
                drop, users, args.holdout, args.days, args.runs, rate=args.rate, effect=args.effect, seed=args.seed
            ),
        }
        for drop in args.drops
        for users in args.users_per_day
    ]
    print(
        json.dumps(
            {
                "holdout": args.holdout,
                "rate": args.rate,
                "days": args.days,
                "runs": args.runs,
                "effect": args.effect,
                "look_every_h": STEP_H,
                "for_h": FOR_H,
                "scenarios": scenarios,
                "seconds": round(time.perf_counter() - start, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
