#!/usr/bin/env python
"""Run the dataset pipeline (cleaning, labels, point-in-time features, split, NVTabular workflow,
checks) on raw parquet tables, synthetic or MovieLens-100K, optionally on a dask cluster.

    python scripts/prepare_data.py                                  # data/raw (scripts/generate_data.py)
    python scripts/prepare_data.py --source movielens               # fetches ML-100K if needed
    python scripts/prepare_data.py --scheduler tcp://host:8786      # on a dask.distributed cluster
"""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
from pathlib import Path

from configs import load_config
from workflows.pipeline import run_dataset_pipeline

MOVIELENS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        choices=["raw", "movielens"],
        default="raw",
        help="raw: parquet tables in --raw; movielens: MovieLens-100K (default: raw)",
    )
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml, or configs/movielens.yaml)")
    parser.add_argument(
        "--raw", help="folder with events/users/items.parquet (default: data/raw or data/movielens/raw)"
    )
    parser.add_argument("--out", help="output folder (default: data/processed or data/movielens/processed)")
    parser.add_argument("--cache", default="data/cache", help="where the RecBole wheel is kept (movielens)")
    parser.add_argument("--scheduler", help="dask scheduler address, 'local-cuda' or 'auto' (default: in process)")
    args = parser.parse_args()

    if args.source == "movielens":
        raw = Path(args.raw or "data/movielens/raw")
        config = load_config(args.config or MOVIELENS_CONFIG)
        if not (raw / "events.parquet").exists():
            from workflows.sources import movielens

            source = movielens.fetch_wheel(args.cache)
            movielens.load(source, click_min_rating=config.movielens.click_min_rating).write_parquet(raw)
        out = args.out or "data/movielens/processed"
    else:
        raw = Path(args.raw or "data/raw")
        config = load_config(args.config)
        out = args.out or "data/processed"
    result = run_dataset_pipeline(
        raw / "events.parquet",
        raw / "users.parquet",
        raw / "items.parquet",
        out,
        config.workflow,
        scheduler=args.scheduler,
    )
    summary = result.summary
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("cutoff", "train_rows", "valid_rows", "known_users", "known_items", "duplicate_items")
            },
            indent=2,
        )
    )
    for step in summary["steps"]:
        print(
            f"{step['step']:<24} rows {step['rows_before']:>9} -> {step['rows_after']:>9}  "
            f"users -{step['users_removed']:<6} items -{step['items_removed']}"
        )
    print("checks passed:", ", ".join(c["check"] for c in summary["checks"]))


if __name__ == "__main__":
    main()
