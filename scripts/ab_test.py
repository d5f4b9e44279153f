#!/usr/bin/env python
"""One command: a simulated A/B test against the live Triton server, with its decision.

Trains a control and a treatment model (the treatment is the config's
``online.experiment.treatment_overrides``), serves both in one tritonserver behind the A/B router,
lets simulated users use it over gRPC for a few days, and prints the per-arm metrics, the tests, the
sample-ratio check and a plain decision; ships the treatment (holdout kept on the control) if it wins.

    .venv/bin/python scripts/ab_test.py                       # default config, ~1000 users, 5 days
    .venv/bin/python scripts/ab_test.py --users 300 --days 3  # smaller and faster
    .venv/bin/python scripts/ab_test.py --name activity-features \
        --treatment '{"workflow": {"features": {"activity_windows": ["1h", "24h", "7d"]}}}'
"""

import argparse
import json

from configs.cli import config_file, fresh_workdir, positive_int
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--workdir", default="build/ab", help="where data, models, repository, log and report go")
    parser.add_argument("--users", type=positive_int, help="simulate only the first N users of the world")
    parser.add_argument("--days", type=positive_int, help="simulated days (default: online.simulation.days)")
    parser.add_argument("--no-rollout", action="store_true", help="do not roll the treatment out even if it wins")
    parser.add_argument("--name", help="the experiment's name (default: online.experiment.name)")
    parser.add_argument(
        "--treatment",
        help="the treatment as config overrides in JSON (default: online.experiment.treatment_overrides), e.g. "
        '\'{"workflow": {"features": {"activity_windows": ["1h", "24h", "7d"]}}}\'',
    )
    args = parser.parse_args()

    import pandas as pd

    from configs import load_config
    from online.ab_experiment import run_ab_test, treatment_of

    try:  # through the config's checks ('none' names the state without an experiment), before training
        config = load_config(
            args.config, {"online": {"experiment": {"name": args.name}}} if args.name is not None else None
        )
    except ValueError as err:
        parser.error(f"argument --name: {err}")
    if args.treatment:  # replaces the configured treatment (a merge would keep its other overrides)
        try:
            overrides = json.loads(args.treatment)
            if not isinstance(overrides, dict):
                raise ValueError(f"expected a JSON object of config overrides, got {type(overrides).__name__}")
            config.online.experiment.treatment_overrides = overrides
            treatment_of(config)  # validated now, not after the control has trained
        except (ValueError, TypeError) as err:  # bad JSON, an unknown key or a wrong type
            parser.error(f"argument --treatment: {err}")
    fresh_workdir(parser, args.workdir)  # like the demo, always from nothing: versions 1 and 2, a fresh log
    if args.days is not None:
        config.online.simulation.days = args.days
    result = run_ab_test(config, args.workdir, users=args.users, roll_out=not args.no_rollout)
    analysis = result["analysis"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print("\nPer arm (from the server's feedback log):")
        print(analysis.summary.to_string(index=False))
        print("\nTreatment vs control:")
        print(
            analysis.tests[
                [
                    "metric",
                    "control",
                    "treatment",
                    "difference",
                    "ci_low",
                    "ci_high",
                    "p_value",
                    "bootstrap_low",
                    "bootstrap_high",
                ]
            ].to_string(index=False)
        )
        print(
            f"\nSample ratio: users per arm {json.dumps(analysis.srm.observed)}, chi2 {analysis.srm.chi2:.2f}, "
            f"p {analysis.srm.p_value:.3g} -> {'MISMATCH' if analysis.srm.mismatch else 'ok'}"
        )
        print(
            f"Planned sample size: {analysis.required_users_per_arm:,} users per arm for a CTR lift of "
            f"{config.online.experiment.min_detectable_ctr_lift} (observed {analysis.observed_users_per_arm:,})"
        )
        if analysis.holdout_vs_control:
            h = analysis.holdout_vs_control
            print(f"Holdout vs control arm: CTR {h['control']:.4f} vs {h['treatment']:.4f}, p {h['p_value']:.3g}")
        print("\nPopularity concentration per arm:")
        print(analysis.concentration.to_string(index=False))
        print("\nPrometheus per-arm counters (scraped from the server):")
        print(result["counters"].to_string(index=False))
    print(f"\nDECISION: {analysis.decision}")
    print(f"Report: {result['paths']['html']}")


if __name__ == "__main__":
    main()
