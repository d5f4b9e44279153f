#!/usr/bin/env python
"""Write the embedded synthetic dataset (events, users, items) as parquet."""

from configs.runtime import quiet_known_warnings

quiet_known_warnings()  # before TensorFlow is imported

import argparse

from configs import load_config
from configs.cli import config_file, output_folder, positive_int
from workflows.sources.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=config_file, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--out", type=output_folder, default="data/raw", help="output folder (default: data/raw)")
    parser.add_argument("--num-users", type=positive_int, help="override synthetic.num_users")
    parser.add_argument("--num-items", type=positive_int, help="override synthetic.num_items")
    args = parser.parse_args()
    overrides = {k: v for k, v in {"num_users": args.num_users, "num_items": args.num_items}.items() if v}
    config = load_config(args.config, {"synthetic": overrides} if overrides else None)
    data = generate(config.synthetic)
    paths = data.write_parquet(args.out)
    print(f"wrote {len(data.events)} events, {len(data.users)} users, {len(data.items)} items to {args.out}")
    for name, path in paths.items():
        print(f"  {name}: {path}")


if __name__ == "__main__":
    main()
