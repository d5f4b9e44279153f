"""The live store (``workflows/live_store.py``) on both backends: SQLite files and a real PostgreSQL
server this module starts and stops; ingestion, takedowns (with the admin key), the content filter
reading the same takedown list, and the feedback log on PostgreSQL."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deployment.postgres import PostgresServer, postgres_bin
from workflows.live_store import EventFileError, LiveStore, TakedownList, ingest_events

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """A fresh, empty store on each backend (PostgreSQL: its own database on the module's server)."""
    if request.param == "sqlite":
        return str(tmp_path / "live.sqlite")
    import psycopg

    server = request.getfixturevalue("postgres")
    name = f"t{time.time_ns()}"
    with psycopg.connect(server.url, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def test_events_are_stored_once_and_read_newest_first(location):
    store = LiveStore(location)
    rows = [(7, 11, 100.0, "click", 1.0), (7, 12, 101.0, "view", 1.0), (8, 11, 102.0, "like", 1.0)]
    assert store.append_events(rows, "ingest") == 3
    assert store.append_events(rows[:2] + [(7, 13, 103.0, "watch_seconds", 40.0)], "feedback") == 1  # replay: no-op
    got = store.user_events(7)
    assert got.item_ids.tolist() == [13, 12, 11] and got.events.tolist() == ["watch_seconds", "view", "click"]
    assert store.user_events(7, limit=2).item_ids.tolist() == [13, 12]
    assert store.user_events(7, since=101.0).item_ids.tolist() == [13]
    assert len(store.user_events(99)) == 0
    assert len(store.events()) == 4 and set(store.events()["source"]) == {"ingest", "feedback"}
    with pytest.raises(ValueError, match="unknown live event 'churn'"):
        store.append_events([(7, 1, 1.0, "churn", 1.0)], "feedback")
    store.close()


WRITER = """
import sys
from workflows.live_store import LiveStore
store = LiveStore(sys.argv[1])
writer = int(sys.argv[2])
for i in range(40):
    store.append_events([(writer, i, float(i), "click", 1.0)], "feedback")
"""


def test_several_writer_processes_lose_nothing(location):
    LiveStore(location).close()  # the schema first, as a server would
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, location, str(w)], cwd=ROOT, stderr=subprocess.PIPE)
        for w in range(4)
    ]
    reader = LiveStore(location)
    while any(w.poll() is None for w in writers):  # readers run while writers write
        reader.user_events(0)
    for w in writers:
        assert w.wait() == 0, w.stderr.read().decode()
    assert len(reader.events()) == 160
    assert [len(reader.user_events(w)) for w in range(4)] == [40] * 4


def test_takedowns_are_recorded_and_undone_and_reach_a_reader_within_its_refresh(location):
    store = LiveStore(location)
    taken = TakedownList(LiveStore(location), refresh_s=0.2)
    assert taken.ids().size == 0
    store.set_takedown(42, True, "graphic violence", "moderator")
    store.set_takedown(43, True, "scam", "moderator")
    time.sleep(0.25)
    assert taken.ids().tolist() == [42, 43]
    store.set_takedown(42, False, "appeal upheld", "lead")
    time.sleep(0.25)
    assert taken.ids().tolist() == [43]
    state = store.takedowns().set_index("item_id")
    assert state.loc[42, "active"] == 0 and state.loc[42, "reason"] == "appeal upheld"
    assert store.takedown_log()["action"].tolist() == ["takedown", "takedown", "undo"]
    with pytest.raises(ValueError, match="needs a reason"):
        store.set_takedown(44, True, " ", "moderator")


def test_ingestion_takes_csv_parquet_and_jsonl_and_refuses_bad_files_whole(location, tmp_path):
    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [10, 11, 12]})
    frame.to_csv(tmp_path / "a.csv", index=False)
    assert ingest_events(location, tmp_path / "a.csv") == 3
    assert ingest_events(location, tmp_path / "a.csv") == 0  # the same file again adds nothing
    frame.assign(timestamp=[20, 21, 22], event="click").to_parquet(tmp_path / "b.parquet")
    assert ingest_events(location, tmp_path / "b.parquet") == 3
    (tmp_path / "c.jsonl").write_text(json.dumps({"user_id": 3, "item_id": 9, "timestamp": 30, "event": "like"}))
    assert ingest_events(location, tmp_path / "c.jsonl") == 1
    bad = pd.DataFrame(
        {"user_id": [4, "x", 4], "item_id": [1, 2, -3], "timestamp": [1, 2, "later"], "event": ["view", "view", "buy"]}
    )
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(EventFileError) as error:
        ingest_events(location, tmp_path / "bad.csv")
    message = str(error.value)
    for defect in ("user_id is not an integer", "item_id is negative", "timestamp is not", "event is not one of"):
        assert defect in message, message
    store = LiveStore(location)
    assert len(store.events()) == 7 and len(store.user_events(4)) == 0  # nothing of the bad file
    with pytest.raises(EventFileError, match="is a folder, not an events file"):  # was "does not exist"
        ingest_events(location, tmp_path)
    # The script: exit status 2 and the message, nothing written.
    script = [sys.executable, str(ROOT / "scripts/ingest_events.py"), "--store", location]
    result = subprocess.run([*script, str(tmp_path / "bad.csv")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "nothing was written" in result.stderr
    frame.assign(timestamp=[40, 41, 42]).to_csv(tmp_path / "d.csv", index=False)
    result = subprocess.run([*script, str(tmp_path / "d.csv")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "3 new event(s)" in result.stdout, result.stderr
    assert len(store.events()) == 10
    # By repository: a mistyped one is refused instead of getting a new store that nothing serves.
    typo = [sys.executable, str(ROOT / "scripts/ingest_events.py"), "--repository", str(tmp_path / "triton_rep")]
    env = {k: v for k, v in os.environ.items() if k != "FUNNEL_STORE_URL"}
    result = subprocess.run([*typo, str(tmp_path / "d.csv")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 2 and "no model repository at" in result.stderr, result.stderr
    assert not (tmp_path / "triton_rep-live.sqlite").exists()


def test_an_undo_by_either_id_of_a_duplicated_item_restores_it(tmp_path, monkeypatch):
    """Serving reads a takedown of a duplicate's id (900, a copy of 100) as the item's. An undo by
    the other id left the first takedown active, so the item stayed out of every list."""
    import json

    import pandas as pd

    from deployment import security
    from deployment.takedowns import list_takedowns, set_takedown
    from serving.item_aliases import FILE

    monkeypatch.delenv(security.ADMIN_KEY_ENV, raising=False)
    repo = tmp_path / "triton_repo"
    (repo / "ordering" / "3").mkdir(parents=True)
    (repo / "export.json").write_text(json.dumps({"version": 3}))
    pd.DataFrame({"item_id_raw": [900], "canonical_item_id_raw": [100]}).to_parquet(repo / "ordering" / "3" / FILE)
    key = security.ensure_admin_key(repo)
    store = str(tmp_path / "live.sqlite")

    def down():
        state = list_takedowns(repo, store=store)
        return sorted(state[state["active"] == 1]["item_id"].tolist())

    for taken, undone in ((900, 100), (100, 900)):
        set_takedown(repo, taken, "unsafe", key=key, store=store)
        set_takedown(repo, 7, "another item", key=key, store=store)
        assert down() == sorted([taken, 7])
        state = set_takedown(repo, undone, "appeal upheld", key=key, store=store, undo=True)
        assert state["active"] == 0 and down() == [7]  # the other item stays down
        set_takedown(repo, 7, "done", key=key, store=store, undo=True)


def test_an_undo_restores_the_item_in_every_version_on_disk_not_only_export_json(tmp_path, monkeypatch):
    """An A/B arm (or a version added for roll_out) serves version 4 beside export.json's 3; only 4
    knows 900 as a copy of 100. An undo by 100 read 3's aliases only: 900 stayed down, and the arm
    serving 4 kept the item out of its lists."""
    import json

    from deployment import security
    from deployment.takedowns import list_takedowns, set_takedown
    from serving.item_aliases import FILE

    monkeypatch.delenv(security.ADMIN_KEY_ENV, raising=False)
    repo = tmp_path / "triton_repo"
    (repo / "ordering" / "3").mkdir(parents=True)
    (repo / "fused_funnel" / "4" / "ordering").mkdir(parents=True)
    (repo / "export.json").write_text(json.dumps({"version": 3}))
    aliases = pd.DataFrame({"item_id_raw": [900], "canonical_item_id_raw": [100]})
    aliases.to_parquet(repo / "fused_funnel" / "4" / "ordering" / FILE)
    key = security.ensure_admin_key(repo)
    store = str(tmp_path / "live.sqlite")
    set_takedown(repo, 900, "unsafe", key=key, store=store)
    set_takedown(repo, 100, "appeal upheld", key=key, store=store, undo=True)
    state = list_takedowns(repo, store=store)
    assert state[state["active"] == 1]["item_id"].tolist() == []


@pytest.fixture
def keyed_repo(tmp_path, monkeypatch):
    """A repository folder with its admin key, no key or store location from the environment."""
    from deployment import security
    from workflows.live_store import STORE_ENV

    monkeypatch.delenv(security.ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(STORE_ENV, raising=False)
    repo = tmp_path / "triton_repo"
    repo.mkdir()
    return repo, security.ensure_admin_key(repo)


def test_a_takedown_needs_the_admin_key_and_the_content_filter_reads_the_same_list(tmp_path, monkeypatch, keyed_repo):
    from configs import ContentFilterConfig
    from deployment import security
    from deployment.takedowns import set_takedown
    from workflows.content_filter import takedown_ids
    from workflows.live_store import STORE_ENV

    repo, key = keyed_repo
    with pytest.raises(security.AdminKeyError, match="wrong admin key"):
        set_takedown(repo, 17, "unsafe", key="x" * 40)
    state = set_takedown(repo, 17, "unsafe", key=key, actor="moderator")
    assert state["active"] == 1 and state["reason"] == "unsafe" and state["actor"] == "moderator"
    store = str(tmp_path / "triton_repo-live.sqlite")  # beside the repository, like the feedback log
    assert takedown_ids(ContentFilterConfig(takedowns=store)).tolist() == [17]
    monkeypatch.setenv(STORE_ENV, store)
    assert takedown_ids(ContentFilterConfig()).tolist() == [17]
    monkeypatch.delenv(STORE_ENV)
    assert takedown_ids(ContentFilterConfig()).size == 0
    with pytest.raises(ValueError, match="does not exist"):
        takedown_ids(ContentFilterConfig(takedowns=str(tmp_path / "typo.sqlite")))
    # The script: the key from the file beside the repository; undo with its own reason.
    script = [sys.executable, str(ROOT / "scripts/takedown.py"), "--repository", str(repo)]
    result = subprocess.run([*script, "--item", "17", "--undo", "--reason", "appeal"], capture_output=True, text=True)
    assert result.returncode == 0 and "served again" in result.stdout, result.stderr
    assert takedown_ids(ContentFilterConfig(takedowns=store)).size == 0
    security.admin_key_path(repo).unlink()  # no key at hand: refused, nothing changed
    result = subprocess.run([*script, "--item", "17", "--reason", "again"], capture_output=True, text=True)
    assert result.returncode == 2 and "no admin key" in result.stderr
    assert takedown_ids(ContentFilterConfig(takedowns=store)).size == 0
    # A mistyped repository, even with the key in the environment: refused, no new store beside it.
    typo = [sys.executable, str(ROOT / "scripts/takedown.py"), "--repository", str(tmp_path / "triton_rep")]
    env = {**os.environ, security.ADMIN_KEY_ENV: key}
    for args in (["--list"], ["--item", "17", "--reason", "again"]):
        result = subprocess.run([*typo, *args], capture_output=True, text=True, env=env)
        assert result.returncode == 2 and "no model repository at" in result.stderr, result.stderr
    assert not (tmp_path / "triton_rep-live.sqlite").exists()


def test_the_content_filter_drops_taken_down_items_from_events_and_catalog(tmp_path):
    import dask.dataframe as dd

    from configs import ContentFilterConfig
    from workflows.content_filter import content_filter

    store = str(tmp_path / "live.sqlite")
    LiveStore(store).set_takedown(2, True, "unsafe", "moderator")
    items = pd.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]})
    events = dd.from_pandas(pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 3]}), npartitions=1)
    kept, kept_items, unsafe, report = content_filter(events, items, ContentFilterConfig(takedowns=store))
    assert sorted(kept.compute()["item_id"]) == [1, 3] and kept_items["item_id"].tolist() == [1, 3]
    assert list(unsafe) == [2] and report.details["taken_down"] == 1


def test_the_feedback_log_runs_on_postgres(postgres):
    from online.feedback_log import FeedbackLog

    log = FeedbackLog(postgres.url)
    other = FeedbackLog(postgres.url)  # a second replica on the same log
    log.log_impressions("r1", 7, [11, 12], "1", "control", "model")
    assert other.served("r1") == {"user_id": 7, "item_ids": [11, 12], "arm": "control", "model_version": "1"}
    assert len(log.log_feedback_many([("r1", 7, 11, "click", 1), ("r1", 7, 12, "like", 1)])) == 2
    assert other.log_feedback_many([("r1", 7, 11, "click", 1)]) == []  # stored once across replicas
    assert log.counts() == {"impressions": 2, "feedback": 2, "empty_responses": 0}
    assert np.isclose(other.feedback()["value"].sum(), 2.0)


def test_the_feedback_log_reads_one_experiment_since_a_time_in_the_database(location):
    """``impressions`` / ``empty_responses`` / ``feedback`` with ``since`` and ``experiment`` return what
    ``serve_ab_test`` used to filter in pandas from the whole log, and only those rows leave the database
    (a deployment's shared log holds millions of other rows: reading them all took 2x the time and memory)."""
    from online.ab_report import of_experiment
    from online.feedback_log import FeedbackLog

    log = FeedbackLog(location)
    began = 100.0
    for i, (ts, experiment) in enumerate([(50.0, "ab"), (150.0, "ab"), (150.0, "other"), (160.0, ""), (170.0, "ab")]):
        items = [] if i == 4 else [10 + i, 20 + i]
        log.log_impressions(f"r{i}", i, items, "1", "control", "model", ts=ts, experiment=experiment)
        log.log_feedback_many([(f"r{i}", i, items[0] if items else -1, "click" if items else "churn", 1)], ts=ts + 1)
    log.log_feedback_many([("r1", 1, 11, "like", 1)], ts=began - 1)  # about one of ours, sent before the start
    everything = log.impressions(), log.empty_responses(), log.feedback()
    read = []
    frame = log.db.frame
    log.db.frame = lambda sql, params=(): read.append(len(out := frame(sql, params))) or out
    imp = log.impressions(since=began, experiment="ab")
    empty = log.empty_responses(since=began, experiment="ab")
    fb = log.feedback(since=began, experiment="ab")
    log.close()
    # What serve_ab_test computed from the whole log before the filters moved into the query.
    want_imp = of_experiment(everything[0][everything[0]["ts"] >= began], "ab")
    want_empty = of_experiment(everything[1][everything[1]["ts"] >= began], "ab")
    ours = pd.concat([want_imp["request_id"], want_empty["request_id"]])
    want_fb = everything[2][(everything[2]["ts"] >= began) & everything[2]["request_id"].isin(ours)]
    for got, want in ((imp, want_imp), (empty, want_empty), (fb, want_fb)):
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert sorted(imp["request_id"].unique()) == ["r1", "r3"] and empty["request_id"].tolist() == ["r4"]
    assert sorted(fb["request_id"]) == ["r1", "r3", "r4"]
    assert read == [4, 1, 3]  # the rows that left the database: the experiment's, since the start


# The feedback log's tables before responses named their experiment (2026-12-07).
LEGACY_FEEDBACK_LOG = [
    """CREATE TABLE impressions (
    request_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, user_id BIGINT NOT NULL, item_id BIGINT NOT NULL,
    position INTEGER NOT NULL, model_version TEXT NOT NULL, arm TEXT NOT NULL, served_by TEXT NOT NULL,
    PRIMARY KEY (request_id, position))""",
    """CREATE TABLE feedback (
    request_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, user_id BIGINT NOT NULL, item_id BIGINT NOT NULL,
    event TEXT NOT NULL, value DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE empty_responses (
    request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, user_id BIGINT NOT NULL,
    model_version TEXT NOT NULL, arm TEXT NOT NULL, served_by TEXT NOT NULL)""",
    "INSERT INTO impressions VALUES ('old', 1.0, 7, 11, 0, '1', 'control', 'model')",
    "INSERT INTO impressions VALUES ('old', 1.0, 7, 12, 1, '1', 'control', 'model')",
    "INSERT INTO empty_responses VALUES ('old-empty', 1.0, 8, '1', 'treatment', 'fallback')",
    "INSERT INTO feedback VALUES ('old', 2.0, 7, 11, 'click', 1.0)",
]


def test_a_feedback_log_from_before_experiment_names_opens_and_is_migrated_on_either_backend(location):
    """A log written before impressions named their experiment lacks the column: reading it for one
    experiment reads every row (unknown experiment), and opening it adds the column ('' in the old
    rows, none lost), after which the router's rows carry their experiment's name."""
    from online.ab_report import logged_requests
    from online.feedback_log import FeedbackLog
    from workflows.live_store import Database

    if not location.startswith("postgresql://"):
        location = location.replace("live.sqlite", "feedback.sqlite")
    old = Database(location)
    with old.transaction():
        for statement in LEGACY_FEEDBACK_LOG:
            old.execute(statement)
    old.close()
    assert sorted(logged_requests(location, experiment="a")["request_id"]) == ["old", "old-empty"]  # not migrated
    log, other = FeedbackLog(location), FeedbackLog(location)  # a second opener finds it migrated
    try:
        log.log_impressions("new-a", 9, [13], "2", "control", "model", ts=3.0, experiment="a")
        other.log_impressions("new-b", 10, [], "2", "control", "model", ts=3.0, experiment="b")
        imp, empty = log.impressions().sort_values("request_id"), log.empty_responses().sort_values("request_id")
        assert imp[["request_id", "experiment"]].values.tolist() == [["new-a", "a"], ["old", ""], ["old", ""]]
        assert empty[["request_id", "experiment"]].values.tolist() == [["new-b", "b"], ["old-empty", ""]]
        assert log.counts() == {"impressions": 3, "feedback": 1, "empty_responses": 2}
        assert log.served("old")["item_ids"] == [11, 12]
    finally:
        log.close(), other.close()
    requests = logged_requests(location, experiment="a").set_index("request_id").sort_index()
    assert requests.index.tolist() == ["new-a", "old", "old-empty"] and requests.loc["old", "clicks"] == 1
    assert sorted(logged_requests(location, experiment="b")["request_id"]) == ["new-b", "old", "old-empty"]
    assert len(logged_requests(location)) == 4


def test_feedback_whose_request_id_holds_a_nul_is_a_bad_request_on_either_backend(location):
    """PostgreSQL text cannot hold NUL: psycopg raised DataError (an INTERNAL error) at the lookup of such
    a request id, where SQLite answered "unknown request_id". A request id with NUL is the client's
    error on both backends (``INVALID_ARGUMENT``), and nothing is logged."""
    from online.router import FeedbackService
    from serving.request import RequestError

    feedback = FeedbackService(location)
    feedback.log.log_impressions("r1", 7, [11, 12], "1", "control", "model")
    request = {
        "item_ids": np.array([11]),
        "events": np.array([b"click"], dtype=object),
        "values": np.ones(1, dtype=np.float32),
    }
    try:
        for request_id in (b"r1\x00", b"\x00"):
            with pytest.raises(RequestError, match="'request_id' must not hold NUL"):
                feedback.run({**request, "request_id": np.array([request_id], dtype=object)})
        assert feedback.run({**request, "request_id": np.array([b"r1"], dtype=object)})["accepted"][0] == 1
        assert len(feedback.log.feedback()) == 1
    finally:
        feedback.close()


OPENER = """
import sys, time
from online.feedback_log import FeedbackLog
from workflows.live_store import LiveStore
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # all at once, as replicas' pods start
for location in sys.argv[2:]:
    FeedbackLog(location), LiveStore(location)
"""


def test_replicas_starting_together_create_the_schema_once(location):
    """Seen in a full run: two servers starting at once on one fresh PostgreSQL database, one died of a
    unique violation in the catalog (concurrent ``CREATE UNIQUE INDEX IF NOT EXISTS``). The collision
    needs two creations to overlap: 6 processes open 8 fresh stores together."""
    locations = [f"{location}.{i}.sqlite" for i in range(8)]
    if location.startswith("postgresql://"):
        import psycopg

        base, name = location.rsplit("/", 1)
        locations = [f"{base}/{name}x{i}" for i in range(8)]
        with psycopg.connect(location, autocommit=True) as con:
            for other in locations:
                con.execute(f"CREATE DATABASE {other.rsplit('/', 1)[1]}")
    start = str(time.time() + 4)  # after every interpreter has imported
    openers = [
        subprocess.Popen([sys.executable, "-c", OPENER, start, *locations], cwd=ROOT, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    for opener in openers:
        assert opener.wait() == 0, opener.stderr.read().decode()[-2000:]


def test_the_postgres_server_refuses_tcp_clients_without_its_password(postgres):
    """Every local user reaches 127.0.0.1: with trust there, any of them could take items down in the
    live store without the admin key, or read what users did. The DSN the server hands out works."""
    import psycopg

    from workflows.live_store import describe

    without = describe(postgres.url)  # the same DSN, its password left out
    assert without != postgres.url
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without, autocommit=True).close()
    with psycopg.connect(postgres.url, autocommit=True) as con:
        assert con.execute("SELECT 1").fetchone() == (1,)


def test_the_postgres_servers_cpu_is_read_from_its_processes(postgres):
    """What the live benchmark charges to the database: the cluster's CPU grows with its work (a
    backend's time counts while it runs and after it has gone), and reads 0 once it has stopped."""
    import psycopg

    before = postgres.cpu_seconds()
    assert before > 0  # initdb's server start and createdb already cost some
    with psycopg.connect(postgres.url, autocommit=True) as con:
        con.execute("SELECT count(*) FROM generate_series(1, 3000000)")  # a second or so of one backend
        during = postgres.cpu_seconds()
    time.sleep(0.5)  # the backend exits; the postmaster reaps it
    after = postgres.cpu_seconds()
    assert during - before > 0.1 and after >= during - 0.05, (before, during, after)
    stopped = PostgresServer()
    assert stopped.cpu_seconds() == 0.0
    stopped.stop()


def test_ingestion_reads_epoch_seconds_in_json_lines_as_seconds(tmp_path):
    """pandas' read_json turns a column named ``timestamp`` into dates by default, and the dates' ns
    then became 1.7e18 "seconds": every event of a JSON-lines file landed 50 billion years ahead."""
    from workflows.live_store import read_events_file

    lines = [{"user_id": 1, "item_id": 5, "timestamp": 1_700_000_000}, {"user_id": 2, "item_id": 6, "timestamp": 1.7e9}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_events_file(tmp_path / "e.jsonl")["ts"].tolist() == [1.7e9, 1.7e9]
    # A parquet column of dates means those instants: their seconds since the epoch.
    dates = pd.DataFrame({"user_id": [1], "item_id": [5], "timestamp": pd.to_datetime([1_700_000_000], unit="s")})
    dates.to_parquet(tmp_path / "d.parquet")
    assert read_events_file(tmp_path / "d.parquet")["ts"].tolist() == [1.7e9]


def test_ingestion_refuses_millisecond_timestamps_instead_of_hiding_the_users_real_events(tmp_path):
    """Epoch milliseconds read as seconds put events 50,000 years ahead: newest forever, 1,000 of them
    filled the per-request read (``user_events``), and the item the user had just watched through the
    feedback endpoint was no longer read, so it came back in the next response."""
    location = str(tmp_path / "live.sqlite")
    millis = pd.DataFrame({"user_id": 5, "item_id": np.arange(3), "timestamp": 1_700_000_000_000 + np.arange(3)})
    unit = r"timestamp is 1e11 or more: milliseconds \(or micro- or nanoseconds\), not seconds"
    with pytest.raises(EventFileError, match=unit + r" in 3 row\(s\)"):
        ingest_events(location, millis)
    assert len(LiveStore(location).events()) == 0  # refused whole
    assert ingest_events(location, millis.assign(timestamp=millis["timestamp"] / 1000)) == 3  # seconds go in


def test_ingestion_refuses_ids_beyond_int64_instead_of_wrapping_them(tmp_path):
    """A user id of 2**64 - 1 was stored as user -1 (another user's events), an item id of 2**63 or
    1e20 was refused as 'negative'."""
    (tmp_path / "e.csv").write_text(
        "user_id,item_id,timestamp\n18446744073709551615,5,1700000000\n1,99999999999999999999,1700000000\n"
    )
    with pytest.raises(EventFileError) as error:
        ingest_events(str(tmp_path / "live.sqlite"), tmp_path / "e.csv")
    message = str(error.value)
    assert "user_id is outside the 64-bit integer range in 1 row(s), e.g. row(s) [1]" in message, message
    assert "item_id is outside the 64-bit integer range in 1 row(s), e.g. row(s) [2]" in message, message
    assert "negative" not in message, message
    unsigned = pd.DataFrame(
        {"user_id": np.array([2**63], np.uint64), "item_id": np.array([2**63 - 1], np.uint64), "timestamp": [1]}
    )
    with pytest.raises(EventFileError, match=r"user_id is outside the 64-bit integer range in 1 row\(s\)"):
        ingest_events(str(tmp_path / "live.sqlite"), unsigned)
    # The largest int64 ids still go in exactly.
    largest = pd.DataFrame({"user_id": [2**63 - 1, -(2**63)], "item_id": [2**63 - 1, 0], "timestamp": [1, 2]})
    assert ingest_events(str(tmp_path / "live.sqlite"), largest) == 2
    stored = LiveStore(str(tmp_path / "live.sqlite")).events()
    assert sorted(stored["user_id"].tolist()) == [-(2**63), 2**63 - 1]


def test_a_dsn_is_described_without_its_password_in_either_form():
    """libpq takes the password in the query string too; ``describe`` kept that form whole, so the
    ingestion script printed it and the A/B report wrote it into its "source of the numbers"."""
    from workflows.live_store import describe

    assert describe("postgresql://u:secret@db:5432/funnel") == "postgresql://u@db:5432/funnel"
    assert describe("postgresql://u@db/funnel?password=secret") == "postgresql://u@db/funnel"
    assert describe("postgres://db/funnel?user=u&PASSWORD=secret&sslmode=require") == (
        "postgres://db/funnel?user=u&sslmode=require"
    )
    assert describe("/srv/live.sqlite") == "/srv/live.sqlite"


def test_a_dsn_whose_password_holds_a_question_mark_is_described_without_it():
    """libpq ends the credentials at the ``@`` before the host, so a ``?`` in the password is part of
    it (the URL connects); ``describe`` cut the query off first and printed the password whole."""
    from workflows.live_store import describe

    assert describe("postgresql://u:pa?ss@db:5432/funnel") == "postgresql://u@db:5432/funnel"
    assert describe("postgresql://u:pa?ss@db/funnel?password=x&sslmode=require") == (
        "postgresql://u@db/funnel?sslmode=require"
    )
    assert describe("postgresql://u:pa/ss@db/funnel") == "postgresql://u@db/funnel"


def test_a_dsn_libpq_cannot_parse_is_refused_without_its_password_in_the_error():
    """A password with a literal ``%`` (not percent-encoded) or an unclosed ``[``: libpq's message
    quoted the password, or the whole URL, and the ingestion script's traceback printed it."""
    psycopg = pytest.importorskip("psycopg")
    for url in ("postgresql://u:s3c%ret@127.0.0.1:1/db", "postgresql://u:s3c%ret@[db/funnel"):
        with pytest.raises(psycopg.Error) as error:
            LiveStore(url)
        assert "s3c%ret" not in str(error.value), str(error.value)


def test_the_takedown_script_refuses_an_item_id_beyond_int64_with_exit_status_2(tmp_path, monkeypatch):
    """It ended in SQLite's OverflowError traceback (exit status 1) instead of the argument error."""
    from deployment import security
    from workflows.live_store import STORE_ENV

    monkeypatch.delenv(STORE_ENV, raising=False)
    repo = tmp_path / "triton_repo"
    repo.mkdir()
    env = {**os.environ, security.ADMIN_KEY_ENV: security.ensure_admin_key(repo)}
    env.pop(STORE_ENV, None)
    script = [sys.executable, str(ROOT / "scripts/takedown.py"), "--repository", str(repo), "--reason", "unsafe"]
    result = subprocess.run([*script, "--item", str(2**64)], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "argument --item" in result.stderr and "Traceback" not in result.stderr, (
        result.stderr
    )
    result = subprocess.run([*script, "--item", str(2**63 - 1)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert LiveStore(str(tmp_path / "triton_repo-live.sqlite")).taken_down().tolist() == [2**63 - 1]


def test_a_postgres_server_starts_in_a_temporary_folder_with_a_space(monkeypatch):
    """pg_ctl passes the server's options through a shell: an unquoted socket folder under a TMPDIR
    with a space failed the start ("pg_ctl: could not start server")."""
    import shutil
    import tempfile

    import psycopg

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    # In the system's temporary folder: run as root, the cluster runs as the postgres user, which
    # cannot enter pytest's private folders.
    spaced = Path(tempfile.mkdtemp(prefix="funnel pg "))
    try:
        os.chmod(spaced, 0o755)
        monkeypatch.setattr(tempfile, "tempdir", str(spaced))
        with PostgresServer() as server:
            assert " " in str(server.root)
            with psycopg.connect(server.url) as con:
                assert con.execute("SELECT 1").fetchone() == (1,)
        assert not server.root.exists()
    finally:
        shutil.rmtree(spaced, ignore_errors=True)


def test_a_postgres_server_that_fails_to_start_leaves_no_folder_behind():
    """``PostgresServer().start()`` (tests/test_replicas.py, benchmarks/benchmark_live.py) on a port
    already taken failed ("pg_ctl: could not start server") and left its temporary folder, with the
    whole initdb'd cluster in it; only the ``with`` form removed it."""
    import socket

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = PostgresServer(port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="pg_ctl"):
            server.start()
    assert not server.root.exists(), sorted(p.name for p in server.root.iterdir())


def postgres_segments_mapped_outside(postmaster: int) -> set[Path]:
    """The ``/dev/shm/PostgreSQL.*`` segments a live process maps that is neither ``postmaster`` nor one
    of its children: those of other clusters on this machine."""
    from deployment.server import child_pids

    ours = {postmaster, *child_pids(postmaster)}
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in ours:
            continue
        try:
            maps = (proc / "maps").read_text().splitlines()
        except OSError:  # gone, or not ours to read
            continue
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/PostgreSQL."):
                found.add(Path(fields[5].removesuffix(" (deleted)")))
    return found


def test_a_postgres_server_that_pg_ctl_cannot_stop_is_killed_not_left_running(monkeypatch):
    """A postmaster that does not stop (here SIGSTOPped) made ``pg_ctl stop`` give up after its timeout;
    ``stop`` then deleted the cluster's folder and left the server running on it, holding its port."""
    import signal

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    monkeypatch.setenv("PGCTLTIMEOUT", "2")  # pg_ctl stop's wait, 60 s by default
    shm = Path("/dev/shm")
    before = set(shm.glob("PostgreSQL.*"))
    with PostgresServer() as server:
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
        # New since ``before`` and not another cluster's: a cluster another xdist worker started meanwhile
        # (tests/test_replicas.py) made its own segments, which its running postmaster keeps.
        made = set(shm.glob("PostgreSQL.*")) - before - postgres_segments_mapped_outside(postmaster)
        os.kill(postmaster, signal.SIGSTOP)
    # Killed, it could not remove its dynamic shared memory: stop() does (old code left 2 segments).
    assert not {p for p in made if p.exists()}
    try:
        state = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    if state not in ("gone", "Z"):
        os.kill(postmaster, signal.SIGKILL)
    assert state in ("gone", "Z"), f"the postmaster is still there ({state}) after stop()"
    assert not server.root.exists()


def test_a_new_sqlite_store_and_its_journal_are_readable_by_their_owner_only(tmp_path):
    """The feedback log and the live store hold user ids and what they did: 0600, not the umask's 0644."""
    import stat

    from online.feedback_log import FeedbackLog

    live, log = LiveStore(tmp_path / "live.sqlite"), FeedbackLog(tmp_path / "feedback.sqlite")
    try:
        live.append_events([(1, 2, 3.0, "click", 1.0)], "ingest")
        log.log_impressions("r1", 1, [2, 3], "1", "control", "model")
        files = sorted(tmp_path.glob("*.sqlite*"))
        assert {p.name for p in files} >= {"live.sqlite", "live.sqlite-wal", "feedback.sqlite", "feedback.sqlite-wal"}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o600" for p in files}
    finally:
        live.close()
        log.close()


def test_a_store_reconnects_after_its_postgres_server_restarts(caplog):
    """psycopg never reopens a connection the server dropped: after one restart of the database
    every later read of a long-running server failed ("the connection is closed"), and every write
    ("the connection is lost")."""
    import psycopg

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    with PostgresServer() as server:
        store = LiveStore(server.url)
        try:
            assert store.append_events([(1, 10, 100.0, "click", 1.0), (1, 11, 101.0, "like", 1.0)], "feedback") == 2
            server.restart()
            with caplog.at_level("WARNING", logger="workflows.live_store"):
                assert store.user_events(1).item_ids.tolist() == [11, 10]  # the read is retried on a new connection
            assert "reconnecting" in caplog.text and server.password not in caplog.text
            assert store.append_events([(1, 12, 102.0, "view", 1.0)], "feedback") == 1
            assert store.user_events(1).item_ids.tolist() == [12, 11, 10]
            # A write that is the first call after a restart: its BEGIN meets the dead connection,
            # before anything of the transaction was sent, and is begun again on a new one.
            server.restart()
            assert store.append_events([(2, 13, 103.0, "share", 1.0)], "feedback") == 1
            assert store.events()[["user_id", "item_id"]].values.tolist() == [[1, 10], [1, 11], [1, 12], [2, 13]]
            # Inside a transaction nothing is retried: the error reaches the caller, nothing of the
            # transaction is committed, and the next call reconnects.
            insert = "INSERT INTO live_events VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
            with pytest.raises(psycopg.OperationalError):
                with store.db.transaction():
                    store.db.execute(insert, (3, 14, 104.0, "view", 1.0, "feedback"))
                    server.restart()
                    with pytest.raises(psycopg.OperationalError):
                        store.db.execute(insert, (3, 15, 105.0, "view", 1.0, "feedback"))
                    # Not on a new connection either, where it would commit alone (autocommit).
                    store.db.execute(insert, (3, 16, 106.0, "view", 1.0, "feedback"))
            assert len(store.user_events(3)) == 0
            assert store.append_events([(3, 17, 107.0, "view", 1.0)], "feedback") == 1
            assert store.user_events(3).item_ids.tolist() == [17]
        finally:
            store.close()


def test_a_call_while_the_postgres_server_is_unreachable_waits_one_connect_timeout_not_two(monkeypatch):
    """A call that found its connection dropped tried to reconnect, and when that attempt timed out
    (the server unreachable, not refusing) tried once more: every read and write of a serving process
    held the store's lock for twice ``CONNECT_TIMEOUT_S`` before failing, while the requests queued."""
    import socket

    import psycopg

    from workflows import live_store

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    monkeypatch.setattr(live_store, "CONNECT_TIMEOUT_S", 2)
    with PostgresServer() as server:
        store = LiveStore(server.url)
        silent = socket.socket()
        try:
            assert store.append_events([(1, 10, 100.0, "click", 1.0)], "feedback") == 1
            server._run(str(server.bin / "pg_ctl"), "-D", str(server.data), "-m", "fast", "-w", "stop")
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            silent.bind(("127.0.0.1", server.port))
            silent.listen(8)  # where the server was: accepts, never speaks
            for call in (
                lambda: store.user_events(1),  # finds the connection dropped, one attempt to reconnect
                lambda: store.user_events(1),  # the connection known broken: one attempt
                lambda: store.append_events([(1, 11, 101.0, "like", 1.0)], "feedback"),
            ):
                started = time.monotonic()
                with pytest.raises(psycopg.OperationalError):
                    call()
                assert time.monotonic() - started < 3.5
        finally:
            silent.close()
            store.close()


def test_a_postgres_server_that_never_answers_is_given_up_on(monkeypatch):
    """libpq waited for a server that accepts TCP but never answers (or an unreachable host) as long
    as the OS let it, while every request of the serving process queued behind the store's lock. The
    store now gives up after ``CONNECT_TIMEOUT_S`` (the URL's own ``connect_timeout`` wins)."""
    import socket
    import threading

    import psycopg

    from workflows import live_store

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never speaks
    port = silent.getsockname()[1]
    monkeypatch.setattr(live_store, "CONNECT_TIMEOUT_S", 2, raising=False)
    outcome = {}

    def connect(url):
        started = time.monotonic()
        try:
            live_store.Database(url)
        except psycopg.OperationalError as err:
            outcome[url] = (time.monotonic() - started, str(err))

    urls = [f"postgresql://u:p@127.0.0.1:{port}/db", f"postgresql://u:p@127.0.0.1:{port}/db?connect_timeout=4"]
    threads = [threading.Thread(target=connect, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    silent.close()
    assert set(outcome) == set(urls), f"still connecting after 15 s: {set(urls) - set(outcome)}"
    assert outcome[urls[0]][0] < 3.5 and 3.5 < outcome[urls[1]][0] < 6, outcome


def test_the_same_events_from_csv_and_json_lines_are_stored_once(tmp_path):
    """pandas' default CSV float parser is not correctly rounded: about one full-precision timestamp in
    eight (``time.time()``, as the feedback endpoint stores them) came out one ulp off, so the same
    events ingested from a CSV after a JSON-lines or parquet file (or the store's own events, exported
    and ingested back) were stored twice and counted twice in the user's live history."""
    location = str(tmp_path / "live.sqlite")
    ts = 1_700_000_000 + np.random.default_rng(0).random(200)
    events = pd.DataFrame({"user_id": 1, "item_id": np.arange(200), "timestamp": ts})
    (tmp_path / "e.jsonl").write_text(events.to_json(orient="records", lines=True, double_precision=15))
    events.to_csv(tmp_path / "e.csv", index=False)
    assert ingest_events(location, events) == 200
    assert ingest_events(location, tmp_path / "e.jsonl") == 0
    assert ingest_events(location, tmp_path / "e.csv") == 0
    assert LiveStore(location).events()["ts"].tolist() == sorted(ts.tolist())


def test_a_parquet_column_of_dates_and_the_same_instants_in_seconds_are_stored_once(tmp_path):
    """Dates were turned into seconds by ``total_seconds()``, which divides a float of the nanoseconds
    (already rounded past 2**53): about one microsecond-resolution instant in four came out one ulp
    away from its seconds (``datetime.timestamp()``, or the decimal in a CSV), so the same events from
    a parquet file of dates and from a file of seconds were stored twice."""
    location = str(tmp_path / "live.sqlite")
    micros = 1_700_000_000_000_000 + np.random.default_rng(0).integers(0, 10**9, 200)
    dates = pd.to_datetime(micros, unit="us", utc=True)
    pd.DataFrame({"user_id": 1, "item_id": np.arange(200), "timestamp": dates}).to_parquet(tmp_path / "d.parquet")
    seconds = pd.DataFrame({"user_id": 1, "item_id": np.arange(200), "timestamp": [d.timestamp() for d in dates]})
    assert seconds["timestamp"].tolist() == [int(m) / 10**6 for m in micros]
    assert ingest_events(location, tmp_path / "d.parquet") == 200
    assert ingest_events(location, seconds) == 0


def test_an_ingest_that_fills_the_disk_says_so_and_writes_nothing(tmp_path):
    """SQLite rolls the whole transaction back itself on a full disk; the ROLLBACK after it then
    failed, and its 'cannot rollback - no transaction is active' replaced 'database or disk is full'."""
    store = LiveStore(str(tmp_path / "live.sqlite"))
    store.db.execute("PRAGMA max_page_count=20")  # a disk with room for 20 pages
    n = 5000
    events = pd.DataFrame({"user_id": np.arange(n), "item_id": np.arange(n), "timestamp": 1.7e9 + np.arange(n)})
    with pytest.raises(Exception, match="database or disk is full"):
        ingest_events(store, events)
    assert len(store.events()) == 0
    assert store.append_events([(1, 1, 1.0, "view", 1.0)], "ingest") == 1  # the store still works


def test_an_id_beyond_2_53_read_as_a_float_is_refused_instead_of_rounded_to_another_user(tmp_path):
    """One id written as a float ("7.0") makes pandas read the whole column as floats, and a 64-bit
    id beyond 2**53 was rounded: user 1234567890123456789's events were stored as user
    1234567890123456768's."""
    location = str(tmp_path / "live.sqlite")
    (tmp_path / "e.csv").write_text("user_id,item_id,timestamp\n1234567890123456789,5,1700000000\n7.0,6,1700000000\n")
    with pytest.raises(EventFileError, match=r"user_id is a float beyond 2\*\*53.* in 1 row\(s\), e.g. row\(s\) \[1\]"):
        ingest_events(location, tmp_path / "e.csv")
    assert len(LiveStore(location).events()) == 0
    (tmp_path / "e.csv").write_text("user_id,item_id,timestamp\n1234567890123456789,5,1700000000\n7,6,1700000000\n")
    assert ingest_events(location, tmp_path / "e.csv") == 2  # integers: exact
    assert sorted(LiveStore(location).events()["user_id"]) == [7, 1234567890123456789]


def test_a_takedown_refuses_a_fractional_item_id_and_a_missing_reason(keyed_repo):
    """``int(1234.5)`` took item 1234 down, and a ``reason`` of None failed with ``AttributeError``."""
    from deployment.takedowns import list_takedowns, set_takedown

    repo, key = keyed_repo
    with pytest.raises(ValueError, match="item_id must be a whole number, got 1234.5"):
        set_takedown(repo, 1234.5, "unsafe", key=key)
    with pytest.raises(ValueError, match="needs a reason"):
        set_takedown(repo, 1234, None, key=key)
    assert list_takedowns(repo).empty
    assert set_takedown(repo, 1234.0, "unsafe", key=key)["item_id"] == 1234


def test_opening_an_existing_store_does_not_wait_for_a_long_ingest(tmp_path):
    """Every open ran the schema in a ``BEGIN IMMEDIATE`` transaction, the store's write lock, even
    when its tables were there: a serving stage loading (a start, a rollout), the takedown list or
    the content filter waited for any write in progress, and an ingest of a few million rows (one
    transaction, ~7 us a row) made them fail after 30 s with "database is locked". Readers never wait."""
    import sqlite3
    import threading

    location = str(tmp_path / "live.sqlite")
    store = LiveStore(location)
    store.append_events([(7, 11, 100.0, "click", 1.0)], "ingest")
    store.set_takedown(42, True, "scam", "moderator")
    store.close()
    ingest = sqlite3.connect(location, isolation_level=None)
    ingest.execute("BEGIN IMMEDIATE")  # an ingest in progress, holding the write lock
    seen = []

    def open_and_read():
        reader = LiveStore(location)
        seen.append((reader.user_events(7).item_ids.tolist(), reader.taken_down().tolist()))
        reader.close()

    try:
        thread = threading.Thread(target=open_and_read, daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert seen == [([11], [42])]
    finally:
        ingest.execute("ROLLBACK")
        ingest.close()
    thread.join()


def test_a_store_url_naming_no_file_warns_and_creates_nothing(tmp_path, monkeypatch, caplog):
    """``$FUNNEL_STORE_URL`` naming a SQLite file that does not exist (a typo) had the training run's
    content filter create an empty store there and apply no takedown, without a word."""
    import logging

    from configs import ContentFilterConfig
    from workflows.content_filter import takedown_ids
    from workflows.live_store import STORE_ENV

    typo = tmp_path / "lve.sqlite"
    monkeypatch.setenv(STORE_ENV, str(typo))
    with caplog.at_level(logging.WARNING, logger="workflows.content_filter"):
        assert takedown_ids(ContentFilterConfig()).size == 0
    assert not typo.exists()
    assert any("does not exist: no takedown applied" in r.getMessage() for r in caplog.records)


def test_a_takedown_of_an_unknown_id_warns_and_an_undo_of_an_item_not_down_writes_nothing(
    tmp_path, monkeypatch, caplog
):
    """A mistyped id was taken down in silence (nothing the export serves went down, and the operator
    believed it had), and an undo of an item that was never down wrote an undo row and log entry."""
    import json
    import logging

    from deployment import security
    from deployment.takedowns import NotTakenDownError, list_takedowns, set_takedown
    from serving.item_aliases import FILE
    from workflows.live_store import STORE_ENV

    monkeypatch.delenv(security.ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(STORE_ENV, raising=False)
    repo = tmp_path / "triton_repo"
    (repo / "ordering" / "3").mkdir(parents=True)
    (repo / "export.json").write_text(json.dumps({"version": 3}))
    pd.DataFrame({"item_id": [0, 1], "item_id_raw": [100, 200]}).to_parquet(
        repo / "ordering" / "3" / "item_features.parquet"
    )
    pd.DataFrame({"item_id_raw": [900], "canonical_item_id_raw": [100]}).to_parquet(repo / "ordering" / "3" / FILE)
    key = security.ensure_admin_key(repo)
    store = str(tmp_path / "live.sqlite")
    with caplog.at_level(logging.WARNING, logger="deployment.takedowns"):
        for known in (100, 900):  # in the catalog; a duplicate's id the aliases know
            set_takedown(repo, known, "unsafe", key=key, store=store)
        assert not caplog.records
        state = set_takedown(repo, 1000, "unsafe", key=key, store=store)  # a typo of 100, or not arrived yet
    assert state["active"] == 1  # blocked all the same
    assert "item 1000 is in no exported version's catalog" in caplog.text
    log = LiveStore(store).takedown_log()
    with pytest.raises(NotTakenDownError, match="item 200 is not taken down: nothing to undo"):
        set_takedown(repo, 200, "appeal upheld", key=key, store=store, undo=True)
    set_takedown(repo, 1000, "a typo", key=key, store=store, undo=True)
    with pytest.raises(NotTakenDownError, match="item 1000 is not taken down"):  # undone already
        set_takedown(repo, 1000, "again", key=key, store=store, undo=True)
    assert (
        len(LiveStore(store).takedown_log()) == len(log) + 1
        and 200 not in list_takedowns(repo, store=store)["item_id"].tolist()
    )
    # The script: the undo refused with exit status 2, the warning on stderr.
    env = {**os.environ, STORE_ENV: store}
    script = [sys.executable, str(ROOT / "scripts/takedown.py"), "--repository", str(repo), "--reason", "r"]
    result = subprocess.run([*script, "--item", "200", "--undo"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "item 200 is not taken down" in result.stderr, result.stderr
    result = subprocess.run([*script, "--item", "2000"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "WARNING: item 2000 is in no exported version's catalog" in result.stderr


def test_two_undos_at_once_restore_the_item_once_and_the_second_is_refused(location, tmp_path, monkeypatch):
    """Two operators undo the same takedown at once, each with its own connection. The undo read what
    was down and wrote the undo in separate transactions: both passed the check, both wrote, and the
    log held two undos (the second an undo of nothing, which must be refused and write nothing). The
    rival undo here runs in the gap between the first one's read of what is down and its write."""
    import threading

    from deployment import security
    from deployment.takedowns import NotTakenDownError, set_takedown

    monkeypatch.delenv(security.ADMIN_KEY_ENV, raising=False)
    repo = tmp_path / "triton_repo"  # no export yet: no aliases, so the one read of what is down is the check
    repo.mkdir()
    key = security.ensure_admin_key(repo)
    set_takedown(repo, 100, "unsafe", key=key, store=location)
    outcomes = {}

    def undo(who):
        try:
            outcomes[who] = set_takedown(repo, 100, f"appeal ({who})", key=key, store=location, undo=True)["active"]
        except NotTakenDownError as err:
            outcomes[who] = err

    read = LiveStore.taken_down
    rival = threading.Thread(target=undo, args=("rival",))

    def taken_down(self):
        down = read(self)
        if threading.current_thread() is not rival and not rival.is_alive() and "rival" not in outcomes:
            rival.start()  # the other process's undo, between this one's check and its write
            rival.join(timeout=3)  # it finishes (old code) or waits for this transaction (new code)
        return down

    monkeypatch.setattr(LiveStore, "taken_down", taken_down)
    undo("first")
    rival.join(timeout=60)
    assert outcomes["first"] == 0
    assert isinstance(outcomes["rival"], NotTakenDownError), outcomes
    store = LiveStore(location)
    try:
        log = store.takedown_log()
        assert log["action"].tolist() == ["takedown", "undo"] and log["reason"].iloc[-1] == "appeal (first)"
        state = store.takedowns()
        assert state["active"].tolist() == [0] and state["reason"].tolist() == ["appeal (first)"]
    finally:
        store.close()


def test_a_postgres_store_connects_with_tcp_keepalives_unless_its_url_sets_them(postgres):
    """The store's PostgreSQL connection kept libpq's keepalive timing, the OS's: a first probe after
    2 hours idle. A NAT or firewall that forgets idle connections after minutes then swallowed the next
    statement, which hung until TCP gave up (about 15 min) with every request of the process queued
    behind the store's lock. Now probes after ``KEEPALIVES``' 60 s idle, on the socket itself; the
    URL's own keepalive settings win."""
    import socket

    from workflows import live_store

    def socket_keepalives(store) -> tuple[int, int, int, int]:
        sock = socket.fromfd(store.db._con.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM)  # a dup
        try:
            return tuple(
                sock.getsockopt(level, option)
                for level, option in (
                    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                )
            )
        finally:
            sock.close()

    store = LiveStore(postgres.url)
    own = LiveStore(postgres.url + "?keepalives_idle=5&keepalives_count=2")
    try:
        on, idle, interval, count = socket_keepalives(store)
        # probes on, the first before common NAT idle timeouts (4 min and up), a dead peer noticed in minutes
        assert on == 1 and idle < 240 and idle + interval * count <= 180, (on, idle, interval, count)
        expected = live_store.KEEPALIVES
        assert (idle, interval, count) == (
            expected["keepalives_idle"],
            expected["keepalives_interval"],
            expected["keepalives_count"],
        )
        assert socket_keepalives(own) == (1, 5, expected["keepalives_interval"], 2)  # the URL's win
        for each, values in ((store, (idle, interval, count)), (own, (5, interval, 2))):
            given = each.db._con.info.get_parameters()  # what libpq was given, as the server's log would show
            assert given["keepalives"] == "1"
            assert tuple(given[key] for key in ("keepalives_idle", "keepalives_interval", "keepalives_count")) == tuple(
                str(v) for v in values
            )
    finally:
        store.close()
        own.close()
