"""A small generated shop log in another shape than the raw schema: the bring-your-own-data example.

Nothing here is special to the pipeline: ``write`` puts plain files in a folder together with the
spec ``configs/datasets/shop.yaml``, and the pipeline reads them through that spec alone
(``scripts/make_shop_data.py``, ``docs/own-data.md``). The files:

    events-000.csv, events-001.csv   customer, sku, ts (ms since 1970), view, add_to_cart, purchase
                                     one row per product shown in a listing (two files: a glob)
    items.csv                        sku, brand, price, category_path ("home>kitchen>knives")
    customers.jsonl                  {"customer": ..., "segment": ..., "region": ...}

How the world works: a sku's latent vector is its leaf category's centre plus its brand's and some
noise; a customer's mixes two favourite top-level categories. Listings show skus by preference
(``personalized_exposure``) or by popularity; the customer views (clicks) by affinity, adds to the
cart more rarely and less for pricier skus, and buys a share of what is in the cart.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from workflows.spec import DATASET_SPECS

SPEC = DATASET_SPECS / "shop.yaml"
TREE = {
    "home": {"kitchen": ["knives", "pans", "mugs"], "garden": ["tools", "seeds"]},
    "electronics": {"audio": ["headphones", "speakers"], "computers": ["laptops", "mice", "keyboards"]},
    "fashion": {"shoes": ["running", "boots"], "bags": ["backpacks", "totes"]},
    "sports": {"outdoor": ["tents", "bottles"], "fitness": ["mats", "weights"]},
}
BRANDS = np.array([f"brand_{c}" for c in "abcdefghijklmn"])
SEGMENTS = np.array(["new", "regular", "vip"])
REGIONS = np.array(["north", "south", "east", "west"])
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z in milliseconds
DAY_MS = 86_400_000


@dataclass
class ShopData:
    events: pd.DataFrame  # customer, sku, ts, view, add_to_cart, purchase
    items: pd.DataFrame  # sku, brand, price, category_path
    customers: pd.DataFrame  # customer, segment, region

    def write(self, out_dir: str | Path, files: int = 2) -> dict[str, str]:
        """Write the files and the spec (``dataset.yaml``) into ``out_dir``; return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        order = self.events.sort_values("ts", kind="stable")
        for i, part in enumerate(np.array_split(np.arange(len(order)), files)):
            path = out / f"events-{i:03d}.csv"
            order.iloc[part].to_csv(path, index=False)
            paths[f"events_{i}"] = str(path)
        self.items.to_csv(out / "items.csv", index=False)
        paths["items"] = str(out / "items.csv")
        with open(out / "customers.jsonl", "w") as f:
            for row in self.customers.to_dict(orient="records"):
                f.write(json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}) + "\n")
        paths["customers"] = str(out / "customers.jsonl")
        paths["spec"] = str(shutil.copyfile(SPEC, out / "dataset.yaml"))
        return paths


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def generate(
    customers: int = 400,
    skus: int = 250,
    events_per_customer: float = 40.0,
    days: int = 30,
    personalized_exposure: float = 0.7,
    seed: int = 3,
) -> ShopData:
    """The shop log; the same arguments always give the same tables."""
    rng = np.random.default_rng(seed)
    d = 8
    leaves = [(top, mid, leaf) for top, mids in TREE.items() for mid, ls in mids.items() for leaf in ls]
    tops = sorted(TREE)
    top_centre = {t: rng.normal(size=d) for t in tops}
    leaf_centre = np.array([top_centre[t] + 0.6 * rng.normal(size=d) for t, _, _ in leaves])
    brand_shift = 0.4 * rng.normal(size=(len(BRANDS), d))
    leaf = rng.integers(0, len(leaves), size=skus)
    brand = rng.integers(0, len(BRANDS), size=skus)
    item_latent = leaf_centre[leaf] + brand_shift[brand] + 0.4 * rng.normal(size=(skus, d))
    item_latent /= np.linalg.norm(item_latent, axis=1, keepdims=True)
    leaf_price = rng.uniform(np.log(5), np.log(800), size=len(leaves))
    price = np.round(np.exp(leaf_price[leaf] + 0.3 * rng.normal(size=skus) + 0.2 * (brand % 3)), 2)

    favourites = rng.integers(0, len(tops), size=(customers, 2))
    customer_latent = np.array([0.8 * top_centre[tops[a]] + 0.5 * top_centre[tops[b]] for a, b in favourites])
    customer_latent += 0.5 * rng.normal(size=(customers, d))
    customer_latent /= np.linalg.norm(customer_latent, axis=1, keepdims=True)
    segment = rng.choice(len(SEGMENTS), size=customers, p=[0.3, 0.55, 0.15])
    region = rng.integers(0, len(REGIONS), size=customers)

    popularity = 1.0 / (rng.permutation(skus) + 1.0)
    popularity /= popularity.sum()
    affinity = customer_latent @ item_latent.T / np.sqrt(d) * 3.0
    preference = np.exp(affinity - affinity.max(axis=1, keepdims=True))
    preference /= preference.sum(axis=1, keepdims=True)
    policy = (1 - personalized_exposure) * popularity[None, :] + personalized_exposure * preference
    counts = np.maximum(1, rng.lognormal(np.log(events_per_customer) - 0.3, 0.7, size=customers).round()).astype(int)
    rows_c, rows_s = [], []
    for c in range(customers):
        rows_c.append(np.full(counts[c], c))
        rows_s.append(rng.choice(skus, size=counts[c], p=policy[c]))
    cust, sku = np.concatenate(rows_c), np.concatenate(rows_s)
    a = affinity[cust, sku]
    view = rng.random(len(a)) < _sigmoid(3.0 * a - 2.0)
    cart = view & (rng.random(len(a)) < _sigmoid(2.0 * a - 1.0 - 0.4 * np.log(price[sku] / 50.0)))
    purchase = cart & (rng.random(len(a)) < 0.45 + 0.1 * (segment[cust] == 2))
    ts = START_MS + rng.integers(0, days * DAY_MS, size=len(a))

    events = pd.DataFrame(
        {
            "customer": cust + 1001,
            "sku": sku + 50_001,
            "ts": ts.astype(np.int64),
            "view": view.astype(np.int64),
            "add_to_cart": cart.astype(np.int64),
            "purchase": purchase.astype(np.int64),
        }
    ).sort_values(["ts", "customer"], kind="stable", ignore_index=True)
    items = pd.DataFrame(
        {
            "sku": np.arange(skus) + 50_001,
            "brand": BRANDS[brand],
            "price": price,
            "category_path": [">".join(leaves[i]) for i in leaf],
        }
    )
    customer_table = pd.DataFrame(
        {"customer": np.arange(customers) + 1001, "segment": SEGMENTS[segment], "region": REGIONS[region]}
    )
    return ShopData(events, items, customer_table)
