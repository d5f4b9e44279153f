"""Rolling model version 1 -> 2 into the live server: no request fails, none mixes the two exports."""

import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

MAX_K = 50


@pytest.fixture(scope="module")
def two_versions(model_version, processed, tmp_path_factory):
    """Version 1 is the session's model; version 2 is trained with another seed (1 epoch, small)."""
    from configs import load_config
    from models.registry import get
    from models.train import train_all
    from tests.conftest import SMALL

    registry = tmp_path_factory.mktemp("rollout-registry")
    shutil.copytree(model_version.path, registry / "1")
    overrides = {
        **SMALL,
        "seed": 99,
        "candidate_generator": {"epochs": 1, "batch_size": 512},
        "light_ranker": {"epochs": 1, "batch_size": 512},
        "heavy_ranker": {"epochs": 1, "batch_size": 512},
    }
    v2 = train_all(processed, load_config(overrides=overrides), registry, verbose=0)
    assert v2.version == 2
    return get(registry, 1), v2


def _answers(url, users, k=10):
    from serving.client import FunnelClient

    with FunnelClient(url) as client:
        return {u: client.recommend(u, k) for u in users}


def roll_under_load(url: str, repo, version: int, users: list, before: dict) -> dict:
    """Roll ``repo`` to ``version`` while a request loop runs; every request answered, each exactly
    as the version before (``before``) or the new one answers alone. Returns the new answers."""
    from benchmarks.loadgen import Request, run_load
    from deployment.rollout import roll_out, served_version

    old = {r.model_version for r in before.values()}.pop()
    results, stop = [], threading.Event()

    def loop():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            batch = [Request(int(users[rng.integers(len(users))]), 10) for _ in range(20)]
            results.extend(run_load(url, batch, concurrency=2, max_k=MAX_K).results)

    load = threading.Thread(target=loop)
    load.start()
    try:
        roll_out(url, repo, version)
        for _ in range(300):  # keep the load on until some requests have run on the new version
            if sum(r.outputs and r.outputs["model_version"] == str(version) for r in results[-20:]) >= 10:
                break
            stop.wait(0.1)
    finally:
        stop.set()
        load.join()
    after = _answers(url, users)
    assert {r.model_version for r in after.values()} == {str(version)} and served_version(repo) == version

    failed = [r for r in results if r.error is not None]
    assert not failed, failed[:3]
    seen_versions = []
    for r in results:
        ref = {old: before, str(version): after}[r.outputs["model_version"]][r.request.user_id]
        assert r.outputs["item_ids"].tolist() == ref.item_ids, "a response mixed the stages of two versions"
        assert np.allclose(r.outputs["scores"], ref.scores, atol=1e-6)
        seen_versions.append(r.outputs["model_version"])
    assert seen_versions[0] == old and seen_versions[-1] == str(version)
    assert seen_versions.count(old) > 0 and seen_versions.count(str(version)) >= 10
    print(
        f"rollout {old} -> {version}: {len(results)} requests during the roll, 0 failed, "
        f"{seen_versions.count(old)} on v{old}, {seen_versions.count(str(version))} on v{version}"
    )
    return after


def test_roll_from_version_1_to_2_without_failed_or_mixed_requests(two_versions, tmp_path_factory):
    """1 -> 2 under load, back to 1, then 1 -> 2 again as the fused funnel
    (``serving.batching.fuse_stages``): the switch of layout is a rollout like any other, and
    retiring version 1 then removes the stage models. One server for all three rolls."""
    from deployment.export import batching_of, export_repository
    from deployment.rollout import add_version, funnel_version, retire, roll_out, served_version
    from deployment.server import TritonServer
    from serving.interface import FUSED, stage_folder

    v1, v2 = two_versions
    repo = export_repository(v1, tmp_path_factory.mktemp("rollout") / "triton_repo")
    users = pd.read_parquet(v1.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[:20]
    users.append(10**9)  # an unknown user: the fallback of each version
    with TritonServer(repo, log_path=repo.parent / "server.log") as server:
        ref1 = _answers(server.grpc_url, users)
        assert {r.model_version for r in ref1.values()} == {"1"}
        add_version(v2, repo)  # on disk, not served yet
        assert (stage_folder(repo, "query_tower", 2) / "query_tower").is_dir() and served_version(repo) == 1
        assert not (repo / FUSED).exists()
        assert _answers(server.grpc_url, users[:3]) == {u: ref1[u] for u in users[:3]}

        ref2 = roll_under_load(server.grpc_url, repo, 2, users, ref1)
        # the two versions answer differently, so a request that mixed their stages would show
        differ = sum(ref1[u].item_ids != ref2[u].item_ids for u in users[:-1])
        assert differ >= len(users) // 2, differ
        retire(server.grpc_url, repo, 1)
        assert not (repo / "query_tower" / "1").exists() and (repo / "query_tower").exists()
        assert _answers(server.grpc_url, users) == ref2

        # Back to the older version: Triton loads the highest funnel/<N> folder unless told which,
        # so this roll used to wait for funnel version 1 until it timed out, serving 1 all the same.
        add_version(v1, repo)
        started = time.monotonic()
        roll_out(server.grpc_url, repo, 1, timeout_s=60)
        print(f"rolled back to version 1 in {time.monotonic() - started:.1f}s")
        assert served_version(repo) == funnel_version(repo) == 1
        assert _answers(server.grpc_url, users) == ref1
        with pytest.raises(ValueError, match="being served"):
            retire(server.grpc_url, repo, 1)

        # From the seven stage models to the fused funnel: version 2 again, in one Python model.
        retire(server.grpc_url, repo, 2)
        batching = batching_of(v2.manifest)
        batching.fuse_stages = True
        add_version(v2, repo, batching=batching)
        assert (repo / FUSED / "2").is_dir() and not (repo / "query_tower" / "2").exists()
        fused = roll_under_load(server.grpc_url, repo, 2, users, ref1)
        assert {u: r.item_ids for u, r in fused.items()} == {u: r.item_ids for u, r in ref2.items()}
        retire(server.grpc_url, repo, 1)
        assert not (repo / "query_tower").exists()  # the stage models are gone with their last version
        assert _answers(server.grpc_url, users) == fused


class RefusingControl:
    """Triton's control plane where every stage loads and the ``funnel`` ensemble fails to."""

    loads: list = []

    def __init__(self, url, repo, root_certificates=None, **timeouts):
        pass

    def is_model_ready(self, name, version=""):
        return name != "funnel"

    def load_model(self, name):
        RefusingControl.loads.append(name)
        if name == "funnel":
            raise RuntimeError("simulated: the ensemble failed to load")

    def unload_model(self, name):
        pass

    def get_model_repository_index(self, as_json=False):  # retire's keyed call before it deletes
        return {}

    def close(self):
        pass


def test_a_failed_roll_out_leaves_the_old_version_on_disk_too(two_versions, tmp_path, monkeypatch):
    """No server: a control plane that refuses the new ensemble. The served config used to stay
    pinned to the new version on disk, so the next restart served the version that had failed, and
    ``retire`` allowed removing it from under the config."""
    from deployment import rollout
    from deployment.export import export_repository

    v1, v2 = two_versions
    repo = export_repository(v1, tmp_path / "triton_repo")
    before = (repo / "funnel" / "config.pbtxt").read_text()
    monkeypatch.setattr(rollout, "ControlClient", RefusingControl)
    rollout.add_version(v2, repo)
    with pytest.raises(RuntimeError, match="simulated"):
        rollout.roll_out("127.0.0.1:1", repo, 2)
    assert (repo / "funnel" / "config.pbtxt").read_text() == before and rollout.funnel_version(repo) == 1
    assert not (repo / "funnel" / "2").exists() and rollout.served_version(repo) == 1
    assert RefusingControl.loads[-2:] == ["funnel", "funnel"]  # the new one, then the old one back
    rollout.retire("127.0.0.1:1", repo, 2)  # the failed version can go; the served one cannot
    with pytest.raises(ValueError, match="being served"):
        rollout.retire("127.0.0.1:1", repo, 1)
    # A config pinned elsewhere than export.json says (a roll whose last step failed) is protected too.
    config = (repo / "funnel" / "config.pbtxt").read_text()
    (repo / "funnel" / "config.pbtxt").write_text(re.sub(r"model_version: 1", "model_version: 3", config))
    with pytest.raises(ValueError, match="version 3 is the one being served"):
        rollout.retire("127.0.0.1:1", repo, 3)


class RefusingRouter(RefusingControl):
    """Triton's control plane where every model is ready and the ``ab_router`` fails to load."""

    def is_model_ready(self, name, version=""):
        return True

    def load_model(self, name):
        RefusingControl.loads.append(name)
        if name == "ab_router" and len(RefusingControl.loads) == 1:
            raise RuntimeError("simulated: the router failed to load")


def test_a_router_version_that_fails_to_load_is_not_left_on_disk(model_version, tmp_path, monkeypatch):
    """No server: ``set_rollout`` wrote the new router version and then asked Triton to load it. A
    refused load left the folder, so ``current_rollout`` (what the analysis, ``retire`` and a
    replica's ``follow_rollout`` read) and the next restart took an experiment that never served."""
    from deployment import rollout
    from deployment.export import export_repository
    from serving.assignment import ab_rollout
    from serving.interface import ROUTER

    repo = export_repository(model_version, tmp_path / "triton_repo")
    before = rollout.current_rollout(repo)
    monkeypatch.setattr(rollout, "ControlClient", RefusingRouter)
    monkeypatch.setattr(RefusingControl, "loads", [])
    with pytest.raises(RuntimeError, match="router failed"):
        rollout.set_rollout("127.0.0.1:1", repo, ab_rollout("e", "s", 1, 1, holdout=0.05))
    assert rollout.router_versions(repo) == [1] and rollout.current_rollout(repo) == before
    assert RefusingControl.loads == [ROUTER, ROUTER]  # the new one, then the one on disk back
    assert not [p for p in (repo / ROUTER).iterdir() if p.name.startswith(".")]  # no staging folder left


class LockCheckingRouter(RefusingRouter):
    """Every model ready and loading; each load of the router checks the router's folder is locked."""

    locked: list = []

    def load_model(self, name):
        import fcntl

        if name == "ab_router":
            fd = os.open(self.router, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                LockCheckingRouter.locked.append(False)
            except BlockingIOError:
                LockCheckingRouter.locked.append(True)
            finally:
                os.close(fd)

    def get_model_repository_index(self, as_json=False):
        return {"models": []}


def test_set_rollout_removes_what_a_killed_set_rollout_left_and_writes_alone(model_version, tmp_path, monkeypatch):
    """No server: a ``set_rollout`` killed (SIGKILL) after it made its staging folder in the router's
    folder left ``.ab_router-<N>-<random>`` there for good (Triton skips it with a warning at every
    router load). The next ``set_rollout`` removes it, and writes and loads its version holding a lock
    on the router's folder, so two writers neither pick the same number nor load over each other."""
    import subprocess
    import sys
    from pathlib import Path

    from deployment import rollout
    from deployment.export import export_repository
    from serving.assignment import ab_rollout
    from serving.interface import ROUTER

    repo = export_repository(model_version, tmp_path / "triton_repo")
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from deployment import rollout\n"
            "from serving.assignment import single_version\n"
            "class Ready:\n"
            "    def __init__(self, *a, **k): pass\n"
            "    def is_model_ready(self, *a): return True\n"
            "    def close(self): pass\n"
            "rollout.ControlClient = Ready\n"
            "rollout.sync_tree = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # staged, not renamed\n"
            "rollout.set_rollout('127.0.0.1:1', sys.argv[1], single_version(1))\n",
            str(repo),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in (repo / ROUTER).iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and re.fullmatch(r"\.ab_router-2-[a-z0-9_]{8}", left[0])
    assert rollout.router_versions(repo) == [1]
    (repo / ROUTER / ".notes").mkdir()  # not a staging folder's name: stays

    LockCheckingRouter.router = repo / ROUTER
    monkeypatch.setattr(rollout, "ControlClient", LockCheckingRouter)
    monkeypatch.setattr(LockCheckingRouter, "locked", [])
    assert rollout.set_rollout("127.0.0.1:1", repo, ab_rollout("e", "s", 1, 1, holdout=0.05)) == 2
    assert rollout.router_versions(repo) == [1, 2] and rollout.current_rollout(repo).experiment.name == "e"
    # old code: the killed writer's staging folder stayed
    assert sorted(p.name for p in (repo / ROUTER).iterdir() if p.name.startswith(".")) == [".notes"]
    assert LockCheckingRouter.locked == [True]  # old code: the router was written and loaded without a lock


def test_add_version_clears_what_a_killed_add_version_left(two_versions, tmp_path):
    """``add_version`` moves the stages in one by one and the pinned ``funnel_v<N>`` last: a process
    killed in between left stage folders that made every rerun fail with "already in"."""
    from deployment.export import export_repository
    from deployment.rollout import add_version
    from serving.interface import ensemble_name

    v1, v2 = two_versions
    repo = export_repository(v1, tmp_path / "triton_repo")
    add_version(v2, repo)
    shutil.rmtree(repo / ensemble_name(2))  # as if killed before the last rename
    shutil.rmtree(repo / "ordering" / "2")
    staged = tmp_path / ".triton_repo-v2-k1ll3d_0" / "repo" / "ordering"  # and its staging folder left
    staged.mkdir(parents=True)
    assert add_version(v2, repo) == 2
    assert not staged.parent.parent.exists()
    assert (repo / ensemble_name(2)).is_dir() and (repo / "ordering" / "2").is_dir()
    with pytest.raises(FileExistsError, match="already in"):  # a complete version is still refused
        add_version(v2, repo)


def test_ab_experiment_on_the_live_server(two_versions, small_config, small_data, tmp_path_factory):
    """Both versions behind ab_router: simulated users over gRPC, feedback to the server, per-arm
    counters in /metrics equal to the server's log, then the treatment rolled out and the holdout kept.
    The server's gRPC speaks TLS, as an exposed deployment's does: the experiment is started (by the
    retraining pipeline's step), shipped and checked through the keyed control plane over TLS, which
    a plain client cannot reach (the tools once had no way to give the control plane a certificate)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from deployment.export import export_repository
    from deployment.rollout import add_version, current_rollout, retire
    from deployment.security import ControlClient
    from deployment.server import TritonServer
    from online.ab_experiment import online_counters
    from online.ab_report import analyze
    from online.experiments import roll_out_treatment
    from online.feedback_log import FeedbackLog
    from online.retraining import step_experiment
    from online.router import feedback_log_path
    from online.simulator import SimulationConfig, UserSimulator
    from serving.assignment import HOLDOUT
    from serving.client import BadRequest, FunnelClient, ServerFault
    from serving.interface import ROUTER
    from tests.conftest import self_signed

    v1, v2 = two_versions
    repo = export_repository(v1, tmp_path_factory.mktemp("ab") / "triton_repo")
    add_version(v2, repo)
    users = small_data.users["user_id"].head(120).to_numpy()
    cert, key = self_signed(repo.parent)
    with TritonServer(repo, tls_cert=cert, tls_key=key, log_path=repo.parent / "server.log") as server:
        with ControlClient(server.grpc_url, repo) as plain_control, pytest.raises(InferenceServerException):
            plain_control.get_model_repository_index(client_timeout=10)  # the key never goes out in the clear
        # The retraining pipeline's last step starts the experiment (settings as a scheduler passes them).
        settings = {
            "grpc_url": server.grpc_url,
            "tls_ca": str(cert),
            "overrides": {"online": {"experiment": {"salt": "salt-it", "holdout": 0.05}}},
        }
        started = step_experiment({"settings": settings, "export": {"repo": str(repo), "version": 2, "live": True}})
        assert started["router_version"] == 2 and started["experiment"]["control_version"] == 1
        rollout = current_rollout(repo)
        assert rollout.versions == {"control": 1, "treatment": 2} and rollout.experiment.holdout == 0.05
        again = step_experiment({"settings": settings, "export": {"repo": str(repo), "version": 2, "live": True}})
        assert again["router_version"] is None  # idempotent: a retried step does not start it twice
        with FunnelClient(server.grpc_url, model_name=ROUTER, root_certificates=cert) as client:
            sim = UserSimulator(small_data, small_config.synthetic, SimulationConfig(days=2, k=5, concurrency=4))
            outcomes = sim.run(
                users,
                client.recommend,
                feedback=lambda rid, u, items, events, values: client.send_feedback(rid, items, events, values),
            )
            # every response came from its arm's version
            expected = {u: rollout.version_for(int(u)) for u in users}
            assert {arm for arm, _ in expected.values()} == {"control", "treatment", HOLDOUT}
            for row in outcomes.itertuples():
                assert (row.arm, int(row.model_version)) == expected[row.user_id]
            # A client retrying feedback it already sent (a replay): acknowledged, stored and counted once.
            replayed = outcomes[outcomes["clicks"] > 0]["request_id"].iloc[0]
            log = FeedbackLog(feedback_log_path(repo))
            sent = log.feedback()
            clicked = sent[(sent["request_id"] == replayed) & (sent["event"] == "click")]["item_id"].tolist()
            assert (
                clicked and client.send_feedback(replayed, clicked, ["click"] * len(clicked), [1.0] * len(clicked)) == 0
            )
            imp, fb = log.impressions(), log.feedback()
            # recorded off the request path: wait until every response and feedback request is counted
            counters = online_counters(server.metrics_url, len(outcomes), fb["request_id"].nunique()).set_index("arm")
            assert (
                len(imp) == outcomes["impressions"].sum() and (fb["event"] == "click").sum() == outcomes["clicks"].sum()
            )
            for arm, frame in imp.groupby("arm"):
                assert counters.loc[arm, "impressions"] == len(frame)
                clicks = fb[(fb["event"] == "click") & fb["request_id"].isin(frame["request_id"])]
                assert counters.loc[arm, "click"] == len(clicks)
            analysis = analyze(imp, fb, rollout, small_config.online.experiment, len(small_data.items))
            assert not analysis.srm.mismatch and set(analysis.summary["arm"]) == {"control", "treatment", HOLDOUT}

            # Bad requests get named INVALID_ARGUMENT errors from the router and the feedback endpoint.
            bad_calls = {
                "k must be between 1 and 50": lambda: client.recommend(int(users[0]), 10**6),
                "exclude_item_ids holds 10001 ids": lambda: client.recommend(int(users[0]), 5, np.arange(10_001)),
                "unknown request_id": lambda: client.send_feedback("no-such-request", [1], ["click"], [1.0]),
                "unknown event": lambda: client.send_feedback(
                    outcomes["request_id"].iloc[0], [-1], ["purchase"], [1.0]
                ),
                "feedback holds 22 events": lambda: client.send_feedback(
                    outcomes["request_id"].iloc[0], [-1] * 22, ["churn"] * 22, [1.0] * 22
                ),
                r"item_ids\[0\] is 5 for a churn": lambda: client.send_feedback(
                    outcomes["request_id"].iloc[0], [5], ["churn"], [1.0]
                ),
            }
            for message, call in bad_calls.items():
                with pytest.raises(BadRequest, match=message) as err:
                    call()
                assert err.value.status() == "StatusCode.INVALID_ARGUMENT"

            # Ship the treatment: everyone but the holdout moves to v2; version 1 must stay. Every stage
            # of both versions is loaded already, so shipping reloads none of them (only the ensemble
            # and the router change): stubs writing __pycache__ into the repository once made Triton
            # reload them all.
            before = server.log_path.read_text(errors="replace")
            roll_out_treatment(server.grpc_url, repo, root_certificates=cert)
            during = server.log_path.read_text(errors="replace")[len(before) :]
            reloaded = re.findall(r"loading: (\w+):\d", during)
            assert set(reloaded) <= {"funnel", "funnel_v1", "funnel_v2", "ab_router"}, reloaded
            assert current_rollout(repo).versions == {"control": 2, "treatment": 2}
            after = {int(u): client.recommend(int(u), 5) for u in users}
            for u, recs in after.items():
                want = "1" if expected[u][0] == HOLDOUT else "2"
                assert recs.model_version == want, (u, recs.arm, recs.model_version)
            assert any(r.arm == HOLDOUT for r in after.values())
            # the plain funnel serves the shipped version
            with FunnelClient(server.grpc_url, root_certificates=cert) as funnel:
                assert funnel.recommend(int(users[0]), 5).model_version == "2"
            with pytest.raises(ValueError, match="still serves an arm"):
                retire(server.grpc_url, repo, 1, root_certificates=cert)
            health = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(cert))
            assert health.is_model_ready("funnel_v1") and health.is_model_ready("funnel_v2")
            health.close()

            # Kill the whole server (SIGKILL, process group) while a client streams feedback:
            # every event the server acknowledged is in the log. Each event is new (one per response,
            # item and signal), since a repeated one would be acknowledged without being stored again.
            fresh = [
                (r.request_id, item, event)
                for r in (client.recommend(int(u), 5) for u in users[:20])
                for item in r.item_ids
                for event in ("click", "like", "share")
            ]
            acked, unstored, errors, stop = [], [], [], threading.Event()

            def stream():
                for request_id, item, event in fresh:
                    if stop.is_set():
                        return
                    try:
                        stored = client.send_feedback(request_id, [item], [event], [1.0])
                    except ServerFault as err:  # the server is gone
                        errors.append(err)
                        return
                    # A new event the server answers without storing is a defect, not a kill.
                    (acked if stored == 1 else unstored).append((request_id, item, event))

            sender = threading.Thread(target=stream)
            sender.start()
            deadline = time.monotonic() + 60
            while len(acked) < 30 and sender.is_alive() and time.monotonic() < deadline:
                stop.wait(0.01)
            assert len(acked) >= 30 and not unstored and not errors, (len(acked), unstored[:3], errors[:1])
            os.killpg(server.process.pid, signal.SIGKILL)
            sender.join(timeout=30)
            stop.set()
        logged = FeedbackLog(feedback_log_path(repo)).feedback()
        logged = set(zip(logged["request_id"], logged["item_id"], logged["event"]))
        assert errors and not unstored and set(acked) <= logged, (unstored[:3], sorted(set(acked) - logged)[:5])
        print(
            f"A/B on the live server: {len(outcomes)} requests, arms {analysis.srm.observed}, "
            f"decision: {analysis.decision}; server SIGKILLed after {len(acked)} acknowledged feedback "
            f"events, all {len(acked)} in the log"
        )
