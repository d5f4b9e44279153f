"""Alert delivery: our own Alertmanager sends what Prometheus fires to the alert log (and webhooks).

Fast and real: Debian's prometheus-alertmanager on a free loopback port, alerts posted to its API as
Prometheus posts them, the AlertLog webhook receiving them. The path from a rule firing in Prometheus
to the log is in tests/test_prometheus.py. Skipped, with the reason, where Alertmanager is not
installed (``make services`` installs it as root).
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from deployment.alerting import AlertLog, Alertmanager, alert_records
from deployment.monitoring import PrometheusServer

ROOT = Path(__file__).resolve().parents[1]
installed = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
needs_alertmanager = pytest.mark.skipif(
    not installed,
    reason="Alertmanager is not installed (Debian package prometheus-alertmanager; `make services` as root)",
)


def post(url: str, body) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def wait_for(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s")


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@needs_alertmanager
def test_a_firing_alert_and_its_resolution_reach_the_alert_log(tmp_path):
    labels = {"alertname": "FunnelInternalErrors", "severity": "critical", "stage": "ordering"}
    now = datetime.now(timezone.utc)
    with (
        AlertLog(tmp_path / "alerts.jsonl") as sink,
        Alertmanager([sink.url], group_wait="1s", group_interval="1s", repeat_interval="1h") as am,
    ):
        # What Prometheus posts while the rule fires: the alert, its end a few evaluations ahead.
        alert = {"labels": labels, "annotations": {"summary": "ordering fails"}, "startsAt": stamp(now)}
        assert post(f"{am.url}/api/v2/alerts", [{**alert, "endsAt": stamp(now + timedelta(minutes=5))}]) == 200
        firing = wait_for(lambda: [r for r in sink.records() if r["status"] == "firing"])
        assert firing[0]["alertname"] == "FunnelInternalErrors"
        assert firing[0]["labels"] == labels and firing[0]["annotations"]["summary"] == "ordering fails"
        assert firing[0]["ends_at"] is None and firing[0]["receiver"] == "funnel"
        # What Prometheus posts once the rule stops firing: the end now; send_resolved delivers it.
        assert post(f"{am.url}/api/v2/alerts", [{**alert, "endsAt": stamp(datetime.now(timezone.utc))}]) == 200
        resolved = wait_for(lambda: [r for r in sink.records() if r["status"] == "resolved"])
        assert resolved[0]["labels"] == labels and resolved[0]["ends_at"]
        assert len(firing) == 1  # grouped: one notification for the firing alert, not one per post


@needs_alertmanager
def test_alertmanager_listens_on_loopback_only(tmp_path):
    """No gossip port: a lone Alertmanager otherwise listens on 0.0.0.0:9094 for cluster peers.

    Its sockets are read with psutil (in the lock), not `ss`: iproute2 is in no package `make services`
    installs and a minimal Debian lacks it, where this test failed with FileNotFoundError."""
    with AlertLog(tmp_path / "alerts.jsonl") as sink, Alertmanager([sink.url]) as am:
        connections = psutil.Process(am.process.pid).net_connections(kind="inet")
        # what `ss -ltnup` lists: listening TCP sockets and every UDP one (gossip uses both)
        mine = [c for c in connections if c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM]
        local = [f"{c.laddr.ip}:{c.laddr.port}" for c in mine]
        assert local == [f"127.0.0.1:{am.port}"], connections


def test_the_alert_log_refuses_what_is_not_alertmanagers_and_writes_nothing(tmp_path):
    with AlertLog(tmp_path / "alerts.jsonl") as sink:
        assert post(sink.url, b"not json") == 400
        assert post(sink.url, {"status": "firing"}) == 400  # no alerts list
        assert post(sink.url, {"alerts": [{"status": "firing"}]}) == 400  # an alert without labels
        assert post(sink.url.replace("/alerts", "/other"), {"alerts": []}) == 404
        assert sink.records() == []
        assert post(sink.url, {"receiver": "r", "status": "firing", "alerts": [{"labels": {"alertname": "A"}}]}) == 200
        assert [r["alertname"] for r in sink.records()] == ["A"]
    with pytest.raises(ValueError, match="no 'alerts' list"):
        alert_records([])


def test_prometheus_sends_to_the_alertmanagers_it_is_given():
    targets = {"tritonserver": ["127.0.0.1:8002"]}
    assert "alerting" not in PrometheusServer(targets).config()
    config = PrometheusServer(targets, alertmanagers=["127.0.0.1:9093"]).config()
    assert config["alerting"] == {"alertmanagers": [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]}


def test_alertmanager_needs_a_receiver():
    with pytest.raises(ValueError, match="at least one webhook"):
        Alertmanager([])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alert-webhook", "ftp://example.org/hook"], "not an http(s) URL"),
        (["--alert-webhook", "example.org/hook"], "not an http(s) URL"),
        (["--alert-log", "{tmp}"], "is a folder, not a file"),
    ],
)
def test_monitor_refuses_bad_alert_arguments_before_starting_anything(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "monitor.py"), *args, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert not (tmp_path / "data").exists()
