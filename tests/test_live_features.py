"""Live features through a real tritonserver: what a user just did, and what was just taken down,
reach the next request (``workflows/live_store.py``, ``docs/live-features.md``).

The served tests run on the one-box default, SQLite beside a copy of the shared export. The
networked backend (PostgreSQL) is served by ``tests/test_replicas.py``: two servers sharing it,
where what a user did at one replica reaches their next request at the other.
"""

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

NEW_USER = 10**9 + 7  # never seen by the models


@pytest.fixture(scope="module")
def served(triton_repo, tmp_path_factory):
    from deployment.server import TritonServer
    from online.router import LOG_ENV
    from workflows.live_store import STORE_ENV, store_location

    root = tmp_path_factory.mktemp("live")
    repo = root / "triton_repo"  # a copy: its live store and admin key beside it are this module's
    shutil.copytree(triton_repo, repo)
    saved = {name: os.environ.pop(name, None) for name in (STORE_ENV, LOG_ENV)}  # the defaults beside it
    try:
        server = TritonServer(repo, log_path=root / "server.log").start()
        try:
            yield SimpleNamespace(repo=repo, server=server, store=store_location(repo))
        finally:
            server.stop()
    finally:
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value


@pytest.fixture(scope="module")
def clients(served):
    from serving.client import FunnelClient
    from serving.interface import ROUTER

    with FunnelClient(served.server.grpc_url) as funnel, FunnelClient(served.server.grpc_url, model_name=ROUTER) as ab:
        yield funnel, ab


def known_users(model_version) -> list[int]:
    return pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()


def test_a_watched_item_is_not_recommended_on_the_next_request(served, clients, model_version):
    funnel, router = clients
    user = known_users(model_version)[3]
    first = router.recommend(user, 10)
    watched = first.item_ids[0]
    assert first.served_by == "model"
    assert router.send_feedback(first.request_id, [watched], ["watch_seconds"], [120.0]) == 1  # acknowledged
    after = funnel.recommend(user, 10)  # the very next request
    assert watched not in after.item_ids and after.served_by == "model"
    assert len(after.item_ids) == 10


def test_a_new_user_gets_personal_recommendations_after_a_few_interactions(served, clients, model_version):
    from workflows.live_store import ingest_events

    funnel, _ = clients
    before = funnel.recommend(NEW_USER, 10)
    assert before.served_by == "fallback"
    items = pd.read_parquet(model_version.path / "item_features.parquet")["item_id_raw"].astype(int).tolist()
    done = items[5:8]  # three interactions, through the ingestion path (not the router)
    now = time.time()
    events = pd.DataFrame({"user_id": NEW_USER, "item_id": done, "timestamp": [now - 3, now - 2, now - 1]})
    assert ingest_events(served.store, events) == 3
    after = funnel.recommend(NEW_USER, 10)
    assert after.served_by == "fresh_history"  # the export has item affinity weights
    assert not set(done) & set(after.item_ids) and len(after.item_ids) == 10
    assert after.item_ids != before.item_ids


def test_a_taken_down_item_leaves_every_list_within_5s_and_returns_after_undo(served, clients, model_version):
    from deployment.takedowns import set_takedown

    funnel, _ = clients
    user = known_users(model_version)[5]
    modelled = funnel.recommend(user, 10).item_ids[0]
    popular = funnel.recommend(10**9 + 11, 10).item_ids[0]
    key = served.server.admin_key

    def lists():
        return {
            "model": funnel.recommend(user, 10),
            "fallback": funnel.recommend(10**9 + 11, 10),
            "fresh_history": funnel.recommend(NEW_USER, 50),
        }

    def wait_until(done) -> float:
        start = time.monotonic()
        while not done(lists()):
            assert time.monotonic() - start < 5.0, "not within 5 s"
            time.sleep(0.05)
        return time.monotonic() - start

    for item in (modelled, popular):
        set_takedown(served.repo, item, "unsafe", key=key)
    taken = wait_until(lambda got: all(not {modelled, popular} & set(r.item_ids) for r in got.values()))
    got = lists()
    assert {r.served_by for r in got.values()} == {"model", "fallback", "fresh_history"}
    assert all(len(r.item_ids) == 10 for name, r in got.items() if name != "fresh_history")
    for item in (modelled, popular):
        set_takedown(served.repo, item, "appeal upheld", key=key, undo=True)
    restored = wait_until(lambda got: modelled in got["model"].item_ids and popular in got["fallback"].item_ids)
    assert taken < 5.0 and restored < 5.0


def test_the_takedown_script_with_url_refuses_a_wrong_key_from_the_environment(served):
    """``scripts/takedown.py`` took its key from ``read_admin_key`` and ``set_takedown`` checked it
    against ``read_admin_key`` again: a ``$FUNNEL_ADMIN_KEY`` was compared with itself, so any wrong
    value took the item down. With ``--url`` the serving Triton confirms the key first."""
    import subprocess
    import sys

    from deployment.security import ADMIN_KEY_ENV
    from deployment.takedowns import list_takedowns
    from online.router import LOG_ENV
    from workflows.live_store import STORE_ENV

    item = 987654321  # no catalog item: what is served does not change
    env = {k: v for k, v in os.environ.items() if k not in (STORE_ENV, LOG_ENV)}
    env["PYTHONPATH"] = os.getcwd()

    def takedown(key, *flags):
        return subprocess.run(
            [sys.executable, "scripts/takedown.py", "--repository", str(served.repo), "--item", str(item), *flags],
            env={**env, ADMIN_KEY_ENV: key},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def down() -> bool:
        state = list_takedowns(served.repo)
        return bool(state[state["item_id"] == item]["active"].any())

    wrong = takedown("not-the-deployment-key-1234", "--reason", "test", "--url", served.server.grpc_url)
    assert wrong.returncode == 2 and "did not accept the admin key" in wrong.stderr, wrong.stderr
    assert "not-the-deployment-key-1234" not in wrong.stderr and not down()
    right = takedown(served.server.admin_key, "--reason", "test", "--url", served.server.grpc_url)
    assert right.returncode == 0 and down(), right.stderr
    undone = takedown(served.server.admin_key, "--reason", "test over", "--undo", "--url", served.server.grpc_url)
    assert undone.returncode == 0 and not down(), undone.stderr


def test_a_duplicates_raw_id_reaches_its_canonical_item_excluded_taken_down_or_watched(served, clients, model_version):
    """One item under two ids: the export serves the canonical id only, and a request's excluded id,
    a takedown or a live event that names the other copy reaches it (serving/item_aliases.py)."""
    from deployment.takedowns import set_takedown
    from workflows.live_store import ingest_events

    funnel, _ = clients
    aliases = pd.read_parquet(model_version.path / "item_aliases.parquet")
    assert model_version.manifest["item_aliases"] == len(aliases) > 0  # the synthetic world plants duplicates
    alias_of = dict(zip(aliases["canonical_item_id_raw"].astype(int), aliases["item_id_raw"].astype(int)))
    # A user whose list holds an item with a second id, and that id (never served itself).
    for user in known_users(model_version)[20:]:
        listed = funnel.recommend(user, 30).item_ids  # the light ranker keeps 30 (tests/conftest.py)
        held = [item for item in listed if item in alias_of]
        if held:
            break
    item, other = held[0], alias_of[held[0]]
    assert other not in listed

    excluded = funnel.recommend(user, 30, exclude_item_ids=[other])
    assert item not in excluded.item_ids and len(excluded.item_ids) == len(listed) and excluded.served_by == "model"
    popular = funnel.recommend(10**9 + 13, 50).item_ids  # the fallback path reads excluded ids too
    fallback_item = next(i for i in popular if i in alias_of)
    assert fallback_item not in funnel.recommend(10**9 + 13, 50, exclude_item_ids=[alias_of[fallback_item]]).item_ids

    key = served.server.admin_key
    set_takedown(served.repo, other, "a re-post of an unsafe item", key=key)
    start = time.monotonic()
    while item in funnel.recommend(user, 30).item_ids:
        assert time.monotonic() - start < 5.0, "the takedown of the other id did not reach the item within 5 s"
        time.sleep(0.05)
    set_takedown(served.repo, other, "appeal upheld", key=key, undo=True)
    while item not in funnel.recommend(user, 30).item_ids:
        assert time.monotonic() - start < 10.0, "the item did not return after the undo"
        time.sleep(0.05)

    now = time.time()
    ingest_events(served.store, pd.DataFrame({"user_id": [user], "item_id": [other], "timestamp": [now]}))
    assert item not in funnel.recommend(user, 30).item_ids  # watched under its other id: seen


def test_windowed_activity_features_are_the_same_offline_and_from_the_live_server(served, model_version, processed):
    """One (user, time), both ways: the pipeline's point-in-time counts encoded by the fitted
    workflow (training) and what the server's ``feature_lookup`` computes from the live store at its
    own clock (serving). Events sit well inside their windows so the two clocks' gap cannot matter."""
    import dask.dataframe as dd
    import tritonclient.grpc as grpcclient
    from merlin.io import Dataset

    from serving.stages import activity_slots, load_manifest
    from workflows.activity import add_activity_counts, column_names
    from workflows.live_store import ingest_events
    from workflows.point_in_time import WEIGHT

    windows, slots = activity_slots(load_manifest(served.repo / "feature_lookup" / str(model_version.version)))
    assert windows == [3600, 86400, 7 * 86400]  # the test world's (tests/conftest.py)
    names = column_names(windows)
    user = 10**9 + 23  # a newcomer: everything the features count arrives after the export
    now = time.time()
    ages = [600, 7200, 30 * 3600, 3 * 86400, 10 * 86400]  # inside 1h, 24h, 7d, 7d, none of them
    times, clicks = [now - a for a in ages], [1, 0, 1, 1, 0]
    events = pd.DataFrame({"user_id": user, "item_id": 1, "timestamp": times, "click": clicks})
    live = events.assign(event=np.where(events["click"] > 0, "click", "view")).drop(columns="click")
    assert ingest_events(served.store, live) == len(live)

    with grpcclient.InferenceServerClient(served.server.grpc_url) as client:
        value = grpcclient.InferInput("user_id", [1, 1], "INT64")  # the stages batch: a batch of one
        value.set_data_from_numpy(np.array([[user]], dtype=np.int64))
        result = client.infer("feature_lookup", [value], model_version=str(model_version.version))
    online = result.as_numpy("user_continuous")[0][slots]

    # Training: the row is added uncounted (as sampled negatives are) and gets the counts before it.
    query = pd.DataFrame({"user_id": [user], "item_id": [-1], "timestamp": [time.time()], "click": [0]})
    both = pd.concat([events.assign(**{WEIGHT: 1}), query.assign(**{WEIGHT: 0})], ignore_index=True)
    both = both.assign(watch_seconds=0, like=0, share=0)
    counted = add_activity_counts(dd.from_pandas(both, npartitions=1), windows).compute()
    counted = counted[counted[WEIGHT] == 0].reset_index(drop=True)
    assert counted[names].to_numpy().tolist() == [[1, 1, 2, 1, 4, 3]]  # events, clicks per window
    workflow = processed.workflow().get_subworkflow("user_features")
    table = counted[["user_id", *names]]
    for column in workflow.input_schema.column_names:
        if column not in table.columns:
            table = table.assign(**{column: 0})
    offline = workflow.transform(Dataset(table[workflow.input_schema.column_names])).to_ddf().compute()
    np.testing.assert_array_equal(online, offline[names].to_numpy(dtype=np.float32)[0])


# In-process, without a server: the stages themselves.


def test_the_feature_lookup_merges_live_events_into_the_history(triton_repo, model_version, tmp_path):
    from serving.stages import FeatureLookup
    from workflows.live_store import LiveStore

    store = str(tmp_path / "live.sqlite")
    lookup = FeatureLookup(triton_repo / "feature_lookup" / str(model_version.version), live_store=store)
    items = pd.read_parquet(model_version.path / "item_features.parquet")
    user = known_users(model_version)[0]
    before = lookup.run({"user_id": np.array([user])})["seen_items"]
    unseen = items[~items["item_id"].isin(before)].iloc[0]
    raw = int(unseen["item_id_raw"])
    LiveStore(store).append_events(
        [(user, raw, 1.0, "click", 1.0), (NEW_USER, raw, 1.0, "view", 1.0)]
        + [(user, 10**12, 2.0, "view", 1.0)],  # an item the catalog does not hold: ignored
        "ingest",
    )
    after = lookup.run({"user_id": np.array([user])})["seen_items"]
    assert set(after) == set(before) | {int(unseen["item_id"])}  # the history the item affinity reads
    new = lookup.run({"user_id": np.array([NEW_USER])})
    assert not new["user_known"][0] and new["seen_items"].tolist() == [int(unseen["item_id"])]


def new_user_request(k: int = 10) -> dict:
    """The ordering stage's inputs for a user the models never saw (no candidates), less ``seen_items``."""
    empty = np.zeros(0, dtype=np.int64)
    return {
        "candidate_ids": empty,
        "filtered_ids": empty,
        "light_ids": empty,
        "heavy_scores": np.zeros(0, dtype=np.float32),
        "retrieval_scores": np.zeros(0, dtype=np.float32),
        "k": np.array([k], dtype=np.int32),
        "user_known": np.array([False]),
    }


def test_without_item_affinity_a_new_user_is_served_by_a_history_query(triton_repo, model_version, tmp_path):
    from serving.stages import Ordering

    ordering = Ordering(triton_repo / "ordering" / str(model_version.version), live_store=str(tmp_path / "l.sqlite"))
    ordering.affinity = None  # as for a catalog above item_affinity.max_items
    seen = np.sort(ordering.catalog_ids[:4])
    request = new_user_request()
    out = ordering.run({**request, "seen_items": seen})
    assert out["served_by"][0] == b"history_query" and len(out["item_ids"]) == 10
    assert not set(out["item_ids"]) & set(ordering.raw_ids[seen])
    short = ordering.run({**request, "seen_items": seen[:2]})  # below fresh_history_min_items
    assert short["served_by"][0] == b"fallback" and not set(short["item_ids"]) & set(ordering.raw_ids[seen[:2]])


def test_a_new_user_whose_history_the_models_do_not_hold_gets_the_fallback(triton_repo, model_version, tmp_path):
    """A live history none of whose items the retrieval index holds made the history query the mean
    of no vectors: a NaN query, answered with an empty list served as ``history_query``. Ids in the
    holes of the encoding (a direct call) read as enough history too, for both fresh-history lists."""
    from models.item_index import ItemVectors, build_index, load_index
    from serving.stages import Ordering

    version = str(model_version.version)
    ordering = Ordering(triton_repo / "ordering" / version, live_store=str(tmp_path / "l.sqlite"))
    empty = np.zeros(0, dtype=np.int64)
    request = new_user_request()
    fallback = ordering.run({**request, "seen_items": empty})
    assert fallback["served_by"][0] == b"fallback" and len(fallback["item_ids"]) == 10

    def served(seen):
        out = ordering.run({**request, "seen_items": seen})
        assert np.isfinite(out["scores"]).all()
        return out["served_by"][0], out["item_ids"].tolist()

    affinity, ordering.affinity = ordering.affinity, None  # a catalog above item_affinity.max_items
    # An index without the history's items (they are all new to it).
    seen = np.sort(ordering.catalog_ids[:4])
    index, _ = load_index(triton_repo / "retrieval" / version)
    others = np.setdiff1d(ordering.catalog_ids, seen)
    without, _ = build_index(others, ItemVectors(index).vectors(others), exact_max_items=len(others))
    ordering._item_vectors = (without, ItemVectors(without))
    by, items = served(seen)
    assert by == b"fallback" and len(items) == 10 and not set(items) & set(ordering.raw_ids[seen])
    ordering._item_vectors = None  # the export's index again
    holes = np.flatnonzero(ordering.raw_ids < 0)  # encoded ids no catalog item has (Categorify's reserved ones)
    assert holes.size
    unknown = np.resize(holes, ordering.live_config.fresh_history_min_items)
    assert served(unknown) == (b"fallback", fallback["item_ids"].tolist())
    ordering.affinity = affinity
    assert served(unknown) == (b"fallback", fallback["item_ids"].tolist())


def test_the_live_benchmarks_writer_stores_every_event_it_counts(served, model_version):
    """``benchmarks/benchmark_live.py``'s write stream, against this server for about a second: half
    its events as feedback (gRPC, acknowledged), half ingested, every one it reports stored once in
    the live store, and its CPU per event measured from the start of the stream."""
    import multiprocessing

    from benchmarks.benchmark_live import write_stream
    from workflows.live_store import LiveStore

    users = known_users(model_version)[10:]  # not the users the other tests here follow
    items = pd.read_parquet(model_version.path / "item_features.parquet")["item_id_raw"].astype(int).tolist()
    since = time.time()
    context = multiprocessing.get_context("spawn")
    ready, stop, out = context.Event(), context.Event(), context.Queue()
    writer = context.Process(
        target=write_stream, args=(served.server.grpc_url, served.store, users, items, 80.0, ready, stop, out)
    )
    writer.start()
    try:
        assert ready.wait(120), "the writer did not start"
        streaming = time.perf_counter()
        time.sleep(1.0)
        stop.set()
        report = out.get(timeout=60)
        window = time.perf_counter() - streaming
    finally:
        stop.set()
        writer.join(60)
    assert report["feedback"] > 0 and report["ingest"] > 0
    assert abs(report["feedback"] - report["ingest"]) <= 8  # the two halves pace at the same rate
    stored = LiveStore(served.store)
    try:
        written = stored.events(since=since)
    finally:
        stored.close()
    by_source = written["source"].value_counts().to_dict()
    assert by_source.get("feedback", 0) == report["feedback"]
    assert by_source.get("ingest", 0) == report["ingest"]
    assert 0 < report["writer_cpu_ms_per_ingested_event"] and 0 < report["writer_cpu_ms_per_feedback_event"]
    # Measured from the start of the stream: the process's start (a spawned interpreter's imports and
    # connections, seconds of CPU) falls outside the window between `ready` and the report.
    assert 0.9 <= report["writer_seconds"] <= window + 0.3, (report["writer_seconds"], window)
    assert report["writer_cpu_s"] <= report["writer_seconds"] * (os.cpu_count() or 1) + 0.05, report
    ingest_cpu_s = report["writer_cpu_ms_per_ingested_event"] * report["ingest"] / 1000
    assert ingest_cpu_s <= report["writer_cpu_s"] * 1.01 + 0.002, report  # a share of the total


def test_the_live_benchmarks_cpu_burner_uses_the_cores_it_is_asked_for():
    """The live benchmark's same-CPU phase (``benchmarks/benchmark_live.py``) replaces the write stream
    with processes that only burn as many cores as it used: the cores split into whole ones and the
    rest, and a burner asked for 0.3 of a core for a second uses about that (CPU time, not wall time)."""
    import multiprocessing

    from benchmarks.benchmark_live import burn_cpu, burner_shares, write_stream_cores

    assert burner_shares(0.0) == [] and burner_shares(0.25) == [0.25] and burner_shares(2.0) == [1.0, 1.0]
    assert burner_shares(1.3) == [1.0, pytest.approx(0.3)]
    with pytest.raises(ValueError, match="cores"):
        burner_shares(-0.1)
    # the writer's 0.6 s of CPU in 4 s of stream, the feedback stubs' 0.3 s in a 3 s phase
    assert write_stream_cores({"writer_cpu_s": 0.6, "writer_seconds": 4.0}, 0.3, 3.0) == pytest.approx(0.25)

    context = multiprocessing.get_context("spawn")
    ready, stop, out = context.Event(), context.Event(), context.Queue()
    burner = context.Process(target=burn_cpu, args=(0.3, ready, stop, out))
    burner.start()
    try:
        assert ready.wait(60), "the burner did not start"
        time.sleep(1.0)
        stop.set()
        used, seconds = out.get(timeout=60)
    finally:
        stop.set()
        burner.join(60)
    # about 0.3 s a second; the bounds leave room for a busy machine (2 shared cores)
    assert seconds >= 1.0 and 0.1 < used / seconds < 0.45


def test_an_item_outside_the_catalog_is_never_served_back_after_a_live_click(tmp_path):
    """``workflow.features.id_freq_threshold`` leaves rare items out of the catalog (Categorify's OOV
    index; the export's item table keeps vocabulary items only), but the popularity fallback counted
    every training click, so it served them. A user's seen items reach the ordering stage as encoded
    ids, and such an item has none: a live click on it was dropped by the feature lookup ("ids the
    catalog does not hold are ignored") and the fallback served it again on the next request."""
    import copy

    from configs import load_config
    from deployment.export import export_repository
    from models.registry import ModelVersion
    from models.train import train_all
    from serving.stages import FeatureLookup, Ordering
    from tests.conftest import SMALL
    from workflows.live_store import LiveStore
    from workflows.pipeline import run_dataset_pipeline
    from workflows.sources.synthetic import generate

    overrides = copy.deepcopy(SMALL)
    overrides["workflow"] = {"features": {"id_freq_threshold": 30}, "checks": {"point_in_time_probe": False}}
    overrides["candidate_generator"]["epochs"] = 1
    overrides["light_ranker"]["epochs"] = 1
    overrides["heavy_ranker"] = {"epochs": 1, "batch_size": 512}
    config = load_config(overrides=overrides)
    raw = generate(config.synthetic).write_parquet(tmp_path / "raw")
    data = run_dataset_pipeline(raw["events"], raw["users"], raw["items"], tmp_path / "processed", config.workflow)
    version = train_all(data, config, tmp_path / "registry", verbose=0)
    repo = export_repository(ModelVersion(version.path), tmp_path / "triton_repo")
    rare = set(pd.read_parquet(data.train_events)["item_id"]) - set(pd.read_parquet(data.item_features)["item_id_raw"])
    assert rare  # the threshold left clicked items out of the catalog

    store = str(tmp_path / "live.sqlite")
    name = str(version.version)
    lookup = FeatureLookup(Path(repo) / "feature_lookup" / name, live_store=store)
    ordering = Ordering(Path(repo) / "ordering" / name, live_store=store)

    def served() -> list[int]:
        out = ordering.run({**new_user_request(k=30), **lookup.run({"user_id": np.array([NEW_USER])})})
        assert out["served_by"][0] == b"fallback"
        return out["item_ids"].tolist()

    first = served()
    assert len(first) == 30
    clicked = [first[0], *(item for item in first if item in rare)]  # old code: 2 rare items, ranks 15 and 29
    LiveStore(store).append_events([(NEW_USER, item, 1.0, "click", 1.0) for item in clicked], "ingest")
    again = served()
    assert not set(clicked) & set(again)  # old code: the rare ones served again
    assert not set(first) & rare
