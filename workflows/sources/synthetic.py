"""A seeded synthetic interaction log with a known ground truth.

Why not Merlin's ``aliccp-raw`` generator: its labels are drawn independently of the features, so no
model can beat chance on it. Here latent user and item vectors drive every event, so a good model
scores far above chance and tests can compare what a model learned against the truth.

How the world works:

* Items belong to a category; an item's latent vector is its category centre plus noise. Durations
  are log-normal per category (some categories are short clips, some long tutorials).
* Users have age band, gender and location. A user's latent vector mixes two favourite categories
  and a small shift shared by everyone of the same age band, so user attributes carry signal.
* A logging policy exposes items: a share ``personalized_exposure`` by the user's true preference
  (softmax over affinity), the rest by popularity (Zipf over items, ``popularity_skew``). Each exposure is one event (an impression).
* The user reacts by affinity ``a = <u, v> / sqrt(d)``: click with ``sigmoid(s * a - 1.5)``, watch a
  fraction of the duration that grows with ``a``, like and share more rarely, only after a click.

The result is three raw tables in the project's raw schema (see ``workflows/schema.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from configs import SyntheticDataConfig

AGE_BANDS = np.array(["18-24", "25-34", "35-44", "45-54", "55+"])
GENDERS = np.array(["F", "M"])
LOCATIONS = np.array(["north", "south", "east", "west", "central", "coast", "mountain", "islands"])
START_TIMESTAMP = 1_767_225_600  # 2026-01-01T00:00:00Z
SECONDS_PER_DAY = 86_400


@dataclass
class SyntheticData:
    """The three raw tables plus the latent truth that generated them."""

    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    user_latent: np.ndarray  # [num_users, latent_dim], row i is user id i + 1
    item_latent: np.ndarray  # [num_items, latent_dim], row j is item id j + 1

    def true_affinity(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Affinity of each (user, item) pair, the quantity that drives clicks."""
        u = self.user_latent[np.asarray(user_ids) - 1]
        v = self.item_latent[np.asarray(item_ids) - 1]
        return (u * v).sum(axis=-1) / np.sqrt(u.shape[-1])

    def true_top_items(self, user_id: int, k: int) -> np.ndarray:
        """The ``k`` item ids this user likes most according to the ground truth."""
        scores = self.item_latent @ self.user_latent[user_id - 1] / np.sqrt(self.user_latent.shape[1])
        return np.argsort(-scores)[:k] + 1

    def write_parquet(self, out_dir) -> dict[str, str]:
        """Write ``events``, ``users`` and ``items`` as parquet; return their paths."""
        from pathlib import Path

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in ("events", "users", "items"):
            path = out / f"{name}.parquet"
            getattr(self, name).to_parquet(path, index=False)
            paths[name] = str(path)
        return paths


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate(config: SyntheticDataConfig | None = None) -> SyntheticData:
    """Generate the synthetic log; the same config always gives the same tables."""
    cfg = config or SyntheticDataConfig()
    rng = np.random.default_rng(cfg.seed)
    d = cfg.latent_dim

    # Items: category centres plus noise; durations per category; a Zipf exposure propensity.
    centres = rng.normal(size=(cfg.num_categories, d))
    item_category = rng.integers(0, cfg.num_categories, size=cfg.num_items)
    item_latent = centres[item_category] + 0.6 * rng.normal(size=(cfg.num_items, d))
    category_log_duration = rng.uniform(np.log(20), np.log(3600), size=cfg.num_categories)
    duration = np.exp(category_log_duration[item_category] + 0.3 * rng.normal(size=cfg.num_items))
    duration = np.maximum(5, np.round(duration)).astype(np.int64)
    popularity_rank = rng.permutation(cfg.num_items) + 1
    exposure_pop = 1.0 / popularity_rank.astype(float) ** cfg.popularity_skew
    exposure_pop /= exposure_pop.sum()

    # Users: two favourite categories plus an age-band shift, so attributes are informative.
    age = rng.integers(0, len(AGE_BANDS), size=cfg.num_users)
    gender = rng.integers(0, len(GENDERS), size=cfg.num_users)
    location = rng.integers(0, len(LOCATIONS), size=cfg.num_users)
    age_shift = rng.normal(size=(len(AGE_BANDS), d))
    favourites = rng.integers(0, cfg.num_categories, size=(cfg.num_users, 2))
    user_latent = (
        0.7 * centres[favourites[:, 0]]
        + 0.4 * centres[favourites[:, 1]]
        + 0.5 * age_shift[age]
        + 0.4 * rng.normal(size=(cfg.num_users, d))
    )
    # Normalise so affinities have a comparable scale whatever latent_dim is.
    user_latent /= np.linalg.norm(user_latent, axis=1, keepdims=True) / np.sqrt(d) * 1.5
    item_latent /= np.linalg.norm(item_latent, axis=1, keepdims=True) / np.sqrt(d) * 1.5

    n_events = np.maximum(
        1, rng.lognormal(np.log(cfg.events_per_user) - 0.32, 0.8, size=cfg.num_users).round()
    ).astype(np.int64)

    rows_user, rows_item = [], []
    for start in range(0, cfg.num_users, 512):  # chunks keep the [users, items] matrix small
        stop = min(cfg.num_users, start + 512)
        aff = user_latent[start:stop] @ item_latent.T / np.sqrt(d)
        pref = np.exp(aff * 2.0 - (aff * 2.0).max(axis=1, keepdims=True))
        pref /= pref.sum(axis=1, keepdims=True)
        w = cfg.personalized_exposure
        policy = (1.0 - w) * exposure_pop[None, :] + w * pref
        cdf = np.cumsum(policy, axis=1)
        for row, uid in enumerate(range(start, stop)):
            draws = rng.random(n_events[uid]) * cdf[row, -1]
            items = np.minimum(np.searchsorted(cdf[row], draws), cfg.num_items - 1)
            rows_user.append(np.full(len(items), uid, dtype=np.int64))
            rows_item.append(items)
    user_idx = np.concatenate(rows_user)
    item_idx = np.concatenate(rows_item)

    aff = (user_latent[user_idx] * item_latent[item_idx]).sum(axis=1) / np.sqrt(d)
    s = cfg.preference_strength
    click = rng.random(len(aff)) < _sigmoid(s * aff - 1.5)
    watch_fraction = _sigmoid(s * aff - 0.5 + 0.8 * rng.normal(size=len(aff)))
    watch_seconds = np.where(click, np.round(watch_fraction * duration[item_idx]), 0).astype(np.int64)
    like = click & (rng.random(len(aff)) < _sigmoid(s * aff - 2.5))
    share = like & (rng.random(len(aff)) < _sigmoid(s * aff - 2.5))
    timestamp = START_TIMESTAMP + rng.integers(0, cfg.days * SECONDS_PER_DAY, size=len(aff))

    events = pd.DataFrame(
        {
            "user_id": user_idx + 1,
            "item_id": item_idx + 1,
            "timestamp": timestamp.astype(np.int64),
            "click": click.astype(np.int64),
            "watch_seconds": watch_seconds,
            "like": like.astype(np.int64),
            "share": share.astype(np.int64),
        }
    ).sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, cfg.num_users + 1, dtype=np.int64),
            "age_band": AGE_BANDS[age],
            "gender": GENDERS[gender],
            "location": LOCATIONS[location],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, cfg.num_items + 1, dtype=np.int64),
            "category": np.char.add("cat_", item_category.astype(str)),
            "duration_seconds": duration,
            "title": [f"item {i + 1} in category {c}" for i, c in enumerate(item_category)],
        }
    )
    return SyntheticData(events, users, items, user_latent, item_latent)
