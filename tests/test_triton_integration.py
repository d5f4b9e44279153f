"""The exported funnel on the real tritonserver, queried over gRPC with tritonclient."""
import os

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(triton_repo, tmp_path_factory):
    from serving.server import TritonServer

    srv = TritonServer(triton_repo, log_path=tmp_path_factory.mktemp("triton") / "server.log")
    srv.start()
    yield srv
    pid = srv.process.pid
    srv.stop()
    # No server or stub process is left behind: the whole process group is gone.
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.fixture(scope="module")
def client(server):
    from serving.client import FunnelClient

    with FunnelClient(server.grpc_url) as c:
        yield c


def test_known_user_gets_k_valid_items_with_descending_scores(client, model_version):
    items = pd.read_parquet(model_version.path / "item_features.parquet")
    user = int(pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].iloc[0])
    recs = client.recommend(user, 10)
    assert recs.served_by == "model"
    assert recs.model_version == str(model_version.version)
    assert len(recs.item_ids) == 10 and len(set(recs.item_ids)) == 10
    assert set(recs.item_ids) <= set(items["item_id_raw"])
    scores = np.array(recs.scores)
    assert ((scores >= 0) & (scores <= 1)).all() and np.all(np.diff(scores) <= 0)
    counts = recs.stage_counts
    assert list(counts) == ["catalog", "retrieval", "filters", "light_ranker", "final"]
    assert counts["catalog"] == len(items) >= counts["retrieval"] >= counts["filters"] >= counts["light_ranker"]
    assert counts["light_ranker"] >= counts["final"] == 10


def test_unknown_user_gets_the_fallback(client, model_version):
    recs = client.recommend(10**9, 5)
    assert recs.served_by == "fallback"
    popular = pd.read_parquet(model_version.path / "popularity.parquet")["item_id"].head(5).tolist()
    assert recs.item_ids == popular


def test_bad_k_gets_an_error_naming_the_problem(client):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="k must be between 1 and 50"):
        client.recommend(1, 0)
    # The server is still up and answering afterwards.
    assert len(client.recommend(1, 3).item_ids) == 3


def test_wrong_dtype_and_shape_are_rejected_by_name(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(server.grpc_url)
    user = grpcclient.InferInput("user_id", [1], "FP32")
    user.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    k = grpcclient.InferInput("k", [1], "INT32")
    k.set_data_from_numpy(np.array([5], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="user_id"):
        c.infer("funnel", [user, k])
    users = grpcclient.InferInput("user_id", [2], "INT64")
    users.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="user_id"):
        c.infer("funnel", [users, k])
    c.close()


def test_request_context_excludes_items_on_both_paths(client, model_version):
    from tritonclient.utils import InferenceServerException

    user = int(pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].iloc[0])
    plain = client.recommend(user, 10)
    excluded = plain.item_ids[:3] + [10**12]  # an id the catalog does not hold is ignored
    recs = client.recommend(user, 10, exclude_item_ids=excluded)
    assert recs.served_by == "model" and len(recs.item_ids) == 10
    assert not set(recs.item_ids) & set(excluded)
    assert recs.item_ids[:7] == plain.item_ids[3:]  # the rest keep their order
    assert recs.stage_counts["filters"] <= plain.stage_counts["filters"]
    # Unknown users: the fallback list skips them too.
    popular = client.recommend(10**9, 5).item_ids
    assert client.recommend(10**9, 5, exclude_item_ids=popular[:2]).item_ids[:3] == popular[2:]
    # An empty list is the same as none; a wrong datatype is refused naming the input.
    assert client.recommend(user, 10, exclude_item_ids=[]).item_ids == plain.item_ids
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, dtype, value in (("user_id", "INT64", np.array([user])), ("k", "INT32", np.array([5], np.int32)),
                               ("exclude_item_ids", "FP32", np.array([1.5], np.float32))):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException, match="exclude_item_ids"):
        client.client.infer("funnel", inputs)
