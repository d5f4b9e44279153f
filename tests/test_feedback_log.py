"""The feedback log keeps every acknowledged write, even when its writer is SIGKILLed mid-stream."""

import signal
import subprocess
import sys
import time

import pytest

from online.feedback_log import FeedbackConflict, FeedbackLog

WRITER = r"""
import sys
from online.feedback_log import FeedbackConflict, FeedbackLog
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
    assert log.counts() == {"impressions": 2, "feedback": 2, "empty_responses": 0}  # the bad event wrote nothing


def test_the_same_event_for_the_same_request_and_item_is_stored_once(tmp_path):
    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("a", 7, [10, 11], model_version="3", arm="treatment", served_by="model")
    first = log.log_feedback_many([("a", 7, 11, "click", 1), ("a", 7, 11, "watch_seconds", 40.0)])
    assert len(first) == 2
    # a client's retry, with a replayed click inside a new batch: only the new event is stored
    again = log.log_feedback_many(
        [("a", 7, 11, "click", 1), ("a", 7, 11, "watch_seconds", 40.0), ("a", 7, 10, "click", 1)]
    )
    assert again == [("a", 7, 10, "click", 1.0)]
    assert log.log_feedback("a", 7, 11, "click") is False
    fb = log.feedback()
    assert len(fb) == 3 and fb.set_index(["item_id", "event"])["value"].to_dict() == {
        (11, "click"): 1.0,
        (11, "watch_seconds"): 40.0,
        (10, "click"): 1.0,
    }


def test_a_repeat_with_another_value_is_refused_and_stores_nothing_of_its_batch(tmp_path):
    """A retry repeats what it retries: a repeated (request, item, event) with another value (or user)
    is a client's bug. Until 2026-12-07 it was acknowledged as a retry and its value silently dropped."""
    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("a", 7, [10, 11], model_version="3", arm="treatment", served_by="model")
    log.log_feedback_many([("a", 7, 11, "watch_seconds", 40.0)])
    with pytest.raises(FeedbackConflict, match=r"request_id a: \(11, 'watch_seconds'\) .* value 40, .* says 99"):
        log.log_feedback_many([("a", 7, 10, "click", 1), ("a", 7, 11, "watch_seconds", 99.0)])
    with pytest.raises(FeedbackConflict, match="stored for user 7, this repeat says user 8"):
        log.log_feedback_many([("a", 8, 11, "watch_seconds", 40.0)])
    with pytest.raises(FeedbackConflict, match=r"\(10, 'click'\) was already stored with value 1, .* says 2"):
        log.log_feedback_many([("a", 7, 10, "click", 1), ("a", 7, 10, "click", 2)])  # within one batch
    fb = log.feedback()  # nothing of a refused batch, not even its new click
    assert fb[["item_id", "event", "value"]].values.tolist() == [[11, "watch_seconds", 40.0]]
    assert log.log_feedback_many([("a", 7, 11, "watch_seconds", 40.0)]) == []  # the true retry still passes


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


def _log_with_empty_responses(path):
    """User 1: a slate, then an empty response they churn on; user 2: only an empty response, churned;
    user 3: a slate. Arms as the router logged them."""
    log = FeedbackLog(path)
    log.log_impressions("r1", 1, [10, 11], model_version="1", arm="control", served_by="model", ts=1.0)
    log.log_feedback("r1", 1, 10, "click")
    log.log_impressions("r2", 1, [], model_version="1", arm="control", served_by="fallback", ts=2.0)
    log.log_feedback("r2", 1, -1, "churn")
    log.log_impressions("r3", 2, [], model_version="2", arm="treatment", served_by="fallback", ts=1.0)
    log.log_feedback("r3", 2, -1, "churn")
    log.log_impressions("r4", 3, [12], model_version="2", arm="treatment", served_by="model", ts=1.0)
    return log


def test_empty_responses_are_requests_of_their_arm_in_the_ab_analysis(tmp_path):
    """The A/B analysis took each request's arm from its impressions: an empty response had none, so
    a user served only empty responses vanished from the arm (and the SRM count), and a churn sent
    about an empty response was dropped, so the arm's retention read too high."""
    import pandas as pd

    from online.ab_report import per_user

    log = _log_with_empty_responses(tmp_path / "log.sqlite")
    empty = log.empty_responses()
    assert sorted(empty["request_id"]) == ["r2", "r3"] and set(empty["arm"]) == {"control", "treatment"}
    users = per_user(log.impressions(), log.feedback(), empty).set_index("user_id")
    assert users.loc[1, ["arm", "requests", "impressions", "clicks", "churned"]].tolist() == ["control", 2, 2, 1, True]
    assert users.loc[2, ["arm", "requests", "impressions", "clicks", "churned"]].tolist() == [
        "treatment",
        1,
        0,
        0,
        True,
    ]
    assert users.loc[3, ["arm", "requests", "impressions", "churned"]].tolist() == ["treatment", 1, 1, False]
    # A log without empty responses reads exactly as before.
    plain = FeedbackLog(tmp_path / "plain.sqlite")
    plain.log_impressions("r1", 1, [10, 11], model_version="1", arm="control", served_by="model", ts=1.0)
    plain.log_feedback("r1", 1, 10, "click")
    pd.testing.assert_frame_equal(
        per_user(plain.impressions(), plain.feedback(), plain.empty_responses()),
        per_user(plain.impressions(), plain.feedback()),
    )


def test_the_srm_check_counts_users_served_only_empty_responses(tmp_path):
    from configs import ExperimentConfig
    from online.ab_report import analyze
    from serving.assignment import ab_rollout

    rollout = ab_rollout("e", "s", 1, 2, holdout=0.0)
    log = FeedbackLog(tmp_path / "log.sqlite")
    for user in range(400):
        arm = rollout.experiment.assign(user)
        # Every third treatment user gets an empty response (every item excluded, say) and churns.
        items = [] if arm == "treatment" and user % 3 == 0 else [user % 7, 7 + user % 5]
        log.log_impressions(f"r{user}", user, items, model_version="1", arm=arm, served_by="model", ts=1.0)
        if not items:
            log.log_feedback(f"r{user}", user, -1, "churn")
    imp, fb = log.impressions(), log.feedback()
    result = analyze(imp, fb, rollout, ExperimentConfig(), catalog_size=12, empty_responses=log.empty_responses())
    designed = {a: sum(rollout.experiment.assign(u) == a for u in range(400)) for a in ("control", "treatment")}
    assert result.srm.observed == designed and not result.srm.mismatch
    summary = result.summary.set_index("arm")
    assert summary.loc["treatment", "requests"] == designed["treatment"]
    assert summary.loc["treatment", "retention"] < 0.7  # a third of them churned


def test_the_holdout_monitor_reads_empty_responses_and_logs_from_before_them(tmp_path):
    from online.ab_report import logged_requests, users_of

    _log_with_empty_responses(tmp_path / "log.sqlite").close()
    requests = logged_requests(tmp_path / "log.sqlite").set_index("request_id").sort_index()
    assert requests["impressions"].tolist() == [2, 0, 0, 1] and requests["churned"].tolist() == [0, 1, 1, 0]
    users = users_of(requests.reset_index()).set_index("user_id")
    assert users.loc[1, "requests"] == 2 and users.loc[1, "churned"] and users.loc[2, "churned"]
    # A log written before empty responses were logged has no such table: read as before.
    log = FeedbackLog(tmp_path / "old.sqlite")
    log.log_impressions("r1", 1, [10], model_version="1", arm="control", served_by="model", ts=1.0)
    log.db.execute("DROP TABLE empty_responses")
    log.close()
    assert logged_requests(tmp_path / "old.sqlite")["request_id"].tolist() == ["r1"]


def test_two_experiments_logging_at_once_with_the_same_arm_names_are_analysed_apart(tmp_path):
    """The log had no experiment column: two experiments written into one log at the same time (two
    rollouts, or one started by hand beside the retraining pipeline's), both with arms "control" and
    "treatment", read as one, each report counting the other's users. Rows of unknown experiment (''),
    from before the column, still count, as before, by time."""
    from configs import ExperimentConfig
    from online.ab_report import analyze, logged_requests
    from serving.assignment import ab_rollout

    rollouts = {name: ab_rollout(name, f"salt-{name}", 1, 2, holdout=0.0) for name in ("a", "b")}
    log = FeedbackLog(tmp_path / "log.sqlite")
    users = {"a": range(0, 300), "b": range(1000, 1200)}
    for name, rollout in rollouts.items():
        for user in users[name]:
            arm = rollout.experiment.assign(user)
            items = [] if user % 10 == 0 else [user % 7, 7 + user % 5]
            log.log_impressions(f"{name}{user}", user, items, "1", arm, "model", ts=float(user % 5), experiment=name)
            if name == "b":  # only b's users click: a's CTR must not see it
                log.log_feedback(
                    f"{name}{user}", user, -1 if not items else items[0], "churn" if not items else "click"
                )
    log.log_impressions("old", 5000, [1, 2], "1", "control", "model", ts=1.0)  # unknown experiment ('')
    imp, fb, empty = log.impressions(), log.feedback(), log.empty_responses()
    assert set(imp["experiment"]) == {"a", "b", ""} and set(empty["experiment"]) == {"a", "b"}
    for name, rollout in rollouts.items():
        result = analyze(imp, fb, rollout, ExperimentConfig(), catalog_size=12, empty_responses=empty)
        expected = {*users[name], 5000}  # its own users and the one of unknown experiment
        assert sum(result.srm.observed.values()) == len(expected), (name, result.srm.observed)
        clicks = result.summary.set_index("arm")["ctr"]
        assert (clicks > 0).all() if name == "b" else (clicks == 0).all()
        requests = logged_requests(tmp_path / "log.sqlite", experiment=name)
        assert set(requests["user_id"]) == expected
        assert requests["impressions"].sum() == imp[imp["experiment"].isin([name, ""])].shape[0]
    assert set(logged_requests(tmp_path / "log.sqlite")["user_id"]) == {*users["a"], *users["b"], 5000}


def test_an_experiment_without_a_name_is_refused_before_its_rows_join_every_other_one():
    """'' is the log's "unknown experiment" (rows from before the column), which every experiment's
    analysis reads as its own (``of_experiment``). An A/B test named '' (``ab_rollout("", ...)``, or
    ``online.experiment.name: ""`` in a config) was accepted, so the router logged its responses as
    unknown and a second experiment sharing the log counted all of its users: 800 users for an
    experiment that served 400. Refused now, before anything is served."""
    from configs import load_config
    from serving.assignment import Experiment, Rollout, ab_rollout

    with pytest.raises(ValueError, match="unknown experiment"):
        ab_rollout("", "salt", 1, 2)
    with pytest.raises(ValueError, match="unknown experiment"):  # an experiment.json of that name too
        Rollout.from_dict({**ab_rollout("a", "salt", 1, 2).to_dict(), "experiment": {"name": "", "salt": "s"}})
    with pytest.raises(ValueError, match="online.experiment.name must not be empty"):
        load_config(overrides={"online": {"experiment": {"name": ""}}})
    assert Experiment("a", "salt").name == "a"


def test_an_experiment_logged_across_its_rollout_is_refused_not_pooled(tmp_path):
    """``roll_out_treatment`` keeps the experiment's name and arms and moves every arm but the holdout to
    the treatment's version, so the log of a shipped experiment (``serve_ab_test``'s check after the
    rollout, notebook 05, the retraining pipeline's experiment shipped by hand) holds "control" rows of
    v1 before it and of v2 after it. ``analyze`` of that log pooled them: the control arm's CTR mixed both
    models, so the treatment was compared in part with itself. It is refused, naming the versions; the
    rows from before the rollout analyse as before."""
    from configs import ExperimentConfig
    from online.ab_report import analyze
    from serving.assignment import HOLDOUT, ab_rollout

    rollout = ab_rollout("e", "s", 1, 2, holdout=0.02)
    shipped = rollout.roll_out("treatment")  # what roll_out_treatment writes for the router
    log = FeedbackLog(tmp_path / "log.sqlite")
    for period, (ts, current) in enumerate(((1.0, rollout), (2.0, shipped))):
        for user in range(600):
            arm, version = current.version_for(user)
            rid = f"{period}-{user}"
            log.log_impressions(rid, user, [user % 7, 7 + user % 5], str(version), arm, "model", ts=ts, experiment="e")
            if version == 2:  # the treatment's model is clicked, the control's is not
                log.log_feedback(rid, user, user % 7, "click", ts=ts)
    imp, fb, empty = log.impressions(), log.feedback(), log.empty_responses()
    log.close()
    with pytest.raises(ValueError, match=r"arm 'control' by model versions \['1', '2'\]"):
        analyze(imp, fb, rollout, ExperimentConfig(), catalog_size=12, empty_responses=empty)
    with pytest.raises(ValueError, match="rollout"):  # with the router's rollout as it is now, the same
        analyze(imp, fb, shipped, ExperimentConfig(), catalog_size=12, empty_responses=empty)
    before = imp["ts"] < 2.0
    result = analyze(
        imp[before], fb[fb["ts"] < 2.0], rollout, ExperimentConfig(), catalog_size=12, empty_responses=empty
    )
    ctr = result.summary.set_index("arm")["ctr"]
    assert ctr["control"] == 0 and ctr["treatment"] == 0.5 and ctr[HOLDOUT] == 0  # one click of two items


def test_before_rollout_cuts_a_shipped_experiments_log_where_an_arm_changed_version(tmp_path):
    """``analyze`` refuses a log spanning ``roll_out_treatment`` and asked for "the rows logged before the
    rollout (their ts)", with no way to find that time. ``before_rollout`` cuts at the first response of an
    arm by another version than the starting rollout's (another experiment's rows do not cut), keeps the
    feedback to the responses it keeps (a late click included) and the empty responses before the cut."""
    from configs import ExperimentConfig
    from online.ab_report import analyze, before_rollout
    from serving.assignment import HOLDOUT, ab_rollout

    rollout = ab_rollout("e", "s", 1, 2, holdout=0.02)
    shipped = rollout.roll_out("treatment")
    log = FeedbackLog(tmp_path / "log.sqlite")
    log.log_impressions("other", 9999, [1, 2], "7", "control", "model", ts=0.5, experiment="f")  # not e's: no cut
    for period, (ts, current) in enumerate(((1.0, rollout), (2.0, shipped))):
        for user in range(600):
            arm, version = current.version_for(user)
            rid = f"{period}-{user}"
            items = [] if user % 10 == 0 else [user % 7, 7 + user % 5]
            at = ts + user / 1e4 + (0.1 if period and arm == "control" else 0)  # after the rollout, control last
            log.log_impressions(rid, user, items, str(version), arm, "model", ts=at, experiment="e")
            if not items and period == 0:
                log.log_feedback(rid, user, -1, "churn", ts=ts)
            elif items and version == 2:  # the treatment's model is clicked, the control's is not
                log.log_feedback(rid, user, items[0], "click", ts=ts)
    control_user = next(u for u in range(1, 600) if rollout.version_for(u)[0] == "control" and u % 10)
    log.log_feedback(f"0-{control_user}", control_user, control_user % 7, "click", ts=5.0)  # late, pre-rollout slate
    imp, fb, empty = log.impressions(), log.feedback(), log.empty_responses()
    log.close()
    with pytest.raises(ValueError, match="before_rollout"):
        analyze(imp, fb, rollout, ExperimentConfig(), catalog_size=12, empty_responses=empty)
    moved = [u for u in range(600) if shipped.version_for(u) != rollout.version_for(u)]
    first_moved = 2.1 + min(moved) / 1e4  # the control arm's first v2 response
    kept_imp, kept_fb, kept_empty = before_rollout(imp, fb, rollout, empty)
    assert kept_imp["ts"].max() < first_moved and (kept_imp["ts"] >= 2.0).any()  # the period's rows before it stay
    assert kept_empty["ts"].max() < first_moved and (kept_empty["ts"] < 2.0).sum() == 60
    assert "other" in set(kept_imp["request_id"])
    assert set(kept_fb["request_id"]) <= set(kept_imp["request_id"]) | set(kept_empty["request_id"])
    assert (kept_fb["ts"] == 5.0).sum() == 1  # the late click on a slate served before the rollout
    result = analyze(kept_imp, kept_fb, rollout, ExperimentConfig(), catalog_size=12, empty_responses=kept_empty)
    ctr = result.summary.set_index("arm")["ctr"]
    assert 0 < ctr["control"] < 0.01 and ctr["treatment"] == 0.5 and ctr[HOLDOUT] == 0
    retention = result.summary.set_index("arm")["retention"]
    assert retention["control"] < 1 and retention["treatment"] < 1  # the churns after empty responses count
    # A log that never moved is returned whole.
    before = imp[imp["ts"] < 2.0]
    assert before_rollout(before, fb, rollout)[0] is before
