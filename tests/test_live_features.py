"""Live features through a real tritonserver: what a user just did, and what was just taken down,
reach the next request (``workflows/live_store.py``, ``docs/live-features.md``).

The served tests run once per backend of the live store: SQLite beside a copy of the shared export,
and a PostgreSQL server this module starts (the feedback log on it too, as replicas would share
it). One tritonserver per backend.
"""

import os
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

NEW_USER = 10**9 + 7  # never seen by the models


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, triton_repo, tmp_path_factory):
    from deployment.postgres import PostgresServer, postgres_bin
    from deployment.server import TritonServer
    from online.router import LOG_ENV
    from workflows.live_store import STORE_ENV, store_location

    root = tmp_path_factory.mktemp(f"live-{request.param}")
    repo = root / "triton_repo"  # a copy: its live store and admin key beside it are this module's
    shutil.copytree(triton_repo, repo)
    saved = {name: os.environ.pop(name, None) for name in (STORE_ENV, LOG_ENV)}
    postgres = None
    try:
        if request.param == "postgresql":
            if postgres_bin() is None:
                pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
            postgres = PostgresServer().start()
            os.environ[STORE_ENV] = os.environ[LOG_ENV] = postgres.url  # read by the server's stubs
        server = TritonServer(repo, log_path=root / "server.log").start()
        try:
            yield SimpleNamespace(repo=repo, server=server, store=store_location(repo))
        finally:
            server.stop()
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        if postgres is not None:
            postgres.stop()


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


def test_without_item_affinity_a_new_user_is_served_by_a_history_query(triton_repo, model_version, tmp_path):
    from serving.stages import Ordering

    ordering = Ordering(triton_repo / "ordering" / str(model_version.version), live_store=str(tmp_path / "l.sqlite"))
    ordering.affinity = None  # as for a catalog above item_affinity.max_items
    seen = np.sort(ordering.catalog_ids[:4])
    empty = np.zeros(0, dtype=np.int64)
    request = {
        "candidate_ids": empty,
        "filtered_ids": empty,
        "light_ids": empty,
        "heavy_scores": np.zeros(0, dtype=np.float32),
        "retrieval_scores": np.zeros(0, dtype=np.float32),
        "k": np.array([10], dtype=np.int32),
        "user_known": np.array([False]),
    }
    out = ordering.run({**request, "seen_items": seen})
    assert out["served_by"][0] == b"history_query" and len(out["item_ids"]) == 10
    assert not set(out["item_ids"]) & set(ordering.raw_ids[seen])
    short = ordering.run({**request, "seen_items": seen[:2]})  # below fresh_history_min_items
    assert short["served_by"][0] == b"fallback" and not set(short["item_ids"]) & set(ordering.raw_ids[seen[:2]])
