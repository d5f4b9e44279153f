"""The monitoring files and their helpers, without a server: the dashboard and rules are well formed,
``promtool`` checks the rules and runs a unit test for every alert, the sidecar's pieces work.

What the dashboard's queries return from a live server, and the degradation alert end to end, are in
tests/test_prometheus.py (a real Prometheus scraping a real tritonserver)."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "monitoring" / "grafana" / "funnel-dashboard.json"
RULES = ROOT / "monitoring" / "prometheus" / "funnel-alerts.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "tests"
SUFFIXES = ("_bucket", "_sum", "_count")
NO_PROMTOOL = "promtool is not installed (Debian package prometheus; `make services` installs it when run as root)"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _exported_names() -> set[str]:
    """Names the project exports: the stubs' (serving/metrics.py) and the sidecar's (online/ab_report.py)."""
    source = (ROOT / "serving" / "metrics.py").read_text() + (ROOT / "online" / "ab_report.py").read_text()
    names = set(re.findall(r'"((?:funnel|online)_[a-z_]+)"', source))
    return names | {n + s for n in names for s in SUFFIXES}


def _queried_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values (model=~"funnel_v[0-9]+") are not metrics
    expr = re.sub(r"[a-z_]*:[a-z_:]+", "", expr)  # nor recording rules (level:metric:operation)
    return set(re.findall(r"\b((?:funnel|online)_[a-z_]+)\b", expr))


def test_dashboard_and_rules_are_well_formed_and_query_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [r["expr"] for r in rules()]
    recorded = {r["record"] for r in rules() if "record" in r}
    queried = set().union(*map(_queried_names, exprs))
    assert {"online_clicks_total", "online_impressions_total", "funnel_process_resident_memory_bytes"} <= queried
    assert queried <= _exported_names(), sorted(queried - _exported_names())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # the memory panel is the processes', not the host's
    assert not any("nv_cpu_memory" in e for e in exprs)
    for name in recorded:  # every recording rule is used by the dashboard or an alert
        assert any(name in e for e in exprs), name
    alerts = [r for r in rules() if "alert" in r]
    assert all(r.get("for") and r["labels"].get("severity") and r["annotations"].get("summary") for r in alerts)


def test_the_holdout_staleness_alert_and_the_monitors_interval_limit_agree():
    """scripts/monitor.py refuses a --holdout-interval at which HoldoutMonitorDown would fire all along."""
    from online.ab_report import HOLDOUT_STALE_S

    (alert,) = [r for r in rules() if r.get("alert") == "HoldoutMonitorDown"]
    assert f"(time() - online_holdout_updated_timestamp_seconds) > {HOLDOUT_STALE_S}" in alert["expr"]


def test_counters_are_read_through_rate_or_increase():
    """A counter's raw value is its total since the process started (reset by a restart): a panel or
    rule reads its rate. The "served model version" panel charted the ordering stage's request total
    per version, so a version no longer served kept its line at its old total."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [r["expr"] for r in rules()]
    counter = r"\b((?:funnel|online|nv)_[a-z_]*(?:_total|_bucket|_sum|_count|_success|_failure|_duration_us))\b"
    raw = []
    for expr in exprs:
        plain = re.sub(r'"[^"]*"', '""', expr)
        plain = re.sub(r"[a-z_]*:[a-z_:]+", "", plain)  # recording rules (level:metric:operation)
        for match in re.finditer(counter + r"(\{[^}]*\})?", plain):
            if not plain[match.end() :].startswith("["):  # no range: not inside rate()/increase()
                raw.append((match.group(1), expr))
    assert not raw, raw


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)
def test_promtool_checks_the_rules_and_every_alert_has_a_passing_unit_test():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = {r["alert"] for r in rules() if "alert" in r}
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert {f.stem for f in files} == alerts  # one test file per alert, named after it
    for path in files:
        spec = yaml.safe_load(path.read_text())
        cases = [c for t in spec["tests"] for c in t.get("alert_rule_test", []) if c["alertname"] == path.stem]
        assert any(c.get("exp_alerts") for c in cases), f"{path.name}: no case where {path.stem} fires"
        assert any(not c.get("exp_alerts") for c in cases), f"{path.name}: no case where {path.stem} stays quiet"
    run = subprocess.run(["promtool", "test", "rules", *map(str, files)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(files), run.stdout


def _panel_expr(panel_id: int, ref: str = "A", window: str = "5m") -> str:
    panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p["id"] == panel_id)
    return next(t["expr"] for t in panel["targets"] if t["refId"] == ref).replace("$__rate_interval", window)


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)
def test_likes_plus_shares_panel_keeps_an_arm_that_has_no_share_yet(tmp_path):
    """The feedback endpoint creates an arm's share counter at its first share: ``likes + shares``
    matched no share series for that arm, and the arm's likes vanished from the panel."""
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'online_requests_total{arm="control", version="1"}', "values": "0+60x30"},
                    {"series": 'online_requests_total{arm="treatment", version="2"}', "values": "0+60x30"},
                    {"series": 'online_likes_total{arm="control", version="1"}', "values": "0+30x30"},
                    {"series": 'online_shares_total{arm="control", version="1"}', "values": "0+15x30"},
                    {"series": 'online_likes_total{arm="treatment", version="2"}', "values": "0+30x30"},
                ],
                "promql_expr_test": [
                    {
                        "expr": _panel_expr(14),
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": '{arm="control"}', "value": 0.75},
                            {"labels": '{arm="treatment"}', "value": 0.5},
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "panel.yml"
    path.write_text(yaml.safe_dump(spec))
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMTOOL)
def test_per_arm_feedback_panels_show_zero_for_an_arm_with_no_such_event_yet(tmp_path):
    """The feedback endpoint creates an arm's click, watch, churn, like and share counters at the first
    such event: a treatment served and never clicked had no line on the CTR panel at all (the worst
    case, which TreatmentCTRBelowControl reads as CTR 0), where it should show 0."""
    control = '{arm="control", version="1"}'
    treatment = '{arm="treatment", version="2"}'
    series = [
        (f"online_requests_total{control}", "0+60x30"),
        (f"online_requests_total{treatment}", "0+60x30"),
        (f"online_impressions_total{control}", "0+600x30"),
        (f"online_impressions_total{treatment}", "0+600x30"),
        (f"online_clicks_total{control}", "0+150x30"),
        (f"online_watch_seconds_total{control}", "0+1920x30"),
        (f"online_churned_users_total{control}", "0+15x30"),
        (f"online_likes_total{control}", "0+30x30"),
    ]
    # panel: CTR, watch minutes, churn, likes + shares per request (control's values, treatment 0)
    expected = {11: 0.25, 12: 32 / 60, 13: 0.25, 14: 0.5}
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "promql_expr_test": [
                    {
                        "expr": _panel_expr(panel),
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": '{arm="control"}', "value": value},
                            {"labels": '{arm="treatment"}', "value": 0},
                        ],
                    }
                    for panel, value in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(spec))
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_make_test_installs_the_services_the_tests_use():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^SERVICES_PACKAGES\s*:?=.*\bprometheus\b", makefile, flags=re.M)
    assert re.search(r"^test:.*\bservices\b", makefile, flags=re.M)


class _Family:
    """Stand-in for ``pb_utils.MetricFamily`` (it exists only inside a Triton stub)."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    made: list = []

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind

    def Metric(self, labels, buckets=None):  # noqa: N802 (pb_utils' name)
        metric = SimpleNamespace(family=self.name, labels=labels, value=0.0)
        metric.set = lambda v: setattr(metric, "value", v)
        metric.increment = lambda v: setattr(metric, "value", metric.value + v)
        _Family.made.append(metric)
        return metric


def test_process_sampler_publishes_its_own_memory_and_cpu():
    from serving.metrics import PROCESS_CPU, PROCESS_MEMORY, ProcessSampler, read_process

    _Family.made = []
    sampler = ProcessSampler(SimpleNamespace(MetricFamily=_Family), {"model": "ordering", "version": 1}, 0.05)
    try:
        deadline = time.monotonic() + 5
        while not all(m.value > 0 for m in _Family.made) and time.monotonic() < deadline:
            sum(i * i for i in range(20000))  # use some CPU
            time.sleep(0.01)
    finally:
        sampler.close()
    memory, cpu = (next(m for m in _Family.made if m.family == name) for name in (PROCESS_MEMORY, PROCESS_CPU))
    rss, used = read_process()
    assert memory.labels == {"process": "stub", "model": "ordering", "version": "1"}
    assert 0.5 * rss < memory.value < 2 * rss and 0 < cpu.value <= used


def test_sidecar_serves_the_server_process_and_survives_a_failing_collector():
    from serving.metrics import MetricsExporter, parse_prometheus, process_exposition

    def broken():
        raise RuntimeError("a collector that fails")

    with MetricsExporter([lambda: process_exposition(os.getpid(), {"process": "tritonserver"}), broken]) as sidecar:
        assert sidecar.host == "127.0.0.1"
        with urllib.request.urlopen(sidecar.url, timeout=5) as response:
            metrics = parse_prometheus(response.read().decode())
    (labels, rss), *_ = metrics["funnel_process_resident_memory_bytes"]
    assert labels == {"process": "tritonserver"} and rss > 10e6
    assert metrics["funnel_process_cpu_seconds_total"][0][1] > 0
    assert process_exposition(2**22 + 12345, {}) == ""  # a process that is gone: nothing


def test_sidecar_closes_a_connection_that_sends_nothing():
    """A client that connects and sends no request held a handler thread forever (no socket timeout)."""
    import socket

    from serving.metrics import MetricsExporter

    with MetricsExporter([lambda: ""], idle_timeout_s=0.5) as sidecar:
        quiet = socket.create_connection((sidecar.host, sidecar.port), timeout=5)
        try:
            assert quiet.recv(1) == b""  # closed by the sidecar, not by this side's 5 s timeout
        finally:
            quiet.close()
        with urllib.request.urlopen(sidecar.url, timeout=5) as response:  # and it still serves
            assert response.status == 200


def test_holdout_monitor_compares_each_live_version_with_the_holdout_of_its_period(tmp_path):
    from online.ab_report import HoldoutMonitor, logged_requests
    from online.feedback_log import FeedbackLog
    from serving.metrics import parse_prometheus

    log = FeedbackLog(tmp_path / "log.sqlite")
    rng = np.random.default_rng(0)
    # Version 1 live and the holdout, same CTR; then version 2 live, far below the holdout.
    n = 0
    for period, (version, live_ctr) in enumerate([("1", 0.3), ("2", 0.05)]):
        for user in range(200):
            arm = "holdout" if user % 10 == 5 else "control"
            ctr = 0.3 if arm == "holdout" else live_ctr
            request = f"r{n}"
            n += 1
            items = list(range(10))
            log.log_impressions(
                request, user, items, "1" if arm == "holdout" else version, arm, "model", ts=period * 100 + user * 0.1
            )
            clicked = [i for i in items if rng.random() < ctr]
            log.log_feedback_many([(request, user, i, "click", 1.0) for i in clicked], ts=period * 100 + user * 0.1)
            if arm == "holdout" or rng.random() < 0.2:
                log.log_feedback_many([(request, user, -1, "churn", 1.0)], ts=period * 100 + user * 0.1)
    log.close()
    requests = logged_requests(tmp_path / "log.sqlite")
    assert len(requests) == 400 and requests["clicks"].sum() > 0

    monitor = HoldoutMonitor(tmp_path / "log.sqlite", interval_s=3600)
    table = monitor.table().set_index(["version", "metric"])
    assert set(table.index.get_level_values(0)) == {"1", "2"}
    # each version is compared with the 20 holdout users of its own period
    assert (table["users_holdout"] == 20).all() and (table["users_live"] == 180).all()
    assert table.loc[("1", "ctr"), "p_value"] > 0.05
    assert table.loc[("2", "ctr"), "p_value"] < 0.01 and table.loc[("2", "ctr"), "difference"] < -0.15
    assert table.loc[("2", "retention"), "difference"] > 0  # the holdout churned every time here
    assert "permutation" in table.loc[("2", "ctr"), "method"]
    # What the alert watches: valid at every look, never below the one-look p; the drop still shows.
    print("\n" + table[["difference", "p_value", "sequential_p_value"]].to_string())
    assert (table["sequential_p_value"] >= table["p_value"]).all()
    assert table.loc[("2", "ctr"), "sequential_p_value"] < 0.05 < table.loc[("1", "ctr"), "sequential_p_value"]

    metrics = parse_prometheus(monitor.exposition())
    values = {(lab["version"], lab["metric"], lab["group"]): v for lab, v in metrics["online_holdout_value"]}
    assert values["2", "ctr", "live"] == pytest.approx(table.loc[("2", "ctr"), "live"])
    assert {lab["version"] for lab, _ in metrics["online_holdout_p_value"]} == {"1", "2"}
    sequential = {(lab["version"], lab["metric"]): v for lab, v in metrics["online_holdout_sequential_p_value"]}
    assert sequential["2", "ctr"] == pytest.approx(table.loc[("2", "ctr"), "sequential_p_value"])
    assert metrics["online_holdout_errors"] == [({}, 0.0)]
    assert metrics["online_holdout_updated_timestamp_seconds"][0][1] > 0
    # a log that does not exist yet: no comparison, no error
    empty = parse_prometheus(HoldoutMonitor(tmp_path / "none.sqlite").exposition())
    assert "online_holdout_value" not in empty and empty["online_holdout_errors"] == [({}, 0.0)]
    # a comparison that keeps failing still exports when the last one worked (0: never), so its age
    # grows and HoldoutMonitorDown fires; without the series the alert could not fire at all
    (tmp_path / "broken.sqlite").write_bytes(b"not a database" * 100)
    broken = HoldoutMonitor(tmp_path / "broken.sqlite")
    failing = parse_prometheus(broken.exposition())
    assert failing["online_holdout_errors"] == [({}, 1.0)] and broken.last_error
    assert failing["online_holdout_updated_timestamp_seconds"] == [({}, 0.0)]
    monitor._updated, monitor.interval_s, monitor.log_path = 123.0, 0.0, tmp_path / "broken.sqlite"
    assert parse_prometheus(monitor.exposition())["online_holdout_updated_timestamp_seconds"] == [({}, 123.0)]


def test_holdout_monitor_drops_a_version_the_live_users_moved_on_from(tmp_path):
    # The whole-log comparison of a retired version (here v2, far below the holdout, rolled back to v1)
    # stayed exported with its frozen gap and p-values: LiveBelowHoldout kept firing for a model that
    # served nobody any more.
    from online.ab_report import HoldoutMonitor
    from online.feedback_log import FeedbackLog
    from serving.metrics import parse_prometheus

    log = FeedbackLog(tmp_path / "log.sqlite")
    rng = np.random.default_rng(0)
    n = 0
    for start, version, live_ctr in ((0.0, "2", 0.05), (7200.0, "1", 0.3)):  # v2, then two hours later v1
        for user in range(100):
            arm = "holdout" if user % 10 == 5 else "control"
            request, items = f"r{n}", list(range(10))
            n += 1
            ts = start + user
            log.log_impressions(request, user, items, "1" if arm == "holdout" else version, arm, "model", ts=ts)
            ctr = 0.3 if arm == "holdout" else live_ctr
            log.log_feedback_many([(request, user, i, "click", 1.0) for i in items if rng.random() < ctr], ts=ts)
    log.close()

    def exported(**kwargs):
        monitor = HoldoutMonitor(tmp_path / "log.sqlite", n_resamples=99, **kwargs)
        metrics = parse_prometheus(monitor.exposition())
        return {lab["version"] for lab, _ in metrics.get("online_holdout_sequential_p_value", [])}

    assert exported() == {"1"}  # v2's last live response is 2 h older than the log's latest
    assert exported(retired_after_s=None) == {"1", "2"}
    assert exported(retired_after_s=3 * 3600) == {"1", "2"}


def test_prometheus_keeps_a_relative_data_dir_where_the_caller_means_it(tmp_path, monkeypatch):
    # scripts/monitor.py passes --data-dir build/monitor/prometheus ("kept between runs"); Prometheus runs
    # in its temporary folder, which cleanup removes: a path relative to that folder lost the data.
    import deployment.monitoring as monitoring

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(monitoring, "prometheus_binary", lambda name="prometheus": Path("/usr/bin/prometheus"))
    prom = monitoring.PrometheusServer({"tritonserver": ["127.0.0.1:8002"]}, data_dir="build/monitor/prometheus")
    try:
        storage = next(a.split("=", 1)[1] for a in prom.command() if a.startswith("--storage.tsdb.path="))
        # spawn runs it with cwd=prom._workdir: where it writes, seen from the caller
        assert (prom._workdir / storage).resolve() == (tmp_path / "build" / "monitor" / "prometheus").resolve()
    finally:
        prom.cleanup()


@pytest.mark.parametrize(
    "host, listen, dial",
    [("::1", "[::1]", "[::1]"), ("::", "[::]", "127.0.0.1"), ("[::1]", "[::1]", "[::1]"), ("127.0.0.1",) * 3],
)
def test_prometheus_and_alertmanager_bracket_an_ipv6_host(monkeypatch, host, listen, dial):
    # host="::" (which url already read as a wildcard) or "::1" went out as --web.listen-address=:::9090 and
    # Prometheus exited at once: "address :::9090: too many colons in address"; url was http://::1:9090 and
    # Alertmanager's address, Prometheus' target for it, ::1:9093 (a scrape of that failed the same way).
    import deployment.alerting as alerting
    import deployment.monitoring as monitoring
    from deployment.server import host_port

    assert host_port("::1", 8001) == "[::1]:8001" and host_port("[::1]", 8001) == "[::1]:8001"
    assert host_port("fe80::1%eth0", 80) == "[fe80::1%eth0]:80" and host_port("localhost", 80) == "localhost:80"
    monkeypatch.setattr(monitoring, "prometheus_binary", lambda name="prometheus": Path("/usr/bin/prometheus"))
    monkeypatch.setattr(alerting, "alertmanager_binary", lambda: Path("/usr/bin/alertmanager"))
    prom = monitoring.PrometheusServer({"tritonserver": ["127.0.0.1:8002"]}, port=9090, host=host)
    am = alerting.Alertmanager(["http://127.0.0.1:1/alerts"], port=9093, host=host)
    try:
        assert f"--web.listen-address={listen}:9090" in prom.command()
        assert prom.url == f"http://{dial}:9090"
        assert f"--web.listen-address={listen}:9093" in am.command()
        assert am.address == f"{dial}:9093" and am.url == f"http://{dial}:9093"
    finally:
        prom.cleanup()
        am.cleanup()


def test_prometheus_that_fails_to_start_in_a_with_block_leaves_no_temporary_folder(monkeypatch):
    # start() only stopped a server that never became ready: as a context manager __exit__ never ran,
    # and its temporary folder (config, log, data) stayed behind on every failed start.
    import deployment.monitoring as monitoring
    from deployment.server import ServerError

    monkeypatch.setattr(monitoring, "prometheus_binary", lambda name="prometheus": Path("/bin/false"))
    prom = monitoring.PrometheusServer({"tritonserver": ["127.0.0.1:8002"]}, startup_timeout=10)
    with pytest.raises(ServerError, match="exited with code 1"):
        with prom:
            pass
    assert not prom._workdir.exists(), sorted(p.name for p in prom._workdir.iterdir())


def test_live_vs_holdout_counts_a_user_in_one_group_only_across_salts():
    # A log spanning two experiments (a new salt reshuffles the holdout: online/retraining.py gives every
    # candidate its own): a user held out under the first and served live under the second was counted in
    # both groups of one comparison, so the groups were not the disjoint samples the tests assume.
    import pandas as pd

    from online.ab_report import live_vs_holdout
    from serving.assignment import Experiment

    first = Experiment("a", "salt-a", {"control": 1.0}, holdout=0.05)
    second = Experiment("b", "salt-b", {"control": 1.0}, holdout=0.05)
    rows = []
    for period, exp in enumerate((first, second)):
        for user in range(2000):
            ts, arm = period * 100 + user * 0.01, exp.assign(user)
            rows.append((f"{period}-{user}", ts, user, arm, "1", 10, user % 3, 60.0 * (user % 5)))
    requests = pd.DataFrame(
        rows, columns=["request_id", "ts", "user_id", "arm", "model_version", "impressions", "clicks", "watch_seconds"]
    ).assign(likes=0, shares=0, churned=False)
    held = set(requests.loc[requests["arm"] == "holdout", "user_id"])
    live = set(requests.loc[requests["arm"] != "holdout", "user_id"])
    assert len(held & live) > 100  # the reshuffle: most of each holdout is live under the other salt
    table = live_vs_holdout(requests, n_resamples=99)
    assert set(table["version"]) == {"1"}
    row = table.iloc[0]
    # every user in at most one group: those seen in both are left out of the comparison
    assert row["users_live"] + row["users_holdout"] == len(held ^ live)


def test_live_vs_holdout_compares_with_one_holdout_model_version(tmp_path):
    # The retraining pipeline started each candidate's experiment with the served version as control, and
    # the holdout went with it: v2 served live across two experiments while the holdout was served by v1,
    # then by v2. Its comparison pooled the holdout's users of both versions, a yardstick of two models
    # that neither the table nor the exported series named.
    from online.ab_report import HoldoutMonitor
    from online.feedback_log import FeedbackLog
    from serving.metrics import parse_prometheus

    log = FeedbackLog(tmp_path / "log.sqlite")
    n = 0
    # period 0: experiment v1 (control) vs v2 (treatment), holdout on v1; period 1: v2 vs v3, holdout on v2
    for period, (arms, holdout_version, holdout_clicks) in enumerate(
        [({"control": "1", "treatment": "2"}, "1", 3), ({"control": "2", "treatment": "3"}, "2", 1)]
    ):
        for user in range(period * 200, period * 200 + 200):
            arm = "holdout" if user % 10 == 5 else ("control" if user % 2 == 0 else "treatment")
            version = holdout_version if arm == "holdout" else arms[arm]
            request, items, ts = f"r{n}", list(range(10)), period * 1000 + user
            n += 1
            log.log_impressions(request, user, items, version, arm, "model", ts=ts)
            clicks = holdout_clicks if arm == "holdout" else 2
            log.log_feedback_many([(request, user, i, "click", 1.0) for i in items[:clicks]], ts=ts)
    log.close()

    table = HoldoutMonitor(tmp_path / "log.sqlite", n_resamples=99, retired_after_s=None).table()
    table = table.set_index(["version", "metric"])
    # v2 is compared with the holdout on v2 only, from the holdout's move on: its 20 users at CTR 0.1
    # (old code: the 40 holdout users of both versions, CTR 0.2, and no holdout_version)
    assert table.loc[("2", "ctr"), "holdout"] == pytest.approx(0.1)
    assert table.loc[("2", "ctr"), "users_holdout"] == 20
    # its live users after the holdout's last v1 response (ts 195): period 1's 100 and period 0's 197 and 199
    assert table.loc[("2", "ctr"), "users_live"] == 102
    assert table.loc[("2", "ctr"), "since"] == 197
    assert dict(table.xs("ctr", level="metric")["holdout_version"]) == {"1": "1", "2": "2", "3": "2"}
    assert table.loc[("1", "ctr"), "holdout"] == pytest.approx(0.3)  # v1 served with the holdout on v1 only

    metrics = parse_prometheus(HoldoutMonitor(tmp_path / "log.sqlite", n_resamples=99).exposition())
    holdout = {
        (lab["version"], lab["holdout_version"]): v
        for lab, v in metrics["online_holdout_value"]
        if lab["metric"] == "ctr" and lab["group"] == "holdout"
    }
    assert holdout == {("1", "1"): pytest.approx(0.3), ("2", "2"): pytest.approx(0.1), ("3", "2"): pytest.approx(0.1)}


# Labels Prometheus adds to every scraped series, and the jobs that scrape them (scripts/monitor.py,
# monitoring/prometheus/prometheus.yml).
SCRAPE_LABELS = {"job": {"tritonserver", "funnel-monitor"}, "instance": None}
# Triton's own metrics the dashboard and rules read (tritonserver 2.51; ``reason`` on failures).
TRITON_SERIES = {
    "nv_inference_request_success": {"model": None, "version": None},
    "nv_inference_request_failure": {"model": None, "version": None, "reason": None},
    "nv_inference_request_duration_us": {"model": None, "version": None},
    "up": {},
}
PROMQL_WORDS = {
    *("sum", "max", "min", "avg", "count", "abs", "rate", "increase", "histogram_quantile", "vector", "scalar"),
    *("time", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"),
}


def _exported_series() -> dict[str, dict[str, set | None]]:
    """``{series name: {label: the values the code gives it, or None for any}}``, from the code itself:
    every stage's, the router's and the feedback endpoint's metrics made with a stand-in ``pb_utils``,
    a stub's ``ProcessSampler``, the sidecar's process and live-vs-holdout expositions (parsed)."""
    import pandas as pd

    from online.ab_report import HoldoutMonitor
    from serving.metrics import (
        CANDIDATE_OUTPUT,
        OnlineMetrics,
        ProcessSampler,
        StageMetrics,
        parse_prometheus,
        process_exposition,
    )

    pb = SimpleNamespace(MetricFamily=_Family)
    _Family.made = []
    for stage in [*CANDIDATE_OUTPUT, "feature_lookup", "query_tower", "fused_funnel"]:
        StageMetrics(pb, stage, 1, ["out"])
    OnlineMetrics(pb, "router", {"control": 1, "treatment": 2, "holdout": 1}, {"control": 0.5, "treatment": 0.5})
    OnlineMetrics(pb, "feedback").record(
        [("feedback", 1.0, {"arm": "control", "version": "1"}, [(e, 1.0) for e in ("click", "watch_seconds")])]
        + [("feedback", 1.0, {"arm": "control", "version": "1"}, [(e, 1.0) for e in ("like", "share", "churn")])]
    )
    ProcessSampler(pb, {"model": "ordering", "version": 1, "model_instance": "ordering_0"}, 3600).close()
    series: dict[str, dict[str, set | None]] = {}
    for m in _Family.made:
        for label, value in m.labels.items():
            series.setdefault(m.family, {}).setdefault(label, set()).add(value)
        series.setdefault(m.family, {})
    monitor = HoldoutMonitor("unused.jsonl")
    row = dict(live=0.2, holdout=0.25, p_value=0.5, sequential_p_value=1.0, min_detectable_effect=0.06)
    monitor._table = pd.DataFrame(
        [
            {"version": "2", "holdout_version": "1", "metric": m, "users_live": 9, "users_holdout": 2, **row}
            for m in ("ctr", "watch_minutes_per_user", "retention")
        ]
    )
    monitor._updated = time.time()
    text = monitor.exposition() + process_exposition(os.getpid(), {"process": "tritonserver"})
    for name, samples in parse_prometheus(text).items():
        for labels, _ in samples:
            for label, value in labels.items():
                series.setdefault(name, {}).setdefault(label, set()).add(value)
            series.setdefault(name, {})
    arms = set().union(*(labels.get("arm", set()) for labels in series.values()))
    for labels in series.values():  # the feedback endpoint's counters come with an arm's first event
        if "arm" in labels:
            labels["arm"] = arms
    for label in ("stage", "version", "holdout_version", "model", "model_instance"):  # any stage, version, model
        for labels in series.values():
            if label in labels:
                labels[label] = None
    for name, labels in {**TRITON_SERIES}.items():
        series[name] = dict(labels)
    for labels in series.values():
        labels.update(SCRAPE_LABELS)
    return series


def _closing(text: str, start: int) -> int:
    """The index just past the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced: {text}")


def _selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """``[(metric name, [(label, op, value), ...]), ...]``: the vector selectors of ``expr``."""
    found = []
    expr = re.sub(r"\b(by|on|ignoring|without|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range durations
    token = re.compile(r'"(?:[^"\\]|\\.)*"|([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\{[^}]*\})?(\s*\()?')
    for match in token.finditer(expr):
        name, braces, call = match.groups()
        if not name or call or name in PROMQL_WORDS:
            continue
        matchers = re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', braces or "")
        found.append((name, matchers))
    return found


def _groupings(expr: str) -> list[tuple[str, list[str], str]]:
    """``[(keyword, labels, what it applies to), ...]``: an aggregation's ``by (...)`` with its argument,
    a binary operator's ``on``/``ignoring`` with the whole expression."""
    out = []
    for match in re.finditer(r"\b(by|on|ignoring|without)\s*\(([^)]*)\)", expr):
        labels = [label.strip() for label in match.group(2).split(",") if label.strip()]
        scope = expr
        if match.group(1) in ("by", "without"):
            rest = match.end() + len(expr[match.end() :]) - len(expr[match.end() :].lstrip())
            scope = expr[rest : _closing(expr, rest)]
        out.append((match.group(1), labels, scope))
    return out


def _recorded_series(exported: dict) -> dict:
    """The recording rules as series: their labels are their ``by`` labels, or their metrics' less ``ignoring``."""
    series = dict(exported)
    for rule in rules():
        if "record" not in rule:
            continue
        expr = rule["expr"]
        by = {label for kw, labels, _ in _groupings(expr) if kw == "by" for label in labels}
        if by:
            labels = {label: None for label in by}
        else:
            labels = {label: v for name, _ in _selectors(expr) for label, v in series[name].items()}
            for kw, ignored, _ in _groupings(expr):
                for label in ignored if kw == "ignoring" else ():
                    labels.pop(label, None)
        series[rule["record"]] = {**labels, **SCRAPE_LABELS}
    return series


def _label_problems(expr: str, series: dict) -> list[str]:
    problems = []
    for name, matchers in _selectors(expr):
        if name not in series:
            problems.append(f"{name}: not exported")
            continue
        for label, op, value in matchers:
            if label not in series[name]:
                problems.append(f"{name}: no label {label} (it has {sorted(series[name])})")
            elif series[name][label] is not None and op in ("=", "=~"):
                known = series[name][label]
                for alternative in value.split("|") if op == "=~" else [value]:
                    if not any(re.fullmatch(alternative, v) for v in known):
                        problems.append(f'{name}{{{label}{op}"{value}"}}: {alternative!r} is none of {sorted(known)}')
    for keyword, labels, scope in _groupings(expr):
        inside = set().union(*(series.get(name, {}) for name, _ in _selectors(scope)))
        for label in labels:
            if label != "le" and label not in inside:
                problems.append(f"{keyword} ({label}): no metric of {scope!r} has it")
            if label == "le" and not all(name.endswith("_bucket") for name, _ in _selectors(scope)):
                problems.append(f"by (le) over a series that is no histogram bucket: {scope!r}")
    for match in re.finditer(r"histogram_quantile\(", expr):
        call = expr[match.end() - 1 : _closing(expr, match.end() - 1)]
        if not re.search(r"\bby \(le\b|\bby \([^)]*\ble\b", call):
            problems.append(f"histogram_quantile not summed by (le, ...): {call}")
    return problems


def test_every_query_and_rule_selects_series_and_labels_the_code_exports():
    """The name-only check above passed a query of a label the code never sets (``kind`` spelled
    ``type``, ``by (endpoint)`` on a stage metric), a histogram's bare name (only its ``_bucket``,
    ``_sum`` and ``_count`` exist) or a ``_total`` on a histogram's series: the panel stays empty and
    the alert can never fire, and each alert's promtool test, written against the rule, passes all the
    same. Here the series and labels come from the code, and the promtool tests' input series must be
    ones the code exports too."""
    series = _recorded_series(_exported_series())
    assert "online_request_latency_ms" not in series and "online_request_latency_ms_bucket" in series
    assert "le" in series["funnel_stage_latency_ms_bucket"] and "le" not in series["funnel_stage_latency_ms_sum"]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [r["expr"] for r in rules()]
    problems = {expr: _label_problems(expr, series) for expr in exprs}
    assert not {e: p for e, p in problems.items() if p}, {e: p for e, p in problems.items() if p}
    # the checker itself finds what it is for
    for wrong in (
        'sum(rate(funnel_stage_errors_total{type="internal"}[5m]))',
        'sum(rate(online_errors_total{kind="internal_error"}[5m]))',
        "sum by (endpoint) (rate(funnel_stage_errors_total[5m]))",
        "histogram_quantile(0.99, sum by (le) (rate(funnel_stage_latency_ms[5m])))",
        "histogram_quantile(0.99, sum by (stage) (rate(funnel_stage_latency_ms_bucket[5m])))",
        "sum(rate(funnel_stage_latency_ms_count_total[5m]))",
        "sum by (version) (rate(online_request_latency_ms_count[5m]))",
        "sum by (le) (rate(funnel_stage_latency_ms_sum[5m]))",
    ):
        assert _label_problems(wrong, series), wrong
    # the promtool tests feed the rules series the code exports
    unknown = []
    for path in sorted(RULE_TESTS.glob("*.yml")):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for item in test.get("input_series", []):
                name, _, braces = item["series"].partition("{")
                selector = f"{name}{{{braces}" if braces else name
                labels = re.findall(r'([a-zA-Z_]\w*)\s*=\s*"((?:[^"\\]|\\.)*)"', selector)
                if name not in series or not {label for label, _ in labels} <= set(series[name]):
                    unknown.append((path.name, item["series"]))
                else:
                    unknown += [
                        (path.name, item["series"])
                        for label, value in labels
                        if series[name][label] is not None and value not in series[name][label]
                    ]
    assert not unknown, unknown
    # and docs/monitoring.md's table of what is exported names every metric a panel or an alert reads
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    read = {re.sub(r"_(bucket|sum|count)$", "", name) for e in exprs for name, _ in _selectors(e) if ":" not in name}
    assert not {name for name in read if f"`{name}`" not in doc and name != "up" and not name.startswith("nv_")}
