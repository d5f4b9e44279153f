"""The online feature store: a SQLite file the feature-lookup stage reads per request.

Two tables, both keyed by the raw user id a client sends:

    user_features(user_id_raw PRIMARY KEY, <encoded user feature columns...>)
    user_history(user_id_raw PRIMARY KEY, item_ids BLOB)
                                             encoded ids of the items the user has already seen:
                                             sorted little-endian int64, one row per user
    items(item_id_raw PRIMARY KEY, item_id)  raw -> encoded ids of the catalog
    user_events(user_id_raw PRIMARY KEY, timestamps BLOB, clicks BLOB)
                                             the user's events in the longest activity window before
                                             the end of the training data (little-endian int64
                                             seconds, uint8 click flags): the windowed activity
                                             features count from them at request time

What users do after the export lives in the live store (``workflows/live_store.py``), which the
feature lookup merges in per request.

SQLite because it is a real, durable, concurrent-reader store that needs no server; the stage opens
it read-only, so serving can never change it. A user's history is one blob, not one row per item:
reading it is one indexed lookup and one ``np.frombuffer`` whatever its length (measured: a history
of 25k items took 15 ms as rows, 0.06 ms as a blob, on 2 shared cores).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd


def build_online_store(
    path: str | Path,
    user_features: pd.DataFrame,
    categorical: list[str],
    continuous: list[str],
    history: pd.DataFrame,
    item_features: pd.DataFrame,
    recent_events: pd.DataFrame | None = None,
) -> None:
    """Write the store. ``history`` has raw ids; they are mapped to encoded item ids here."""
    path = Path(path)
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    try:
        cols = ["user_id_raw", *categorical, *continuous]
        frame = user_features[cols]
        col_defs = ", ".join(
            [f'"{c}" INTEGER' for c in ["user_id_raw", *categorical]] + [f'"{c}" REAL' for c in continuous]
        )
        con.execute(f"CREATE TABLE user_features ({col_defs}, PRIMARY KEY (user_id_raw))")
        con.executemany(
            f"INSERT INTO user_features VALUES ({', '.join('?' * len(cols))})",
            frame.astype(object).itertuples(index=False, name=None),
        )
        to_encoded = pd.Series(item_features["item_id"].to_numpy(), index=item_features["item_id_raw"].to_numpy())
        hist = history[history["item_id_raw"].isin(to_encoded.index)]
        encoded = (
            pd.DataFrame(
                {
                    "user_id_raw": hist["user_id_raw"].astype("int64").to_numpy(),
                    "item_id": to_encoded.reindex(hist["item_id_raw"].to_numpy()).to_numpy().astype("<i8"),
                }
            )
            .drop_duplicates()
            .sort_values(["user_id_raw", "item_id"])
        )
        con.execute("CREATE TABLE user_history (user_id_raw INTEGER PRIMARY KEY, item_ids BLOB)")
        item_ids = encoded["item_id"].to_numpy().astype("<i8")
        con.executemany(
            "INSERT INTO user_history VALUES (?, ?)",
            (
                (user, item_ids[start:end].tobytes())
                for user, start, end in runs(encoded["user_id_raw"].to_numpy().astype("int64"))
            ),
        )
        # raw -> encoded item ids, so the feature lookup can merge live events (raw ids) into histories
        con.execute("CREATE TABLE items (item_id_raw INTEGER PRIMARY KEY, item_id INTEGER NOT NULL)")
        con.executemany(
            "INSERT INTO items VALUES (?, ?)",
            zip(to_encoded.index.astype("int64").tolist(), to_encoded.to_numpy().astype("int64").tolist()),
        )
        # Windowed activity (workflows/activity.py): raw timestamps and clicks, counted per request.
        con.execute("CREATE TABLE user_events (user_id_raw INTEGER PRIMARY KEY, timestamps BLOB, clicks BLOB)")
        if recent_events is not None and len(recent_events):
            recent = recent_events[recent_events["user_id"].notna()]  # as groupby dropped them
            recent = recent.sort_values(["user_id", "timestamp"], kind="stable")
            timestamps = recent["timestamp"].to_numpy().astype("<i8")
            clicks = recent["click"].to_numpy().astype("u1")
            con.executemany(
                "INSERT INTO user_events VALUES (?, ?, ?)",
                (
                    (user, timestamps[start:end].tobytes(), clicks[start:end].tobytes())
                    for user, start, end in runs(recent["user_id"].to_numpy().astype("int64"))
                ),
            )
        con.commit()
    finally:
        con.close()


def runs(keys: np.ndarray):
    """``(key, start, end)`` of each run of equal values in ``keys`` (sorted), in order: the rows of
    one user, sliced from whole-column arrays. A pandas groupby yielded each user's rows as a new
    frame or series, ~0.1 ms apiece: most of an export's time at 200,000 users (docs/measurements.md)."""
    if not len(keys):
        return
    starts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    bounds = np.concatenate([[0], starts, [len(keys)]]).tolist()
    yield from zip(keys[bounds[:-1]].tolist(), bounds[:-1], bounds[1:])


class OnlineStore:
    """Read-only access to the store; one instance per serving process."""

    def __init__(self, path: str | Path, categorical: list[str], continuous: list[str]):
        # quoted (as_uri): a bare "%31" in the path decoded to "1", and "#" or "?" cut it, another file
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self.categorical, self.continuous = list(categorical), list(continuous)
        cols = ", ".join(f'"{c}"' for c in [*self.categorical, *self.continuous])
        self._features_sql = f"SELECT {cols} FROM user_features WHERE user_id_raw = ?"

    def user_features(self, user_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Encoded categorical and continuous features, or ``None`` for an unknown user."""
        row = self._con.execute(self._features_sql, (int(user_id),)).fetchone()
        if row is None:
            return None
        n = len(self.categorical)
        return np.array(row[:n], dtype=np.int64), np.array(row[n:], dtype=np.float32)

    def history(self, user_id: int) -> np.ndarray:
        """Encoded ids of the items the user has seen, sorted (empty for a user without history)."""
        row = self._con.execute("SELECT item_ids FROM user_history WHERE user_id_raw = ?", (int(user_id),)).fetchone()
        if row is None:
            return np.zeros(0, dtype=np.int64)
        return np.frombuffer(row[0], dtype="<i8").astype(np.int64)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(raw ids sorted, their encoded ids)`` of the catalog (empty for a store exported before
        the table existed: live events then add nothing to histories)."""
        try:
            rows = self._con.execute("SELECT item_id_raw, item_id FROM items ORDER BY item_id_raw").fetchall()
        except sqlite3.OperationalError:
            rows = []
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        raw, encoded = zip(*rows)
        return np.array(raw, dtype=np.int64), np.array(encoded, dtype=np.int64)

    def recent_events(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(timestamps, clicks)`` of the user's exported recent events, oldest first (empty for a
        user without any, or a store exported before the table existed)."""
        try:
            row = self._con.execute(
                "SELECT timestamps, clicks FROM user_events WHERE user_id_raw = ?", (int(user_id),)
            ).fetchone()
        except sqlite3.OperationalError:
            row = None
        if row is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.frombuffer(row[0], dtype="<i8").astype(np.int64), np.frombuffer(row[1], dtype="u1").astype(np.int64)

    def close(self) -> None:
        self._con.close()
