#!/usr/bin/env python
"""Training examples/s of our Merlin two-tower vs the same model in TensorFlow Recommenders (JSON).

Same data (the processed training clicks of the synthetic world), features, embedding widths,
towers, temperature, optimiser and batch size; epochs interleaved, first epoch of each untimed
(see evaluation/training_benchmark.py). Needs tensorflow-recommenders: `make bench` installs it
(requirements-bench.txt, --no-deps: TFRS declares the full `tensorflow` wheel, which would replace
tensorflow-cpu; it runs on tensorflow-cpu 2.12.1 as is).

    scripts/benchmark_training.py [--users 1000] [--items 600] [--epochs 4] [--batch-size 1024] [--out bench.json]
"""
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--users", type=int, help="synthetic users (default: the config's)")
    parser.add_argument("--items", type=int, help="synthetic items (default: the config's)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per model; the first is not timed")
    parser.add_argument("--batch-size", type=int, help="default: candidate_generator.batch_size")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is tracing and is not timed)")
    try:
        import tensorflow_recommenders  # noqa: F401
    except ImportError:
        sys.exit("tensorflow-recommenders is not installed: run `make bench` "
                 "(or pip install --no-deps -r requirements-bench.txt)")

    from configs import load_config
    from evaluation.training_benchmark import benchmark
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    overrides: dict = {"synthetic": {}}
    if args.users:
        overrides["synthetic"]["num_users"] = args.users
    if args.items:
        overrides["synthetic"]["num_items"] = args.items
    if args.batch_size:
        overrides["candidate_generator"] = {"batch_size": args.batch_size}
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        raw = generate(config.synthetic).write_parquet(Path(tmp) / "raw")
        processed = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], Path(tmp) / "processed",
                                         config.workflow)
        result = benchmark(processed.train(), config.candidate_generator, config.embeddings,
                           epochs=args.epochs, seed=config.seed)
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    result["versions"] = {"tensorflow": tf.__version__, "tensorflow_recommenders": tfrs.__version__}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
