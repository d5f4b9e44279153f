#!/usr/bin/env python
"""Check an event log and run the dataset pipeline on it (cleaning, labels, point-in-time features,
split, NVTabular workflow, checks), optionally on a dask cluster.

    python scripts/prepare_data.py --spec myshop/dataset.yaml --out myshop/processed   # your own data
    python scripts/prepare_data.py                                  # data/raw (scripts/generate_data.py)
    python scripts/prepare_data.py --source movielens               # fetches ML-100K if needed
    python scripts/prepare_data.py --scheduler tcp://host:8786      # on a dask.distributed cluster

A dataset spec (docs/own-data.md) says where the files are and what each column is. Every defect of
the input (a missing column, unparseable timestamps, bad ids, events of unknown items, ...) is
reported, one line each naming the file, the column, how many rows and an example; the exit code is
then 2 and nothing is written.
"""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse
import json
import sys
from pathlib import Path

from configs import load_config
from configs.cli import config_file, output_folder
from workflows.cluster import check_scheduler
from workflows.pipeline import prepare_dataset
from workflows.sources import SPEC_FILE
from workflows.spec import SpecError, load_spec, raw_schema_spec
from workflows.validate import DatasetError, Defect

MOVIELENS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml"


def spec_of_folder(raw: Path):
    """The folder's ``dataset.yaml``, or the raw schema's spec for its three parquet tables."""
    if (raw / SPEC_FILE).exists():
        return load_spec(raw / SPEC_FILE)
    return raw_schema_spec(raw / "events.parquet", raw / "users.parquet", raw / "items.parquet")


def scheduler(text: str) -> str:
    try:
        return check_scheduler(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="dataset spec (YAML) of your own event log; see docs/own-data.md")
    parser.add_argument(
        "--source",
        choices=["raw", "movielens"],
        default="raw",
        help="raw: the tables in --raw (their dataset.yaml if present); movielens: MovieLens-100K (default: raw)",
    )
    parser.add_argument(
        "--config", type=config_file, help="YAML config (default: configs/default.yaml, or configs/movielens.yaml)"
    )
    parser.add_argument(
        "--raw", help="folder with events/users/items.parquet (default: data/raw or data/movielens/raw)"
    )
    parser.add_argument(
        "--out", type=output_folder, help="output folder (default: data/processed or data/movielens/processed)"
    )
    parser.add_argument(
        "--cache", type=output_folder, default="data/cache", help="where the RecBole wheel is kept (movielens)"
    )
    parser.add_argument(
        "--scheduler", type=scheduler, help="dask scheduler address, 'local-cuda' or 'auto' (default: in process)"
    )
    args = parser.parse_args()
    if args.spec and (args.raw or args.source != "raw"):
        parser.error("--spec names the files itself; it does not go with --raw or --source")

    try:
        if args.spec:
            spec = load_spec(args.spec)
            config = load_config(args.config)
            out = args.out or "data/processed"
        elif args.source == "movielens":
            raw = Path(args.raw or "data/movielens/raw")
            config = load_config(args.config or MOVIELENS_CONFIG)
            from workflows.sources import movielens

            wanted = config.movielens.click_min_rating
            if not (raw / "events.parquet").exists():
                source = movielens.fetch_wheel(args.cache)
                movielens.load(source, click_min_rating=wanted).write_parquet(raw)
            elif (written := movielens.written_click_min_rating(raw)) not in (None, wanted):
                # Tables of another threshold carry other click labels than this config trains on.
                parser.error(
                    f"{raw} was written with movielens.click_min_rating {written}, the config says {wanted}: "
                    f"write it again (scripts/fetch_movielens.py --out {raw} --config <this config>) or pass --raw"
                )
            spec = spec_of_folder(raw)
            out = args.out or "data/movielens/processed"
        else:
            spec = spec_of_folder(Path(args.raw or "data/raw"))
            config = load_config(args.config)
            out = args.out or "data/processed"
        result = prepare_dataset(spec, out, config.workflow, scheduler=args.scheduler)
    except (DatasetError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
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
    dataset = summary["dataset"]
    print(f"dataset {dataset['name']!r}: labels {dataset['labels']}")
    for note in dataset["adaptations"]:
        print(f"adapted: {note}")
    for w in dataset["warnings"]:
        print(f"warning: {Defect(**w)}")
    for step in summary["steps"]:
        print(
            f"{step['step']:<24} rows {step['rows_before']:>9} -> {step['rows_after']:>9}  "
            f"users -{step['users_removed']:<6} items -{step['items_removed']}"
        )
    print("checks passed:", ", ".join(c["check"] for c in summary["checks"]))


if __name__ == "__main__":
    main()
