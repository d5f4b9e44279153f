"""The feedback log: every served impression and every feedback event, durably.

SQLite in WAL mode with ``synchronous=FULL`` (or PostgreSQL, given a ``postgresql://`` DSN): a call
returns only after its transaction is on disk, so a process killed mid-stream loses nothing it
acknowledged (the kill test in ``tests/test_feedback_log.py`` checks exactly that). Many processes
may append at once; readers never block writers. A feedback event is stored once per (request,
item, event): the same event sent again (a client's retry, a replay) is ignored, and
``log_feedback_many`` returns only the new ones. A repeat must be the same event: one whose value (or
user) differs from the stored one is a client's bug, not a retry, and is refused with
``FeedbackConflict`` naming the request, the item, the event and both values (nothing of its batch is
stored); before 2026-12-07 it was acknowledged and dropped, and the client never learnt its value was lost.

    impressions(request_id, ts, user_id, item_id, position, model_version, arm, served_by, experiment)
    feedback(request_id, ts, user_id, item_id, event, value)      event: click|watch_seconds|like|share|churn
    empty_responses(request_id, ts, user_id, model_version, arm, served_by, experiment)

A response with no items has no impression row; ``empty_responses`` keeps it, so feedback on it (a
churn) finds the request the server issued.

``experiment`` is the name of the experiment that served the response (the router's rollout), so two
experiments written into one log at once, with the same arm names, are told apart
(``online.ab_report``: ``logged_requests``, ``analyze``). '' is unknown: an in-process simulation, or
a row of a log written before the column existed (2026-12-07), which opening the log migrates by
adding the column with that default.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from workflows.live_store import Database, is_postgres

SIGNALS = ("click", "watch_seconds", "like", "share")  # reactions to one item: training signals
EVENTS = (*SIGNALS, "churn")  # churn: the user did not come back after this response (item_id -1)

SCHEMA = """
CREATE TABLE IF NOT EXISTS impressions (
    request_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, user_id BIGINT NOT NULL, item_id BIGINT NOT NULL,
    position INTEGER NOT NULL, model_version TEXT NOT NULL, arm TEXT NOT NULL, served_by TEXT NOT NULL,
    experiment TEXT NOT NULL DEFAULT '', PRIMARY KEY (request_id, position));
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, user_id BIGINT NOT NULL, item_id BIGINT NOT NULL,
    event TEXT NOT NULL, value DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id);
CREATE TABLE IF NOT EXISTS empty_responses (
    request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, user_id BIGINT NOT NULL,
    model_version TEXT NOT NULL, arm TEXT NOT NULL, served_by TEXT NOT NULL, experiment TEXT NOT NULL DEFAULT '');
"""
# SQLite logs written before feedback was deduplicated may hold repeats: keep the first of each, then index.
# PostgreSQL logs came after the index (every one was opened with it first), so they hold none.
DROP_REPEATS = (
    "DELETE FROM feedback WHERE rowid NOT IN (SELECT MIN(rowid) FROM feedback GROUP BY request_id, item_id, event)"
)
UNIQUE_FEEDBACK = "CREATE UNIQUE INDEX IF NOT EXISTS feedback_once ON feedback (request_id, item_id, event)"
# Columns named: a log may gain columns (``experiment`` did), and a positional insert breaks on it.
INSERT_IMPRESSION = (
    "INSERT INTO impressions (request_id, ts, user_id, item_id, position, model_version, arm, served_by, experiment) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_EMPTY_RESPONSE = (
    "INSERT INTO empty_responses (request_id, ts, user_id, model_version, arm, served_by, experiment) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# Logs written before responses named their experiment lack the column: added, '' (unknown) in every old row.
EXPERIMENT_TABLES = ("impressions", "empty_responses")
ADD_EXPERIMENT = "ALTER TABLE {table} ADD COLUMN experiment TEXT NOT NULL DEFAULT ''"
SQLITE_COLUMNS = "SELECT name FROM pragma_table_info(?)"
POSTGRES_COLUMNS = (
    "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?"
)


class FeedbackConflict(ValueError):
    """A repeated (request, item, event) whose value or user differs from the one the log stored first."""


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN repeats NaN


class FeedbackLog:
    """The log at ``path``: a SQLite file, or a ``postgresql://`` DSN for several server replicas
    sharing one log (the live store's backends, ``workflows/live_store.py``: same SQL, same durability)."""

    def __init__(self, path: str | Path):
        self.path = str(path) if is_postgres(path) else Path(path)
        self.db = Database(self.path, [s for s in SCHEMA.split(";") if s.strip()])
        with self.db.schema_transaction():  # one process at a time checks and creates the unique index
            if not self.db.postgres and not self.db.query("SELECT 1 FROM sqlite_master WHERE name = 'feedback_once'"):
                self.db.execute(DROP_REPEATS)
            self.db.execute(UNIQUE_FEEDBACK)
            for table in EXPERIMENT_TABLES:
                columns = self.db.query(POSTGRES_COLUMNS if self.db.postgres else SQLITE_COLUMNS, (table,))
                if "experiment" not in {row[0] for row in columns}:
                    self.db.execute(ADD_EXPERIMENT.format(table=table))

    def log_impressions(
        self,
        request_id: str,
        user_id: int,
        item_ids: Sequence[int],
        model_version: str,
        arm: str,
        served_by: str,
        ts: float | None = None,
        experiment: str = "",
    ) -> None:
        """One served slate: one row per position, in one transaction; an empty one, one row of
        ``empty_responses``. ``experiment``: the name of the experiment that served it ('' unknown)."""
        ts = time.time() if ts is None else ts
        rows = [
            (request_id, ts, int(user_id), int(item), pos, str(model_version), arm, served_by, experiment)
            for pos, item in enumerate(item_ids)
        ]
        with self.db.transaction():
            for row in rows:
                self.db.execute(INSERT_IMPRESSION, row)
            if not rows:
                self.db.execute(
                    INSERT_EMPTY_RESPONSE,
                    (request_id, ts, int(user_id), str(model_version), arm, served_by, experiment),
                )

    def log_feedback(
        self, request_id: str, user_id: int, item_id: int, event: str, value: float = 1.0, ts: float | None = None
    ) -> bool:
        """Store one event; False if the same event for this request and item was already stored."""
        return bool(self.log_feedback_many([(request_id, user_id, item_id, event, value)], ts))

    def log_feedback_many(self, events: Iterable[tuple], ts: float | None = None) -> list[tuple]:
        """Store ``(request_id, user_id, item_id, event, value)`` events in one transaction; return
        those that were new (an event already stored for the same request and item is ignored).
        A repeat whose value or user differs from the stored event raises ``FeedbackConflict`` and
        stores nothing of the batch: a retry repeats what it retries."""
        ts = time.time() if ts is None else ts
        rows = []
        for request_id, user_id, item_id, event, value in events:
            if event not in EVENTS:
                raise ValueError(f"unknown feedback event {event!r}; expected one of {EVENTS}")
            rows.append((request_id, int(user_id), int(item_id), event, float(value)))
        with self.db.transaction():
            new = self.db.insert_new(
                "INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(r, ts, u, i, e, v) for r, u, i, e, v in rows],
            )
            repeats = [row for row, is_new in zip(rows, new) if not is_new]
            if repeats:  # inside the transaction: a conflict rolls the batch back
                self._check_repeats(repeats)
        return [row for row, is_new in zip(rows, new) if is_new]

    def _check_repeats(self, repeats: list[tuple]) -> None:
        """Raise ``FeedbackConflict`` unless each row repeats the stored event of its request, item and
        event (one read per request, ``reactions``)."""
        stored = {request_id: self.reactions(request_id) for request_id in {row[0] for row in repeats}}
        for request_id, user_id, item_id, event, value in repeats:
            first = stored[request_id].get((item_id, event))
            if first is None:  # cannot happen: the unique index refused the row
                continue
            first_user, first_value = first[1], first[4]
            if not _same(first_value, value):
                raise FeedbackConflict(
                    f"request_id {request_id}: ({item_id}, {event!r}) was already stored with value "
                    f"{first_value:g}, this repeat says {value:g}; a retry must repeat the same values"
                )
            if first_user != user_id:
                raise FeedbackConflict(
                    f"request_id {request_id}: ({item_id}, {event!r}) was already stored for user {first_user}, "
                    f"this repeat says user {user_id}"
                )

    def reactions(self, request_id: str) -> dict[tuple[int, str], tuple]:
        """The stored reactions to one response, each as first stored:
        ``{(item_id, event): (request_id, user_id, item_id, event, value, ts)}``. The reactions one call
        stored share its ``ts``."""
        rows = self.db.query(
            "SELECT user_id, item_id, event, value, ts FROM feedback WHERE request_id = ?", (request_id,)
        )
        return {
            (int(item), event): (request_id, int(user), int(item), event, float(value), float(ts))
            for user, item, event, value, ts in rows
        }

    def served(self, request_id: str) -> dict | None:
        """What one response showed: user, items in order (none for an empty response), arm and
        model version; None if unknown."""
        rows = self.db.query(
            "SELECT user_id, item_id, arm, model_version FROM impressions WHERE request_id = ? ORDER BY position",
            (request_id,),
        )
        if not rows:
            empty = self.db.query(
                "SELECT user_id, arm, model_version FROM empty_responses WHERE request_id = ?", (request_id,)
            )
            if not empty:
                return None
            user_id, arm, model_version = empty[0]
            return {"user_id": user_id, "item_ids": [], "arm": arm, "model_version": model_version}
        return {"user_id": rows[0][0], "item_ids": [r[1] for r in rows], "arm": rows[0][2], "model_version": rows[0][3]}

    def impressions(self, since: float | None = None, experiment: str | None = None) -> pd.DataFrame:
        """Impression rows; with ``since`` (epoch seconds) those logged since then, with ``experiment``
        those of that experiment and of unknown experiment ('', ``online.ab_report.of_experiment``).
        The filters run in the database: a shared log holds millions of rows of other periods and experiments."""
        return self._frame("impressions", *self._where(since, experiment))

    def feedback(self, since: float | None = None, experiment: str | None = None) -> pd.DataFrame:
        """Feedback rows; with ``since`` or ``experiment``, those sent since ``since`` about the
        responses ``impressions(since, experiment)`` or ``empty_responses(since, experiment)`` returns."""
        if since is None and experiment is None:
            return self._frame("feedback")
        where, params = self._where(since, experiment)
        ours = f"SELECT request_id FROM impressions{where} UNION ALL SELECT request_id FROM empty_responses{where}"
        if since is not None:
            return self._frame(
                "feedback", f" WHERE ts >= ? AND request_id IN ({ours})", (float(since), *params, *params)
            )
        return self._frame("feedback", f" WHERE request_id IN ({ours})", (*params, *params))

    def empty_responses(self, since: float | None = None, experiment: str | None = None) -> pd.DataFrame:
        """Responses with no items (no impression row): each is still a request of its arm and user.
        ``since`` and ``experiment`` as in ``impressions``."""
        where, params = self._where(since, experiment)
        frame = self.db.frame(f"SELECT * FROM empty_responses{where}", params)
        if frame.empty:
            frame = frame.astype({"ts": float, "user_id": np.int64})
        return frame

    @staticmethod
    def _where(since: float | None, experiment: str | None) -> tuple[str, tuple]:
        """The SQL filter (and its parameters) of responses logged since ``since`` of ``experiment``."""
        clauses, params = [], []
        if since is not None:
            clauses.append("ts >= ?")
            params.append(float(since))
        if experiment is not None:
            clauses.append("experiment IN (?, '')")
            params.append(experiment)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)

    def _frame(self, table: str, where: str = "", params: tuple = ()) -> pd.DataFrame:
        frame = self.db.frame(f"SELECT * FROM {table}{where}", params)
        if frame.empty:  # keep the columns' types of an empty table
            frame = frame.astype({"ts": float, "user_id": np.int64, "item_id": np.int64})
        return frame

    def counts(self) -> dict[str, int]:
        """Rows of each table: impressions, feedback and empty responses (requests that showed nothing)."""
        tables = ("impressions", "feedback", "empty_responses")
        return {t: self.db.query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in tables}

    def close(self) -> None:
        self.db.close()


def signals_per_item(feedback: pd.DataFrame) -> pd.DataFrame:
    """``SIGNALS`` per (request_id, item_id) (the largest value of each; 0 where none was sent), an
    empty frame with that index when there is no feedback to a shown item (no clicks yet, churns only)."""
    fb = feedback[feedback["event"].isin(SIGNALS)]
    if fb.empty:
        index = pd.MultiIndex.from_arrays(
            [np.array([], dtype=object), np.array([], dtype=np.int64)], names=["request_id", "item_id"]
        )
        return pd.DataFrame(0.0, index=index, columns=list(SIGNALS))
    signals = fb.pivot_table(index=["request_id", "item_id"], columns="event", values="value", aggfunc="max")
    return signals.reindex(columns=list(SIGNALS)).fillna(0)


def to_events(log: FeedbackLog, start_timestamp: int, seconds_per_request: int = 1) -> pd.DataFrame:
    """The log as raw events (the schema the dataset pipeline reads): one row per impression, with
    its click / watch_seconds / like / share from the feedback of the same request and item.

    Timestamps are synthesised from the order of requests (``start_timestamp`` + n seconds) because
    the simulator's wall clock is not the world's clock.
    """
    imp = log.impressions()
    if imp.empty:
        return pd.DataFrame(columns=["user_id", "item_id", "timestamp", "click", "watch_seconds", "like", "share"])
    fb = log.feedback()
    signals = signals_per_item(fb)
    order = imp.groupby("request_id")["ts"].min().rank(method="first").astype(np.int64)
    events = imp.join(signals, on=["request_id", "item_id"]).fillna({e: 0 for e in SIGNALS})
    events["timestamp"] = start_timestamp + order.reindex(events["request_id"]).to_numpy() * seconds_per_request
    out = events[["user_id", "item_id", "timestamp"]].copy()
    for e in SIGNALS:
        out[e] = events[e].astype(np.int64)
    return out.sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)
