"""Fast checks of the serving helpers that need no server: version pinning, metrics parsing, NDCG."""

import pathlib
import re

import numpy as np
import pandas as pd
import pytest

from deployment.export import TRITON_REPO_SOURCE, pin_ensemble, serve_all_versions
from serving.metrics import CANDIDATE_OUTPUT, candidate_output, parse_prometheus


def test_pin_ensemble_pins_every_step_of_the_funnel():
    text = (TRITON_REPO_SOURCE / "funnel" / "config.pbtxt").read_text()
    steps = text.count("model_name:")
    pinned = pin_ensemble(text, 7)
    assert pinned.count("model_version: 7") == steps > 0
    assert "model_version: -1" not in pinned
    assert pin_ensemble(pinned, 8).count("model_version: 8") == steps  # re-pinning a pinned config
    with pytest.raises(ValueError, match="no step"):
        pin_ensemble('name: "x"\nplatform: "ensemble"\n', 1)


def test_stage_configs_serve_all_versions_once():
    text = (TRITON_REPO_SOURCE / "heavy_ranker" / "config.pbtxt").read_text()
    once = serve_all_versions(text)
    assert once.count("version_policy") == 1 and serve_all_versions(once) == once


def test_parse_prometheus_reads_labels_and_values():
    text = (
        "# HELP funnel_stage_latency_ms x\n# TYPE funnel_stage_latency_ms histogram\n"
        'funnel_stage_latency_ms_bucket{stage="ranker",version="1",le="0.5"} 3\n'
        'funnel_stage_latency_ms_bucket{stage="ranker",version="1",le="+Inf"} 4\n'
        "nv_cpu_memory_used_bytes 1.5e+09\n"
    )
    m = parse_prometheus(text)
    assert m["funnel_stage_latency_ms_bucket"][1] == ({"stage": "ranker", "version": "1", "le": "+Inf"}, 4.0)
    assert m["nv_cpu_memory_used_bytes"] == [({}, 1.5e9)]


def test_parse_prometheus_reads_back_escaped_label_values():
    """Label values are quoted, their backslashes, quotes and newlines escaped; a comma or ``=`` inside
    one split it (a model named ``a,b`` read as ``a``), and the escapes stayed in the value."""
    from serving.metrics import render_metrics

    labels = {"model": "a,b=c", "version": 'say "hi"\\ \n}', "le": "+Inf"}
    text = render_metrics([("x_total", "counter", "X", [(labels, 2.0), ({"model": "plain"}, 1.0)])])
    assert parse_prometheus(text)["x_total"] == [(labels, 2.0), ({"model": "plain"}, 1.0)]


def test_candidate_output_covers_item_stages_and_new_rankers():
    assert candidate_output("retrieval", ["candidate_ids", "retrieval_scores"]) == CANDIDATE_OUTPUT["retrieval"]
    assert candidate_output("heavy_ranker", ["heavy_scores"]) == "heavy_scores"
    assert candidate_output("feature_lookup", ["user_categorical"]) is None


def test_ndcg_at_k():
    from benchmarks.benchmark_serving import ndcg_at_k

    gains = np.array([3.0, 2.0, 1.0, 0.0])
    assert ndcg_at_k(gains, gains, k=3) == pytest.approx(1.0)
    assert ndcg_at_k(gains[::-1], gains, k=3) < 0.5
    assert ndcg_at_k(np.zeros(3), np.zeros(3)) == 0.0


class _Family:
    """In-memory stand-in for ``pb_utils.MetricFamily`` (which exists only inside a Triton stub;
    tests/test_triton_integration.py checks the real one)."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name, description, kind):
        self.name, self.metrics = name, []

    def Metric(self, labels):  # noqa: N802  (pb_utils' spelling)
        metric = _Metric(labels)
        self.metrics.append(metric)
        return metric


class _Metric:
    def __init__(self, labels):
        self.labels, self.total, self.updates = labels, 0.0, 0

    def increment(self, value):
        assert value >= 0, "a counter only goes up"
        self.total += value
        self.updates += 1

    def set(self, value):  # a gauge
        self.total = value


def _buckets(histogram):
    return {m.labels["le"]: m.total for m in histogram.buckets}


def test_counter_histogram_publishes_a_histograms_series_in_one_update_per_series():
    from serving.metrics import CounterHistogram, counter_histogram_families

    families = counter_histogram_families(_Family, "x_ms", "X")
    assert [f.name for f in families] == ["x_ms_bucket", "x_ms_sum", "x_ms_count"]
    h = CounterHistogram(families, {"stage": "s"}, [1.0, 2.5, 10.0])
    # every series exists at 0 before the first observation (a counter first seen at 1 shows no rate)
    assert _buckets(h) == {"1": 0, "2.5": 0, "10": 0, "+Inf": 0} and h.count.total == 0
    h.observe_many([0.5, 1.0, 2.0, 3.0, 50.0])  # le is inclusive, as Prometheus defines it
    h.observe_many([])
    assert _buckets(h) == {"1": 2, "2.5": 3, "10": 4, "+Inf": 5}
    assert h.sum.total == pytest.approx(56.5) and h.count.total == 5
    h.observe_many(np.full(1000, 0.1))  # a thousand requests: still one update per series
    assert _buckets(h)["1"] == 1002 and h.count.total == 1005
    assert all(m.updates == 2 for m in [*h.buckets, h.sum, h.count])
    assert h.buckets[0].labels == {"stage": "s", "le": "1"} and h.count.labels == {"stage": "s"}


def test_background_recorder_records_every_request_from_many_threads():
    import threading
    from types import SimpleNamespace

    from serving.metrics import BackgroundRecorder, StageMetrics

    metrics = StageMetrics(SimpleNamespace(MetricFamily=_Family), "ordering", 3, ["item_ids", "served_by"])
    recorder = BackgroundRecorder(metrics)
    model = {"item_ids": np.arange(10), "served_by": np.array([b"model"], dtype=object)}
    fallback = {"item_ids": np.arange(4), "served_by": np.array([b"fallback"], dtype=object)}

    def send(worker):
        for i in range(50):
            if i % 10 == 0:
                recorder.observe(0.002, None, "bad_request")
            else:
                recorder.observe(0.001 * (worker + 1), fallback if i % 10 == 1 else model)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.flush(timeout=10)
    recorder.close()
    assert metrics.requests.total == 200 and metrics.latency.count.total == 200
    assert metrics.errors["bad_request"].total == 20 and metrics.errors["internal"].total == 0
    # 180 answered: 20 fallback responses of 4 items, 160 of 10
    assert metrics.candidates.count.total == 180 and metrics.candidates.sum.total == 20 * 4 + 160 * 10
    assert _buckets(metrics.candidates)["1"] == 0 and _buckets(metrics.candidates)["10"] == 180
    assert metrics.fallback.total == 20
    # latencies: worker w answers 45 requests in w + 1 ms and refuses 5 in 2 ms
    assert metrics.latency.sum.total == pytest.approx(45 * (1 + 2 + 3 + 4) + 20 * 2)
    assert {le: _buckets(metrics.latency)[le] for le in ("0.5", "1", "2", "5")} == {
        "0.5": 0,
        "1": 45,
        "2": 45 + 45 + 20,
        "5": 200,
    }


def test_background_recorder_updates_once_per_interval_and_flushes_at_once():
    import time
    from types import SimpleNamespace

    from serving.metrics import BackgroundRecorder, StageMetrics

    metrics = StageMetrics(SimpleNamespace(MetricFamily=_Family), "retrieval", 1, ["candidate_ids"])
    recorder = BackgroundRecorder(metrics, interval_s=0.5)
    answered = {"candidate_ids": np.arange(100)}
    for _ in range(300):  # a burst well inside one interval
        recorder.observe(0.001, answered)
    assert recorder.flush(timeout=10)
    assert metrics.latency.count.total == 300
    # the burst cost one update per series (maybe two, if the recorder woke between observations)
    assert metrics.requests.updates <= 2 and metrics.latency.count.updates <= 2
    began = time.monotonic()
    recorder.observe(0.001, answered)
    assert recorder.flush(timeout=10) and time.monotonic() - began < 0.4  # flush does not wait the interval out
    assert metrics.latency.count.total == 301
    recorder.close()


def test_background_recorder_flushes_after_an_observation_it_could_not_read():
    """``observe`` counted a request as pending before reading its facts; one whose facts raised was
    never queued nor recorded, so every later ``flush`` waited out its whole timeout and said False."""
    from types import SimpleNamespace

    from serving.metrics import BackgroundRecorder, StageMetrics

    metrics = StageMetrics(SimpleNamespace(MetricFamily=_Family), "ordering", 1, ["item_ids", "served_by"])
    recorder = BackgroundRecorder(metrics)
    try:
        with pytest.raises(IndexError):  # no served_by value to read
            recorder.observe(0.001, {"item_ids": np.arange(3), "served_by": np.array([], dtype=object)})
        recorder.observe(0.001, {"item_ids": np.arange(3), "served_by": np.array([b"model"], dtype=object)})
        assert recorder.flush(timeout=2)
        assert metrics.requests.total == 1 and metrics.latency.count.total == 1
    finally:
        recorder.close()


def test_online_counters_recorded_in_the_background_add_up_and_settle():
    import threading
    from types import SimpleNamespace

    from serving.metrics import BackgroundRecorder, OnlineMetrics, online_settled

    pb = SimpleNamespace(MetricFamily=_Family)
    router, feedback = OnlineMetrics(pb, "router"), OnlineMetrics(pb, "feedback")
    routed, answered = BackgroundRecorder(router), BackgroundRecorder(feedback)

    def served(arm, fallback=False):
        return {
            "arm": np.array([arm.encode()], dtype=object),
            "model_version": np.array([b"2"], dtype=object),
            "item_ids": np.arange(3 if fallback else 5),
            "served_by": np.array([b"fallback" if fallback else b"model"], dtype=object),
        }

    def send(worker):
        for i in range(30):
            arm = ("control", "treatment")[i % 2]
            routed.observe(0.001, served(arm, fallback=i % 10 == 0))
            answered.observe(
                0.001,
                {
                    "arm": np.array([arm.encode()], dtype=object),
                    "_version": 2,
                    "_events": [("click", 1.0), ("watch_seconds", 30.0)],
                },
            )
        routed.observe(0.001, None, "bad_request")

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert routed.flush(timeout=10) and answered.flush(timeout=10)
    routed.close(), answered.close()

    def totals(metrics, key, **labels):
        found = [(dict(lab), m) for (k, lab), m in metrics.series().items() if k == key]
        return sum(
            m.count.total if key == "latency" else m.total
            for lab, m in found
            if all(lab.get(n) == v for n, v in labels.items())
        )

    assert totals(router, "requests") == 120 and totals(router, "latency") == 120
    assert totals(router, "requests", arm="control", version="2") == 60
    assert totals(router, "impressions") == 12 * 3 + 108 * 5 and totals(router, "fallback") == 12
    assert totals(router, "errors", kind="bad_request", endpoint="router") == 4
    assert totals(feedback, "click", arm="treatment") == 60 and totals(feedback, "watch_seconds") == 120 * 30.0
    assert totals(feedback, "feedback") == 120

    scrape = {
        "online_requests_total": [({"arm": "control"}, 60.0), ({"arm": "treatment"}, 60.0)],
        "online_request_latency_ms_count": [({"arm": "control"}, 60.0), ({"arm": "treatment"}, 59.0)],
        "online_feedback_total": [({"arm": "control"}, 60.0)],
    }
    assert not online_settled(scrape)  # caught between counting requests and their latencies
    scrape["online_request_latency_ms_count"][1] = ({"arm": "treatment"}, 60.0)
    assert online_settled(scrape, requests=120, feedback=60)
    assert not online_settled(scrape, requests=121) and not online_settled(scrape, feedback=61)


def test_the_churn_counter_counts_reports_and_says_so():
    """``online_churned_users_total`` counts churn reports (one per response), not distinct users: its
    help said "Users who did not come back", yet one user's churns after two responses count 2."""
    from types import SimpleNamespace

    from serving.metrics import FEEDBACK_COUNTERS, OnlineMetrics

    name, help_text = FEEDBACK_COUNTERS["churn"]
    assert name == "online_churned_users_total"  # kept: dashboards and alerts read it
    assert help_text.startswith("Churn reports") and "not distinct users" in help_text
    feedback = OnlineMetrics(SimpleNamespace(MetricFamily=_Family), "feedback")
    churned = {"arm": np.array([b"control"], dtype=object), "_version": 1, "_events": [("churn", 1.0)]}
    for _ in range(2):  # the same user, after two responses
        feedback.record([feedback.facts(0.001, churned)])
    assert sum(m.total for (k, _), m in feedback.series().items() if k == "churn") == 2


def test_the_routers_per_arm_series_exist_at_zero_before_its_first_request():
    """Series born at an arm's first response would hide that response from rate() (a counter first
    seen at 1 shows no increase); the router declares every arm of its rollout, the holdout too."""
    from types import SimpleNamespace

    from serving.assignment import HOLDOUT, ab_rollout, single_version
    from serving.metrics import OnlineMetrics

    rollout = ab_rollout("e", "salt", 3, 4, holdout=0.02)
    assert rollout.versions_by_arm() == {"control": 3, "treatment": 4, HOLDOUT: 3}
    assert single_version(7).versions_by_arm() == {"control": 7}  # no holdout share, no holdout arm

    rollout.experiment.arms = {"control": 0.9, "treatment": 0.1}  # a 10/90 design
    router = OnlineMetrics(
        SimpleNamespace(MetricFamily=_Family), "router", rollout.versions_by_arm(), rollout.experiment.arms
    )
    declared = {(key, tuple(sorted(dict(labels).items()))): m for (key, labels), m in router.series().items()}
    # the design the sample-ratio alert compares the traffic with (monitoring/prometheus/funnel-alerts.yml)
    assert {arm: declared["design_share", (("arm", arm),)].total for arm in ("control", "treatment")} == {
        "control": 0.9,
        "treatment": 0.1,
    }
    for arm, version in rollout.versions_by_arm().items():
        for key in ("requests", "impressions", "fallback"):
            assert declared[key, (("arm", arm), ("version", str(version)))].total == 0
        latency = declared["latency", (("arm", arm),)]
        assert latency.count.total == 0 and set(_buckets(latency).values()) == {0}
    # the first response adds to the declared series, not to new ones
    before = len(router.series())
    router.observe(
        0.003,
        {
            "arm": np.array([b"treatment"], dtype=object),
            "model_version": np.array([b"4"], dtype=object),
            "item_ids": np.arange(5),
            "served_by": np.array([b"model"], dtype=object),
        },
    )
    assert len(router.series()) == before
    assert declared["requests", (("arm", "treatment"), ("version", "4"))].total == 1
    assert declared["latency", (("arm", "treatment"),)].count.total == 1


def test_the_server_gives_slow_stubs_time_to_start(tmp_path):
    """Python stubs import TensorFlow before their handshake; Triton's 30 s default is too short on
    busy cores, so the server passes its own (configurable) stub timeout."""
    from deployment.server import TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    default, patient = TritonServer(repo), TritonServer(repo, stub_timeout_s=120)
    try:
        try:
            commands = default.command(), patient.command()
        except FileNotFoundError as err:  # nvidia-pytriton missing: the command cannot be built
            pytest.skip(str(err))
        assert "--backend-config=python,stub-timeout-seconds=300" in commands[0]
        assert "--backend-config=python,stub-timeout-seconds=120" in commands[1]
        # Two servers on one machine, or one restarted, never share the python backend's
        # shared-memory regions (a shared prefix crashed or hung starting servers).
        prefixes = [
            [c for c in cmd if c.startswith("--backend-config=python,shm-region-prefix-name=")]
            for cmd in (*commands, default.command())
        ]
        assert all(len(p) == 1 for p in prefixes) and len({p[0] for p in prefixes}) == 3
    finally:
        default.cleanup()
        patient.cleanup()


def aborting_server(tmp_path):
    """A ``TritonServer`` over an empty repository, and a command that dies as the python backend's
    IPC crash does (its message, then SIGABRT)."""
    import sys

    from deployment.server import TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=60)
    crash = "terminate called after throwing an instance of 'boost::interprocess::lock_exception'"
    return server, [sys.executable, "-c", f"import os; print({crash!r}, flush=True); os.abort()"]


def test_a_start_that_aborts_in_the_python_backends_ipc_is_retried_twice_after_a_pause(tmp_path, monkeypatch):
    """The python backend's intermittent crash while stubs initialise (boost::interprocess::
    lock_exception, SIGABRT) gets two fresh processes, each after a pause; a third abort, or any other
    exit, is raised. One retry at once was not enough on a loaded machine: a clean clone's Prometheus
    tests failed at setup after two aborts 8 s apart (2026-12-07)."""
    import sys

    from deployment import server as server_module
    from deployment.server import ServerAborted, ServerError, TritonServer

    pauses, sleep = [], server_module.time.sleep
    monkeypatch.setattr(server_module, "ABORT_PAUSE_S", 0.0125)  # a value no polling loop sleeps for

    def recorded(seconds):
        if seconds in (0.0125, 0.025):
            pauses.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(server_module.time, "sleep", recorded)

    server, aborts = aborting_server(tmp_path)
    exits = [sys.executable, "-c", "import sys; print('error: unknown flag', flush=True); sys.exit(1)"]
    ready = [  # answers Triton's readiness probe and listens on the other two ports, as a server that loaded
        sys.executable,
        "-c",
        "import http.server as h, socket\n"
        f"others = [socket.create_server(('127.0.0.1', p)) for p in ({server.grpc_port}, {server.metrics_port})]\n"
        "class Ready(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self): self.send_response(200); self.end_headers()\n"
        f"h.HTTPServer(('127.0.0.1', {server.http_port}), Ready).serve_forever()",
    ]
    started = []

    def serve(*commands):
        queue = iter(commands)
        monkeypatch.setattr(TritonServer, "command", lambda self: started.append(c := next(queue)) or c)
        started.clear()

    try:
        serve(aborts, ready)
        assert server.start() is server and started == [aborts, ready] and server.process.poll() is None
        server.stop()
        assert pauses == [0.0125]
        serve(aborts, aborts, ready)
        assert server.start() is server and started == [aborts, aborts, ready]
        server.stop()
        pauses.clear()
        serve(aborts, aborts, aborts)
        with pytest.raises(ServerAborted, match="lock_exception"):
            server.start()
        assert len(started) == 3 and pauses == [0.0125, 0.025]
        serve(exits, ready)
        with pytest.raises(ServerError, match="unknown flag") as raised:
            server.start()
        assert type(raised.value) is ServerError and started == [exits]
    finally:
        server.stop()
        server.cleanup()


def test_a_cancelled_start_does_not_wait_out_the_pause_before_an_abort_retry(tmp_path, monkeypatch):
    """The supervisor's stop(cancel_restart=True) while a restart pauses before retrying an IPC abort
    ends the start at once (StartCancelled), with no further process; the pause was a plain sleep
    that ignored ``cancelled``, so the stop waited it out (10 s, then 20 s) and started one more."""
    import sys
    import threading
    import time

    from deployment import server as server_module
    from deployment.server import StartCancelled, TritonServer

    monkeypatch.setattr(server_module, "ABORT_PAUSE_S", 3.0)
    server, aborts = aborting_server(tmp_path)
    sleeps = [sys.executable, "-c", "import time; time.sleep(60)"]
    queue, started = iter([aborts, sleeps]), []
    monkeypatch.setattr(TritonServer, "command", lambda self: started.append(c := next(queue)) or c)
    # Cancelled from the moment the aborted process has been stopped, i.e. as the pause begins.
    cancel, stop = threading.Event(), TritonServer.stop

    def stopped(self, timeout=None):
        stop(self, timeout)
        if started:
            cancel.set()

    monkeypatch.setattr(TritonServer, "stop", stopped)
    try:
        began = time.monotonic()
        with pytest.raises(StartCancelled, match="retry an IPC abort"):
            server.start(cancelled=cancel.is_set)
        assert started == [aborts]
        assert time.monotonic() - began < 2.5
    finally:
        server.stop()
        server.cleanup()


def answers_ready_over_http(port: int) -> list[str]:
    """A stand-in tritonserver command: answers the readiness probe over HTTP on ``port`` and nothing else."""
    import sys

    return [
        sys.executable,
        "-c",
        "import http.server as h\n"
        "class Ready(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self): self.send_response(200); self.end_headers()\n"
        f"h.HTTPServer(('127.0.0.1', {port}), Ready).serve_forever()",
    ]


def test_a_cancelled_start_does_not_wait_out_its_ports_or_a_stalls_stack_dump(tmp_path, monkeypatch):
    """Two waits of the start ignored ``cancelled`` (serve.py's SIGTERM, the supervisor's
    stop(cancel_restart=True)): the wait for gRPC and metrics to listen once HTTP answered (up to
    10 s) and the pause for the stubs' stacks at a stall (2 s). Each now ends within a poll, and
    neither a stall's retry nor a restart starts a fresh process once cancelled."""
    import sys
    import threading
    import time

    from deployment import server as server_module
    from deployment.server import StartCancelled, TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    cancel, cancelled_at = threading.Event(), []
    spawn = TritonServer.spawn

    def cancelling(method):  # cancels as ``method`` begins, then runs it
        def run(self, *args, **kwargs):
            cancel.set()
            cancelled_at.append(time.monotonic())
            return method(self, *args, **kwargs)

        return run

    # HTTP answers ready; gRPC and metrics never listen (the wait's 10 s timeout).
    server = TritonServer(repo, log_path=tmp_path / "ports.log", startup_timeout=60)
    http_only = answers_ready_over_http(server.http_port)
    monkeypatch.setattr(TritonServer, "command", lambda self: http_only)
    monkeypatch.setattr(TritonServer, "wait_until_listening", cancelling(TritonServer.wait_until_listening))
    try:
        with pytest.raises(StartCancelled, match="waited for its ports"):
            server.start(cancelled=cancel.is_set)
        assert time.monotonic() - cancelled_at[0] < 1.0
        assert server.process is None
    finally:
        server.cleanup()

    # A stall: a process that neither logs nor uses CPU, with a stub still loading.
    cancel.clear()
    cancelled_at.clear()
    monkeypatch.setattr(server_module, "STALL_S", 1.0)
    server = TritonServer(repo, log_path=tmp_path / "stall.log", startup_timeout=60)
    monkeypatch.setattr(TritonServer, "command", lambda self: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(TritonServer, "stub_pids", lambda self: {"ranker": []})
    monkeypatch.setattr(TritonServer, "dump_stub_stacks", cancelling(TritonServer.dump_stub_stacks))
    started = []
    monkeypatch.setattr(TritonServer, "spawn", lambda self, cmd, **kw: started.append(cmd) or spawn(self, cmd, **kw))
    try:
        # No second process for the stall's retry: its first poll would only stop it again.
        with pytest.raises(StartCancelled, match="after a stall"):
            server.start(cancelled=cancel.is_set)
        assert time.monotonic() - cancelled_at[0] < 1.0
        assert len(started) == 1
        # A restart asked to stop while it stopped the old server starts no new one.
        started.clear()
        with pytest.raises(StartCancelled, match="before the restart"):
            server.restart(cancelled=lambda: True)
        assert started == []
    finally:
        server.cleanup()


def test_a_start_reports_and_diagnoses_from_its_own_log_lines_only(tmp_path, monkeypatch):
    """A log is appended to across starts (a retry, a restart, serve.py --log run again): an earlier
    start's errors are not this exit's, and its models loaded then are not loaded now."""
    import sys

    from deployment.server import ServerError, TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    log = tmp_path / "server.log"
    log.write_text("successfully loaded 'ranker'\nerror: the previous start's failure\n")
    server = TritonServer(repo, log_path=log, startup_timeout=60)
    exits = [sys.executable, "-c", "import sys; print('error: unknown flag', flush=True); sys.exit(1)"]
    monkeypatch.setattr(TritonServer, "command", lambda self: exits)
    try:
        with pytest.raises(ServerError, match="unknown flag") as raised:
            server.start()
        assert "previous start" not in str(raised.value)
        monkeypatch.setattr(TritonServer, "stub_pids", lambda self: {"ranker": []})  # a stub still loading
        assert server.dump_stub_stacks(wait_s=0) == ["ranker"]
    finally:
        server.cleanup()


def test_a_given_port_another_server_answers_on_fails_the_start_naming_it(tmp_path, monkeypatch):
    """A second server on ports one already serves (scripts/serve.py's defaults): the first answers
    the readiness probe on the HTTP port while this one still loads. The start waits for its own
    process and fails naming the port, not 'ready but does not listen' before its models loaded."""
    import http.server
    import sys
    import threading

    from deployment.server import PortTaken, TritonServer

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Ready)  # the server already running
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, http_port=port, log_path=tmp_path / "server.log", startup_timeout=60)
    loads = [  # loads for 2 s, then finds its HTTP port taken, as tritonserver does
        sys.executable,
        "-c",
        "import sys, time; time.sleep(2)\n"
        f"print(\"failed to start HTTP service: Unavailable - Socket '127.0.0.1:{port}' already in use\")\n"
        "sys.exit(1)",
    ]
    monkeypatch.setattr(TritonServer, "command", lambda self: loads)
    listening = TritonServer.wait_until_listening
    monkeypatch.setattr(TritonServer, "wait_until_listening", lambda self, *_, **kw: listening(self, 0.5, **kw))
    try:
        with pytest.raises(PortTaken, match=f"HTTP port {port} already in use"):
            server.start()
    finally:
        other.shutdown()
        other.server_close()
        server.cleanup()


def test_a_stopped_server_leaves_no_shared_memory_behind(tmp_path):
    """A killed python backend cannot unlink its regions (1 MiB per stub in /dev/shm); ``stop``
    removes those of its own start's prefix and no other server's."""
    from deployment.server import TritonServer, remove_shm_regions

    shm = tmp_path / "shm"
    shm.mkdir()
    mine = [shm / f"funnel_1_2_abc_{i}" for i in range(3)]
    other = shm / "funnel_1_2_abd_0"  # another server's: its prefix differs in the last character
    for region in (*mine, other):
        region.write_bytes(b"\0")
    assert sorted(remove_shm_regions("funnel_1_2_abc_", shm)) == mine and other.exists()
    assert remove_shm_regions(None, shm) == [] and other.exists()

    if not pathlib.Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo)
    server.shm_prefix = f"funnel_test_{tmp_path.name}_"  # as command() names a start's regions
    left = pathlib.Path("/dev/shm") / f"{server.shm_prefix}stub-region"
    left.write_bytes(b"\0")
    try:
        server.stop()
        assert not left.exists()
    finally:
        left.unlink(missing_ok=True)
        server.cleanup()


def test_a_stopped_server_leaves_no_scratch_folder_unless_it_failed(tmp_path, monkeypatch):
    """Each start's scratch folder (the copied backend, the cache) goes at stop:
    left behind, they took 1.2 GB of /tmp in a day of test runs. The log stays where the caller put
    it; a default log stays, with its folder, only when the server failed, until ``cleanup``."""
    import sys

    from deployment.server import ServerError, TritonServer, prepare_backend_dir

    repo = tmp_path / "repo"
    repo.mkdir()
    # Stand-in processes for tritonserver (real processes, the real start and stop; no model needed):
    # one that answers the readiness probe over HTTP (the other two ports are not checked here), and
    # one that exits at once.
    monkeypatch.setattr(TritonServer, "wait_until_listening", lambda self, timeout=10.0, **kw: None)

    def serving(server):
        return answers_ready_over_http(server.http_port)

    exits = [sys.executable, "-c", "import sys; print('error: unknown flag', flush=True); sys.exit(1)"]

    def command(cmd):
        def build(self):  # copies the backend as command() does, then runs the stand-in
            prepare_backend_dir(self.scratch_dir / "backends")
            return cmd

        return build

    def start(server, cmd):
        monkeypatch.setattr(TritonServer, "command", command(cmd))
        return server.start()

    clean = TritonServer(repo, startup_timeout=60)
    try:
        start(clean, serving(clean))
    except FileNotFoundError as err:  # nvidia-pytriton missing: no backend to copy
        pytest.skip(str(err))
    scratch = clean.scratch_dir
    assert clean.log_path.parent == scratch and clean.log_path.exists()
    assert (scratch / "backends" / "python").is_dir()
    clean.stop()
    assert not scratch.exists()
    start(clean, serving(clean))  # a second start makes its folder again
    assert clean.log_path.exists()
    clean.stop()
    assert not scratch.exists()

    given = TritonServer(repo, log_path=tmp_path / "logs" / "server.log", startup_timeout=60)
    monkeypatch.setattr(TritonServer, "command", lambda self: command(serving(self))(self))
    with given:
        pass
    assert not given.scratch_dir.exists() and given.log_path.exists()

    failed = TritonServer(repo, startup_timeout=60)
    with pytest.raises(ServerError, match="unknown flag") as raised:
        start(failed, exits)
    assert f"tritonserver log: {failed.log_path}" in raised.value.__notes__
    assert "unknown flag" in failed.log_path.read_text()
    assert not (failed.scratch_dir / "backends").exists()  # only the log is kept
    failed.cleanup()
    assert not failed.scratch_dir.exists()

    died = TritonServer(repo, startup_timeout=60)  # exits on its own after a good start
    start(died, serving(died))
    died.process.kill()
    died.process.wait()
    died.stop()
    assert died.log_path.exists()
    died.cleanup()
    restarted = TritonServer(repo, startup_timeout=60)
    start(restarted, serving(restarted))
    restarted.restart()
    restarted.stop()
    assert restarted.log_path.exists()  # a restarted server failed: its log stays
    restarted.cleanup()


def test_the_supervisor_keeps_supervising_after_a_failed_restart():
    """A restart that raises (the server did not come back) is recorded, and the next failed probes
    restart again instead of the supervising thread dying with the exception."""
    from types import SimpleNamespace

    from deployment.supervisor import Supervisor

    attempts = []

    def restart(**_):
        attempts.append(1)
        if len(attempts) == 1:
            raise TimeoutError("not ready in time")

    server = SimpleNamespace(process=SimpleNamespace(poll=lambda: None), grpc_url="x", tls_cert=None, restart=restart)

    def probe(url):
        raise ConnectionError("down")

    now = [0.0]
    supervisor = Supervisor(server, probe=probe, failures=2, clock=lambda: now[0])
    results = []
    for _ in range(4):
        results.append(supervisor.check_once())
        now[0] += 10.0  # past the first backoff (5 s): this test is about the failed restart
    assert results == [False] * 4 and len(attempts) == 2 and supervisor.restarts == 1
    assert supervisor.last_error == "ConnectionError: down"


def _supervised_stub(on_restart, **extra):
    """A server for the supervisor's tests: its process always running, ``on_restart`` its restart."""
    from types import SimpleNamespace

    return SimpleNamespace(
        process=SimpleNamespace(poll=lambda: None),
        grpc_url="x",
        tls_cert=None,
        restart=lambda **_: on_restart(),
        **extra,
    )


def test_the_supervisor_restarts_a_server_whose_router_or_feedback_stub_is_gone(monkeypatch):
    """Triton 2.51 never restarts a killed Python stub: after ``kill -9`` of one of ``ab_router``'s two
    stubs every second router request failed (``Stub process 'ab_router_0_0' is not healthy.``) while
    the funnel, all its stubs alive, answered. The supervisor probed only the funnel and never
    restarted; its default probe now also counts each READY Python model version's stubs, and sends
    no request to the router or the feedback endpoint (nothing logged, no counter moved)."""
    import deployment.supervisor as supervisor_module
    from deployment.supervisor import Supervisor

    monkeypatch.setattr(supervisor_module, "funnel_probe", lambda url: None)  # the funnel answers
    loaded = {("ab_router", "1"): 2, ("feedback", "1"): 1, ("query_tower", "1"): 1}
    monkeypatch.setattr(supervisor_module, "python_instances", lambda server, **_: dict(loaded), raising=False)
    live = {("ab_router", "1"): [11, 12], ("feedback", "1"): [13], ("query_tower", "1"): [14]}
    restarts = []
    server = _supervised_stub(lambda: restarts.append(1), stub_pids_by_version=lambda: live)
    supervisor = Supervisor(server, failures=2, stable_s=0)  # no backoff: this test is about the probe
    assert supervisor.check_once() and supervisor.check_once() and not restarts

    live[("ab_router", "1")] = [12]  # one of the router's two stubs killed
    assert not supervisor.check_once() and not supervisor.check_once()
    assert restarts == [1]
    assert "ab_router v1 (1 of 2 alive)" in supervisor.last_error

    live[("ab_router", "1")] = [17, 18]  # the restarted server's
    assert supervisor.check_once()
    del live[("feedback", "1")]  # the feedback endpoint's only stub killed
    assert not supervisor.check_once() and not supervisor.check_once()
    assert len(restarts) == 2 and "feedback v1 (0 of 1 alive)" in supervisor.last_error

    # A version not READY (loading, unloading: python_instances leaves it out) is not counted.
    live[("feedback", "1")] = [15]
    live[("ab_router", "2")] = [16]
    assert supervisor.check_once()


def test_the_supervisor_backs_off_a_server_that_keeps_failing_after_its_restarts():
    """A server that fails again soon after every restart (a stage crashing on each request) is not
    restarted in a tight loop: each restart within ``stable_s`` of the one before waits twice as long
    (5, 10, 20 s here, at most ``max_backoff_s``), and a server that answered for ``stable_s`` after
    its last restart is restarted at once again."""

    from deployment.supervisor import Supervisor

    now, restarted_at, healthy = [0.0], [], [False]
    server = _supervised_stub(lambda: restarted_at.append(now[0]))

    def probe(url):
        if not healthy[0]:
            raise ConnectionError("stage crashed")

    supervisor = Supervisor(
        server, probe=probe, failures=1, backoff_s=5, max_backoff_s=15, stable_s=60, clock=lambda: now[0]
    )
    for _ in range(60):  # one probe a second, never healthy
        supervisor.check_once()
        now[0] += 1.0
    # at once, then 5, 10 and (capped) 15, 15 s after the restart before
    assert restarted_at == [0, 5, 15, 30, 45], restarted_at
    assert "restart in" in supervisor.last_error and supervisor.restarts == 5

    healthy[0] = True
    for _ in range(60):  # answers for stable_s after the last restart: the backoff resets
        assert supervisor.check_once()
        now[0] += 1.0
    healthy[0] = False
    supervisor.check_once()
    assert restarted_at[-1] == now[0] and supervisor.quick_restarts == 0


def test_the_supervisor_backoff_grows_to_max_backoff_s_while_the_server_never_answers():
    """The defaults (5 s doubling to 300 s, reset after the server answered for 120 s): a server that
    never answers after its restarts waits 5, 10, ... 160 and then 300 s between them. The backoff
    reset once 120 s had passed since a restart, answered or not, so it never waited more than
    120 s and went back to 5 s after each 120 s wait."""

    from deployment.supervisor import Supervisor

    now, restarted_at = [0.0], []
    server = _supervised_stub(lambda: restarted_at.append(now[0]))

    def probe(url):
        raise ConnectionError("stage crashed")

    supervisor = Supervisor(server, probe=probe, failures=1, clock=lambda: now[0])
    for _ in range(1000):
        supervisor.check_once()
        now[0] += 1.0
    waits = [b - a for a, b in zip(restarted_at, restarted_at[1:])]
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300], waits


def test_the_supervisor_outlasts_a_server_that_never_comes_back():
    """A server that cannot start (a model that never loads, a port taken for good): every restart
    raises, and the supervisor backs off to ``max_backoff_s`` and tries again, for as long as it runs.
    After 1024 quick restarts (3.5 days at 300 s each) ``backoff_s * 2**quick_restarts`` raised
    OverflowError out of ``check_once``, which ended the supervising thread: nothing restarted the
    server any more, and serve.py --supervise went on without a word."""
    from deployment.supervisor import Supervisor

    now, attempts = [0.0], []

    def restart():
        attempts.append(now[0])
        raise RuntimeError("model failed to load")

    server = _supervised_stub(restart)
    server.process = None  # the failed start stopped it

    supervisor = Supervisor(server, probe=lambda url: None, failures=2, clock=lambda: now[0])
    for _ in range(2200):
        assert not supervisor.check_once()
        now[0] += 301.0  # past max_backoff_s (300 s) at every other probe
    assert len(attempts) == 1100 and supervisor.quick_restarts == 1099 and supervisor.restarts == 0
    now[0] = attempts[-1]  # just after the last restart: the whole (capped) backoff is ahead
    assert supervisor.restart_delay() == supervisor.max_backoff_s
    assert supervisor.last_error == "restart failed: RuntimeError: model failed to load"


def test_the_supervising_thread_survives_an_unexpected_error_in_a_check():
    """An exception out of ``check_once`` (a bug, as the backoff's OverflowError above) ended the
    thread, and with it the supervision; it is logged and the next check runs."""
    from deployment.supervisor import Supervisor, wait_until

    server = _supervised_stub(lambda: None, startup_timeout=5.0)
    supervisor = Supervisor(server, probe=lambda url: None, interval_s=0.01)
    checks = []

    def check_once():
        checks.append(1)
        if len(checks) == 1:
            raise OverflowError("int too large to convert to float")
        return True

    supervisor.check_once = check_once
    supervisor.start()
    try:
        assert wait_until(lambda: len(checks) >= 3, timeout_s=10, interval_s=0.01), checks
        assert supervisor._thread.is_alive()
        assert supervisor.last_error == "supervisor error: OverflowError: int too large to convert to float"
    finally:
        supervisor.stop()


def test_the_supervisor_does_not_restart_the_server_once_it_is_asked_to_stop():
    """``stop`` while a probe is in flight (a stuck server's probe takes its 10 s timeout): the failed
    probe used to restart the server anyway, and ``scripts/serve.py`` waited for every model to load
    again before it stopped."""
    import threading

    from deployment.supervisor import Supervisor, wait_until

    restarts, probing, release = [], threading.Event(), threading.Event()
    server = _supervised_stub(lambda: restarts.append(1), startup_timeout=5.0)

    def probe(url):
        probing.set()
        release.wait(10)
        raise ConnectionError("deadline exceeded")

    supervisor = Supervisor(server, probe=probe, interval_s=0.01, failures=1).start()
    assert probing.wait(10)
    stopping = threading.Thread(target=supervisor.stop)
    stopping.start()
    assert wait_until(supervisor._stop.is_set, timeout_s=10, interval_s=0.01)
    release.set()
    stopping.join(10)
    assert not stopping.is_alive() and restarts == [], restarts


def test_the_supervisor_stops_at_once_while_a_restarted_server_loads(tmp_path, monkeypatch):
    """``stop(cancel_restart=True)`` (serve.py --supervise on Ctrl-C or SIGTERM) while a restart waits
    for the models to load: the stop waited for the whole start (up to its 420 s timeout, the join up
    to 30 s more), so serve.py ignored the signal that long. The restart is cancelled and its process
    group stopped. A plain ``stop`` lets the restart finish: the server it started keeps serving
    (test_triton_integration's supervisor test stops supervising once the funnel answers again)."""
    import sys
    import time

    from deployment.server import TritonServer
    from deployment.supervisor import Supervisor, wait_until

    repo = tmp_path / "repo"
    repo.mkdir()
    loading = [sys.executable, "-c", "import time; time.sleep(600)"]  # a server whose models never load
    monkeypatch.setattr(TritonServer, "command", lambda self: loading)
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=20)

    def probe(url):
        raise ConnectionError("down")

    supervisor = Supervisor(server, probe=probe, interval_s=0.01, failures=1).start()
    try:
        assert wait_until(lambda: server.process is not None, timeout_s=10, interval_s=0.01)
        loader = server.process
        began = time.monotonic()
        supervisor.stop(cancel_restart=True)
        took = time.monotonic() - began
        assert took < 10, f"stop took {took:.1f} s"
        assert loader.poll() is not None and server.process is None
        assert "cancelled" in supervisor.last_error, supervisor.last_error
    finally:
        supervisor.stop()
        server.cleanup()


def test_stopping_the_supervisor_lets_a_restart_finish_and_keeps_its_server(tmp_path, monkeypatch):
    """A plain ``stop`` during a restart cancelled it and killed the restarted server (the first
    version of the cancel above), although the caller only stops supervising: the integration test
    found its funnel answering again and ``restarts`` still 0. The restart now finishes first."""
    import threading
    import time

    from deployment.supervisor import Supervisor, wait_until

    loading, release = threading.Event(), threading.Event()

    class Server:
        process = None
        grpc_url = "127.0.0.1:1"
        startup_timeout = 20
        restarted = 0

        def restart(self, cancelled=None):
            loading.set()
            release.wait(10)  # the models load; a stop comes meanwhile
            if cancelled is not None and cancelled():
                raise RuntimeError("cancelled")
            self.restarted += 1

    server = Server()

    def probe(url):
        raise ConnectionError("down")

    supervisor = Supervisor(server, probe=probe, interval_s=0.01, failures=1).start()
    assert wait_until(loading.is_set, timeout_s=10, interval_s=0.01)
    stopper = threading.Thread(target=supervisor.stop)
    stopper.start()
    time.sleep(0.3)  # the stop is asked for while the restart loads (stop() sets its flag at once)
    release.set()
    stopper.join(15)
    assert server.restarted == 1 and supervisor.restarts == 1, supervisor.last_error


def test_a_rollout_waits_until_the_old_router_version_is_unloaded(monkeypatch):
    """``wait_unloaded`` returns once no other version of the router is loaded or unloading (the
    repository index a real server reports), and names the stuck versions when it times out."""
    from deployment import rollout

    states = iter(["READY", "UNLOADING", "UNLOADING", "UNAVAILABLE"])

    class Index:
        calls = 0

        def get_model_repository_index(self, as_json=False):
            Index.calls += 1
            old = next(states, "UNAVAILABLE")
            return {
                "models": [
                    {"name": "ab_router", "version": "1", "state": old},
                    {"name": "ab_router", "version": "2", "state": "READY"},
                    {"name": "funnel", "version": "1", "state": "READY"},
                ]
            }

    monkeypatch.setattr(rollout.time, "sleep", lambda s: None)
    rollout.wait_unloaded(Index(), "ab_router", 2, timeout_s=5)
    assert Index.calls == 4  # READY, UNLOADING, UNLOADING, then gone

    class Stuck:
        def get_model_repository_index(self, as_json=False):
            return {"models": [{"name": "ab_router", "version": "1", "state": "UNLOADING"}]}

    with pytest.raises(RuntimeError, match=r"ab_router versions \['1'\] were still unloading"):
        rollout.wait_unloaded(Stuck(), "ab_router", 2, timeout_s=0)


def test_the_stub_is_never_rewritten_in_place(tmp_path):
    """A retried server start prepares its backend folder again while the stalled server's stubs
    may still run the stub binary (writing into it: "Text file busy"): an identical stub is left
    alone, a different one is replaced by a rename, so the running file is never opened for writing."""
    from deployment.server import install_executable, prepare_backend_dir

    stub = prepare_backend_dir(tmp_path / "backends") / "python" / "triton_python_backend_stub"
    first = stub.stat().st_ino
    prepare_backend_dir(tmp_path / "backends")
    assert stub.stat().st_ino == first  # identical: untouched
    source = tmp_path / "new_stub"
    source.write_bytes(b"another build")
    install_executable(source, stub)
    assert stub.read_bytes() == b"another build" and stub.stat().st_ino != first  # a new file, renamed over
    assert [p.name for p in stub.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_statistics_are_read_once_they_count_the_whole_load():
    """Triton reports a batch's statistics after its responses: a reading as the last response
    arrives missed 59 -> 73. ``wait_until_counted`` reads again until the count arrives, over every
    version of the model, and gives up after its timeout with what it found."""
    from benchmarks.loadgen import wait_until_counted

    class Statistics:  # Triton's get_inference_statistics answer, one batch reported late
        def __init__(self, counts):
            self.counts, self.reads = counts, 0

        def get_inference_statistics(self, model, as_json=False):
            self.reads += 1
            first, second = self.counts[min(self.reads, len(self.counts)) - 1]
            return {
                "model_stats": [
                    {"name": model, "version": "1", "inference_count": str(first)},
                    {"name": model, "version": "2", "inference_count": str(second)},
                ]
            }

    late = Statistics([(59, 0), (59, 0), (70, 3)])
    assert wait_until_counted(late, "fused_funnel", 73) == 73 and late.reads == 3
    never = Statistics([(59, 0)])
    assert wait_until_counted(never, "fused_funnel", 73, timeout_s=0.2) == 59 and never.reads > 1


def test_the_reading_after_a_load_of_unknown_size_waits_for_the_last_count():
    """After ``perf_analyzer``'s load (how many requests it sent is not known here), the batching
    benchmark and the fused funnel's test read the stages' statistics at once: the full suite once
    read 1,303 requests where Triton counted 1,304 a moment later. ``settled_stage_stats`` reads
    once the entry model's count has stopped moving."""
    from benchmarks.benchmark_batching import settled_stage_stats, stage_stats

    class Statistics:  # Triton counts the last request after its response, between two reads
        def __init__(self):
            self.reads = 0

        def get_inference_statistics(self, model, as_json=False):
            self.reads += 1
            count = 1303 if self.reads == 1 else 1304
            return {"model_stats": [{"name": "fused_funnel", "version": "1", "inference_count": str(count)}]}

    assert stage_stats(Statistics())["fused_funnel"]["requests"] == 1303  # the reading as the load ends
    late = Statistics()
    assert settled_stage_stats(late, "fused_funnel", quiet_s=0.01)["fused_funnel"]["requests"] == 1304
    assert late.reads >= 3  # read until two readings agree, then once more for every stage


def test_online_counters_are_read_from_a_scrape_that_began_after_they_settled(monkeypatch):
    """A scrape reads ``online_clicks_total`` before ``online_feedback_total`` (and impressions before
    the router's latency count), while the recorder adds a batch's clicks before the feedback count it
    adds last: the first scrape that counts every feedback request can miss the last batch's click.
    ``online_counters`` returned that scrape; the A/B test on the live server then compares each arm's
    click counter with the log's clicks. It now reads the scrape after one that settled."""
    import serving.metrics
    from online.ab_experiment import online_counters

    def reading(clicks: float) -> dict:
        arm = {"arm": "control", "version": "1"}
        return {
            "online_requests_total": [(arm, 4.0)],
            "online_impressions_total": [(arm, 40.0)],
            "online_request_latency_ms_count": [({"arm": "control"}, 4.0)],
            "online_clicks_total": [(arm, clicks)],
            "online_feedback_total": [(arm, 3.0)],
        }

    readings = [reading(2.0), reading(3.0)]  # the last click recorded between reading it and the count
    monkeypatch.setattr(
        serving.metrics, "scrape", lambda url, timeout=5.0: readings.pop(0) if len(readings) > 1 else readings[0]
    )
    counters = online_counters("http://metrics", requests=4, feedback=3, timeout=1.0).set_index("arm")
    assert counters.loc["control", "click"] == 3.0 and counters.loc["control", "requests"] == 4.0


def test_online_counters_that_keep_moving_time_out_saying_so(monkeypatch):
    """Counters that reached what was asked but never held still (traffic still flowing) timed out with
    "did not reach 4 requests", which they had. The message now says they kept moving."""
    import itertools

    import serving.metrics
    from online.ab_experiment import online_counters

    moving = itertools.count(4)

    def reading(url, timeout=5.0):
        n = float(next(moving))
        return {
            "online_requests_total": [({"arm": "control", "version": "1"}, n)],
            "online_request_latency_ms_count": [({"arm": "control"}, n)],
            "online_feedback_total": [({"arm": "control", "version": "1"}, 3.0)],
        }

    monkeypatch.setattr(serving.metrics, "scrape", reading)
    with pytest.raises(TimeoutError, match="did not hold still"):
        online_counters("http://metrics", requests=4, feedback=3, timeout=0.2)


def test_item_aliases_read_a_duplicates_raw_id_as_its_canonical_id(tmp_path):
    from serving.item_aliases import FILE, ItemAliases
    from workflows.dedup import duplicate_ids

    mapping = pd.DataFrame({"item_id": [1, 2, 3, 4, 5], "canonical_item_id": [1, 1, 3, 3, 5]})
    table = duplicate_ids(mapping)
    assert table.values.tolist() == [[2, 1], [4, 3]]
    table.to_parquet(tmp_path / FILE, index=False)
    aliases = ItemAliases.load(tmp_path)
    assert len(aliases) == 2
    assert aliases.canonical_ids([4, 2, 1, 7, 4]).tolist() == [3, 1, 1, 7, 3]  # order, length and unknowns kept
    assert aliases.canonical_ids(np.zeros(0, np.int64)).tolist() == []
    none = ItemAliases.load(tmp_path / "older-version")  # exported before the table existed
    assert len(none) == 0 and none.canonical_ids([2, 4]).tolist() == [2, 4]
    with pytest.raises(ValueError, match="two canonical ids"):
        ItemAliases(np.array([2, 2]), np.array([1, 3]))


def test_load_throughput_counts_answered_requests_only():
    """A refused request returns at once: 100 answers and 900 errors in one second were reported as
    1,000 requests/s, and a load the server refused entirely as 900, meeting the benchmarks' targets."""
    from benchmarks.loadgen import LoadReport, Request, Result

    answered = [Result(Request(1, 10), 0.010) for _ in range(100)]
    refused = [Result(Request(1, 10), 0.001, error="UNAVAILABLE") for _ in range(900)]
    summary = LoadReport(answered + refused, wall_s=1.0).summary()
    assert (summary["requests"], summary["ok"], summary["errors"]) == (1000, 100, 900)
    assert summary["requests_per_s"] == 100.0 and summary["p50_ms"] == pytest.approx(10.0)
    assert LoadReport(refused, wall_s=1.0).summary()["requests_per_s"] == 0.0


def test_the_client_refuses_a_request_value_its_tensor_cannot_hold(monkeypatch):
    """``recommend`` cast its arguments into the request's tensors with numpy, which wraps and truncates:
    ``k=2**32 + 5`` was sent as ``k=5``, ``user_id=1.9`` as user 1 and an excluded id 7.5 as 7, each
    answered as if asked; a NaN user or an id past int64 raised numpy's ValueError / OverflowError naming
    no input. Now ``BadRequest`` (``INVALID_ARGUMENT``) naming the input, before anything is sent."""
    from serving.client import BadRequest, FunnelClient

    class Sent(Exception):
        pass

    def infer(model, inputs, **kw):
        sent.append(inputs)
        raise Sent

    sent = []
    client = FunnelClient("127.0.0.1:1")  # never connected: infer is replaced
    monkeypatch.setattr(client.client, "infer", infer)
    for kwargs, name in [
        ({"user_id": 1, "k": 2**32 + 5}, "k"),
        ({"user_id": 1, "k": 2**31}, "k"),
        ({"user_id": 1, "k": 10.7}, "k"),
        ({"user_id": 1.9, "k": 10}, "user_id"),
        ({"user_id": float("nan"), "k": 10}, "user_id"),
        ({"user_id": 2**63, "k": 10}, "user_id"),
        ({"user_id": 1, "k": 10, "exclude_item_ids": [3, 7.5]}, "exclude_item_ids"),
        ({"user_id": 1, "k": 10, "exclude_item_ids": [2**64]}, "exclude_item_ids"),
    ]:
        with pytest.raises(BadRequest, match=name) as err:
            client.recommend(**kwargs)
        assert "INVALID_ARGUMENT" in str(err.value.status())
    with pytest.raises(BadRequest, match="item_ids"):
        client.send_feedback("r1", [4.5], ["click"], [1.0])
    with pytest.raises(BadRequest, match="'item_ids': 2, 'events': 1, 'values': 1"):  # was numpy's ValueError
        client.send_feedback("r1", [4, 5], ["click"], [1.0])
    for args, name in [  # were AttributeError ('int' object has no attribute 'encode') and numpy's ValueError
        ((7, [4], ["click"], [1.0]), "request_id"),
        (("r1", [4], [1], [1.0]), "events"),
        (("r1", [4], ["click"], ["abc"]), "values"),
    ]:
        with pytest.raises(BadRequest, match=name):
            client.send_feedback(*args)
    assert sent == []
    with pytest.raises(Sent):  # numpy integers and no exclusions pass
        client.recommend(np.int64(7), np.int32(3), exclude_item_ids=[])
    assert [i.name() for i in sent[0]] == ["user_id", "k", "exclude_item_ids"] and sent[0][2].shape() == [0]
    with pytest.raises(Sent):  # a whole-number float is an id (an id column with a gap reads as float)
        client.recommend(7.0, 3, exclude_item_ids=np.array([5.0]))
    client.close()


def test_the_client_takes_excluded_ids_as_any_iterable_and_names_a_value_that_is_no_integer(monkeypatch):
    """``exclude_item_ids={3, 7}`` (a set, the natural type for "leave these out"), a frozenset, a tuple
    of numpy ints or a generator was one object to numpy and refused as "must hold integers", naming
    nothing; [1, "a"] named numpy's dtype <U21. Now any iterable of integers is sent, a value that is
    none names itself and its type; ``send_feedback`` pairs its lists by position, so a set there
    (whose order is arbitrary) is refused as unordered, and a generator is read in order."""
    from serving.client import BadRequest, FunnelClient

    class Sent(Exception):
        pass

    def infer(model, inputs, **kw):
        sent.append({i.name(): i for i in inputs})
        raise Sent

    sent = []
    client = FunnelClient("127.0.0.1:1")  # never connected: infer is replaced
    monkeypatch.setattr(client.client, "infer", infer)
    for excluded in ({3, 7}, frozenset({3, 7}), (np.int64(3), 7), (i for i in (3, 7)), range(3, 8, 4)):
        with pytest.raises(Sent):
            client.recommend(1, 5, exclude_item_ids=excluded)
        assert sent[-1]["exclude_item_ids"].shape() == [2], excluded
    for excluded, shown in [([1, "a"], "'a' (str)"), ({1, None}, "None (NoneType)"), ((1, 2.5), "2.5")]:
        with pytest.raises(BadRequest, match=re.escape(shown)):
            client.recommend(1, 5, exclude_item_ids=excluded)
    with pytest.raises(Sent):
        client.send_feedback("r1", (i for i in (4, 5)), iter(["click", "like"]), (1.0, 1.0))
    assert sent[-1]["item_ids"].shape() == [2] and sent[-1]["events"].shape() == [2]
    for args, name in [
        (("r1", {4, 5}, ["click", "like"], [1.0, 1.0]), "item_ids"),
        (("r1", [4, 5], {"click", "like"}, [1.0, 1.0]), "events"),
    ]:
        with pytest.raises(BadRequest, match=f"{name} pairs with the other lists by position"):
            client.send_feedback(*args)
    client.close()


@pytest.mark.parametrize("folder", ["v%31", "a#b", "a?b"])
def test_the_online_store_opens_its_own_file_whatever_the_folder_is_called(tmp_path, folder):
    """The store was opened by an SQLite URI built from the bare path: a folder named ``v%31`` read the
    store of folder ``v1`` (``%31`` decodes to ``1``: another version's users and features), and a ``#``
    or ``?`` in the path cut it there, opening some other file read-write. Now the path is quoted."""
    from serving.online_store import OnlineStore, build_online_store

    def store(name: str, age: int):
        (tmp_path / name).mkdir()
        users = pd.DataFrame({"user_id_raw": [1], "age": [age], "x": [0.5]})
        items = pd.DataFrame({"item_id": [0], "item_id_raw": [10]})
        history = pd.DataFrame({"user_id_raw": [1], "item_id_raw": [10]})
        build_online_store(tmp_path / name / "store.sqlite", users, ["age"], ["x"], history, items)

    store("v1", 99)
    store(folder, 7)
    online = OnlineStore(tmp_path / folder / "store.sqlite", ["age"], ["x"])
    assert online.user_features(1)[0].tolist() == [7]
    online.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["v1", folder])  # nothing else created


def test_the_online_store_writes_its_users_without_a_python_step_per_user(tmp_path):
    """The histories and recent events were written from a pandas groupby, one new frame or series per
    user (~200 Python calls each): at 200,000 users that was half of ``export_repository``'s 14 s.
    Now each user's rows are slices of whole-column arrays; the blobs are the same, and the Python
    calls stay far below one per row. On the old code the call-count bound failed (~200 per user)."""
    import sqlite3
    import sys

    from serving.online_store import OnlineStore, build_online_store

    rng = np.random.default_rng(0)
    n = 3000
    users = pd.DataFrame({"user_id_raw": np.arange(n) * 7 + 5, "age": rng.integers(0, 9, n), "x": rng.random(n)})
    items = pd.DataFrame({"item_id": np.arange(3, 503), "item_id_raw": np.arange(500) * 3 + 1})
    history = pd.DataFrame(
        {
            "user_id_raw": rng.choice(users["user_id_raw"], 20 * n),
            "item_id_raw": rng.choice(items["item_id_raw"], 20 * n),
        }
    )
    recent = pd.DataFrame(
        {
            "user_id": rng.choice(users["user_id_raw"], 10 * n),
            "timestamp": rng.integers(0, 50, 10 * n),  # ties: kept in their given order
            "click": rng.integers(0, 2, 10 * n),
        }
    )
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        build_online_store(tmp_path / "store.sqlite", users, ["age"], ["x"], history, items, recent)
    finally:
        sys.setprofile(None)
    assert calls < 10 * n, calls

    encoded = dict(zip(items["item_id_raw"], items["item_id"]))
    online = OnlineStore(tmp_path / "store.sqlite", ["age"], ["x"])
    for user in users["user_id_raw"]:
        seen = history.loc[history["user_id_raw"] == user, "item_id_raw"].map(encoded)
        assert online.history(user).tolist() == sorted(set(seen))
        rows = recent[recent["user_id"] == user].sort_values("timestamp", kind="stable")
        stamps, clicks = online.recent_events(user)
        assert stamps.tolist() == rows["timestamp"].tolist() and clicks.tolist() == rows["click"].tolist()
    online.close()
    with sqlite3.connect(tmp_path / "store.sqlite") as con:  # a row for every user with events, none else
        assert con.execute("SELECT COUNT(*) FROM user_history").fetchone()[0] == history["user_id_raw"].nunique()
        assert con.execute("SELECT COUNT(*) FROM user_events").fetchone()[0] == recent["user_id"].nunique()


def test_the_client_refuses_a_user_id_or_k_that_is_not_one_value(monkeypatch):
    """``recommend(user_id=[1, 2])`` (or an empty ``k``) raised tritonclient's bare
    ``InferenceServerException`` ("got unexpected numpy array shape [2,], expected [1]"), neither
    ``BadRequest`` nor ``ServerFault``, naming no input. Now ``BadRequest`` naming it, before sending."""
    from serving.client import BadRequest, FunnelClient

    client = FunnelClient("127.0.0.1:1")  # never connected: infer must not be reached
    monkeypatch.setattr(client.client, "infer", lambda *a, **kw: pytest.fail("sent"))
    for kwargs, name in [
        ({"user_id": [1, 2], "k": 3}, "user_id"),
        ({"user_id": [], "k": 3}, "user_id"),
        ({"user_id": 1, "k": [3, 4]}, "k"),
        ({"user_id": 1, "k": []}, "k"),
    ]:
        with pytest.raises(BadRequest, match=name) as err:
            client.recommend(**kwargs)
        assert "INVALID_ARGUMENT" in str(err.value.status())
    client.close()


def test_a_closed_client_says_it_was_closed(silent_grpc_server):
    """A call after ``close()`` (or after the ``with`` block) raised gRPC's bare ``ValueError("Cannot invoke
    RPC on closed channel!")``, naming neither the client nor its server. Now ``ClientClosed`` (a
    ``RuntimeError``) naming the call, the address and that the client was closed; closing twice is fine."""
    from serving.client import ClientClosed, FunnelClient

    with FunnelClient(silent_grpc_server, timeout_s=0.5) as client:
        pass
    for call in (lambda: client.recommend(1, 5), lambda: client.send_feedback("r", [1], ["click"], [1.0])):
        with pytest.raises(ClientClosed, match=rf"on a FunnelClient for {silent_grpc_server} that was closed"):
            call()
    assert issubclass(ClientClosed, RuntimeError) and not issubclass(ClientClosed, ValueError)
    client.close()


def test_the_client_names_the_server_and_the_timeout_when_no_answer_comes(silent_grpc_server):
    """A server that took the call and never answered raised ``ServerFault("[StatusCode.DEADLINE_EXCEEDED]
    Deadline Exceeded")`` after ``timeout_s`` (30 s by default): neither the server's address nor how long
    the client had waited (``scripts/query.py`` printed just that). Now it names both, as ``ControlClient``
    does, still a ``ServerFault`` with the status code, within the timeout."""
    import time

    from serving.client import FunnelClient, ServerFault
    from serving.interface import FEEDBACK, FUNNEL

    with FunnelClient(silent_grpc_server, timeout_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(ServerFault, match=rf"{silent_grpc_server} did not answer {FUNNEL} within 0.5 s") as err:
            client.recommend(1, 5)
        assert time.monotonic() - started < 5
        assert "DEADLINE_EXCEEDED" in str(err.value.status())
        with pytest.raises(ServerFault, match=rf"{silent_grpc_server} did not answer {FEEDBACK} within 0.5 s"):
            client.send_feedback("r", [1], ["click"], [1.0])


@pytest.mark.parametrize(
    "url", ["localhost", "127.0.0.1", "::1", "[::1]", "localhost:", "host:0", "http://localhost:8001"]
)
def test_the_client_refuses_an_address_without_a_port_when_it_is_made(url):
    """``FunnelClient("localhost")`` was made, and its first call failed with gRPC's "failed to connect to
    all addresses; last error: ... ipv4:127.0.0.1:443" (``::1``: ``...:0``), naming neither the address
    given nor that it lacked a port. Now ``ValueError`` naming it and the form it wants, before any call."""
    from serving.client import FunnelClient

    with pytest.raises(ValueError, match=re.escape(f"{url!r} is not a gRPC address: expected host:port")):
        FunnelClient(url)


def test_the_client_still_dials_every_form_of_address_grpc_takes(silent_grpc_server, tmp_path):
    """The check on the address keeps what gRPC accepts: host:port, dns:///host:port, ipv4:addr:port,
    [v6]:port and unix sockets (each reaches its server: the call times out or is unimplemented, never
    UNAVAILABLE)."""
    from concurrent import futures

    import grpc

    from serving.client import FunnelClient, ServerFault

    port = silent_grpc_server.rsplit(":", 1)[1]
    socket = tmp_path / "grpc.sock"
    unix = grpc.server(futures.ThreadPoolExecutor(1))
    unix.add_insecure_port(f"unix:{socket}")
    unix.start()
    urls = [f"localhost:{port}", f"dns:///127.0.0.1:{port}", f"ipv4:127.0.0.1:{port}", f"unix:{socket}"]
    try:
        for url in urls:
            with FunnelClient(url, timeout_s=0.3) as client:
                with pytest.raises(ServerFault) as err:
                    client.recommend(1, 5)
                # the silent server never answers (DEADLINE_EXCEEDED); the bare unix one has no funnel (UNIMPLEMENTED)
                assert "UNAVAILABLE" not in str(err.value.status()), (url, err.value)
    finally:
        unix.stop(0)
    FunnelClient("[::1]:8001").close()  # made (no IPv6 loopback is promised here, so not dialed)


class StandInControl:
    """``ControlClient`` for the rollout script's tests: a server that answers the control plane."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def get_model_repository_index(self, client_timeout=None):
        return []


def test_the_rollout_script_rolls_back_to_a_version_still_on_disk(tmp_path, monkeypatch):
    """``scripts/rollout.py --version 1`` after a 1 -> 2 roll without ``--retire`` (docs/deployment.md:
    rolling back is the same command with an older ``--version``): version 1 is still in the
    repository, and the script's ``add_version`` refused it ("already in") before anything rolled;
    so did a rerun after a failed ``roll_out``. A rerun of the served version must not retire it."""
    import importlib.util
    import json
    import sys
    import types

    from serving.interface import ensemble_name

    spec = importlib.util.spec_from_file_location("_script_rollout", pathlib.Path("scripts/rollout.py").resolve())
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    repo = tmp_path / "triton_repo"
    for version in (1, 2):  # both complete on disk (add_version's own check reads these folders)
        (repo / ensemble_name(version)).mkdir(parents=True)
        (repo / "ordering" / str(version)).mkdir(parents=True)
    (repo / "export.json").write_text(json.dumps({"version": 2}))
    calls = []

    from deployment import security

    monkeypatch.setattr(script.registry, "get", lambda registry, version: types.SimpleNamespace(version=version))
    monkeypatch.setattr(security, "ControlClient", StandInControl)  # the script's key check
    monkeypatch.setattr(script, "roll_out", lambda url, repository, version, **kw: calls.append(("roll_out", version)))
    monkeypatch.setattr(script, "retire", lambda url, repository, version, **kw: calls.append(("retire", version)))
    argv = ["rollout.py", "--repository", str(repo), "--url", "127.0.0.1:1", "--retire", "--version"]
    monkeypatch.setattr(sys, "argv", [*argv, "1"])
    script.main()  # the roll back
    assert calls == [("roll_out", 1), ("retire", 2)]
    calls.clear()
    monkeypatch.setattr(sys, "argv", [*argv, "2"])
    (repo / "export.json").write_text(json.dumps({"version": 2}))
    script.main()  # a rerun of the version served: rolled (a no-op), not retired
    assert calls == [("roll_out", 2)]


def test_an_ab_test_named_like_no_experiment_is_refused():
    """``roll_out`` reads a rollout named ``none`` as no experiment and pins every user, the holdout
    included, to one version: an A/B test of that name (from ``online.experiment.name``) was accepted."""
    from configs import load_config
    from serving.assignment import NO_EXPERIMENT, ab_rollout

    with pytest.raises(ValueError, match="'none' names the state without an experiment"):
        ab_rollout(NO_EXPERIMENT, "salt", 1, 2)
    with pytest.raises(ValueError, match="online.experiment.name 'none'"):
        load_config(overrides={"online": {"experiment": {"name": "none"}}})
    assert ab_rollout("none-v2", "salt", 1, 2).experiment.name == "none-v2"


class ReadyTriton:
    """The rollout's Triton control client on a server where every load succeeds and every model is ready."""

    def __init__(self, *args, **kwargs):
        pass

    def is_model_ready(self, name, version=""):
        return True

    def load_model(self, name):
        pass

    def get_model_repository_index(self, as_json=False):
        return {}

    def close(self):
        pass


def test_a_new_router_version_is_readable_by_the_server_like_the_rest_of_the_repository(tmp_path, monkeypatch):
    """``set_rollout`` writes the router version in a ``tempfile.mkdtemp`` folder and renames it into
    place: it kept mkdtemp's mode 0700, so a server running as another user (the image's, the
    repository mounted read-only) failed to load it, and so did ``roll_out`` at its router step."""
    import os
    import stat

    from deployment import rollout
    from serving.assignment import single_version
    from serving.interface import ROUTER

    repo = tmp_path / "triton_repo"
    (repo / ROUTER / "1").mkdir(parents=True)
    (repo / ROUTER / "1" / "model.py").write_text("pass\n")

    monkeypatch.setattr(rollout, "ControlClient", ReadyTriton)
    monkeypatch.setattr(rollout, "arm_versions", lambda repo, rollout: [2])
    umask = os.umask(0o022)
    try:
        assert rollout.set_rollout("127.0.0.1:1", repo, single_version(2)) == 2
    finally:
        os.umask(umask)
    assert stat.S_IMODE((repo / ROUTER / "2").stat().st_mode) == 0o755
    assert rollout.current_rollout(repo).control_version == 2


def test_a_new_router_version_is_on_disk_before_its_rename_publishes_it(tmp_path, monkeypatch, request):
    """``set_rollout`` renamed the router version's folder into place unsynced: after a power cut soon
    after, ``router/<N>`` (the newest, which Triton serves and ``current_rollout`` reads) could hold an
    empty or cut-short rollout file. Its files are now synced before the rename, ``router/`` after it."""

    from deployment import rollout
    from serving.assignment import single_version
    from serving.interface import EXPERIMENT_FILE, ROUTER

    repo = tmp_path / "triton_repo"
    (repo / ROUTER / "1").mkdir(parents=True)
    (repo / ROUTER / "1" / "model.py").write_text("pass\n")
    monkeypatch.setattr(rollout, "ControlClient", ReadyTriton)
    monkeypatch.setattr(rollout, "arm_versions", lambda repo, rollout: [2])
    record = request.getfixturevalue("sync_recorder")
    assert rollout.set_rollout("127.0.0.1:1", repo, single_version(2)) == 2
    monkeypatch.undo()
    published = repo / ROUTER / "2"
    assert {p.name for p in [published, *published.rglob("*")]} >= {"2", "model.py", EXPERIMENT_FILE}  # and bytecode
    assert record.missed(published) == []
    assert record.parent_synced(published)  # the rename itself


def test_the_client_answers_a_user_id_given_as_a_one_value_list(monkeypatch):
    """``recommend(user_id=[5])`` is one value, so it was sent and answered (by the A/B router, with an
    impression logged under a new request id), and then ``int([5])`` raised a ``TypeError`` building
    the ``Recommendations``: the answer and its request id were lost. The user id is the one sent."""
    from serving.client import FunnelClient

    class Result:
        def as_numpy(self, name):
            return {
                "item_ids": np.array([4, 2], dtype=np.int64),
                "scores": np.array([0.9, 0.5], dtype=np.float32),
                "model_version": np.array([b"3"], dtype=object),
                "served_by": np.array([b"model"], dtype=object),
                "stage_counts": np.array([9, 8, 7, 6, 2], dtype=np.int64),
            }[name]

    client = FunnelClient("127.0.0.1:1")  # never connected: infer is replaced
    monkeypatch.setattr(client.client, "infer", lambda *a, **kw: Result())
    for user_id in ([5], np.array([5]), (5,), 5.0):
        recs = client.recommend(user_id, k=2)
        assert recs.user_id == 5 and type(recs.user_id) is int and recs.item_ids == [4, 2]
    client.close()


def test_rollout_script_reports_a_refused_retire_without_a_traceback(tmp_path, monkeypatch, capsys):
    """``scripts/rollout.py --retire`` of a version an A/B arm still serves: the roll out succeeded,
    then ``retire``'s refusal ended the script in a traceback (exit 1), as if the roll had failed."""
    import runpy
    import sys
    from types import SimpleNamespace

    from deployment import rollout, security
    from models import registry

    def refuse(*args, **kwargs):
        raise ValueError("version 1 still serves an arm of experiment 'e'")

    monkeypatch.setattr(registry, "get", lambda folder, version: SimpleNamespace(version=2))
    monkeypatch.setattr(rollout, "served_version", lambda repo: 1)
    monkeypatch.setattr(rollout, "add_version", lambda model, repo: None)
    monkeypatch.setattr(rollout, "roll_out", lambda *args, **kwargs: None)
    monkeypatch.setattr(rollout, "retire", refuse)
    monkeypatch.setattr(security, "ControlClient", StandInControl)
    script = runpy.run_path("scripts/rollout.py")
    monkeypatch.setattr(sys, "argv", ["rollout.py", "--repository", str(tmp_path / "repo"), "--retire"])
    with pytest.raises(SystemExit) as done:
        script["main"]()
    assert done.value.code == 2
    out = capsys.readouterr()
    assert "serving version 2 (was 1)" in out.out
    assert "version 1 not retired: version 1 still serves an arm of experiment 'e'" in out.err


def repository_serving_1_with_2_added(tmp_path) -> pathlib.Path:
    """A repository of ensembles only: ``funnel`` serving version 1, version 2's pinned ensemble
    added, the A/B router on version 1 alone (for ``roll_out`` with a stand-in control client)."""
    import json

    from deployment import rollout
    from deployment.export import rename_ensemble
    from serving.assignment import single_version
    from serving.interface import EXPERIMENT_FILE, FUNNEL, ROUTER, ensemble_name

    source = pathlib.Path("triton_repo/funnel/config.pbtxt").read_text()
    repo = tmp_path / "triton_repo"
    for version in (1, 2):
        (repo / ensemble_name(version) / "1").mkdir(parents=True)
        pinned = pin_ensemble(source, version)
        (repo / ensemble_name(version) / "config.pbtxt").write_text(rename_ensemble(pinned, ensemble_name(version)))
    (repo / FUNNEL / "1").mkdir(parents=True)
    (repo / FUNNEL / "config.pbtxt").write_text(rollout.serve_only(pin_ensemble(source, 1), 1))
    (repo / ROUTER / "1").mkdir(parents=True)
    (repo / ROUTER / "1" / "model.py").write_text("pass\n")
    (repo / ROUTER / "1" / EXPERIMENT_FILE).write_text(json.dumps(single_version(1).to_dict()))
    (repo / "export.json").write_text(json.dumps({"version": 1}))
    return repo


def test_a_roll_out_whose_router_fails_to_follow_puts_funnel_back_on_the_old_version(tmp_path, monkeypatch):
    """``roll_out`` switched ``funnel`` to version 2, then the A/B router failed to load its new
    rollout: ``funnel`` (and a restart) served 2 while the router routed to 1 and export.json said 1.
    A failed step must leave the old version serving everywhere."""
    from deployment import rollout
    from serving.interface import FUNNEL, ROUTER

    repo = repository_serving_1_with_2_added(tmp_path)
    before = (repo / FUNNEL / "config.pbtxt").read_text()
    loads = []

    class Control(ReadyTriton):
        def load_model(self, name):
            loads.append(name)
            if name == ROUTER:
                raise RuntimeError("simulated: the router failed to load")

    monkeypatch.setattr(rollout, "ControlClient", Control)
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    monkeypatch.setattr(rollout, "load_version", lambda *args, **kwargs: None)
    monkeypatch.setattr(rollout, "arm_versions", lambda repo, rollout: [2])
    with pytest.raises(RuntimeError, match="router failed"):
        rollout.roll_out("127.0.0.1:1", repo, 2)
    assert rollout.router_versions(repo) == [1] and rollout.current_rollout(repo).control_version == 1
    assert rollout.served_version(repo) == 1
    assert rollout.funnel_version(repo) == 1 and (repo / FUNNEL / "config.pbtxt").read_text() == before
    assert not (repo / FUNNEL / "2").exists()
    assert loads == [FUNNEL, ROUTER, ROUTER, FUNNEL]  # funnel 2, the router (refused, then back), funnel 1


def test_a_roll_out_whose_version_folder_cannot_be_made_leaves_funnel_on_the_old_version(tmp_path, monkeypatch):
    """``roll_out`` wrote ``funnel/config.pbtxt`` pinned to the new version, then made its
    ``funnel/<version>`` folder outside the step that restores the old config on failure: a mkdir
    that failed (a full disk, a read-only mount) left the config pinned to a version with no folder,
    an ensemble a restart cannot load, while export.json still said version 1."""
    import pathlib as pl

    from deployment import rollout
    from serving.interface import FUNNEL

    repo = repository_serving_1_with_2_added(tmp_path)
    before = (repo / FUNNEL / "config.pbtxt").read_text()
    real_mkdir = pl.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == repo / FUNNEL / "2":
            raise OSError(28, "simulated: No space left on device")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(rollout, "ControlClient", ReadyTriton)
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    monkeypatch.setattr(rollout, "load_version", lambda *args, **kwargs: None)
    monkeypatch.setattr(rollout, "arm_versions", lambda repo, rollout: [2])
    monkeypatch.setattr(pl.Path, "mkdir", mkdir)
    with pytest.raises(OSError, match="No space left"):
        rollout.roll_out("127.0.0.1:1", repo, 2)
    monkeypatch.undo()
    assert (repo / FUNNEL / "config.pbtxt").read_text() == before
    assert rollout.funnel_version(repo) == 1 and rollout.served_version(repo) == 1
    assert not (repo / FUNNEL / "2").exists()


def test_a_retire_refused_by_the_server_deletes_nothing(tmp_path, monkeypatch):
    """``retire`` of a version whose pinned ensemble an earlier, failed retire had already removed:
    its first keyed call came after the version's stage folders were deleted, so a wrong key (or a
    server that could not be reached) was refused only once they were gone."""
    from deployment import rollout
    from serving.interface import ensemble_name

    repo = repository_serving_1_with_2_added(tmp_path)
    stage = repo / rollout.STAGES[0]
    for version in (1, 2):
        (stage / str(version)).mkdir(parents=True)
    (stage / "config.pbtxt").write_text("name: stage\n")
    rollout.shutil.rmtree(repo / ensemble_name(2))  # what the failed retire got to

    class WrongKey(ReadyTriton):
        def get_model_repository_index(self, as_json=False):
            raise RuntimeError("simulated: the server refused the admin key")

        load_model = unload_model = get_model_repository_index

    monkeypatch.setattr(rollout, "ControlClient", WrongKey)
    with pytest.raises(RuntimeError, match="refused the admin key"):
        rollout.retire("127.0.0.1:1", repo, 2)
    assert (stage / "2").is_dir() and (stage / "1").is_dir()


def test_a_roll_outs_config_and_export_record_are_on_disk_before_they_replace_the_old(
    tmp_path, monkeypatch, sync_recorder
):
    """``roll_out`` rewrote ``funnel/config.pbtxt`` (the version a restart serves) and ``export.json``
    with a replace and no sync: after a power cut the new file could be empty, and the server would
    not start or ``served_version`` could not read the repository. Each is now synced before its
    replace, its folder after."""
    from deployment import rollout
    from serving.interface import FUNNEL

    repo = repository_serving_1_with_2_added(tmp_path)
    monkeypatch.setattr(rollout, "ControlClient", ReadyTriton)
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    monkeypatch.setattr(rollout, "load_version", lambda *args, **kwargs: None)
    monkeypatch.setattr(rollout, "arm_versions", lambda repo, rollout: [2])
    rollout.roll_out("127.0.0.1:1", repo, 2)
    monkeypatch.undo()
    assert rollout.served_version(repo) == 2 and rollout.funnel_version(repo) == 2
    for target in (repo / FUNNEL / "config.pbtxt", repo / "export.json"):
        assert target in sync_recorder.published, target
        assert sync_recorder.missed(target) == [], target
        assert sync_recorder.parent_synced(target), target


def test_add_version_warns_when_the_versions_batching_differs_from_the_repositorys(tmp_path, monkeypatch, caplog):
    """One ``config.pbtxt`` serves every version of a stage, and ``add_version`` moves in only the new
    version's folders: its own batching (``serving.batching`` or the ``batching`` argument) was
    dropped in silence while the repository's kept serving."""
    import logging
    import types

    from configs import BatchingConfig
    from deployment import rollout
    from deployment.export import STAGE_ARTIFACTS, configure_batching
    from serving.interface import ensemble_name

    def write(repo, version, batching):
        for stage in STAGE_ARTIFACTS:
            (repo / stage / str(version)).mkdir(parents=True)
            config = (TRITON_REPO_SOURCE / stage / "config.pbtxt").read_text()
            (repo / stage / "config.pbtxt").write_text(configure_batching(config, stage, batching))
        (repo / ensemble_name(version)).mkdir(parents=True)
        return repo

    repo = write(tmp_path / "triton_repo", 1, BatchingConfig())
    for version, batching, warned in ((2, BatchingConfig(), False), (3, BatchingConfig(max_batch_size=8), True)):
        monkeypatch.setattr(
            rollout, "export_repository", lambda model, out, batching=None, b=batching, v=version: write(out, v, b)
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deployment.rollout"):
            assert rollout.add_version(types.SimpleNamespace(version=version), repo) == version
        assert ("version 3's heavy_ranker settings" in caplog.text) == warned, caplog.text
        assert ("'max_batch_size': 8" in caplog.text and "'max_batch_size': 64" in caplog.text) == warned


def test_a_rollout_gives_up_on_a_server_that_never_answers(silent_grpc_server, tmp_path, monkeypatch):
    """The rollout's control calls (readiness, loads, unloads) had no gRPC deadline: ``wait_ready``'s
    ``timeout_s`` was only checked between calls, so a server that took a call and never answered
    held ``roll_out``, ``retire`` and scripts/rollout.py forever. Now a read waits ``CALL_TIMEOUT_S``,
    a load or unload ``timeout_s``, and the error names the server and the call."""
    import json
    import time

    from deployment import rollout, security
    from serving.interface import FUNNEL, ensemble_name

    monkeypatch.setenv(security.ADMIN_KEY_ENV, "k" * 32)
    monkeypatch.setattr(rollout, "CALL_TIMEOUT_S", 0.5)
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    source = pathlib.Path("triton_repo/funnel/config.pbtxt").read_text()
    repo = tmp_path / "triton_repo"
    (repo / FUNNEL / "2").mkdir(parents=True)
    (repo / FUNNEL / "config.pbtxt").write_text(rollout.serve_only(pin_ensemble(source, 2), 2))
    (repo / ensemble_name(1)).mkdir()
    (repo / "export.json").write_text(json.dumps({"version": 2}))
    start = time.monotonic()
    with pytest.raises(security.ControlTimeout, match=rf"{silent_grpc_server} did not answer is_model_ready\("):
        rollout.roll_out(silent_grpc_server, repo, 1, timeout_s=1.0)
    assert time.monotonic() - start < 10.0
    assert rollout.served_version(repo) == 2 and rollout.funnel_version(repo) == 2  # nothing switched
    start = time.monotonic()
    # retire's first call, the keyed check before anything is deleted, is a read: CALL_TIMEOUT_S
    with pytest.raises(security.ControlTimeout, match=r"get_model_repository_index\(\) within 0.5 s"):
        rollout.retire(silent_grpc_server, repo, 1, timeout_s=1.0)
    assert (repo / ensemble_name(1)).is_dir()  # nothing deleted
    assert time.monotonic() - start < 10.0


def rollout_script_run(tmp_path, monkeypatch, url: str, timeout: str) -> str:
    """scripts/rollout.py's main() rolling version 2 (already in the repository) out over a served
    version 1 at ``url``, the key check answered by ``StandInControl``; the ``SystemExit`` message
    it ended with (the test makes the roll fail)."""
    import importlib.util
    import json
    import sys
    import types

    from deployment import rollout, security
    from serving.interface import FUNNEL, ensemble_name

    spec = importlib.util.spec_from_file_location("_script_rollout", pathlib.Path("scripts/rollout.py").resolve())
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source = pathlib.Path("triton_repo/funnel/config.pbtxt").read_text()
    repo = tmp_path / "triton_repo"
    (repo / FUNNEL / "1").mkdir(parents=True)
    (repo / FUNNEL / "config.pbtxt").write_text(rollout.serve_only(pin_ensemble(source, 1), 1))
    (repo / ensemble_name(2)).mkdir()  # added before: rolled out from the repository
    (repo / "export.json").write_text(json.dumps({"version": 1}))
    monkeypatch.setenv(security.ADMIN_KEY_ENV, "k" * 32)
    monkeypatch.setattr(script.registry, "get", lambda registry, version: types.SimpleNamespace(version=version))
    monkeypatch.setattr(security, "ControlClient", StandInControl)  # the key check answers
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    argv = ["rollout.py", "--repository", str(repo), "--url", url, "--version", "2", "--timeout", timeout]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        script.main()
    message = str(done.value.code)
    assert message.startswith("rollout: rolling out version 2 failed: ") and "\n" not in message, message
    assert message.endswith("serving version 1"), message
    return message


def test_the_rollout_script_reports_a_server_that_stops_answering_in_one_line(
    silent_grpc_server, tmp_path, monkeypatch
):
    """A server that answered the script's key check and then stopped answering held
    scripts/rollout.py forever; now each load waits ``--timeout`` seconds and the tool ends with one
    line naming the server and the call (not a traceback), the repository still serving the old version."""
    from deployment import rollout

    monkeypatch.setattr(rollout, "CALL_TIMEOUT_S", 0.5)
    message = rollout_script_run(tmp_path, monkeypatch, silent_grpc_server, "1")
    assert f"the server at {silent_grpc_server} did not answer is_model_ready(" in message, message


class NeverReadyControl(StandInControl):
    """A server that loads every model and never reports one ready."""

    def load_model(self, *args, **kwargs):
        pass

    def is_model_ready(self, *args, **kwargs):
        return False

    def close(self):
        pass


def test_the_rollout_script_reports_a_stage_that_never_becomes_ready_in_one_line(tmp_path, monkeypatch):
    """``wait_ready``'s "did not become ready" ended scripts/rollout.py with a traceback (a bare
    RuntimeError); it is a ``RolloutError`` now, reported in one line like a call that timed out."""
    from deployment import rollout

    monkeypatch.setattr(rollout, "ControlClient", NeverReadyControl)
    message = rollout_script_run(tmp_path, monkeypatch, "127.0.0.1:1", "0.5")
    assert "did not become ready within 0.5 s" in message, message


def test_a_failed_atomic_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path, monkeypatch):
    """roll_out's replace of funnel/config.pbtxt and export.json: a write that fails (a full disk) left
    its half-written .<name>.tmp-<pid> beside the real file for good."""
    import errno

    from deployment import rollout

    target = tmp_path / "export.json"
    target.write_text('{"version": 1}')

    def full_disk(path, folder=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rollout, "sync_path", full_disk)
    with pytest.raises(OSError, match="No space left"):
        rollout._write_atomic(target, '{"version": 2}')
    assert target.read_text() == '{"version": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json"]


class DiskReadingTriton(ReadyTriton):
    """Triton's control plane as ``follow_rollout`` sees it, one per server (``grpc_url``): stages and
    pinned ensembles ready, and ``funnel`` and the router loaded as on disk *when the load is asked*
    (the explicit load reads the repository then): ``funnel`` at the version its config pins, the
    router at the newest version folder. ``pause`` (url -> Event pair) holds that server's ``funnel``
    load: a ``roll_out`` through it stops between its ``funnel`` config and its router version."""

    repo: pathlib.Path | None = None
    loaded: dict = {}
    pause: dict = {}

    def __init__(self, grpc_url, *args, **kwargs):
        self.url = grpc_url
        self.state = self.loaded.setdefault(grpc_url, {"funnel": 1, "router": 1})

    def load_model(self, name):
        from deployment import rollout
        from serving.interface import FUNNEL, ROUTER

        if name == FUNNEL:
            if self.url in self.pause:
                reached, go = self.pause.pop(self.url)
                reached.set()
                assert go.wait(30)
            self.state["funnel"] = rollout.funnel_version(self.repo)
        elif name == ROUTER:
            self.state["router"] = rollout.router_versions(self.repo)[-1]

    def is_model_ready(self, name, version=""):
        from serving.interface import FUNNEL, ROUTER

        if name == FUNNEL:
            return str(self.state["funnel"]) == str(version)
        if name == ROUTER:
            return str(self.state["router"]) == str(version)
        return True

    def get_model_config(self, name, as_json=False):
        return {"config": {"ensemble_scheduling": {"step": [{"model_version": str(self.state["funnel"])}]}}}


@pytest.mark.parametrize("flock", [True, False])
def test_a_replica_following_while_a_roll_out_is_half_written_never_serves_the_half(tmp_path, monkeypatch, flock):
    """``follow_rollout`` took no lock and read the repository once: run while another replica's
    ``roll_out`` had written ``funnel``'s config (pinned to 2) but not yet the router's version nor
    export.json, it loaded ``funnel`` on 2 beside a router still routing everyone to 1, and returned as
    if it had followed. It now waits for the writer (its lock), or, on a file system without flock,
    reads again until ``funnel`` and export.json agree and nothing changed while it loaded."""
    import fcntl
    import threading

    from deployment import rollout

    repo = repository_serving_1_with_2_added(tmp_path)
    if not flock:  # NFS: the writer and the follower both go on without the lock

        def no_lock(fd, op):
            raise OSError(9, "Bad file descriptor")

        monkeypatch.setattr(fcntl, "flock", no_lock)
    writer, follower = "127.0.0.1:1", "127.0.0.1:2"
    reached, go = threading.Event(), threading.Event()
    monkeypatch.setattr(DiskReadingTriton, "repo", repo)
    monkeypatch.setattr(DiskReadingTriton, "loaded", {follower: {"funnel": 1, "router": 1}})  # it serves 1
    monkeypatch.setattr(DiskReadingTriton, "pause", {writer: (reached, go)})
    monkeypatch.setattr(rollout, "ControlClient", DiskReadingTriton)
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    monkeypatch.setattr(rollout, "FOLLOW_RETRY_S", 0.05, raising=False)

    rolling = threading.Thread(target=rollout.roll_out, args=(writer, repo, 2))
    rolling.start()
    try:
        assert reached.wait(30)  # funnel/config.pbtxt pins 2; the router and export.json still say 1
        assert rollout.funnel_version(repo) == 2 and rollout.router_versions(repo) == [1]
        followed = []
        following = threading.Thread(target=lambda: followed.append(rollout.follow_rollout(follower, repo, 30)))
        following.start()
        following.join(1.0)
        # The old code had returned here: funnel on 2, the router on 1 (single_version(1)), nothing raised.
        assert followed == [] and DiskReadingTriton.loaded[follower] == {"funnel": 1, "router": 1}
    finally:
        go.set()
        rolling.join(30)
    following.join(30)
    assert followed == [2] and rollout.router_versions(repo) == [1, 2]
    assert DiskReadingTriton.loaded[follower] == DiskReadingTriton.loaded[writer] == {"funnel": 2, "router": 2}
    assert rollout.current_rollout(repo).control_version == 2


@pytest.mark.parametrize("timeout_s", [float("inf"), 1e10, float("nan"), 0, -1.0])
def test_rollout_functions_refuse_a_timeout_no_grpc_deadline_carries_before_anything_changes(
    tmp_path, monkeypatch, timeout_s
):
    """``scripts/rollout.py --timeout`` refused inf and values over 1e9 s (``configs.cli.positive_seconds``),
    the library functions did not: ``roll_out(..., timeout_s=float('inf'))`` made every load's gRPC
    deadline overflow ('Deadline Exceeded' at once), and ``retire`` of a version whose pinned ensemble was
    already gone deleted its stage folders before its first load failed. Now ``ValueError`` naming
    ``timeout_s``, before a control client is made or the repository is touched."""
    from deployment import rollout
    from serving.assignment import single_version
    from serving.interface import ensemble_name

    repo = repository_serving_1_with_2_added(tmp_path)
    stage = repo / rollout.STAGES[0]
    for version in (1, 2, 3):
        (stage / str(version)).mkdir(parents=True)
    (stage / "config.pbtxt").write_text("name: stage\n")
    files = {p: p.read_bytes() if p.is_file() else None for p in repo.rglob("*")}
    made = []

    class Control(ReadyTriton):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)

        unload_model = ReadyTriton.load_model

    monkeypatch.setattr(rollout, "ControlClient", Control)
    monkeypatch.setattr(rollout, "check_complete", lambda repo, version: None)
    calls = {
        "roll_out": lambda: rollout.roll_out("127.0.0.1:1", repo, 2, timeout_s=timeout_s),
        "retire": lambda: rollout.retire("127.0.0.1:1", repo, 3, timeout_s=timeout_s),  # no pinned ensemble 3
        "set_rollout": lambda: rollout.set_rollout("127.0.0.1:1", repo, single_version(2), timeout_s=timeout_s),
        "follow_rollout": lambda: rollout.follow_rollout("127.0.0.1:1", repo, timeout_s=timeout_s),
    }
    assert not (repo / ensemble_name(3)).exists()
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"timeout_s must be a finite number of seconds > 0 and at most 1e\+09"):
            call()
        assert made == [], name
        assert {p: p.read_bytes() if p.is_file() else None for p in repo.rglob("*")} == files, name


@pytest.mark.parametrize("timeout_s", [float("inf"), 1e10, 0])
def test_the_grpc_clients_refuse_a_timeout_no_grpc_deadline_carries(timeout_s):
    """``ControlClient``, ``FunnelClient`` and ``confirm_key_with_server`` took ``timeout_s=inf`` (or 1e10)
    and every call then failed at once with gRPC's 'Deadline Exceeded' (the deadline overflowed int64
    nanoseconds), reported as a server that 'did not answer within inf s'. Now ``ValueError`` naming the
    argument when the client is made; None still means no deadline."""
    from deployment import security
    from serving.client import FunnelClient

    key = "k" * 32
    with pytest.raises(ValueError, match=r"^timeout_s must be a finite number"):
        security.ControlClient("127.0.0.1:1", key=key, timeout_s=timeout_s)
    with pytest.raises(ValueError, match=r"^load_timeout_s must be a finite number"):
        security.ControlClient("127.0.0.1:1", key=key, timeout_s=1.0, load_timeout_s=timeout_s)
    with pytest.raises(ValueError, match=r"^timeout_s must be a finite number"):
        FunnelClient("127.0.0.1:1", timeout_s=timeout_s)
    with pytest.raises(ValueError, match=r"^timeout_s must be a finite number"):
        security.confirm_key_with_server("127.0.0.1:1", key=key, timeout_s=timeout_s)
    with security.ControlClient("127.0.0.1:1", key=key) as control:  # no deadline of its own
        with pytest.raises(ValueError, match=r"^client_timeout must be a finite number"):
            control.get_model_repository_index(client_timeout=timeout_s)
        with pytest.raises(ValueError, match=r"^client_timeout must be a finite number"):
            control.is_model_ready("funnel", client_timeout=timeout_s)  # a call that needs no key, too
    FunnelClient("127.0.0.1:1", timeout_s=None).close()
