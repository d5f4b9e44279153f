"""The feedback log keeps every acknowledged write, even when its writer is SIGKILLed mid-stream."""

import signal
import subprocess
import sys
import time

import pytest

from online.feedback_log import FeedbackLog

WRITER = r"""
import sys
from online.feedback_log import FeedbackLog
log = FeedbackLog(sys.argv[1])
i = 0
while True:
    log.log_impressions(f"r{i}", i % 50, [1, 2, 3], model_version="1", arm="control", served_by="model")
    log.log_feedback(f"r{i}", i % 50, 2, "click")
    print(i, flush=True)  # acknowledged: both transactions returned
    i += 1
"""


def test_round_trip_and_validation(tmp_path):
    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("a", 7, [10, 11], model_version="3", arm="treatment", served_by="model")
    log.log_feedback_many([("a", 7, 11, "click", 1), ("a", 7, 11, "watch_seconds", 42.5)])
    imp, fb = log.impressions(), log.feedback()
    assert imp["position"].tolist() == [0, 1] and set(imp["arm"]) == {"treatment"}
    assert fb.set_index("event")["value"].to_dict() == {"click": 1.0, "watch_seconds": 42.5}
    with pytest.raises(ValueError, match="unknown feedback event"):
        log.log_feedback("a", 7, 11, "purchase")
    assert log.counts() == {"impressions": 2, "feedback": 2}  # the bad event wrote nothing


def test_the_same_event_for_the_same_request_and_item_is_stored_once(tmp_path):
    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("a", 7, [10, 11], model_version="3", arm="treatment", served_by="model")
    first = log.log_feedback_many([("a", 7, 11, "click", 1), ("a", 7, 11, "watch_seconds", 40.0)])
    assert len(first) == 2
    # a client's retry, with a replayed click inside a new batch: only the new event is stored
    again = log.log_feedback_many(
        [("a", 7, 11, "click", 1), ("a", 7, 11, "watch_seconds", 99.0), ("a", 7, 10, "click", 1)]
    )
    assert again == [("a", 7, 10, "click", 1.0)]
    assert log.log_feedback("a", 7, 11, "click") is False
    fb = log.feedback()
    assert len(fb) == 3 and fb.set_index(["item_id", "event"])["value"].to_dict() == {
        (11, "click"): 1.0,
        (11, "watch_seconds"): 40.0,
        (10, "click"): 1.0,
    }


def test_a_log_with_repeats_from_before_deduplication_is_migrated(tmp_path):
    import sqlite3

    from online.feedback_log import SCHEMA

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    con.executemany(
        "INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?)",
        [("a", 1.0, 7, 11, "click", 1.0), ("a", 2.0, 7, 11, "click", 1.0), ("a", 3.0, 7, 12, "click", 1.0)],
    )
    con.commit()
    con.close()
    log = FeedbackLog(path)
    assert sorted(log.feedback()["ts"]) == [1.0, 3.0]  # the first of the repeats is kept
    assert log.log_feedback("a", 7, 11, "click") is False


def test_nothing_acknowledged_is_lost_when_the_writer_is_killed(tmp_path):
    path = tmp_path / "log.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    deadline = time.monotonic() + 60
    while acknowledged < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            acknowledged = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for line in proc.stdout:  # anything acknowledged between our last read and the kill
        acknowledged = max(acknowledged, int(line))
    assert acknowledged >= 200
    log = FeedbackLog(path)
    counts = log.counts()
    assert counts["impressions"] >= 3 * (acknowledged + 1)
    assert counts["feedback"] >= acknowledged + 1
    # and the database is intact: every impression row is whole
    assert log.impressions()["item_id"].isin([1, 2, 3]).all()


def test_log_converts_to_raw_events_the_pipeline_reads(tmp_path):
    from online.feedback_log import to_events
    from workflows.schema import EVENT_COLUMNS

    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("r1", 5, [10, 11, 12], model_version="1", arm="control", served_by="model", ts=1.0)
    log.log_impressions("r2", 6, [10], model_version="1", arm="control", served_by="model", ts=2.0)
    log.log_feedback_many([("r1", 5, 11, "click", 1), ("r1", 5, 11, "watch_seconds", 30), ("r2", 6, 10, "click", 1)])
    events = to_events(log, start_timestamp=1000)
    assert list(events.columns) == EVENT_COLUMNS
    assert len(events) == 4 and events["click"].sum() == 2
    row = events[(events["user_id"] == 5) & (events["item_id"] == 11)].iloc[0]
    assert row["watch_seconds"] == 30 and row["timestamp"] == 1001
    assert events[events["user_id"] == 6]["timestamp"].tolist() == [1002]


def test_a_log_without_reactions_to_items_converts_and_analyses(tmp_path):
    """No clicks yet, or churns only: the empty per-item signal table had no (request, item) index and
    the join failed (to_events for retraining, per_user_signals for the retention analysis)."""
    import pandas as pd

    from online.feedback_log import to_events
    from online.retention import per_user_signals

    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("r1", 5, [10, 11], model_version="1", arm="control", served_by="model", ts=1.0)
    log.log_impressions("r2", 6, [10], model_version="1", arm="control", served_by="model", ts=2.0)
    durations = pd.Series({10: 60.0, 11: 90.0})
    for feedback in ([], [("r2", 6, -1, "churn", 1.0)]):
        log.log_feedback_many(feedback)
        events = to_events(log, start_timestamp=1000)
        assert len(events) == 3 and events["click"].sum() == 0 and events["timestamp"].tolist() == [1001, 1001, 1002]
        users = per_user_signals(log.impressions(), log.feedback(), durations).set_index("user_id")
        assert (users["click"] == 0).all() and users["returned"].tolist() == [True, not feedback]
