#!/usr/bin/env python
"""Fetch MovieLens-100K (inside the recbole==1.2.1 wheel, via pip) and write it as raw parquet.

    python scripts/fetch_movielens.py                       # wheel -> data/cache, tables -> data/movielens/raw
    python scripts/fetch_movielens.py --grouplens ~/ml-100k # or read an original GroupLens folder
    python scripts/fetch_movielens.py --config configs/movielens-recbole.yaml   # its click_min_rating

The click label is rating >= movielens.click_min_rating of --config (default configs/movielens.yaml,
what prepare_data.py --source movielens reads); prepare_data.py refuses tables of another threshold.

The data is never committed (GroupLens terms); data/ is git-ignored.
"""

import argparse
import json
from pathlib import Path

from configs import load_config
from configs.cli import config_file, output_folder, positive_int
from workflows.sources import movielens

MOVIELENS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache",
        type=output_folder,
        default="data/cache",
        help="where pip puts the RecBole wheel (default: data/cache)",
    )
    parser.add_argument("--grouplens", help="read this GroupLens ml-100k folder (u.data, u.user, u.item) instead")
    parser.add_argument(
        "--out", type=output_folder, default="data/movielens/raw", help="output folder for events/users/items.parquet"
    )
    parser.add_argument(
        "--duration-seconds",
        type=positive_int,
        default=movielens.DEFAULT_DURATION_SECONDS,
        help="duration given to every film (MovieLens has none; default 6000)",
    )
    parser.add_argument(
        "--config", type=config_file, help="its movielens.click_min_rating (default: configs/movielens.yaml)"
    )
    args = parser.parse_args()
    if args.grouplens and not Path(args.grouplens).is_dir():  # a file was read as a wheel: BadZipFile
        parser.error(f"argument --grouplens: {args.grouplens} is not a folder (u.data, u.user, u.item)")
    click_min_rating = load_config(args.config or MOVIELENS_CONFIG).movielens.click_min_rating
    source = args.grouplens or movielens.fetch_wheel(args.cache)
    try:
        data = movielens.load(source, args.duration_seconds, click_min_rating)
    except FileNotFoundError as err:  # --grouplens is not an ml-100k folder
        parser.error(f"argument --grouplens: {err}")
    paths = data.write_parquet(args.out)
    print(
        json.dumps(
            {
                "source": str(source),
                "click_min_rating": click_min_rating,
                **paths,
                "events": len(data.events),
                "users": len(data.users),
                "items": len(data.items),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
