"""The live store: what users did and what was taken down after the export, read by every request.

The online store (``serving/online_store.py``) is written once, at export. This store is its
counterpart that keeps changing while the server runs:

    live_events(user_id, item_id, ts, event, value, source)   UNIQUE (user_id, ts, item_id, event)
        one row per interaction, raw ids, ``ts`` in seconds since the epoch; appended by the feedback
        endpoint (``online/router.py``, source ``feedback``) and by ingestion (``ingest_events``,
        source ``ingest``). The unique key makes re-ingesting a file, or a replayed event, a no-op,
        and doubles as the index of the per-request read (``user_events``: one indexed range scan).
    takedowns(item_id PRIMARY KEY, active, ts, reason, actor)     the current state of each item
    takedown_log(item_id, ts, action, reason, actor)              every takedown and undo, in order

One interface, two backends, chosen by the location string:

    a path (default ``<repository>-live.sqlite`` beside the model repository, like the feedback log)
        SQLite in WAL mode with ``synchronous=FULL``: one box, no server; many processes write and
        read at once (writers take turns, readers never block).
    ``postgresql://...`` (``$FUNNEL_STORE_URL``)
        PostgreSQL, for several server replicas sharing one store. PostgreSQL rather than Redis:
        an acknowledged commit is on disk by default (Redis acknowledges before its fsync unless
        ``appendfsync always``), writes are transactions with the same UNIQUE constraints the
        feedback log relies on for idempotence, and both backends run one SQL schema, so
        ``FeedbackLog`` runs on it too (``online/feedback_log.py``).

Every write returns only after its transaction is durable (acknowledged = on disk).

It lives in ``workflows`` because the dataset pipeline reads it as well as serving: the content
filter excludes taken-down items from the next training run (``workflows/content_filter.py``),
and packages import only from the layers below them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd

from workflows.local_parquet import read_parquet
from workflows.validate import fits_int64

log = logging.getLogger(__name__)

STORE_ENV = "FUNNEL_STORE_URL"
# Interactions a live event may record. "view" is what an ingested row without an event column is.
LIVE_EVENTS = ("view", "click", "watch_seconds", "like", "share")
SOURCES = ("feedback", "ingest")
# Seconds since the epoch below this (the year 5138); at or above, a timestamp is taken for milliseconds.
MAX_EPOCH_SECONDS = 1e11

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS live_events (
        user_id BIGINT NOT NULL, item_id BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, event TEXT NOT NULL,
        value DOUBLE PRECISION NOT NULL, source TEXT NOT NULL, UNIQUE (user_id, ts, item_id, event))""",
    """CREATE TABLE IF NOT EXISTS takedowns (
        item_id BIGINT PRIMARY KEY, active INTEGER NOT NULL, ts DOUBLE PRECISION NOT NULL,
        reason TEXT NOT NULL, actor TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS takedown_log (
        item_id BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, action TEXT NOT NULL,
        reason TEXT NOT NULL, actor TEXT NOT NULL)""",
)


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def store_location(repository: str | Path) -> str:
    """The live store of the deployment serving ``repository``: ``$FUNNEL_STORE_URL`` (a path or a
    ``postgresql://`` DSN), else ``<repository>-live.sqlite`` beside it (``store_beside``)."""
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    return store_beside(repository)


def store_beside(repository: str | Path) -> str:
    """``<repository>-live.sqlite`` beside the repository (never inside: an export replaces the
    repository folder), whatever ``$FUNNEL_STORE_URL`` says: the store an offline replay reads."""
    repository = Path(repository).resolve()
    return str(repository.parent / f"{repository.name}-live.sqlite")


def require_repository(repository: str | Path) -> None:
    """For the command-line tools: a store found beside ``repository`` (no ``$FUNNEL_STORE_URL``)
    needs the repository to exist. A mistyped path would otherwise get a new, empty store beside it
    that nothing serves."""
    if not os.environ.get(STORE_ENV) and not Path(repository).is_dir():
        raise FileNotFoundError(f"no model repository at {repository} (the live store is beside it)")


def describe(location: str | Path) -> str:
    """``location`` for messages: a DSN without its password (``user:password@`` or ``?password=``)."""
    text = str(location)
    if not is_postgres(text):
        return text
    scheme, rest = text.split("://", 1)
    cut = credentials_end(rest)
    if cut >= 0:
        rest = f"{rest[:cut].split(':', 1)[0]}{rest[cut:]}"
    rest, mark, query = rest.partition("?")
    query = "&".join(p for p in query.split("&") if p and p.split("=", 1)[0].strip().lower() != "password")
    return f"{scheme}://{rest}{mark if query else ''}{query}"


def credentials_end(rest: str) -> int:
    """Where ``user:password`` ends in a DSN after its ``scheme://`` (its ``@``), or -1. libpq ends
    it at an ``@`` before the first ``/``, so a ``?`` in the password is part of it: the last ``@``
    before the first ``/`` or a ``?`` after the first ``@`` (an ``@`` in the password hidden too),
    else the last ``@`` before the query (a ``/`` in the password: hidden, though libpq fails on it)."""
    first = rest.split("/", 1)[0].find("@")
    if first < 0:
        return rest.partition("?")[0].rfind("@")
    ends = [i for i in (rest.find("/"), rest.find("?", first)) if i >= 0]
    return rest[: min(ends, default=len(rest))].rfind("@")


def redact(text: str, location: str | Path) -> str:
    """``text`` (an error message) without the password of the DSN ``location``: libpq's message on a
    URL it cannot parse quotes the URL, or the token holding the password (a literal ``%`` in it)."""
    location = str(location)
    if not is_postgres(location):
        return text
    text = text.replace(location, describe(location))
    rest = location.split("://", 1)[1]
    cut = credentials_end(rest)
    secrets = [rest[:cut].partition(":")[2]] if cut >= 0 else []
    secrets += re.findall(r"[?&]\s*password\s*=([^&]*)", rest, re.IGNORECASE)
    for secret in sorted({s for s in secrets if s} | {unquote(s) for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def private_file(path: str | Path) -> None:
    """Create ``path`` empty, readable by its owner only, unless it exists. SQLite takes an empty file
    as a new database and gives its -wal and -shm files the database file's mode: the feedback log
    and the live store hold user ids and what they did, which the default umask (0644) let every
    local user read."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


CONNECT_TIMEOUT_S = 10  # PostgreSQL: seconds to open a connection (the URL's connect_timeout wins)
# PostgreSQL: TCP keepalives on the idle connection (libpq's own parameters; one the URL sets wins).
# libpq turns them on but leaves the timing to the OS: the first probe after 2 hours idle (Linux's
# tcp_keepalive_time). A NAT or firewall between a replica and its database that forgets an idle
# connection after a few minutes (4 to 6 min is common for cloud NATs and load balancers) then
# swallowed the next statement: it waited out TCP's retransmissions (about 15 min, tcp_retries2)
# holding the store's lock, and every request of the process with it. A probe after 60 s idle keeps
# such a mapping alive; where it is lost anyway, 6 unanswered probes 10 s apart mark the connection
# dead within about 2 minutes of idle, and the next call reconnects at once (``Database._cursor``).
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 6}
# PostgreSQL advisory lock key of takedown writes (``LiveStore._takedown_transaction``); the schema's is 72057594037927.
TAKEDOWN_LOCK = 72057594037928
SCHEMA_OBJECT = re.compile(r"\s*CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX)\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.IGNORECASE)


class Database:
    """One connection to a SQLite file or a PostgreSQL server, shared by the threads of a process.

    Statements use ``?`` placeholders and SQL both backends speak (``ON CONFLICT``, ``BIGINT``,
    ``DOUBLE PRECISION``); ``transaction()`` is the only way to write.

    PostgreSQL: a connection the server dropped (a restart, a failover) is replaced before the next
    statement or transaction, so a long-running server outlives its database's restarts. A statement
    outside a transaction that meets the dead connection is run again once on a new one (reads, and
    ``INSERT ... ON CONFLICT DO NOTHING``, may run twice), and so is the ``BEGIN`` of a transaction
    (nothing was sent yet); a statement inside a transaction is not: its error reaches the caller,
    nothing of the transaction is committed, and the next call reconnects.
    """

    def __init__(self, location: str | Path, schema: Sequence[str] = ()):
        self.location = str(location)
        self.postgres = is_postgres(self.location)
        self._lock = threading.RLock()  # one connection, many threads: one statement at a time
        # Transactions open on the connection, under the lock (``transaction()`` holds it while its
        # body runs): a statement inside one must not be retried on a new connection.
        self._depth = 0
        if self.postgres:
            self._con = self._connect()
        else:
            Path(self.location).parent.mkdir(parents=True, exist_ok=True)
            private_file(self.location)
            self._con = sqlite3.connect(self.location, timeout=30, isolation_level=None, check_same_thread=False)
            self._use_wal(deadline=time.monotonic() + 30)
            self._con.execute("PRAGMA synchronous=FULL")
        if schema and not self._has_schema(schema):
            with self.schema_transaction():
                for statement in schema:
                    self.execute(statement)

    def _has_schema(self, schema: Sequence[str]) -> bool:
        """SQLite: every table and index ``schema`` creates is there already, so opening takes no write
        lock. ``BEGIN IMMEDIATE`` waited for any write in progress: an ingest of millions of rows (one
        transaction) failed every stage loading meanwhile, and the content filter, with "database is
        locked" after 30 s. A statement of another form: False (run the schema)."""
        if self.postgres:
            return False
        names = [SCHEMA_OBJECT.match(statement) for statement in schema]
        if not all(names):
            return False
        present = {row[0] for row in self.query("SELECT name FROM sqlite_master")}
        return {name.group(1) for name in names} <= present

    def _use_wal(self, deadline: float) -> None:
        """Switch a new file to write-ahead logging (readers never wait for writers; the mode stays
        with the file). Switching takes the file's exclusive lock and SQLite answers "database is
        locked" at once, without its busy timeout, when another process (a stage starting beside
        this one) holds it: retry until ``deadline``."""
        while True:
            try:
                if self._con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._con.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _connect(self):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        # libpq waits for an unreachable server as long as the OS lets TCP try (minutes), and every
        # request of a serving process waits on this lock meanwhile: a bound, unless the URL sets one.
        # The keepalives likewise (``KEEPALIVES``): each the URL does not set.
        try:
            given = conninfo_to_dict(self.location)
            defaults = {"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES}
            return psycopg.connect(
                self.location, autocommit=True, **{key: value for key, value in defaults.items() if key not in given}
            )
        except psycopg.Error as err:
            message = redact(str(err), self.location)
            if message == str(err):
                raise
            raise type(err)(message) from None

    def _reconnect(self) -> None:
        log.warning("lost the connection to %s (was the server restarted?); reconnecting", describe(self.location))
        # The new one first: if the server is still down, the broken one stays and the next call retries.
        stale, self._con = self._con, self._connect()
        stale.close()

    def _connection(self):
        """The connection, replaced first if the server dropped it: a psycopg connection never
        reopens itself, so one restart of the database would fail every later call of the process.
        Only ``broken``: a connection ``close()`` closed stays closed. Never inside a transaction:
        its later statements would commit one by one on the new connection (autocommit)."""
        if self.postgres and not self._depth and self._con.broken:
            self._reconnect()
        return self._con

    def _lost(self, err: Exception) -> bool:
        """``err`` says the PostgreSQL connection died under the call (not a bad statement)."""
        if not self.postgres:
            return False
        import psycopg

        return isinstance(err, psycopg.OperationalError) and self._con.broken

    def _cursor(self, sql: str, params: Sequence):
        # Call with the lock held. The server may have dropped the connection while it sat idle
        # (nothing tells the client until it sends): outside a transaction the one statement runs
        # again on a new connection; inside one, part of the transaction died with the old connection.
        # A failed reconnect raises from ``_connection()`` and is not tried again here: a second attempt
        # doubled the wait (``CONNECT_TIMEOUT_S``) of every call while the server was unreachable.
        sql, params = self._sql(sql), tuple(params)
        con = self._connection()
        try:
            return con.execute(sql, params)
        except Exception as err:
            if self._depth or not self._lost(err):
                raise
            self._reconnect()
            return self._con.execute(sql, params)

    def execute(self, sql: str, params: Sequence = ()):
        with self._lock:
            return self._cursor(sql, params)

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._cursor(sql, params).fetchall()

    def frame(self, sql: str, params: Sequence = ()) -> pd.DataFrame:
        with self._lock:
            cursor = self._cursor(sql, params)
            columns = [d[0] for d in cursor.description]
            return pd.DataFrame(cursor.fetchall(), columns=columns)

    @contextmanager
    def transaction(self):
        """Everything inside commits together, durably, or not at all (SQLite: ``BEGIN IMMEDIATE``,
        so concurrent writers queue instead of failing at commit)."""
        with self._lock:
            if self.postgres:
                with ExitStack() as stack:
                    con = self._connection()  # a failed reconnect raises here, not retried (see ``_cursor``)
                    try:
                        stack.enter_context(con.transaction())
                    except Exception as err:
                        # A dead connection fails at BEGIN, before anything of the transaction was
                        # sent: safe to begin again on a new one (a nested transaction's SAVEPOINT is not).
                        if self._depth or not self._lost(err):
                            raise
                        self._reconnect()
                        stack.enter_context(self._con.transaction())
                    self._depth += 1
                    try:
                        yield self
                    finally:
                        self._depth -= 1
            else:
                self._con.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    # Unless SQLite rolled it back itself (a full disk, an I/O error): a ROLLBACK then
                    # fails, and its error would replace the one that says what happened.
                    if self._con.in_transaction:
                        self._con.execute("ROLLBACK")
                    raise
                self._con.execute("COMMIT")

    @contextmanager
    def schema_transaction(self):
        """A transaction for schema changes, one process at a time across the deployment: on
        PostgreSQL two replicas starting together collide on ``CREATE ... IF NOT EXISTS`` (a unique
        violation in the catalog) unless serialised (SQLite's ``BEGIN IMMEDIATE`` already is)."""
        with self.transaction():
            if self.postgres:
                self.execute("SELECT pg_advisory_xact_lock(72057594037927)")
            yield self

    def insert_new(self, sql: str, rows: Iterable[Sequence]) -> list[bool]:
        """Run ``INSERT ... ON CONFLICT DO NOTHING`` per row; which rows were new."""
        return [self.execute(sql, row).rowcount == 1 for row in rows]

    def close(self) -> None:
        with self._lock:
            self._con.close()


@dataclass
class UserEvents:
    """One user's live events, newest first (raw item ids)."""

    item_ids: np.ndarray  # int64
    ts: np.ndarray  # float64, seconds since the epoch
    events: np.ndarray  # object (str)
    values: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.item_ids)


class EventFileError(ValueError):
    """An events file the store refuses, with every defect found (nothing was written)."""


class LiveStore:
    """Live events and takedowns (see the module docstring); safe to share between threads."""

    def __init__(self, location: str | Path):
        self.db = Database(location, SCHEMA)
        self.location = self.db.location

    # -- events ------------------------------------------------------------------------------------

    def append_events(self, rows: Iterable[Sequence], source: str) -> int:
        """Append ``(user_id, item_id, ts, event, value)`` rows in one durable transaction; return how
        many were new (a row already stored, same user, time, item and event, is ignored)."""
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
        checked = []
        for user_id, item_id, ts, event, value in rows:
            if event not in LIVE_EVENTS:
                raise ValueError(f"unknown live event {event!r}; expected one of {LIVE_EVENTS}")
            if not (math.isfinite(float(ts)) and math.isfinite(float(value))):
                raise ValueError(f"ts and value must be finite, got {ts!r} and {value!r}")
            checked.append((int(user_id), int(item_id), float(ts), event, float(value), source))
        if not checked:
            return 0
        with self.db.transaction():
            new = self.db.insert_new(
                "INSERT INTO live_events VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", checked
            )
        return int(sum(new))

    def user_events(self, user_id: int, limit: int = 1000, since: float | None = None) -> UserEvents:
        """The user's newest ``limit`` events (after ``since``, if given): one indexed query."""
        rows = self.db.query(
            "SELECT item_id, ts, event, value FROM live_events WHERE user_id = ? AND ts > ? ORDER BY ts DESC LIMIT ?",
            (int(user_id), -math.inf if since is None else float(since), int(limit)),
        )
        if not rows:
            return UserEvents(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, object), np.zeros(0))
        items, ts, events, values = zip(*rows)
        return UserEvents(
            np.array(items, np.int64), np.array(ts, np.float64), np.array(events, object), np.array(values, np.float64)
        )

    def events(self, since: float | None = None) -> pd.DataFrame:
        """Every live event (after ``since``), oldest first: user_id, item_id, ts, event, value, source."""
        return self.db.frame(
            "SELECT * FROM live_events WHERE ts > ? ORDER BY ts, user_id",
            (-math.inf if since is None else float(since),),
        )

    # -- takedowns ---------------------------------------------------------------------------------

    def set_takedown(self, item_id: int, active: bool, reason: str, actor: str, ts: float | None = None) -> None:
        """Take ``item_id`` down (``active``) or restore it, with the reason and who did it; logged.
        Unconditional: ``undo_takedown`` restores only what is down."""
        if not reason.strip():
            raise ValueError("a takedown (and its undo) needs a reason")
        ts = time.time() if ts is None else float(ts)
        with self._takedown_transaction():
            self._write_takedown(int(item_id), bool(active), reason, actor, ts)

    def undo_takedown(
        self,
        item_id: int,
        reason: str,
        actor: str,
        same_item: Callable[[np.ndarray], Sequence[int]] | None = None,
        ts: float | None = None,
    ) -> list[int]:
        """Restore ``item_id``, and the ids ``same_item`` picks from the raw ids down now (the other
        copies of the item), if any of them is down; return the ids restored, ``[]`` (nothing written)
        where none is. ``item_id`` is written whenever another copy is restored, down or not.

        The read of what is down and the writes are one transaction, and takedown writes take turns
        (SQLite's ``BEGIN IMMEDIATE``, a transaction-scoped advisory lock on PostgreSQL): two undos at
        once, in two processes, restore the item once and the later one finds nothing down. They were
        a read and then a write each: both passed the check, and the log held an undo of nothing."""
        if not reason.strip():
            raise ValueError("a takedown (and its undo) needs a reason")
        ts = time.time() if ts is None else float(ts)
        item_id = int(item_id)
        with self._takedown_transaction():
            down = self.taken_down()
            others = [int(i) for i in (same_item(down) if same_item is not None else ()) if int(i) != item_id]
            if not others and item_id not in down:
                return []
            for other in others:
                self._write_takedown(other, False, reason, actor, ts)
            self._write_takedown(item_id, False, reason, actor, ts)
        return [*others, item_id]

    @contextmanager
    def _takedown_transaction(self):
        """A transaction in which this process alone writes takedowns: SQLite's ``BEGIN IMMEDIATE``
        already holds the file's write lock; PostgreSQL (read committed) lets two transactions read
        the same rows, so takedown writes first take an advisory lock held until commit."""
        with self.db.transaction():
            if self.db.postgres:
                self.db.execute("SELECT pg_advisory_xact_lock(?)", (TAKEDOWN_LOCK,))
            yield

    def _write_takedown(self, item_id: int, active: bool, reason: str, actor: str, ts: float) -> None:
        # Inside a transaction: the current state and its log entry.
        self.db.execute(
            "INSERT INTO takedowns VALUES (?, ?, ?, ?, ?) ON CONFLICT (item_id) DO UPDATE SET "
            "active = excluded.active, ts = excluded.ts, reason = excluded.reason, actor = excluded.actor",
            (item_id, int(active), ts, reason, actor),
        )
        self.db.execute(
            "INSERT INTO takedown_log VALUES (?, ?, ?, ?, ?)",
            (item_id, ts, "takedown" if active else "undo", reason, actor),
        )

    def taken_down(self) -> np.ndarray:
        """Raw ids of the items down now, sorted."""
        rows = self.db.query("SELECT item_id FROM takedowns WHERE active = 1 ORDER BY item_id")
        return np.array([r[0] for r in rows], dtype=np.int64)

    def takedowns(self) -> pd.DataFrame:
        """The current state of every item ever taken down: item_id, active, ts, reason, actor."""
        return self.db.frame("SELECT * FROM takedowns ORDER BY item_id")

    def takedown_log(self) -> pd.DataFrame:
        return self.db.frame("SELECT * FROM takedown_log ORDER BY ts")

    def close(self) -> None:
        self.db.close()


class TakedownList:
    """The raw ids down now, as seen by a serving process: re-read at most every ``refresh_s``
    seconds (one small query), so a takedown reaches every request within ``refresh_s`` plus one
    request, and a request costs a clock read otherwise."""

    def __init__(self, store: LiveStore, refresh_s: float = 1.0):
        self.store, self.refresh_s = store, float(refresh_s)
        self._ids, self._read_at = np.zeros(0, np.int64), -math.inf
        self._lock = threading.Lock()

    def ids(self) -> np.ndarray:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            with self._lock:
                if now - self._read_at >= self.refresh_s:
                    self._ids, self._read_at = self.store.taken_down(), now
        return self._ids


def taken_down_items(location: str | Path) -> np.ndarray:
    """Raw ids of the items down now in the store at ``location`` (the content filter reads this)."""
    store = LiveStore(location)
    try:
        return store.taken_down()
    finally:
        store.close()


# -- ingestion ---------------------------------------------------------------------------------------


def read_events_file(path: str | Path) -> pd.DataFrame:
    """``user_id, item_id, timestamp[, event[, value]]`` rows of a CSV, parquet or JSON-lines file,
    checked; raises ``EventFileError`` listing every bad row (up to 10 per defect)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():  # was "does not exist", which sent the user looking for a typo
        raise EventFileError(f"{path} is a folder, not an events file (.csv, .parquet or .jsonl)")
    if not path.is_file():
        raise EventFileError(f"{path} does not exist")
    try:
        if suffix == ".csv":
            # Correctly rounded: the default parser put ~1 in 8 full-precision timestamps one ulp off,
            # so the same event read from another file (or fed back) missed the unique key: stored twice.
            frame = pd.read_csv(path, float_precision="round_trip")
        elif suffix in (".parquet", ".pq"):
            frame = read_parquet(path)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            # Left as written: by default pandas reads a column named "timestamp" as dates (epoch
            # seconds became datetimes, then nanoseconds: every event 1e9 times too late).
            frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False)
        else:
            raise EventFileError(f"{path}: expected a .csv, .parquet or .jsonl file, got {suffix or 'no suffix'!r}")
    except EventFileError:
        raise
    except Exception as e:  # a malformed file: the reader's own message says where
        raise EventFileError(f"{path}: cannot read it: {e}") from None
    return check_events(frame, str(path))


def check_events(frame: pd.DataFrame, where: str = "events") -> pd.DataFrame:
    """``frame`` as clean live events (user_id, item_id, ts, event, value), or ``EventFileError``."""
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in frame.columns]
    if missing:
        raise EventFileError(
            f"{where}: missing column(s) {missing}; expected user_id, item_id, timestamp[, event[, value]]"
        )
    problems = []

    def bad(mask, what):
        rows = np.flatnonzero(np.asarray(mask))
        if rows.size:
            problems.append(f"{what} in {rows.size} row(s), e.g. row(s) {(rows[:10] + 1).tolist()}")

    out = pd.DataFrame(index=frame.index)
    for column in ("user_id", "item_id"):
        values = pd.to_numeric(frame[column], errors="coerce")
        integral = values.notna() & np.isfinite(values) & (values == values.round())
        bad(~integral, f"{column} is not an integer")
        # Beyond int64 the cast below wraps (2**64 - 1 became user -1, someone else's events).
        fits = fits_int64(values)
        bad(integral & ~fits, f"{column} is outside the 64-bit integer range")
        # A column of floats (one id written "7.0", or a float column) holds ids beyond 2**53 rounded:
        # 1234567890123456789 read as 1234567890123456768, another user's id.
        if values.dtype.kind == "f":
            bad(integral & fits & (values.abs() >= 2.0**53), f"{column} is a float beyond 2**53 (not exact)")
        out[column] = values.where(integral & fits, 0).astype(np.int64)
    bad(out["item_id"] < 0, "item_id is negative")
    timestamps = frame["timestamp"]
    if pd.api.types.is_datetime64_any_dtype(timestamps):  # dates (parquet): their seconds since the epoch
        delta = timestamps - pd.Timestamp(0, tz=getattr(timestamps.dt, "tz", None))
        # Python's int / int, correctly rounded: total_seconds() divides a float of the nanoseconds,
        # rounded twice, and ~1 in 4 instants missed the same event in seconds by an ulp (stored twice).
        nanoseconds = delta.to_numpy().astype("timedelta64[ns]").astype(np.int64).tolist()
        timestamps = pd.Series([n / 10**9 for n in nanoseconds], index=delta.index).mask(delta.isna())
    ts = pd.to_numeric(timestamps, errors="coerce")
    bad(ts.isna() | ~np.isfinite(ts.fillna(0)) | (ts.fillna(0) < 0), "timestamp is not seconds since the epoch")
    # Milliseconds (JavaScript, Kafka, Java) read as seconds put every event ~50,000 years ahead: newest
    # forever, they would fill the per-request read (``user_events``) and hide the user's real events.
    bad(
        np.isfinite(ts.fillna(0)) & (ts.fillna(0) >= MAX_EPOCH_SECONDS),
        "timestamp is 1e11 or more: milliseconds (or micro- or nanoseconds), not seconds",
    )
    out["ts"] = ts.fillna(0).astype(np.float64)
    events = frame["event"].astype(str) if "event" in frame.columns else pd.Series("view", index=frame.index)
    bad(~events.isin(LIVE_EVENTS), f"event is not one of {list(LIVE_EVENTS)}")
    out["event"] = events
    values = (
        pd.to_numeric(frame["value"], errors="coerce")
        if "value" in frame.columns
        else pd.Series(1.0, index=frame.index)
    )
    bad(values.isna() | ~np.isfinite(values.fillna(0)) | (values.fillna(0) < 0), "value is not a finite number >= 0")
    out["value"] = values.fillna(0).astype(np.float64)
    if problems:
        raise EventFileError(f"{where}: nothing was written; " + "; ".join(problems))
    return out.reset_index(drop=True)


def ingest_events(location_or_store: str | Path | LiveStore, events: str | Path | pd.DataFrame) -> int:
    """Append the events of a file (``read_events_file``) or a frame (``check_events``) to the live
    store, all in one transaction; return how many were new. Bad rows: ``EventFileError``, nothing written."""
    frame = check_events(events) if isinstance(events, pd.DataFrame) else read_events_file(events)
    own = not isinstance(location_or_store, LiveStore)
    store = LiveStore(location_or_store) if own else location_or_store
    try:
        return store.append_events(
            frame[["user_id", "item_id", "ts", "event", "value"]].itertuples(index=False), "ingest"
        )
    finally:
        if own:
            store.close()
