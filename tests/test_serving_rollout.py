"""Rolling model version 1 -> 2 into the live server: no request fails, none mixes the two exports."""
import shutil
import threading

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
    overrides = {**SMALL, "seed": 99, "candidate_generator": {"epochs": 1, "batch_size": 512},
                 "light_ranker": {"epochs": 1, "batch_size": 512}, "heavy_ranker": {"epochs": 1, "batch_size": 512}}
    v2 = train_all(processed, load_config(overrides=overrides), registry, verbose=0)
    assert v2.version == 2
    return get(registry, 1), v2


def _answers(url, users, k=10):
    from serving.client import FunnelClient

    with FunnelClient(url) as client:
        return {u: client.recommend(u, k) for u in users}


def test_roll_from_version_1_to_2_without_failed_or_mixed_requests(two_versions, tmp_path_factory):
    from serving.export import export_repository
    from serving.loadgen import Request, run_load
    from serving.rollout import add_version, retire, roll_out, served_version
    from serving.server import TritonServer

    v1, v2 = two_versions
    repo = export_repository(v1, tmp_path_factory.mktemp("rollout") / "triton_repo")
    users = pd.read_parquet(v1.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[:20]
    users.append(10**9)  # an unknown user: the fallback of each version
    with TritonServer(repo, log_path=repo.parent / "server.log") as server:
        ref1 = _answers(server.grpc_url, users)
        assert {r.model_version for r in ref1.values()} == {"1"}
        add_version(v2, repo)  # on disk, not served yet
        assert (repo / "query_tower" / "2" / "query_tower").is_dir() and served_version(repo) == 1
        assert _answers(server.grpc_url, users[:3]) == {u: ref1[u] for u in users[:3]}

        results, stop = [], threading.Event()

        def loop():
            rng = np.random.default_rng(1)
            while not stop.is_set():
                batch = [Request(int(users[rng.integers(len(users))]), 10) for _ in range(20)]
                results.extend(run_load(server.grpc_url, batch, concurrency=2, max_k=MAX_K).results)

        load = threading.Thread(target=loop)
        load.start()
        try:
            roll_out(server.grpc_url, repo, 2)
            for _ in range(300):  # keep the load on until some requests have run on version 2
                if sum(r.outputs and r.outputs["model_version"] == "2" for r in results[-20:]) >= 10:
                    break
                stop.wait(0.1)
        finally:
            stop.set()
            load.join()
        ref2 = _answers(server.grpc_url, users)
        assert {r.model_version for r in ref2.values()} == {"2"} and served_version(repo) == 2
        # the two versions answer differently, so a request that mixed their stages would show
        differ = sum(ref1[u].item_ids != ref2[u].item_ids for u in users[:-1])
        assert differ >= len(users) // 2, differ

        failed = [r for r in results if r.error is not None]
        assert not failed, failed[:3]
        seen_versions = []
        for r in results:
            ref = {"1": ref1, "2": ref2}[r.outputs["model_version"]][r.request.user_id]
            assert r.outputs["item_ids"].tolist() == ref.item_ids, "a response mixed the stages of two versions"
            assert np.allclose(r.outputs["scores"], ref.scores, atol=1e-6)
            seen_versions.append(r.outputs["model_version"])
        assert seen_versions[0] == "1" and seen_versions[-1] == "2"
        assert seen_versions.count("1") > 0 and seen_versions.count("2") >= 10
        print(f"rollout: {len(results)} requests during the roll, 0 failed, "
              f"{seen_versions.count('1')} on v1, {seen_versions.count('2')} on v2")

        retire(server.grpc_url, repo, 1)
        assert not (repo / "query_tower" / "1").exists()
        assert _answers(server.grpc_url, users) == ref2
