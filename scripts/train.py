#!/usr/bin/env python
"""Train every funnel stage on a processed dataset and publish one model-registry version."""
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
from pathlib import Path

from configs import load_config
from models.train import train_all
from workflows.pipeline import ProcessedData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--data", default="data/processed", help="output of scripts/prepare_data.py")
    parser.add_argument("--registry", default="artifacts/registry", help="model registry folder")
    args = parser.parse_args()
    version = train_all(ProcessedData(Path(args.data)), load_config(args.config), args.registry, verbose=2)
    print(f"published version {version.version} at {version.path}")
    print(json.dumps(version.manifest["metrics"], indent=2))


if __name__ == "__main__":
    main()
