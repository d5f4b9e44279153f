#!/usr/bin/env python
"""Offline evaluation: our served funnel beside Pop, EASE and ALS on one split, with slices,
popularity bias, the logQ mitigation table and an HTML + Markdown report (also logged to MLflow).

    python scripts/evaluate.py                                   # synthetic data, temporal protocol
    python scripts/evaluate.py --source movielens --config configs/movielens-recbole.yaml   # RecBole protocol
    python scripts/evaluate.py --source movielens --config configs/movielens-recbole.yaml --seed 1 --no-mitigation
    python scripts/evaluate.py --spec myshop/dataset.yaml --out myshop/evaluation   # your own event log
"""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
import sys
from pathlib import Path

from configs import load_config
from configs.cli import config_file, non_negative_int, output_folder, positive_int
from evaluation.pipeline import evaluate_movielens, evaluate_spec, evaluate_synthetic
from workflows.spec import SpecError, load_spec
from workflows.validate import DatasetError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--source", default="synthetic", choices=["synthetic", "movielens"], help="dataset")
    parser.add_argument(
        "--spec", help="dataset spec (YAML) of your own event log (docs/own-data.md), split as the config says"
    )
    parser.add_argument("--movielens", help="RecBole wheel or GroupLens ml-100k folder (default: fetch the wheel)")
    parser.add_argument(
        "--cache", type=output_folder, default="data/cache", help="where the RecBole wheel is fetched to"
    )
    parser.add_argument("--out", type=output_folder, default="build/evaluation", help="output folder (report/ inside)")
    parser.add_argument(
        "--k", type=positive_int, nargs="+", default=[10, 20], help="cut-offs (the first is the headline)"
    )
    parser.add_argument("--no-mitigation", action="store_true", help="skip the logQ on/off retraining")
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        help="MovieLens: seed of the random split (default 2020, RecBole's) and of training (default: the config's)",
    )
    parser.add_argument(
        "--protocol", choices=["recbole", "temporal"], help="MovieLens: the split protocol (default: recbole)"
    )
    args = parser.parse_args()
    if args.spec and args.source != "synthetic":
        parser.error("--spec names the data itself; it does not go with --source")
    for flag, given in (("--movielens", args.movielens), ("--protocol", args.protocol)):
        if given is not None and args.source != "movielens":  # was ignored: another data set evaluated
            parser.error(f"argument {flag}: only with --source movielens")
    config = load_config(args.config, {"seed": args.seed} if args.seed is not None else None)
    ks, mitigation = tuple(args.k), not args.no_mitigation
    if max(ks) > config.serving.max_k:  # the funnel serves no longer list: its figures would be cut short
        parser.error(f"argument --k: at most serving.max_k={config.serving.max_k}, got {max(ks)}")
    split = config.workflow.split
    if args.spec and split.kind == "temporal" and split.test_fraction <= 0:
        parser.error("--spec with a temporal split needs workflow.split.test_fraction > 0: the period that is scored")
    if args.spec and split.kind == "explicit":
        if not split.test_file:
            parser.error("--spec with an explicit split needs workflow.split.test_file: the part that is scored")
        missing = [f for f in (split.train_file, split.valid_file, split.test_file) if not Path(f).exists()]
        if missing:
            parser.error(f"split file(s) not found: {', '.join(missing)}")
    if args.spec:
        try:
            out = evaluate_spec(load_spec(args.spec), config, args.out, ks, mitigation)
        except (DatasetError, SpecError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    elif args.source == "movielens":
        from workflows.sources import movielens

        if args.movielens:  # a wrong path is an argument error, not a traceback
            try:
                movielens.check_source(args.movielens)
            except FileNotFoundError as err:
                parser.error(f"argument --movielens: {err}")
        source = args.movielens or movielens.fetch_wheel(args.cache)
        split_seed = {} if args.seed is None else {"seed": args.seed}
        out = evaluate_movielens(
            source, config, args.out, ks, mitigation, protocol=args.protocol or "recbole", **split_seed
        )
    else:
        out = evaluate_synthetic(config, args.out, ks, mitigation)
    k = ks[0]
    # EASE is not run above item_affinity.max_items items (the report says why): no ratio column then.
    ease = next((r.metrics[f"ndcg@{k}"] for r in out["results"] if r.name == "EASE"), None)
    for r in out["results"]:
        m, gini = r.metrics, r.bias.get("gini")
        ratio = "" if ease is None else f"ndcg/EASE {m[f'ndcg@{k}'] / ease:.3f}  "
        print(
            f"{r.name:<18} ndcg@{k} {m[f'ndcg@{k}']:.4f}  recall@{k} {m[f'recall@{k}']:.4f}  "
            f"{ratio}gini {'n/a' if gini is None else f'{gini:.3f}'}"
        )
    print("stages:", json.dumps(out["stages"]))
    print(json.loads(out["paths"]["json"].read_text())["headline"])
    print(f"report: {out['paths']['html']}")


if __name__ == "__main__":
    main()
