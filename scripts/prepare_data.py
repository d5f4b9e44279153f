#!/usr/bin/env python
"""Run the NVTabular dataset pipeline: join, temporal split, feature workflow, serving tables."""
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
from pathlib import Path

from configs import load_config
from workflows.pipeline import run_dataset_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--raw", default="data/raw", help="folder with events/users/items.parquet")
    parser.add_argument("--out", default="data/processed", help="output folder (default: data/processed)")
    args = parser.parse_args()
    config = load_config(args.config)
    raw = Path(args.raw)
    out = run_dataset_pipeline(
        raw / "events.parquet", raw / "users.parquet", raw / "items.parquet", args.out, config.workflow
    )
    print(json.dumps(out.summary, indent=2))


if __name__ == "__main__":
    main()
