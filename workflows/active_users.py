"""Active users: train only on users with at least ``min_events`` qualifying events lately.

The seed's example: a user with >= 10 clicks in the last 10 days is active. Everyone else is served
by the ``fallback`` (recency-weighted popularity), so the models spend their capacity on users with
enough signal. Applied to the training part only: validation keeps every user, so the evaluation
sees the same population the funnel serves. The dropped users' training-period events still go to
serving as their history (``fallback_events.parquet``), so the fallback skips what they clicked.
"""

from __future__ import annotations

from configs import ActiveUsersConfig
from workflows.recency_window import window_seconds
from workflows.report import StepReport, report
from workflows.rows import IsIn, filter_rows


def active_user_ids(events, config: ActiveUsersConfig, as_of: int | None = None):
    """Ids of the users active in the ``config.days`` days before ``as_of`` (default: newest event)."""
    end = int(events["timestamp"].max().compute()) + 1 if as_of is None else int(as_of)
    start = end - window_seconds(config.days)
    recent = events[(events["timestamp"] >= start) & (events["timestamp"] < end)]
    if config.event != "impression":
        recent = recent[recent[config.event] > 0]
    per_user = recent.groupby("user_id").size()
    active = per_user[per_user >= config.min_events].index.compute()
    return active.values_host if hasattr(active, "values_host") else active.values


def active_users(events, config: ActiveUsersConfig, as_of: int | None = None) -> tuple[object, StepReport]:
    """Keep the events of active users; report how many users and rows went to the fallback."""
    if not config.enabled:
        return events, report("active_users", events, events, enabled=False)
    ids = active_user_ids(events, config, as_of)
    kept = filter_rows(events, IsIn("user_id", ids)).persist()
    return kept, report(
        "active_users", events, kept, min_events=config.min_events, days=config.days, event=config.event
    )
