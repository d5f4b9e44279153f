#!/usr/bin/env python
"""The feedback-loop experiment: retrain for several generations on the system's own logs.

Each generation serves simulated users for a few days (the exported funnel's stage classes,
in-process), logs what it showed and what users did, appends that to the training log and retrains.
A holdout stays on generation 0's model. Prints, per generation, the item-share curve points, Gini,
coverage, and live vs holdout CTR (users as the unit) and retention; writes an HTML/Markdown report.

    .venv/bin/python scripts/feedback_loop.py --generations 4 --users 3000
"""

import argparse
import json
import time
from pathlib import Path

from configs.cli import config_file, fresh_workdir, positive_int
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--out", default="build/feedback_loop")
    parser.add_argument("--generations", type=positive_int, default=4)
    parser.add_argument("--users", type=positive_int, help="synthetic.num_users (default: the config's)")
    parser.add_argument(
        "--days", type=positive_int, help="simulated days per generation (default: online.simulation.days)"
    )
    parser.add_argument("--holdout", type=float, default=0.05, help="share of users kept on generation 0's model")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the table and report of a finished run in --out from its logs",
    )
    args = parser.parse_args()
    from configs import MAX_HOLDOUT

    if not 0.0 <= args.holdout <= MAX_HOLDOUT:  # checked before any training, not after generation 0
        parser.error(f"argument --holdout: must be in [0, {MAX_HOLDOUT}], got {args.holdout}")

    import pandas as pd

    from configs import load_config
    from online.feedback_loop import history_table, reload_history, run_feedback_loop, write_loop_report

    config = load_config(args.config)
    if args.users:
        config.synthetic.num_users = args.users
    if args.days:
        config.online.simulation.days = args.days
    started = time.monotonic()
    if args.report_only:
        if not (Path(args.out) / "report" / "history.json").exists():
            parser.error(f"--report-only: {args.out} holds no finished run (no report/history.json)")
        history = reload_history(args.out)
    else:
        fresh_workdir(parser, args.out, "out")  # a run into an earlier one's folder would mix their logs
        history = run_feedback_loop(config, args.out, args.generations, config.online.simulation, args.holdout)
    seconds = time.monotonic() - started
    table = history_table(history)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.precision", 4):
        print(table.to_string(index=False))
    context = {
        "world": f"{config.synthetic.num_users} users, {config.synthetic.num_items} items",
        "simulation": f"{config.online.simulation.days} days per generation, k={config.online.simulation.k}",
        "holdout": f"{args.holdout:.0%} of users on generation 0's model",
        "wall time": f"{seconds:.0f}s",
    }
    if args.report_only:  # the run's own settings, not this command's flags and config
        saved = Path(args.out) / "report" / "context.json"
        context = json.loads(saved.read_text()) if saved.exists() else {"run": "settings not recorded"}
        context["report"] = "rebuilt from the logs"
    paths = write_loop_report(history, f"{args.out}/report", context)
    print(f"\n{len(history)} generations in {seconds:.0f}s; report: {paths['html']}")


if __name__ == "__main__":
    main()
