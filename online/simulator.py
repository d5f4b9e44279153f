"""Simulated users that close the loop: they ask the live funnel for recommendations, react by their
latent preferences, and come back tomorrow or churn depending on what they were shown.

The users are the synthetic world's (``workflows/sources/synthetic.py``): their reactions come from
the same ``respond`` model that generated the training log, so a model that learned the log well
serves them well. Each simulated day every still-active user makes one request; items further down
the slate are examined less (``position_decay ** position``). A user's chance to return grows with
the day's engagement (clicks and minutes watched) and a user who does not return has churned.

``recommend(user_id, k, arm)`` is any callable returning an object with ``item_ids``,
``model_version`` and ``served_by`` (``serving.client.FunnelClient.recommend`` with an arm-aware
wrapper, or a stub in unit tests); every impression and reaction goes to the feedback log.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from configs import SyntheticDataConfig
from workflows.sources.synthetic import SyntheticData, respond


@dataclass
class SimulationConfig:
    days: int = 5
    k: int = 10
    position_decay: float = 0.85  # P(examine position p) = position_decay ** p
    return_base: float = 0.4  # logit of returning after a day with no engagement at all
    return_per_click: float = 0.6  # each click raises the logit this much
    return_per_minute: float = 0.05  # each minute watched raises it this much
    seed: int = 0


@dataclass
class DayOutcome:
    day: int
    user_id: int
    arm: str
    request_id: str
    model_version: str
    served_by: str
    impressions: int
    clicks: int
    watch_seconds: int
    likes: int
    shares: int
    returned: bool


@dataclass
class UserSimulator:
    """``world`` and ``synthetic`` must be the generated world and the config that generated it."""

    world: SyntheticData
    synthetic: SyntheticDataConfig
    config: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.config.seed)
        items = self.world.items.set_index("item_id")
        self.duration = items["duration_seconds"]
        self.clickbait = set(np.asarray(self.world.truth.clickbait_items).tolist())

    def react(self, user_id: int, item_ids: np.ndarray):
        """The user's reaction to a slate: arrays (click, watch_seconds, like, share) per position."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        known = np.isin(item_ids, self.duration.index.to_numpy())
        affinity = np.full(len(item_ids), -3.0)  # an id the world does not know is of no interest
        if known.any():
            affinity[known] = self.world.true_affinity(np.full(known.sum(), user_id), item_ids[known], at_end=True)
        duration = self.duration.reindex(item_ids).fillna(60).to_numpy()
        bait = np.isin(item_ids, list(self.clickbait))
        examine = self.config.position_decay ** np.arange(len(item_ids))
        return respond(affinity, duration, bait, self.synthetic, self.rng, position_bias=examine)

    def run(self, users, recommend: Callable, assign: Callable[[int], str], log=None) -> pd.DataFrame:
        """Simulate ``config.days`` days for ``users``; return one row per (day, user) request."""
        cfg = self.config
        active = set(int(u) for u in users)
        rows = []
        for day in range(cfg.days):
            for user in sorted(active):
                arm = assign(user)
                recs = recommend(user, cfg.k, arm)
                request_id = uuid.uuid4().hex
                items = np.asarray(recs.item_ids, dtype=np.int64)
                click, watch, like, share = self.react(user, items)
                if log is not None:
                    log.log_impressions(request_id, user, items, recs.model_version, arm, recs.served_by)
                    events = [(request_id, user, int(i), "click", 1.0) for i in items[click]]
                    events += [(request_id, user, int(i), "watch_seconds", float(w)) for i, w in zip(items[click], watch[click])]
                    events += [(request_id, user, int(i), "like", 1.0) for i in items[like]]
                    events += [(request_id, user, int(i), "share", 1.0) for i in items[share]]
                    if events:
                        log.log_feedback_many(events)
                logit = cfg.return_base + cfg.return_per_click * click.sum() + cfg.return_per_minute * watch.sum() / 60
                returned = bool(self.rng.random() < 1 / (1 + np.exp(-logit)))
                rows.append(DayOutcome(day, user, arm, request_id, str(recs.model_version), str(recs.served_by),
                                       len(items), int(click.sum()), int(watch.sum()), int(like.sum()),
                                       int(share.sum()), returned))
            active = {r.user_id for r in rows if r.day == day and r.returned}
        return pd.DataFrame([r.__dict__ for r in rows])


def per_arm_summary(outcomes: pd.DataFrame) -> pd.DataFrame:
    """CTR, watch time, likes and retention per arm (retention: share of users still active on the last day)."""
    last_day = outcomes["day"].max()
    g = outcomes.groupby("arm")
    users = g["user_id"].nunique()
    retained = outcomes[outcomes["day"] == last_day].groupby("arm")["user_id"].nunique().reindex(users.index, fill_value=0)
    return pd.DataFrame({
        "users": users,
        "requests": g.size(),
        "ctr": g["clicks"].sum() / g["impressions"].sum(),
        "watch_minutes_per_request": g["watch_seconds"].mean() / 60,
        "likes_per_request": g["likes"].mean(),
        "retention": retained / users,
    })
