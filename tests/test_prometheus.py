"""A real Prometheus against the live server: the dashboard's queries, latency quantiles beside the
client's own measurement, and the degradation alert, end to end.

One tritonserver serves the session's export as version 1 and, as version 2, the same model with its
ordering stage's item ids shifted off the catalog (a vocabulary out of sync with the catalog: users
are shown ids that mean nothing to them; measured on the synthetic world, no ordering policy the
config offers lowers CTR enough to be told apart from a holdout of 23 users). The monitoring sidecar
(server process metrics, the live-vs-holdout comparison of the feedback log) and Prometheus run as
``scripts/monitor.py`` runs them, with a 1 s scrape and evaluation interval and the project's rules
with every ``for:`` cut to 5 s. Everything listens on 127.0.0.1 and is stopped at the end.

Skipped, with the reason, where Prometheus is not installed (``make services`` installs it as root).
"""

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

if shutil.which("prometheus") is None or shutil.which("promtool") is None:
    pytest.skip(
        "Prometheus is not installed (Debian package prometheus; `make services` installs it when run as root)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow
# Alert delivery is checked where Debian's prometheus-alertmanager is installed too (make services).
ALERTMANAGER = bool(shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"))

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "funnel-alerts.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "funnel-dashboard.json"
SCRAPE_S = 1.0
FOR = "5s"
# Puts 23 of the world's 300 users in a 5% holdout (the design's largest share) whose equal-model
# comparison is far from significant (p >= 0.5 for every metric below the holdout). With equal models
# about 7% of salts cross the threshold somewhere (three metrics at 2.5% each side): that rate is
# what tests/test_ab_aa.py checks; this test checks the path from the log to a firing alert.
SALT = "monitoring-12"
HOLDOUT_SHARE = 0.05
OFF_CATALOG = 10_000_000  # added to version 2's raw item ids
QUANTILES = (0.5, 0.95, 0.99)


def off_catalog_version(repo: Path, source: int = 1, version: int = 2) -> None:
    """Version ``version`` of every stage: ``source``'s folders re-stamped, its ordering stage mapping
    items to ids the catalog does not have; and its pinned ensemble ``funnel_v<version>``."""
    from deployment.export import STAGE_ARTIFACTS, pin_ensemble, write_version_ensemble

    for stage in STAGE_ARTIFACTS:
        target = repo / stage / str(version)
        shutil.copytree(repo / stage / str(source), target, ignore=shutil.ignore_patterns("__pycache__"))
        for stamp in target.glob("*.json"):  # manifest, query tower, item index, item affinity
            data = json.loads(stamp.read_text())
            if isinstance(data, dict) and data.get("version") == source:
                stamp.write_text(json.dumps({**data, "version": version}))
    items_path = repo / "ordering" / str(version) / "item_features.parquet"
    items = pd.read_parquet(items_path)
    items["item_id_raw"] += OFF_CATALOG
    items.to_parquet(items_path, index=False)
    write_version_ensemble(repo, pin_ensemble((repo / "funnel" / "config.pbtxt").read_text(), version), version)


def rules_for_tests(folder: Path) -> Path:
    """The project's rules with every ``for:`` cut to ``FOR``, so alerts fire within a test."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def wait_for(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:.0f}s")
        time.sleep(interval_s)


def server_scrape_after(prom, after: float) -> float:
    """The time of the first scrape of the server after ``after`` (waiting for it). A range from one
    such sample to another holds whole samples at both ends, so rate() over it is the exact increase
    in every series alike (no extrapolation, which differs per series and would skew quantiles)."""

    def newest():
        got = prom.query('timestamp(up{job="tritonserver"})')
        return got and float(got[0]["value"][1]) > after and float(got[0]["value"][1])

    return wait_for(newest, 30, what=f"a scrape of the server after {after:.1f}")


def scraped_since(prom, since: float) -> float:
    """Wait until Prometheus holds a sample of both targets newer than ``since``; its time."""

    def newest():
        got = prom.query('timestamp(up{job=~"tritonserver|funnel-monitor"})')
        times = [float(r["value"][1]) for r in got]
        return len(times) == 2 and min(times) > since and min(times)

    return wait_for(newest, 30, what=f"a scrape of both targets after {since:.1f}")


@pytest.fixture(scope="module")
def stack(triton_repo, small_data, tmp_path_factory):
    from deployment.alerting import AlertLog, Alertmanager
    from deployment.export import with_metrics_interval
    from deployment.monitoring import PrometheusServer
    from deployment.rollout import set_rollout
    from deployment.server import TritonServer
    from online.ab_report import HoldoutMonitor
    from online.router import feedback_log_path
    from serving.assignment import HOLDOUT, ab_rollout
    from serving.metrics import MetricsExporter, process_exposition

    work = tmp_path_factory.mktemp("prometheus")
    repo = work / "triton_repo"
    shutil.copytree(triton_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    # ExactTimes reads each request's own time: every stub records each request at once.
    for config in repo.glob("*/config.pbtxt"):
        if 'platform: "ensemble"' not in (text := config.read_text()):
            config.write_text(with_metrics_interval(text, 0.0))
    off_catalog_version(repo)
    log_path = feedback_log_path(repo)
    rollout = ab_rollout("monitoring", SALT, 1, 1, holdout=HOLDOUT_SHARE)  # equal models in every arm
    users = small_data.users["user_id"].to_numpy()
    assert sum(rollout.experiment.assign(int(u)) == HOLDOUT for u in users) == 23

    server = TritonServer(repo, log_path=work / "tritonserver.log").start()
    exporter = prom = sink = alertmanager = None
    try:
        set_rollout(server.grpc_url, repo, rollout)
        holdout = HoldoutMonitor(log_path, interval_s=SCRAPE_S)
        exporter = MetricsExporter(
            [lambda: process_exposition(server.process.pid, {"process": "tritonserver"}), holdout.exposition]
        ).start()
        if ALERTMANAGER:  # as scripts/monitor.py delivers alerts, with a 1 s group wait
            sink = AlertLog(work / "alerts.jsonl").start()
            alertmanager = Alertmanager(
                [sink.url], group_wait="1s", group_interval="1s", log_path=work / "alertmanager.log"
            ).start()
        prom = PrometheusServer(
            {"tritonserver": [f"127.0.0.1:{server.metrics_port}"], "funnel-monitor": [f"127.0.0.1:{exporter.port}"]},
            [rules_for_tests(work)],
            scrape_interval=f"{SCRAPE_S:.0f}s",
            evaluation_interval=f"{SCRAPE_S:.0f}s",
            log_path=work / "prometheus.log",
            alertmanagers=[alertmanager.address] if alertmanager else [],
        ).start()
        yield SimpleNamespace(
            server=server,
            repo=repo,
            prom=prom,
            exporter=exporter,
            holdout=holdout,
            rollout=rollout,
            users=users,
            alert_log=sink,
        )
    finally:
        if prom is not None:
            prom.cleanup()
        if alertmanager is not None:
            alertmanager.cleanup()
        if sink is not None:
            sink.stop()
        if exporter is not None:
            exporter.stop()
        server.stop()


# Latency: the same requests timed three ways. The client's clock; the server's own time for each
# request, exactly (the histogram's `_sum` read after every single request, before the next); and
# Prometheus' quantile of the histogram (bucket counts only). A histogram places a quantile inside the
# bucket that holds it, so Prometheus must land in the bucket of the exact server-side quantile; the
# client's time also holds the trip (gRPC, Triton, the stub's IPC), so its quantile bounds both above.


def bucket(ms: float) -> tuple[float, float]:
    """The histogram bucket ``(lower, upper]`` holding ``ms`` (``le`` is inclusive)."""
    from serving.metrics import LATENCY_BUCKETS_MS

    edges = [0.0, *LATENCY_BUCKETS_MS, math.inf]
    for low, high in zip(edges, edges[1:]):
        if ms <= high:
            return low, high
    return edges[-2], math.inf


def ranked(values, q: float) -> float:
    """The value of rank ``ceil(q * n)``: the one whose bucket histogram_quantile interpolates in."""
    ordered = np.sort(np.asarray(values))
    return float(ordered[max(math.ceil(q * len(ordered)), 1) - 1])


class ExactTimes:
    """Per-request server times of one histogram: after each request, wait until its count has
    grown by one (the stubs record off the request path) and take the growth of its sum."""

    def __init__(self, metrics_url: str, name: str, **labels):
        self.url, self.name, self.labels = metrics_url, name, {k: str(v) for k, v in labels.items()}
        self.count, self.sum = self._read()
        self.times: list[float] = []

    def _read(self) -> tuple[float, float]:
        from serving.metrics import scrape

        metrics = scrape(self.url)

        def total(suffix):
            return sum(
                v
                for lab, v in metrics.get(self.name + suffix, [])
                if all(lab.get(k) == x for k, x in self.labels.items())
            )

        return total("_count"), total("_sum")

    def record(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            count, total = self._read()
            if count >= self.count + 1:
                break
            assert time.monotonic() < deadline, f"{self.name} {self.labels}: the request was not recorded"
            time.sleep(0.002)
        assert count == self.count + 1, f"{self.name} {self.labels}: {count - self.count} requests recorded, not one"
        # A scrape is not atomic: it may read _sum before an update and _count (exposed after it)
        # after it. The recorder adds the sum before the count, so a scrape that starts once the
        # count has grown reads the request's whole sum. (The likely cause of one full-suite failure,
        # client time < server time for one request; not reproduced in three reruns.)
        count, total = self._read()
        assert count == self.count + 1, f"{self.name} {self.labels}: another request recorded meanwhile"
        self.times.append(total - self.sum)
        self.count, self.sum = count, total


def instant(prom, expr: str, at: float) -> dict[str, float]:
    """``{first label value or "": value}`` of an instant query."""
    return {
        (next(iter(r["metric"].values()), "") if r["metric"] else ""): float(r["value"][1])
        for r in prom.query(expr, at)
    }


def call_stages(client, order: list[str], user: int, k: int, timers: dict, client_ms: dict) -> None:
    """One request through the stage models one by one, as the ensemble runs it, each call timed."""
    import tritonclient.grpc as grpcclient

    from serving.stages import STAGES

    tensors = {"user_id": np.array([user], dtype=np.int64), "k": np.array([k], dtype=np.int32)}
    for name in order:
        stage = STAGES[name]
        inputs = []
        for t in stage.inputs:
            if t.name in tensors:
                # The exported stages batch (serving.batching): a request is a batch of one.
                value = np.asarray(tensors[t.name])[np.newaxis]
                tensor = grpcclient.InferInput(t.name, list(value.shape), "BYTES" if t.dtype == "STRING" else t.dtype)
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
        wanted = [grpcclient.InferRequestedOutput(t.name) for t in stage.outputs]
        began = time.perf_counter()
        result = client.infer(name, inputs, model_version="1", outputs=wanted)
        client_ms.setdefault(name, []).append((time.perf_counter() - began) * 1000)
        timers[name].record()
        tensors.update({t.name: result.as_numpy(t.name)[0] for t in stage.outputs})


def compare(rows: list, wrong: list, latency: str, q: float, prometheus_ms: float, server: list, client: list):
    exact, theirs = ranked(server, q), ranked(client, q)
    trip = float(np.median(np.asarray(client) - np.asarray(server)))
    rows.append((latency, q, prometheus_ms, exact, theirs, trip, len(client)))
    low, high = bucket(exact)
    high = last_edge_before_more(server, high)
    # at such an edge histogram_quantile computes lower + width * rank / count: off by an ulp or so
    slack = 1e-9 * max(1.0, high if math.isfinite(high) else low)
    if not (low - slack <= prometheus_ms <= high + slack and prometheus_ms <= bucket(theirs)[1] + slack):
        wrong.append(rows[-1])


def last_edge_before_more(values, high: float) -> float:
    """The last bucket edge from ``high`` on with no more of ``values`` at or below it than ``high``.

    When the quantile's rank is exactly the count at ``high`` (the quantile is its bucket's last
    observation, as a p99 of 100 requests usually is), Prometheus 2.42 computes that rank as
    ``q * count`` in floating point, and about one time in ten it comes out an ulp above: then every
    bucket holding that same count is passed over and it answers the lower edge of the next bucket
    that holds more (a feature lookup's exact p99 of 0.956 ms came back as 2.00000000000004, with
    nothing between 1 and 2 ms). That is the same quantile, so the edges up to there count as its
    bucket's."""
    from serving.metrics import LATENCY_BUCKETS_MS

    ordered = np.sort(np.asarray(values))
    at_high = np.searchsorted(ordered, high, side="right")
    edge = high
    for bound in (b for b in LATENCY_BUCKETS_MS if b > high):
        if np.searchsorted(ordered, bound, side="right") != at_high:
            break
        edge = bound
    return edge


def test_the_comparison_takes_prometheus_rank_rounding_and_nothing_else():
    """``compare`` (no server): the quantile an ulp past the empty buckets above its own, or an ulp
    above its bucket's edge, matches; a value inside a bucket the exact times do not reach does not."""
    server = [0.3] * 50 + [0.9] * 49 + [3.0]  # p99 0.956-like: 1 ms bucket, nothing in (1, 2]
    client = [v + 2.0 for v in server]
    rows, wrong = [], []
    compare(rows, wrong, "passed over (1, 2]", 0.99, 2.00000000000004, server, client)
    compare(rows, wrong, "its own edge", 0.99, 1.0000000000000002, server, client)
    assert not wrong, wrong
    compare(rows, wrong, "inside (2, 5]", 0.99, 2.5, server, client)
    compare(rows, wrong, "below its bucket", 0.99, 0.4, server, client)
    assert [w[0] for w in wrong] == ["inside (2, 5]", "below its bucket"]
    with_one_between = [0.3] * 99 + [1.5]  # an observation in (1, 2]: 2 ms is another quantile
    rows, wrong = [], []
    compare(rows, wrong, "not passed over", 0.99, 2.00000000000004, with_one_between, client)
    assert len(wrong) == 1


def bucket_increases(prom, stage: str, window: str, at: float) -> dict[str, float]:
    """``{le: increase}`` of one stage's latency histogram over the window: on a failed comparison,
    what Prometheus counted per bucket, to set beside the exact times'."""
    expr = f'increase(funnel_stage_latency_ms_bucket{{stage="{stage}"}}[{window}])'
    return {r["metric"]["le"]: round(float(r["value"][1]), 3) for r in prom.query(expr, at)}


def exact_cumulative(times: list[float]) -> dict[str, int]:
    """``{le: observations <= le}`` of the exact times, in the histogram's buckets."""
    from serving.metrics import LATENCY_BUCKETS_MS

    ordered = np.sort(np.asarray(times))
    return {f"{b:g}": int(np.searchsorted(ordered, b, side="right")) for b in LATENCY_BUCKETS_MS}


def test_every_dashboard_query_returns_data_and_latency_quantiles_match_the_client(stack, small_data, small_config):
    import tritonclient.grpc as grpcclient

    from evaluation.offline import ensemble_order
    from online.simulator import SimulationConfig, UserSimulator
    from serving.client import BadRequest, FunnelClient
    from serving.interface import ROUTER
    from serving.metrics import online_settled, scrape

    prom, server = stack.prom, stack.server
    # Window 1: the simulated users through ab_router (end to end), one request at a time.
    start = server_scrape_after(prom, time.time())
    e2e_ms, feedback_requests = [], []
    router = ExactTimes(server.metrics_url, "online_request_latency_ms")
    with FunnelClient(server.grpc_url, model_name=ROUTER) as client:
        with pytest.raises(BadRequest):  # a refused feedback request (online errors)
            client.send_feedback("no-such-request", [1], ["click"], [1.0])

        def timed(user, k):
            began = time.perf_counter()
            answer = client.recommend(user, k)
            e2e_ms.append((time.perf_counter() - began) * 1000)
            router.record()
            return answer

        sim = UserSimulator(small_data, small_config.synthetic, SimulationConfig(days=1, k=10, concurrency=1, seed=5))
        sim.run(
            stack.users,
            timed,
            feedback=lambda rid, user, items, events, values: feedback_requests.append(
                client.send_feedback(rid, items, events, values)
            ),
        )
        for unknown in range(10**9, 10**9 + 5):  # the popularity fallback
            timed(unknown, 10)
    with FunnelClient(server.grpc_url) as plain:  # the plain funnel too, and a request it refuses
        for user in stack.users[:20]:
            plain.recommend(int(user), 10)
        with pytest.raises(BadRequest):
            plain.recommend(int(stack.users[0]), 0)

    def recorded(metrics) -> bool:
        # Triton counts a request after its response, the refused one too: the error-rate panel below
        # needs it counted before the window's last scrape.
        refused = sum(v for labels, v in metrics.get("nv_inference_request_failure", []) if labels["model"] == "funnel")
        return online_settled(metrics, len(e2e_ms), len(feedback_requests)) and refused >= 1

    wait_for(lambda: recorded(scrape(server.metrics_url)), 30, what="router metrics and the refusal recorded")
    end = server_scrape_after(prom, time.time())
    scraped_since(prom, end)  # the sidecar too
    window = f"{round((end - start) * 1000)}ms"
    # A window from one scrape to another counts its requests in every bucket exactly, so the
    # quantiles below compare like with like. A series born inside the window (an arm's, at its first
    # request) would be extrapolated per bucket instead, some buckets a few requests short.
    counted = {
        r["metric"]["le"]: round(float(r["value"][1]), 6)
        for r in prom.query(f"sum by (le) (increase(online_request_latency_ms_bucket[{window}]))", end)
    }
    assert counted == {**exact_cumulative(router.times), "+Inf": len(router.times)}, counted

    # Window 2: requests whose stages the client calls one by one, as the ensemble does.
    start2 = server_scrape_after(prom, time.time())
    order = ensemble_order(stack.repo)
    timers = {name: ExactTimes(server.metrics_url, "funnel_stage_latency_ms", stage=name, version=1) for name in order}
    stage_ms: dict[str, list[float]] = {}
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for user in stack.users[:100]:
            call_stages(grpc, order, int(user), 10, timers, stage_ms)
    finally:
        grpc.close()
    end2 = server_scrape_after(prom, time.time())
    window2 = f"{round((end2 - start2) * 1000)}ms"

    # Every query of the dashboard, as Grafana would send it, returns data.
    dashboard = json.loads(DASHBOARD.read_text())
    empty, answers = [], {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", window)
            result = prom.query(expr, end)
            values = [float(r["value"][1]) for r in result]
            answers[panel["id"], target["refId"]] = result
            if not any(math.isfinite(v) for v in values):
                empty.append((panel["title"], expr))
    assert not empty, empty
    memory = {(r["metric"].get("process"), r["metric"].get("model")) for r in answers[9, "A"]}  # memory per process
    stub_models = {m for p, m in memory if p == "stub"}
    assert ("tritonserver", None) in memory and set(order) | {"ab_router", "feedback"} <= stub_models, memory
    errors = {r["metric"]["model"]: float(r["value"][1]) for r in answers[21, "A"]}  # error rate per model
    assert errors["funnel"] > 0 and errors["ab_router"] == 0, errors

    # p50/p95/p99 of the dashboard's end-to-end and stage panels vs the exact and the client's.
    rows, wrong = [], []
    for q in QUANTILES:
        expr = f"histogram_quantile({q}, sum by (le) (rate(online_request_latency_ms_bucket[{window}])))"
        compare(rows, wrong, "end to end (ab_router)", q, instant(prom, expr, end)[""], router.times, e2e_ms)
    for q in QUANTILES:
        expr = f"histogram_quantile({q}, sum by (le, stage) (rate(funnel_stage_latency_ms_bucket[{window2}])))"
        ours = instant(prom, expr, end2)
        for name in order:
            compare(rows, wrong, name, q, ours[name], timers[name].times, stage_ms[name])
    columns = ["latency", "quantile", "prometheus_ms", "server_exact_ms", "client_ms", "median_trip_ms", "requests"]
    table = pd.DataFrame(rows, columns=columns)
    print("\nlatency quantiles, Prometheus (histograms) vs the server's exact times vs the client's clock:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    # per stage, what Prometheus counted in each bucket over the window beside the exact times' counts:
    # the evidence a failed comparison needs
    detail = {
        name: {"prometheus": bucket_increases(prom, name, window2, end2), "exact": exact_cumulative(timers[name].times)}
        for name in order
    }
    assert all(d["prometheus"] for d in detail.values()), detail
    assert not wrong, (wrong, {row[0]: detail.get(row[0]) for row in wrong})
    assert all(c >= s for c, s in zip(e2e_ms, router.times))  # the client's clock includes the server's


def firing(prom, name: str) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


def test_degradation_alert_fires_for_a_worse_model_and_not_for_equal_ones(stack, small_data, small_config):
    from deployment.rollout import set_rollout
    from online.simulator import SimulationConfig, UserSimulator
    from serving.assignment import Rollout
    from serving.client import FunnelClient
    from serving.interface import ROUTER

    prom = stack.prom
    first_fired: dict[tuple[str, str], float] = {}  # (version, metric) -> when LiveBelowHoldout first fired
    stop_watching = threading.Event()

    def watch():
        while not stop_watching.wait(0.25):
            for a in firing(prom, "LiveBelowHoldout"):
                first_fired.setdefault((a["labels"]["version"], a["labels"]["metric"]), time.time())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with FunnelClient(stack.server.grpc_url, model_name=ROUTER) as client:

            def simulate(seed: int) -> pd.DataFrame:
                config = SimulationConfig(days=3, k=10, concurrency=4, seed=seed)
                return UserSimulator(small_data, small_config.synthetic, config).run(
                    stack.users,
                    client.recommend,
                    feedback=lambda rid, user, items, events, values: client.send_feedback(rid, items, events, values),
                )

            # Equal models: version 1 in every arm and in the holdout. Once Prometheus has the
            # comparison of all of it, it stays quiet for three times the alert's `for`.
            equal = simulate(seed=21)
            assert set(equal["model_version"]) == {"1"}
            settled = time.time()
            wait_for(
                lambda: prom.query(f"online_holdout_updated_timestamp_seconds > {settled + SCRAPE_S}"),
                60,
                what="the comparison of the equal arms in Prometheus",
            )
            time.sleep(15)
            equal_table = stack.holdout.table()
            assert not first_fired, first_fired
            assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "LiveBelowHoldout"]  # nor pending

            # The worse model for everyone outside the holdout, which stays on version 1.
            worse = Rollout(stack.rollout.experiment, {"control": 2, "treatment": 2}, control_version=1)
            set_rollout(stack.server.grpc_url, stack.repo, worse)
            switched = time.time()
            degraded = {}
            traffic = threading.Thread(target=lambda: degraded.update(outcomes=simulate(seed=22)))
            traffic.start()
            traffic.join(timeout=600)
            ended = time.time()
            # CTR, the primary engagement metric, fires by the end of the degraded traffic (or just after).
            wait_for(lambda: ("2", "ctr") in first_fired, 60, what="LiveBelowHoldout firing for version 2's CTR")
    finally:
        stop_watching.set()
        watcher.join()
    outcomes = degraded["outcomes"]
    assert set(outcomes[outcomes["arm"] != "holdout"]["model_version"]) == {"2"}
    assert set(outcomes[outcomes["arm"] == "holdout"]["model_version"]) == {"1"}
    assert {version for version, _ in first_fired} == {"2"}, first_fired
    if stack.alert_log is not None:
        # Delivered, not only evaluated: Prometheus -> Alertmanager -> the alert log, for version 2 only.
        delivered = wait_for(
            lambda: [r for r in stack.alert_log.records() if r["alertname"] == "LiveBelowHoldout"],
            30,
            what="LiveBelowHoldout in the alert log",
        )
        assert {(r["status"], r["labels"]["version"]) for r in delivered} >= {("firing", "2")}, delivered
        assert {r["labels"]["version"] for r in delivered} == {"2"}, delivered
        assert "v2" in delivered[0]["annotations"]["summary"]
    table = stack.holdout.table()
    print("\nequal models (version 1 everywhere):")
    print(equal_table.drop(columns=["since", "until"]).to_string(index=False))
    print("worse model (version 2 outside the holdout):")
    print(table[table["version"] == "2"].drop(columns=["since", "until"]).to_string(index=False))
    print(
        f"LiveBelowHoldout fired for version 2 (`for` {FOR}, scrape and evaluation every {SCRAPE_S:.0f}s), after the "
        "worse model took the traffic: "
        + ", ".join(f"{metric} {when - switched:.1f}s" for (_, metric), when in sorted(first_fired.items()))
        + f"; the degraded run ({len(outcomes)} requests) took {ended - switched:.1f}s"
    )


def test_monitor_script_starts_prometheus_with_the_rules_and_stops(stack, tmp_path):
    """The one command of docs/monitoring.md, against the same server: --check waits until both
    targets are up and the rules are loaded, then stops everything it started."""
    from online.router import feedback_log_path

    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "monitor.py"),
        "--metrics-port",
        str(stack.server.metrics_port),
        "--feedback-log",
        str(feedback_log_path(stack.repo)),
        "--port",
        "0",
        "--scrape-interval",
        "1s",
        "--evaluation-interval",
        "1s",
        "--data-dir",
        str(tmp_path / "data"),
        "--alertmanager-port",
        "0",
        "--alertmanager-data-dir",
        str(tmp_path / "alertmanager"),
        "--alert-log",
        str(tmp_path / "alerts.jsonl"),
        "--check",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "targets up: funnel-monitor, tritonserver" in done.stdout
    assert "LiveBelowHoldout" in done.stdout and "grafana" in done.stdout
    assert "tritonserver pid" in done.stdout
    if ALERTMANAGER:
        assert "alertmanager up: prometheus sends to http://127.0.0.1:" in done.stdout
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True).stdout.split()
    assert not left, f"prometheus left running: {left}"
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "alertmanager")], capture_output=True, text=True).stdout
    assert not left.split(), f"alertmanager left running: {left}"
