"""Batched stages (``serving.batching``): the export writes Triton's dynamic batcher into every stage,
``Stage.run_batch`` serves a batch with one model call, and a request answered in a batch gets what
it gets alone.

"What it gets alone" is exact for ids, lists and strings. Float scores may differ in the last bit:
TensorFlow's matrix products round differently with the number of rows they multiply (measured
up to 6e-8 on scores in [0, 1]), so scores are compared to 1e-6."""

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from configs import BatchingConfig
from deployment.export import STAGE_ARTIFACTS, TRITON_REPO_SOURCE, configure_batching
from serving import stages
from serving.request import RequestError

SCORE_TOLERANCE = 1e-6


def parsed(text: str) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse(text, config)
    return config


@pytest.mark.parametrize("stage", sorted(STAGE_ARTIFACTS))
def test_export_writes_the_dynamic_batcher_into_every_stage(stage):
    source = (TRITON_REPO_SOURCE / stage / "config.pbtxt").read_text()
    batching = BatchingConfig(max_batch_size=16, max_queue_delay_us=300, stage_instances={stage: 2})
    batched = parsed(configure_batching(source, stage, batching))
    assert batched.max_batch_size == 16
    assert batched.dynamic_batching.max_queue_delay_microseconds == 300
    assert [g.count for g in batched.instance_group] == [2]
    # Variable-length inputs (candidates, history) may differ between the requests of a batch.
    assert {t.name for t in batched.input if t.allow_ragged_batch} == {t.name for t in batched.input if -1 in t.dims}
    # The tensors stay as declared (tests/test_interface.py holds the source to serving/interface.py).
    original = parsed(source)

    def tensors(config, field):
        return [(t.name, t.data_type, list(t.dims), getattr(t, "optional", False)) for t in getattr(config, field)]

    for field in ("input", "output"):
        assert tensors(batched, field) == tensors(original, field)
    assert configure_batching(source, stage, batching).startswith("#")  # the stage's comments survive

    plain = parsed(configure_batching(source, stage, BatchingConfig(enabled=False, instances=3)))
    assert plain.max_batch_size == 0 and not plain.HasField("dynamic_batching")
    assert not any(t.allow_ragged_batch for t in plain.input)
    assert [g.count for g in plain.instance_group] == [3]


def test_batching_config_refuses_nonsense():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="instance counts"):
        BatchingConfig(stage_instances={"heavy_ranker": 0})


def assert_same_outputs(alone: dict, batched: dict, where: str) -> None:
    assert set(alone) == set(batched), where
    for key, value in alone.items():
        a, b = np.asarray(value), np.asarray(batched[key])
        assert a.shape == b.shape, (where, key)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=0, atol=SCORE_TOLERANCE, err_msg=f"{where}: {key}")
        else:
            assert a.tolist() == b.tolist(), (where, key)


@pytest.fixture(scope="module")
def funnel(triton_repo, model_version):
    v = str(model_version.version)
    return {name: stages.STAGES[name](triton_repo / name / v) for name in STAGE_ARTIFACTS}


@pytest.mark.slow
def test_run_batch_gives_every_request_what_run_gives_it_alone(funnel, model_version):
    import pandas as pd

    users = pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[:24]
    requests = [{"user_id": np.array([u], dtype=np.int64), "k": np.array([10], dtype=np.int32)} for u in users]
    requests.append({"user_id": np.array([10**9], dtype=np.int64), "k": np.array([5], dtype=np.int32)})  # unknown
    requests[2]["exclude_item_ids"] = np.array([1, 2, 3], dtype=np.int64)
    for name in stages.FUNNEL:  # each stage on the same inputs: one request at a time, then all at once
        alone = [funnel[name].run(x) for x in requests]
        for i, (one, batched) in enumerate(zip(alone, funnel[name].run_batch(requests))):
            assert_same_outputs(one, batched, f"{name}, request {i}")
        for x, one in zip(requests, alone):
            x.update(one)
    assert {x["served_by"][0] for x in requests} == {b"model", b"fallback"}


@pytest.mark.slow
def test_a_malformed_request_fails_the_batch_so_it_can_be_served_alone(funnel):
    lookup = funnel["feature_lookup"].run({"user_id": np.array([1])})
    good = {**lookup, "filtered_ids": np.arange(3, 40, dtype=np.int64), "light_ids": np.arange(3, 10, dtype=np.int64)}
    off_catalog = {**good, "filtered_ids": np.array([10**9]), "light_ids": np.array([10**9])}
    for name in ("light_ranker", "heavy_ranker"):
        with pytest.raises(RequestError, match="outside the catalog"):
            funnel[name].run_batch([good, off_catalog])
    dim = funnel["retrieval"].index_meta["dim"]
    with pytest.raises(RequestError, match="dims"):
        funnel["retrieval"].run_batch([{"query_embedding": np.zeros(dim)}, {"query_embedding": np.zeros(dim + 1)}])


# The served funnel answering a burst as each request alone runs on the shared server of
# tests/test_triton_integration.py (one server start fewer).
