"""Two server replicas behind one client, sharing the feedback log and the live store on PostgreSQL
(``docs/deployment.md``: N replicas). One A/B analysis comes out of them with nothing lost or
counted twice.

Two real tritonserver processes serve one copy of the shared export (as a Kubernetes Deployment's
replicas share one repository volume); the experiment is written once, through the first replica
(``set_rollout``), and the second takes it from the shared repository (``follow_rollout``). The
client sends requests round-robin and each response's feedback to the *other* replica, then replays
it to the first: the log must hold every impression and every event exactly once.
"""

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

USERS = 121  # each makes two requests; an odd count puts the second on the other replica


@pytest.fixture(scope="module")
def replicas(triton_repo, tmp_path_factory):
    from deployment import security
    from deployment.postgres import PostgresServer, postgres_bin
    from deployment.server import TritonServer
    from online.router import LOG_ENV
    from workflows.live_store import STORE_ENV

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make services installs the postgresql package)")
    root = tmp_path_factory.mktemp("replicas")
    repo = root / "triton_repo"
    shutil.copytree(triton_repo, repo)
    security.ensure_admin_key(repo)  # one key for both: they serve the same repository
    saved = {name: os.environ.pop(name, None) for name in (STORE_ENV, LOG_ENV)}
    postgres = PostgresServer().start()
    servers = []
    try:
        os.environ[STORE_ENV] = os.environ[LOG_ENV] = postgres.url  # read by both servers' stubs
        servers = [TritonServer(repo, log_path=root / f"server-{i}.log") for i in range(2)]
        with ThreadPoolExecutor(2) as pool:  # both start at once, as a Deployment's pods do
            list(pool.map(lambda server: server.start(), servers))
        yield repo, servers, postgres.url
    finally:
        for server in servers:
            server.stop()
        postgres.stop()
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def test_two_replicas_produce_one_ab_analysis_with_nothing_lost_or_double_counted(replicas, model_version):
    from configs import ExperimentConfig
    from deployment.rollout import current_rollout, follow_rollout
    from online.ab_report import analyze, logged_requests, per_user
    from online.experiments import start_experiment
    from online.feedback_log import FeedbackLog
    from serving.assignment import HOLDOUT, ab_rollout
    from serving.client import FunnelClient
    from serving.interface import ROUTER

    repo, servers, log_url = replicas
    version = int(model_version.version)
    rollout = ab_rollout("replicas", "salt-r", version, version, holdout=0.05)
    router_version = start_experiment(servers[0].grpc_url, repo, rollout)
    assert follow_rollout(servers[1].grpc_url, repo) == router_version
    assert current_rollout(repo) == rollout

    users = pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[:USERS]
    clients = [FunnelClient(server.grpc_url, model_name=ROUTER) for server in servers]
    served, sent, accepted, replayed = [], 0, 0, 0
    try:
        turn = 0
        for _ in range(2):
            for user in users:
                here, other = clients[turn % 2], clients[(turn + 1) % 2]
                turn += 1
                response = here.recommend(user, 10)
                served.append((response.request_id, user, response.arm, len(response.item_ids)))
                items = response.item_ids[:2]
                events = ["click", "watch_seconds"]
                # Feedback reaches the other replica: it must find the response the first one logged.
                accepted += other.send_feedback(response.request_id, items, events, [1.0, 30.0])
                sent += len(items)
                replayed += here.send_feedback(response.request_id, items, events, [1.0, 30.0])  # a retry
    finally:
        for client in clients:
            client.close()

    # One arm per user, whichever replica answered: assignment is a hash, not replica state.
    arms = pd.DataFrame(served, columns=["request_id", "user_id", "arm", "shown"])
    assert (arms.groupby("user_id")["arm"].nunique() == 1).all()
    assert all(arm == rollout.version_for(user)[0] for user, arm in zip(arms["user_id"], arms["arm"]))
    assert accepted == sent and replayed == 0

    log = FeedbackLog(log_url)
    try:
        impressions, feedback = log.impressions(), log.feedback()
    finally:
        log.close()
    assert len(impressions) == arms["shown"].sum()  # every impression, once
    assert set(impressions["request_id"]) == set(arms["request_id"])
    assert len(feedback) == sent and not feedback.duplicated(["request_id", "item_id", "event"]).any()
    assert feedback["request_id"].nunique() == len(served)

    analysis = analyze(impressions, feedback, rollout, ExperimentConfig(), catalog_size=10**4)
    assert sum(analysis.srm.observed.values()) == USERS
    assert set(analysis.srm.observed) <= {"control", "treatment", HOLDOUT}
    assert analysis.summary["requests"].sum() == len(served)
    per_user_view = per_user(impressions, feedback)
    assert per_user_view["clicks"].sum() == len(served)  # one click per response
    assert np.isclose(per_user_view["watch_seconds"].sum(), 30.0 * len(served))

    monitor_view = logged_requests(log_url)  # what the holdout monitor reads, from the shared log
    assert len(monitor_view) == len(served) and monitor_view["clicks"].sum() == len(served)


def test_what_a_user_did_at_one_replica_and_a_takedown_reach_the_other(replicas, model_version):
    """The live store on PostgreSQL, served: feedback acknowledged by replica B excludes the item
    from the user's next request at replica A; an item taken down leaves both replicas' lists."""
    from deployment.takedowns import set_takedown
    from serving.client import FunnelClient
    from serving.interface import ROUTER

    repo, servers, _ = replicas
    user = pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[USERS + 1]
    with (
        FunnelClient(servers[0].grpc_url, model_name=ROUTER) as a,
        FunnelClient(servers[1].grpc_url, model_name=ROUTER) as b,
    ):
        first = a.recommend(user, 10)
        watched = first.item_ids[0]
        assert b.send_feedback(first.request_id, [watched], ["watch_seconds"], [120.0]) == 1
        after = a.recommend(user, 10)
        assert watched not in after.item_ids and len(after.item_ids) == 10

        shown = after.item_ids[0]
        set_takedown(repo, shown, "unsafe", key=servers[0].admin_key)
        try:
            start = time.monotonic()
            while any(shown in c.recommend(user, 10).item_ids for c in (a, b)):
                assert time.monotonic() - start < 5.0, "a replica still serves the taken-down item after 5 s"
                time.sleep(0.05)
        finally:
            set_takedown(repo, shown, "test over", key=servers[0].admin_key, undo=True)


def test_a_rollout_through_one_replica_reaches_the_other_and_survives_the_retire(replicas, model_version, tmp_path):
    """``roll_out`` through replica A rewrites the shared ``funnel`` config; ``follow_rollout`` on B
    used to load the new stages and the router but leave B's ``funnel`` on the old version, which
    lost its stages once that version was retired from the shared disk."""
    import json

    from deployment.rollout import add_version, follow_rollout, retire, roll_out, served_version, set_rollout
    from models.registry import ModelVersion
    from serving.assignment import single_version
    from serving.client import FunnelClient

    repo, servers, _ = replicas
    old = served_version(repo)
    new = old + 1
    copy = tmp_path / str(new)  # the same model under the next version number
    shutil.copytree(model_version.path, copy)
    for stamp in copy.glob("*.json"):
        data = json.loads(stamp.read_text())
        if isinstance(data, dict) and data.get("version") == int(model_version.version):
            stamp.write_text(json.dumps({**data, "version": new}))
    user = int(pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].iloc[0])

    def funnel_versions():
        out = []
        for server in servers:
            with FunnelClient(server.grpc_url) as client:
                out.append(client.recommend(user, 5).model_version)
        return out

    add_version(ModelVersion(copy), repo)
    roll_out(servers[0].grpc_url, repo, new)
    follow_rollout(servers[1].grpc_url, repo)
    assert funnel_versions() == [str(new), str(new)]
    set_rollout(servers[0].grpc_url, repo, single_version(new))  # any experiment on the old version ends
    follow_rollout(servers[1].grpc_url, repo)
    retire(servers[0].grpc_url, repo, old)
    follow_rollout(servers[1].grpc_url, repo)  # B reloads its stages: the old version is gone
    assert funnel_versions() == [str(new), str(new)]
