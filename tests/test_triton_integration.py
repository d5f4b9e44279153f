"""The exported funnel on the real tritonserver, queried over gRPC with tritonclient; then the
hardened funnel on the same server: custom metrics, a malformed load, stub crash recovery (last: it
kills a stage). One server for the module, since each start costs three TensorFlow stubs' imports.

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

    srv = TritonServer(triton_repo, log_path=tmp_path_factory.mktemp("triton") / "server.log")
    srv.start()
    yield srv
    pid = srv.process.pid if srv.process is not None else None  # None: a failed restart stopped it already
    srv.stop()
    # No server or stub process is left behind: the whole process group is gone.
    if pid is not None:
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
    for name, dtype, value in (
        ("user_id", "INT64", np.array([user])),
        ("k", "INT32", np.array([5], np.int32)),
        ("exclude_item_ids", "FP32", np.array([1.5], np.float32)),
    ):
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException, match="exclude_item_ids"):
        client.client.infer("funnel", inputs)


# --- Secure by default (deployment/security.py, docs/security.md) ---------------------------------


def _listening_hosts(port: int) -> set[str]:
    """The local addresses a TCP socket of this machine listens on at ``port`` (from /proc/net)."""
    hosts = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    hosts.add(address[-8:] if width == 32 and address[:24] == "0000000000000000FFFF0000" else address)
    return {".".join(str(int(h[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(h) == 8 else h for h in hosts}


def test_every_endpoint_listens_on_loopback_only(server):
    for port in (server.grpc_port, server.http_port, server.metrics_port):
        assert _listening_hosts(port) == {"127.0.0.1"}, port
    assert "127.0.0.1" in server.listening() and "0.0.0.0" not in server.listening()


def _uploaded_model(marker):
    """A model whose model.py, if the server ever ran it, would write ``marker``."""
    config = (
        '{"backend": "python", "max_batch_size": 0, '
        '"input": [{"name": "x", "data_type": "TYPE_INT32", "dims": [1]}], '
        '"output": [{"name": "y", "data_type": "TYPE_INT32", "dims": [1]}]}'
    )
    code = (
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    ).encode()
    return config, {"file:1/model.py": code}


def test_the_control_plane_refuses_clients_without_the_key(server, tmp_path):

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    marker = tmp_path / "uploaded-code-ran"
    config, files = _uploaded_model(marker)
    plain = grpcclient.InferenceServerClient(server.grpc_url)
    refused = {
        "load with uploaded files": lambda: plain.load_model("evil", config=config, files=files),
        "unload the funnel": lambda: plain.unload_model("funnel"),
        "reconfigure a stage": lambda: plain.load_model("ordering", config='{"max_batch_size": 0}'),
        "repository index": lambda: plain.get_model_repository_index(),
        "model config": lambda: plain.get_model_config("funnel"),
        "statistics": lambda: plain.get_inference_statistics("funnel"),
        "log settings": lambda: plain.update_log_settings({"log_verbose_level": 1}),
        "trace settings": lambda: plain.get_trace_settings(),
        "shared memory": lambda: plain.get_system_shared_memory_status(),
    }
    codes = {}
    for name, call in refused.items():
        with pytest.raises(InferenceServerException, match="restricted") as err:
            call()
        codes[name] = err.value.status()
    assert set(codes.values()) == {"StatusCode.UNAVAILABLE"}, codes
    wrong = {"triton-grpc-protocol-funnel-admin-key": "not-the-key-of-this-deployment"}
    with pytest.raises(InferenceServerException, match="restricted"):
        plain.load_model("evil", config=config, files=files, headers=wrong)
    http = httpclient.InferenceServerClient(server.http_url)
    for call in (lambda: http.load_model("evil", config=config, files=files), lambda: http.unload_model("funnel")):
        with pytest.raises(InferenceServerException, match="restricted") as err:
            call()
        assert err.value.status() == "403"
    # Inference, health and metadata stay open; nothing was unloaded and no uploaded code ran.
    assert plain.is_server_ready() and plain.is_model_ready("funnel")
    assert plain.get_model_metadata("funnel").name == "funnel"
    assert http.is_server_live()
    time.sleep(1.0)
    assert not marker.exists()
    plain.close()
    http.close()
    print("refused without the key:", codes)


def test_the_control_plane_takes_requests_with_the_deployments_key(server):
    from deployment.security import ControlClient, admin_key_path
    from deployment.supervisor import wait_until

    assert oct(admin_key_path(server.model_repository).stat().st_mode & 0o777) == "0o600"
    with ControlClient(server.grpc_url, server.model_repository) as control:
        index = {m.name for m in control.get_model_repository_index().models}
        assert {"funnel", "ordering", "ab_router", "feedback"} <= index
        assert control.get_model_config("ordering").config.name == "ordering"
        # feedback: no ensemble depends on it, so unloading it leaves the funnel serving
        control.unload_model("feedback")
        assert wait_until(lambda: not control.is_model_ready("feedback"), timeout_s=30, interval_s=0.2)
        control.load_model("feedback")
        assert control.is_model_ready("feedback") and control.is_model_ready("funnel")


def test_malformed_requests_are_invalid_argument_and_named(client, model_version):
    from serving.client import BadRequest

    user = int(pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].iloc[0])
    with pytest.raises(BadRequest, match="k must be between 1 and 50") as err:
        client.recommend(user, 0)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(BadRequest, match=r"exclude_item_ids holds 10001 ids; at most 10000") as err:
        client.recommend(user, 5, exclude_item_ids=np.arange(10_001))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    at_limit = np.arange(10**9, 10**9 + 10_000)  # ids the catalog does not hold: at the limit, served
    assert len(client.recommend(user, 5, exclude_item_ids=at_limit).item_ids) == 5
    assert client.recommend(10**9, 3).served_by == "fallback"  # unknown users still get the fallback


# Batched stages (serving.batching, tests/test_batching.py), on this module's server. Float scores
# may differ in the last bit with the number of rows TensorFlow multiplies (measured up to 6e-8).
BATCH_SCORE_TOLERANCE = 1e-6


def test_the_served_funnel_answers_a_burst_as_it_answers_each_request_alone(server, triton_repo, model_version):
    """The same users asked one at a time and then all at once (the stages batch them: fewer
    executions than requests) get the same lists and scores; a malformed request in the burst
    fails alone."""
    import pandas as pd

    from benchmarks.loadgen import Request, counted, run_load, settled_statistics, wait_until_counted
    from deployment.security import ControlClient
    from serving.client import FunnelClient

    users = pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].astype(int).tolist()[:32]
    users.append(10**9)  # unknown: the fallback
    with FunnelClient(server.grpc_url) as client:
        alone = {u: client.recommend(u, 10) for u in users}
    with ControlClient(server.grpc_url, triton_repo) as control:
        before = settled_statistics(control, "heavy_ranker")  # the earlier requests all counted
        burst = [Request(u, 10) for u in users * 3] + [Request(users[0], 10, malformed="k_zero")]
        report = run_load(server.grpc_url, burst, concurrency=32)
        wait_until_counted(control, "heavy_ranker", counted(before) + len(burst))
        after = control.get_inference_statistics("heavy_ranker", as_json=True)["model_stats"]
    inferences = counted(after) - counted(before)
    executions = counted(after, "execution_count") - counted(before, "execution_count")
    assert inferences == len(burst) and executions < inferences  # batched (k is checked by the last stage)
    for result in report.results:
        if result.request.malformed:
            assert result.error and "INVALID_ARG" in result.error and "k must be between" in result.error
            continue
        assert result.error is None, result.error
        one = alone[result.request.user_id]
        assert result.outputs["item_ids"].tolist() == one.item_ids
        np.testing.assert_allclose(result.outputs["scores"], one.scores, rtol=0, atol=BATCH_SCORE_TOLERANCE)
        assert (result.outputs["served_by"], result.outputs["stage_counts"].tolist()) == (
            one.served_by,
            list(one.stage_counts.values()),
        )


def test_the_deep_probe_passes_on_the_serving_funnel(server):
    """``scripts/probe.py``, the containers' readiness and liveness check (tests/test_deployment_manifests.py
    checks that it fails without a server, and with a stub gone), its stub check required (``--stubs``,
    as the Kubernetes probes run it): the server is found among this machine's processes by its gRPC
    port, and every Python model instance has its stub."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "scripts" / "probe.py"), "--url", server.grpc_url, "--stubs"]
    up = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=root)
    assert up.returncode == 0, up.stderr
    assert "funnel answered" in up.stdout and "Python model instances have their stub" in up.stdout


def test_the_servers_cpu_is_read_per_process(server, client, model_version):
    """``cpu_seconds_by_process`` (the live-writes and profiling benchmarks' split of where the
    server's CPU goes): tritonserver and every stage's stub, growing where requests were served."""
    from serving.stages import FUNNEL

    user = int(pd.read_parquet(model_version.path / "user_features.parquet")["user_id_raw"].iloc[0])
    before = server.cpu_seconds_by_process()
    assert {"tritonserver", *FUNNEL} <= set(before) and all(v > 0 for v in before.values())
    for _ in range(30):
        client.recommend(user, 10)
    after = server.cpu_seconds_by_process()
    assert all(after[name] >= before[name] for name in before)
    assert after["heavy_ranker"] > before["heavy_ranker"] and after["tritonserver"] > before["tritonserver"]
    assert sum(after.values()) <= server.cpu_seconds() + 0.5  # the total is the same reading, a moment later


# The hardened funnel, on the same server after the tests above.


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


def _settled(metrics_url, stages, answered, quiet_s=1.0, timeout=20.0):
    """A scrape in which every stage has recorded all the requests it has answered so far (at least
    ``answered``), none being in flight. The background recorder may not have started on the last of
    them (the counts are then equal but short), or may be between counting a batch's requests and its
    latencies (then they differ): the counts must agree and stay unchanged for ``quiet_s``, four times
    the stages' metrics interval (tests/conftest.py keeps the default 0.25 s)."""
    from serving.metrics import scrape

    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        metrics = scrape(metrics_url)
        counts = [
            (
                sum(_metric(metrics, "funnel_stage_requests_total", stage=s)),
                sum(_metric(metrics, "funnel_stage_latency_ms_count", stage=s)),
            )
            for s in stages
        ]
        if counts != last:
            last, since = counts, time.monotonic()
        elif all(r == n >= answered for r, n in counts) and time.monotonic() - since >= quiet_s:
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"stage metrics did not settle: {counts}")
        time.sleep(0.05)


def test_custom_metrics_are_scraped_with_sane_values(server, reference):
    from deployment.export import STAGE_ARTIFACTS
    from serving.client import FunnelClient
    from serving.metrics import scrape

    # Every stage has counted each request it answered so far (the tests above and the reference's).
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
    # A scrape reads each stage's _bucket and _sum before its _count, which the recorder adds last:
    # the scrape that first counts all six may have read the +Inf bucket and the sum just before the
    # last batch reached them. One begun after it reads everything recorded before those counts.
    after = scrape(server.metrics_url)

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
