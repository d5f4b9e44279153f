#!/usr/bin/env python
"""Offline evaluation: our served funnel beside Pop, EASE and ALS on one split, with slices,
popularity bias, the logQ mitigation table and an HTML + Markdown report."""
from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json

from configs import load_config
from evaluation.pipeline import evaluate_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--source", default="synthetic", choices=["synthetic"], help="dataset")
    parser.add_argument("--out", default="build/evaluation", help="output folder (report/ inside)")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20], help="cut-offs (the first is the headline)")
    parser.add_argument("--no-mitigation", action="store_true", help="skip the logQ on/off retraining")
    args = parser.parse_args()
    out = evaluate_synthetic(load_config(args.config), args.out, tuple(args.k), mitigation=not args.no_mitigation)
    k = args.k[0]
    for r in out["results"]:
        print(f"{r.name:<18} ndcg@{k} {r.metrics[f'ndcg@{k}']:.4f}  recall@{k} {r.metrics[f'recall@{k}']:.4f}  "
              f"gini {r.bias['gini']:.3f}")
    print("stages:", json.dumps(out["stages"]))
    print(f"report: {out['paths']['html']}")


if __name__ == "__main__":
    main()
