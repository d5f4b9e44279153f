"""Recency window: keep only the last ``days`` days of the log (fresh data beats old data).

The window ends at the newest event of the log, so the same config gives the same window whatever
wall-clock day the pipeline runs on.
"""

from __future__ import annotations

from configs import RecencyWindowConfig
from workflows.report import StepReport, report
from workflows.rows import AtLeast, filter_rows

SECONDS_PER_DAY = 86_400


def window_seconds(days: float) -> int:
    """``days`` in whole seconds, rounded: truncating cut 0.7 days (60480 s) to 60479 s, 0.7 x 86400
    being 60479.99999999999 in floats."""
    return round(days * SECONDS_PER_DAY)


def recency_window(events, config: RecencyWindowConfig) -> tuple[object, StepReport]:
    """Return the events of the last ``config.days`` days (all events when ``days`` is 0)."""
    if config.days <= 0:
        return events, report("recency_window", events, events, days=0)
    newest = int(events["timestamp"].max().compute())
    # [newest + 1 - D days, newest + 1): exactly D days of seconds, the half-open window the active
    # users and activity counts use too (one more second would keep an event D days + 1 s old).
    start = newest + 1 - window_seconds(config.days)
    kept = filter_rows(events, AtLeast("timestamp", start)).persist()
    return kept, report("recency_window", events, kept, days=config.days, window_start=start)
