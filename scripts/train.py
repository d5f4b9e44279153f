#!/usr/bin/env python
"""Train every funnel stage on a processed dataset and publish one model-registry version.

One command for the whole funnel: the two-tower candidate generator (+ its item index), the light
ranker, the multi-task heavy ranker and the popularity fallback. Keras progress bars per epoch,
early stopping on each stage's validation metric, seeded from the config, the embedding-table size
report in the log, and the run (params, per-epoch metrics, manifest) in a local MLflow store
(default <registry>/../mlruns).

    scripts/train.py --data data/processed --registry artifacts/registry [--config my.yaml]
"""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
import logging
import sys
from pathlib import Path

from configs.cli import config_file, non_negative_int, output_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--data", default="data/processed", help="output of scripts/prepare_data.py")
    parser.add_argument("--registry", type=output_folder, default="artifacts/registry", help="model registry folder")
    parser.add_argument("--seed", type=non_negative_int, help="override the config's seed")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: file:<registry>/../mlruns)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (one line per epoch)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from configs import load_config
    from evaluation.tuning import train_tuned
    from workflows.pipeline import ProcessedData

    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.mlflow_uri:
        overrides["training"] = {"mlflow_tracking_uri": args.mlflow_uri}
    data = ProcessedData(Path(args.data))
    if not (data.root / "summary.json").exists():
        parser.error(f"--data {args.data} is not a processed dataset (run scripts/prepare_data.py first)")
    config = load_config(args.config, overrides)
    version = train_tuned(data, config, args.registry, verbose=2 if args.quiet else 1)
    print(f"published version {version.version} at {version.path}")
    print(json.dumps(version.manifest["metrics"], indent=2))
    if version.manifest.get("tuning"):
        tuned = version.manifest["tuning"]
        print(f"tuned on validation ({tuned['metric']} {tuned['best']:.4f}): {json.dumps(tuned['chosen'])}")
        if tuned.get("candidate_generator"):
            metric = tuned["metric"]
            for trial in tuned["candidate_generator"]["trials"]:
                print(f"  candidate generator {json.dumps(trial['params'])}: {metric} {trial[metric]:.4f}")


if __name__ == "__main__":
    main()
