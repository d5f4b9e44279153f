"""Simulated users that close the loop: they ask the live funnel for recommendations, react by their
latent preferences, and come back tomorrow or churn depending on what they were shown.

The users are the synthetic world's (``workflows/sources/synthetic.py``): their reactions come from
the same ``respond`` model that generated the training log, so a model that learned the log well
serves them well. Each simulated day every still-active user makes one request; items further down
the slate are examined less (``position_decay ** position``). A user's chance to return grows with
the day's engagement (clicks and minutes watched); a user who does not return has churned, and a
``churn`` event is reported for the last response they saw.

Two ways to drive it:

* against the live server (``scripts/ab_test.py``): ``recommend(user_id, k)`` asks the ``ab_router``
  over gRPC and returns its response, which carries the arm and a ``request_id``; the server logged
  the impressions; ``feedback(request_id, user_id, item_ids, events, values)`` sends the reactions
  to the server's ``feedback`` endpoint (``serving.client.FunnelClient``);
* in-process (``online/feedback_loop.py``, unit tests): pass ``assign(user_id) -> arm``; then
  ``recommend(user_id, k, arm)`` serves and the simulator logs impressions and reactions to ``log``.

Randomness is drawn per (seed, day, user), so a run is reproducible with any ``concurrency``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from configs import SimulationConfig, SyntheticDataConfig
from workflows.sources.synthetic import SyntheticData, respond

__all__ = ["SimulationConfig", "UserSimulator", "DayOutcome", "per_arm_summary"]


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
        # Plain arrays, not a pandas Series: ``react`` runs in many threads at once and pandas' lazily
        # cached ``Index.is_unique`` is not thread-safe (pandas-dev/pandas#21150), which made
        # ``Series.reindex`` fail at random with "cannot reindex on an axis with duplicate labels".
        ids = self.world.items["item_id"].to_numpy()
        order = np.argsort(ids)
        self._item_ids = ids[order].astype(np.int64)
        self._durations = self.world.items["duration_seconds"].to_numpy()[order].astype(np.float64)
        self._clickbait = np.unique(np.asarray(self.world.truth.clickbait_items, dtype=np.int64))
        self._num_users = len(self.world.user_latent)  # the world's users are 1 .. num_users

    def _check_users(self, user_ids) -> None:
        """Refuse ids outside the world's users: the taste lookup indexes ``user_id - 1``, so user 0
        (or a negative id) was simulated silently with another user's taste, and an id past the last
        user failed with an IndexError in a worker thread after the other users had been served."""
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        unknown = ids[(ids < 1) | (ids > self._num_users)]
        if unknown.size:
            raise ValueError(
                f"user id(s) {sorted(set(unknown.tolist()))[:5]} are not the simulated world's users "
                f"(1 .. {self._num_users}): the simulator has no taste for them"
            )

    def _rng(self, day: int, user_id: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, day + 1, int(user_id)])  # day -1: outside a run

    def react(self, user_id: int, item_ids: np.ndarray, rng: np.random.Generator | None = None):
        """The user's reaction to a slate: arrays (click, watch_seconds, like, share) per position."""
        self._check_users([user_id])
        rng = rng if rng is not None else self._rng(-1, user_id)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._item_ids, item_ids), len(self._item_ids) - 1)
        known = self._item_ids[at] == item_ids
        affinity = np.full(len(item_ids), -3.0)  # an id the world does not know is of no interest
        if known.any():
            affinity[known] = self.world.true_affinity(np.full(known.sum(), user_id), item_ids[known], at_end=True)
        duration = np.where(known, self._durations[at], 60.0)  # 60 s for an id the world does not know
        bait = np.isin(item_ids, self._clickbait)
        examine = self.config.position_decay ** np.arange(len(item_ids))
        return respond(affinity, duration, bait, self.synthetic, rng, position_bias=examine)

    def visit(
        self,
        day: int,
        user: int,
        recommend: Callable,
        assign: Callable | None = None,
        log=None,
        feedback: Callable | None = None,
    ) -> DayOutcome:
        """One user's request of the day, their reactions (reported) and whether they come back."""
        cfg = self.config
        self._check_users([user])  # before the request is served
        rng = self._rng(day, user)
        if assign is not None:  # in-process: we assign, serve and log the impressions
            arm = assign(user)
            recs = recommend(user, cfg.k, arm)
            request_id = uuid.uuid4().hex
            items = np.asarray(recs.item_ids, dtype=np.int64)
            if log is not None:
                log.log_impressions(request_id, user, items, recs.model_version, arm, recs.served_by)
        else:  # live server: the router assigned the arm and logged the impressions
            recs = recommend(user, cfg.k)
            arm, request_id = recs.arm, recs.request_id
            items = np.asarray(recs.item_ids, dtype=np.int64)
        click, watch, like, share = self.react(user, items, rng)
        logit = cfg.return_base + cfg.return_per_click * click.sum() + cfg.return_per_minute * watch.sum() / 60
        returned = bool(rng.random() < 1 / (1 + np.exp(-logit)))
        reported = [(int(i), "click", 1.0) for i in items[click]]
        reported += [(int(i), "watch_seconds", float(w)) for i, w in zip(items[click], watch[click])]
        reported += [(int(i), "like", 1.0) for i in items[like]]
        reported += [(int(i), "share", 1.0) for i in items[share]]
        if not returned:
            reported.append((-1, "churn", 1.0))
        if reported:
            if feedback is not None:
                feedback(request_id, user, *map(list, zip(*reported)))
            elif log is not None:
                log.log_feedback_many((request_id, user, i, e, v) for i, e, v in reported)
        return DayOutcome(
            day,
            user,
            arm,
            request_id,
            str(recs.model_version),
            str(recs.served_by),
            len(items),
            int(click.sum()),
            int(watch.sum()),
            int(like.sum()),
            int(share.sum()),
            returned,
        )

    def run(
        self,
        users,
        recommend: Callable,
        assign: Callable[[int], str] | None = None,
        log=None,
        feedback: Callable | None = None,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Simulate ``config.days`` days for ``users``; return one row per (day, user) request."""
        active = sorted(set(int(u) for u in users))
        self._check_users(active)  # before any request is served and logged
        rows: list[DayOutcome] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, unit="request", desc="simulated requests")
        with ThreadPoolExecutor(max(1, self.config.concurrency)) as pool:
            for day in range(self.config.days):
                futures = [pool.submit(self.visit, day, u, recommend, assign, log, feedback) for u in active]
                today = [f.result() for f in futures]
                rows += today
                if bar is not None:
                    bar.update(len(today))
                active = [r.user_id for r in today if r.returned]
                if not active:
                    break
        if bar is not None:
            bar.close()
        return pd.DataFrame([r.__dict__ for r in rows])


def per_arm_summary(outcomes: pd.DataFrame) -> pd.DataFrame:
    """CTR, watch time, likes and retention per arm (retention: share of users who never churned, i.e.
    came back after every simulated day, as ``online.ab_report`` counts it). Counting the users still
    active on the last day instead gave 1.0 for a one-day simulation, or when the run stopped early
    because everyone had churned, whoever came back."""
    g = outcomes.groupby("arm")
    users = g["user_id"].nunique()
    churned = (
        outcomes[~outcomes["returned"].astype(bool)]
        .groupby("arm")["user_id"]
        .nunique()
        .reindex(users.index, fill_value=0)
    )
    retained = users - churned
    return pd.DataFrame(
        {
            "users": users,
            "requests": g.size(),
            "ctr": g["clicks"].sum() / g["impressions"].sum(),
            "watch_minutes_per_request": g["watch_seconds"].mean() / 60,
            "likes_per_request": g["likes"].mean(),
            "retention": retained / users,
        }
    )
