#!/usr/bin/env python
"""Objective weights from retention: which signals go with users coming back, and an A/B test of the
heavy ranker head weights derived from it against today's.

Trains the funnel once on the synthetic world, lets the world's users use it (in-process) for
``online.simulation.days`` days, relates each user's click / watch / duration-aware watch / like /
share rates to whether they came back (correlations and standardised logistic regressions with 95%
intervals, ``online/retention.py``), derives the head weights by the documented rule, publishes the
same models with those weights as version 2 and runs the simulated A/B test against the live server
(version 1, hand weights, vs version 2; retention and watch time are guardrails). Writes
``<workdir>/report/retention.json`` and ``retention.md`` and prints the analysis's notes (constant,
aliased or nearly collinear signals, a fit that did not converge) and the verdict.

    .venv/bin/python scripts/retention_weights.py                       # default config
    .venv/bin/python scripts/retention_weights.py --num-users 500 --days 3   # smaller and faster
"""

import argparse
import json

from configs.cli import config_file, fresh_workdir, positive_int
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--workdir", default="build/retention", help="data, models, repository, logs and report")
    parser.add_argument("--num-users", type=positive_int, help="synthetic.num_users (default: the config's)")
    parser.add_argument("--days", type=positive_int, help="simulated days (default: online.simulation.days)")
    parser.add_argument("--ab-users", type=positive_int, help="A/B test only the first N users of the world")
    args = parser.parse_args()

    from configs import load_config
    from online.retention import coefficient_table, run_retention_weights

    config = load_config(args.config)
    if args.num_users is not None:
        config.synthetic.num_users = args.num_users
    if args.days is not None:
        config.online.simulation.days = args.days
    fresh_workdir(parser, args.workdir)  # always from nothing: versions 1 and 2, fresh logs
    result = run_retention_weights(config, args.workdir, ab_users=args.ab_users)
    print("\nRetention vs offline signals (per user; coefficients per standard deviation):")
    print(coefficient_table(result["analysis_object"]).to_string(index=False))
    for note in result["analysis_object"].notes:  # constant, aliased or nearly collinear signals, no convergence
        print(f"Note: {note}")
    print(f"\nRule: {result['derived']['reason']}")
    print(f"Current weights: {json.dumps(result['current_weights'])}")
    print(f"Derived weights: {json.dumps(result['derived']['weights'])}")
    if "ab" in result:
        print(f"A/B: {result['ab']['decision']}")
    print(f"\nVERDICT: {result['verdict']}")
    print(f"Report: {result['paths']['markdown']} ({result['paths']['json']})")


if __name__ == "__main__":
    main()
