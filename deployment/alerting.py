"""Delivering Prometheus' alerts: our own Alertmanager, and an alert log it can deliver to.

Prometheus only evaluates the rules of ``monitoring/prometheus/funnel-alerts.yml``; an alert that
fires is shown on its ``/alerts`` page and goes nowhere else. Alertmanager is what groups firing
alerts, waits out flapping, repeats them while they last, says when they resolve, and sends them to
receivers. ``scripts/monitor.py`` starts one beside Prometheus:

    Prometheus --(firing / resolved)--> Alertmanager --(webhook, JSON)--> AlertLog (alerts.jsonl)
                                                                     \\--> your webhook (--alert-webhook)

``Alertmanager`` runs Debian's ``prometheus-alertmanager`` (``make services``) with its own config
and data folder on loopback, clustering off (it listens on 0.0.0.0:9094 for peers otherwise), the
way ``PrometheusServer`` runs Prometheus. ``AlertLog`` is the receiver a machine without any other
has: a loopback webhook that appends each alert Alertmanager sends as one JSON line, so an alert
leaves a record a person or a script can read (``docs/monitoring.md``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from deployment.monitoring import ConfiguredServer, PrometheusServer
from deployment.server import LOOPBACK, WILDCARDS, free_port, host_port
from serving.metrics import BackgroundHTTPServer

log = logging.getLogger(__name__)

# Alertmanager's grouping, its defaults for a dashboard-watched service: the first notification of a
# group waits 30 s for its siblings, a changed group is sent again after 5 min, a standing one every 4 h.
GROUP_WAIT, GROUP_INTERVAL, REPEAT_INTERVAL = "30s", "5m", "4h"
# "...": every label, so each alert (a stage, a model, an arm, a version's metric) is its own notification.
GROUP_BY = ["..."]


def alertmanager_binary() -> Path:
    """Debian's ``prometheus-alertmanager`` (upstream's name ``alertmanager`` too) from ``PATH``."""
    for name in ("prometheus-alertmanager", "alertmanager"):
        if found := shutil.which(name):
            return Path(found)
    raise FileNotFoundError(
        "alertmanager is not installed; `make services` installs it (Debian package prometheus-alertmanager)"
    )


def alertmanager_installed() -> bool:
    """Whether ``alertmanager_binary`` finds one (``scripts/monitor.py`` then delivers alerts)."""
    try:
        alertmanager_binary()
    except FileNotFoundError:
        return False
    return True


class Alertmanager(ConfiguredServer):
    """An Alertmanager process of our own, sending every alert to each of ``webhooks`` (URLs that take
    Alertmanager's webhook JSON: ``AlertLog.url``, a chat bridge, an incident tool). Listens on
    ``127.0.0.1`` (a free port unless given), keeps its state in a temporary folder unless
    ``data_dir`` is given; ``stop`` ends it.

        with AlertLog("build/monitor/alerts.jsonl") as sink, Alertmanager([sink.url]) as am:
            PrometheusServer(targets, rules, alertmanagers=[am.address])
    """

    name = "alertmanager"
    stop_timeout = 20.0

    def __init__(
        self,
        webhooks: list[str],
        port: int | None = None,
        data_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        host: str = LOOPBACK,
        group_wait: str = GROUP_WAIT,
        group_interval: str = GROUP_INTERVAL,
        repeat_interval: str = REPEAT_INTERVAL,
        startup_timeout: float = 60.0,
    ):
        if not webhooks:
            raise ValueError("Alertmanager needs at least one webhook to send alerts to")
        self.webhooks = list(webhooks)
        self.port = port or free_port()
        self._chosen_ports = [] if port else ["port"]  # a taken port chosen here is chosen again at start
        self.host = host
        self.group_wait, self.group_interval, self.repeat_interval = group_wait, group_interval, repeat_interval
        self.startup_timeout = startup_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="alertmanager-"))
        self.data_dir = Path(data_dir).resolve() if data_dir else self._workdir / "data"
        self.log_path = Path(log_path) if log_path else self._workdir / "alertmanager.log"
        self.config_path = self._workdir / "alertmanager.yml"

    @property
    def address(self) -> str:
        """``host:port``, what Prometheus' ``alerting`` section names."""
        return host_port(LOOPBACK if self.host in WILDCARDS else self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def config(self) -> dict:
        return {
            "route": {
                "receiver": "funnel",
                "group_by": GROUP_BY,
                "group_wait": self.group_wait,
                "group_interval": self.group_interval,
                "repeat_interval": self.repeat_interval,
            },
            "receivers": [
                {"name": "funnel", "webhook_configs": [{"url": url, "send_resolved": True} for url in self.webhooks]}
            ],
        }

    def command(self) -> list[str]:
        return [
            str(alertmanager_binary()),
            f"--config.file={self.config_path}",
            f"--storage.path={self.data_dir}",
            f"--web.listen-address={host_port(self.host, self.port)}",
            "--cluster.listen-address=",  # no peers: a lone instance opens no gossip port
        ]

    def alerts(self) -> list[dict]:
        """The alerts Alertmanager holds now (its API v2): ``[{"labels", "annotations", "status", ...}]``."""
        from urllib.request import urlopen

        with urlopen(f"{self.url}/api/v2/alerts", timeout=30) as response:
            return json.loads(response.read())


def alert_records(payload: dict) -> list[dict]:
    """One record per alert of an Alertmanager webhook ``payload`` (version 4): its status (firing or
    resolved), name, labels, annotations, start and end, and the group's receiver. ``ValueError``
    names what a payload that is not Alertmanager's lacks."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise ValueError("not an Alertmanager webhook payload: no 'alerts' list")
    records = []
    for alert in payload["alerts"]:
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise ValueError("not an Alertmanager webhook payload: an alert without 'labels'")
        labels = alert["labels"]
        ends_at = alert.get("endsAt")
        if ends_at and ends_at.startswith("0001-"):  # Go's zero time: a firing alert has no end yet
            ends_at = None
        records.append(
            {
                "status": alert.get("status", payload.get("status")),
                "alertname": labels.get("alertname"),
                "labels": labels,
                "annotations": alert.get("annotations", {}),
                "starts_at": alert.get("startsAt"),
                "ends_at": ends_at,
                "received_at": time.time(),
                "receiver": payload.get("receiver"),
            }
        )
    return records


class AlertLog(BackgroundHTTPServer):
    """A webhook receiver on loopback that appends every alert Alertmanager sends to ``path`` as one
    JSON line (``alert_records``) and logs one line per alert. ``POST /alerts`` only; a body that is
    not Alertmanager's JSON is answered 400 with the reason and writes nothing. ``records()`` reads
    the file back."""

    thread_name = "alert-log"

    def __init__(self, path: str | Path, host: str = LOOPBACK, port: int = 0, idle_timeout_s: float = 10.0):
        from http.server import BaseHTTPRequestHandler

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout_s

            def do_POST(self):  # noqa: N802 (the http.server API)
                if self.path.split("?")[0] != "/alerts":
                    self.send_error(404)
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    records = alert_records(json.loads(self.rfile.read(length)))
                except (ValueError, UnicodeDecodeError) as err:  # json's errors are ValueErrors
                    self.send_error(400, explain=str(err))
                    return
                sink.write(records)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, fmt, *args):
                log.debug("alert log: " + fmt, *args)

        self._listen(Handler, host, port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/alerts"

    def write(self, records: list[dict]) -> None:
        with self._lock, open(self.path, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
                summary = record["annotations"].get("summary", "")
                log.warning("alert %s: %s %s", record["status"], record["alertname"], summary)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self._lock:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def check_ready(prometheus: PrometheusServer, alertmanager: Alertmanager | None = None, timeout_s: float = 60.0) -> int:
    """``scripts/monitor.py --check``: 0 once every target is up, every rule group is loaded and
    Prometheus sends to ``alertmanager`` (when there is one), printing them; 1 after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        targets = prometheus.active_targets()
        groups = prometheus.rules()
        up = {t["labels"]["job"]: t["health"] for t in targets}
        senders = prometheus.active_alertmanagers()
        sends = alertmanager is None or any(alertmanager.address in url for url in senders)
        if up and all(h == "up" for h in up.values()) and groups and sends:
            break
        if time.monotonic() > deadline:
            print(f"not ready after {timeout_s:.0f}s: targets {up}, {len(groups)} rule groups, alertmanagers {senders}")
            return 1
        time.sleep(0.5)
    rules = [r for g in groups for r in g["rules"]]
    alerts = sorted(r["name"] for r in rules if r["type"] == "alerting")
    print(f"targets up: {', '.join(sorted(up))}")
    print(f"{len(groups)} rule groups, {len(rules)} rules; alerts: {', '.join(alerts)}")
    if alertmanager is not None:
        print(f"alertmanager up: prometheus sends to {alertmanager.url}")
    return 0
