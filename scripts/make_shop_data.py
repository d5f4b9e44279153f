#!/usr/bin/env python
"""Write the generated shop log (docs/own-data.md): CSV events with customer, sku, ts in
milliseconds and view / add_to_cart / purchase flags, an item CSV (brand, price, category_path), a
customer JSON-lines file, and their dataset spec (a copy of configs/datasets/shop.yaml) as
dataset.yaml in the same folder.

    python scripts/make_shop_data.py --out myshop
    python scripts/prepare_data.py --spec myshop/dataset.yaml --out myshop/processed
"""

import argparse
import math

from configs.cli import non_negative_int, output_folder, positive_int
from workflows.sources.shop import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_folder, default="data/shop", help="folder to write (default: data/shop)")
    parser.add_argument("--customers", type=positive_int, default=400)
    parser.add_argument("--skus", type=positive_int, default=250)
    parser.add_argument("--events-per-customer", type=float, default=40.0)
    parser.add_argument("--seed", type=non_negative_int, default=3)
    args = parser.parse_args()
    if not (args.events_per_customer > 0 and math.isfinite(args.events_per_customer)):  # also NaN, inf
        parser.error(f"argument --events-per-customer: must be a finite number > 0, got {args.events_per_customer}")
    data = generate(args.customers, args.skus, args.events_per_customer, seed=args.seed)
    paths = data.write(args.out)
    print(f"wrote {len(data.events)} events, {len(data.items)} skus, {len(data.customers)} customers to {args.out}")
    for name, path in paths.items():
        print(f"  {name}: {path}")


if __name__ == "__main__":
    main()
