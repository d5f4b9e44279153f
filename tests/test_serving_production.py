"""The hardened funnel on the real tritonserver: custom metrics, malformed load, stub crash recovery.

``FUNNEL_ROBUSTNESS_REQUESTS`` sets the size of the mixed load (default 2,000 so ``make test``
stays quick; the issue's full run is ``FUNNEL_ROBUSTNESS_REQUESTS=10000``).
"""

import os
import signal
import time

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

MAX_K = 50  # tests/conftest.py SMALL serving.max_k


@pytest.fixture(scope="module")
def server(triton_repo, tmp_path_factory):
    from deployment.server import TritonServer

    srv = TritonServer(triton_repo, log_path=tmp_path_factory.mktemp("triton-prod") / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def users(model_version):
    known = pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()
    return known


@pytest.fixture(scope="module")
def reference(server, users):
    """Each user's answer at k = MAX_K, asked one at a time before any load: every later answer at
    k must be its first k items."""
    from serving.client import FunnelClient

    ref = {}
    with FunnelClient(server.grpc_url) as client:
        for user in users[:40] + [10**9, 10**9 + 1]:
            ref[user] = client.recommend(user, MAX_K)
    return ref


def _metric(metrics, name, **labels):
    return [v for lab, v in metrics.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items())]


def _settled(metrics_url, stages, answered, timeout=10.0):
    """A scrape in which every stage has recorded the ``answered`` requests it has answered so far.
    The background recorder may not have started on the last of them (the counts are then equal but
    short), or may be between counting a batch's requests and its latencies (then they differ)."""
    from serving.metrics import scrape

    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(metrics_url)
        if all(
            sum(_metric(metrics, "funnel_stage_requests_total", stage=s))
            == sum(_metric(metrics, "funnel_stage_latency_ms_count", stage=s))
            >= answered
            for s in stages
        ):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError("stage metrics did not settle")
        time.sleep(0.05)


def test_custom_metrics_are_scraped_with_sane_values(server, reference):
    from deployment.export import STAGE_ARTIFACTS
    from serving.client import FunnelClient
    from serving.metrics import scrape

    # The first test on this server: every stage has answered exactly the reference's requests.
    before = _settled(server.metrics_url, STAGE_ARTIFACTS, len(reference))
    with FunnelClient(server.grpc_url) as client:
        for user in list(reference)[:5]:
            client.recommend(user, 10)
        with pytest.raises(Exception, match="k must be between"):
            client.recommend(list(reference)[0], 0)

    # Stages record metrics on a background thread after they answer: wait until every stage's
    # requests are counted (bounded), then check the values.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(server.metrics_url)
        counted = [
            sum(_metric(after, "funnel_stage_latency_ms_count", stage=s))
            - sum(_metric(before, "funnel_stage_latency_ms_count", stage=s))
            for s in STAGE_ARTIFACTS
        ]
        if min(counted) >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def delta(name, **labels):
        return sum(_metric(after, name, **labels)) - sum(_metric(before, name, **labels))

    for stage in STAGE_ARTIFACTS:  # every stage of the funnel, whatever the stage list becomes
        assert delta("funnel_stage_requests_total", stage=stage) == 6, stage
        assert delta("funnel_stage_latency_ms_count", stage=stage) == 6, stage
        latency_sum = delta("funnel_stage_latency_ms_sum", stage=stage)
        assert 0 < latency_sum < 6 * 5000, (stage, latency_sum)
    # the bad k is refused by ordering, counted as a bad request there and nowhere else
    assert delta("funnel_stage_errors_total", stage="ordering", kind="bad_request") == 1
    assert delta("funnel_stage_errors_total", kind="internal") == 0
    # candidates: 5 ordering responses of 10 items (the refused request passes no items on)
    assert delta("funnel_stage_candidates_sum", stage="ordering") == 50
    assert delta("funnel_stage_candidates_count", stage="retrieval") == 6
    # the reference's two unknown users came before `before`; these 5 requests include none
    assert delta("funnel_fallback_total") == 0
    assert sum(_metric(after, "funnel_fallback_total")) >= 2
    # histogram buckets are cumulative and end at +Inf == count (counter series come in any order)
    buckets = sorted(
        (float(lab["le"]), v) for lab, v in after["funnel_stage_latency_ms_bucket"] if lab["stage"] == "query_tower"
    )
    values = [v for _, v in buckets]
    assert len(buckets) == 12 and values == sorted(values) and buckets[-1][0] == float("inf")
    assert buckets[-1][1] == sum(_metric(after, "funnel_stage_latency_ms_count", stage="query_tower"))
    # Triton's own metrics are on the same endpoint
    assert sum(_metric(after, "nv_inference_request_success", model="funnel")) >= 6


def _check_good(result, reference):
    req = result.request
    assert result.error is None, (req, result.error)
    ref = reference[req.user_id]
    out = result.outputs
    assert out["item_ids"].tolist() == ref.item_ids[: req.k], req
    assert np.allclose(out["scores"], ref.scores[: req.k], atol=1e-6), req
    assert out["served_by"] == ref.served_by and out["model_version"] == ref.model_version


def test_mixed_load_with_malformed_requests(server, reference):
    from benchmarks.loadgen import MALFORMED, Request, run_load

    n = int(os.environ.get("FUNNEL_ROBUSTNESS_REQUESTS", "2000"))
    rng = np.random.default_rng(0)
    users, kinds = list(reference), list(MALFORMED)
    requests = []
    for i in range(n):
        bad = kinds[rng.integers(len(kinds))] if i % 20 == 7 else None  # exactly 5% malformed
        requests.append(Request(int(users[rng.integers(len(users))]), int(rng.integers(1, MAX_K + 1)), bad))
    report = run_load(server.grpc_url, requests, concurrency=8, max_k=MAX_K)
    assert len(report.results) == n
    bad = [r for r in report.results if r.request.malformed]
    assert len(bad) == n // 20
    for r in bad:
        assert r.error is not None, r.request
        named = ("user_id", " k", "'k'", "k must", "exclude_item_ids")
        assert any(name in r.error for name in named), r.error
        # the client's fault, not the server's: never INTERNAL (which clients and proxies retry)
        assert "StatusCode.INVALID_ARGUMENT" in r.error, (r.request.malformed, r.error)
    for r in report.results:
        if not r.request.malformed:
            _check_good(r, reference)
    assert server.healthy()
    print("mixed load:", report.summary())


def test_killed_stage_stub_is_recovered_by_the_supervisor(server, reference):
    from deployment.supervisor import Supervisor, wait_until
    from serving.client import FunnelClient

    user = next(iter(reference))
    victim = server.stub_pids()["query_tower"][0]  # a TensorFlow stage, and one issue 4 does not rename
    os.kill(victim, signal.SIGKILL)
    supervisor = Supervisor(server, interval_s=0.5, failures=2)

    def answers() -> bool:
        try:
            with FunnelClient(server.grpc_url, timeout_s=10) as client:
                return client.recommend(user, 5).item_ids == reference[user].item_ids[:5]
        except Exception:
            return False

    with supervisor:
        assert wait_until(answers, timeout_s=240, interval_s=1.0), supervisor.last_error
    assert victim not in server.stub_pids().get("query_tower", [])
    assert supervisor.restarts >= 1, "the funnel answered again, but not through the supervisor's restart"
    print("supervisor restarts:", supervisor.restarts, "last error:", supervisor.last_error)
