"""Prometheus for a running funnel: our own Prometheus process, and finding the server to watch.

``PrometheusServer`` runs Debian's ``prometheus`` binary (``make services`` installs it) with its own
configuration, rules and data folder on loopback, the way ``TritonServer`` runs tritonserver;
``scripts/monitor.py`` and ``tests/test_prometheus.py`` use it. ``docs/monitoring.md`` says what
is scraped and alerted on.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

from deployment.processes import LoggedProcess
from deployment.server import (
    LOOPBACK,
    PORT_RETRIES,
    WILDCARDS,
    PortTaken,
    ServerError,
    choose_taken_ports_again,
    free_port,
    host_port,
    process_argv,
    raise_if_port_taken,
    triton_option,
)

# The line Prometheus and Alertmanager (Go's net.Listen) log, then exit, for a listen address in use:
# err="listen tcp 127.0.0.1:9090: bind: address already in use".
GO_PORT_IN_USE = re.compile(r"listen tcp \S*:(?P<port>\d+): bind: address already in use")


def find_tritonserver(metrics_port: int) -> int | None:
    """The pid of the local tritonserver whose metrics listen on ``metrics_port`` (started by
    ``TritonServer`` or ``scripts/serve.py``), or None: how a monitor started separately finds the
    process whose memory and CPU it reports."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            argv = process_argv(int(proc.name))
            port = triton_option(argv[1:], "metrics-port") if argv and argv[0].endswith("tritonserver") else None
            if port == str(metrics_port):
                return int(proc.name)
    return None


def prometheus_binary(name: str = "prometheus") -> Path:
    """``prometheus`` or ``promtool`` from ``PATH`` (Debian's ``prometheus`` package: ``make services``)."""
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed; `make services` installs it (Debian package prometheus)")
    return Path(found)


class ConfiguredServer(LoggedProcess):
    """A server of the Prometheus family run as ours: its YAML config (``config()``) written into a
    temporary folder it runs in, its data in ``data_dir`` (in that folder unless given), ready once
    ``GET /-/ready`` answers 200 (Prometheus and Alertmanager alike) and the process itself listens on
    ``port``. Subclasses set ``name``, ``url``, ``port``, ``config()`` and ``command()``; ``cleanup``
    stops it and removes the folder.

    A port taken by another process when the server came to bind it (``PortTaken``): a port this
    object chose (``free_port``: ``_chosen_ports`` holds ``"port"``) is chosen again, up to
    ``PORT_RETRIES`` times, as ``TritonServer`` does; a port the caller gave fails the start at once,
    naming it."""

    name = "server"
    startup_timeout = 60.0
    port: int
    _chosen_ports: list[str] = []
    _workdir: Path
    config_path: Path
    data_dir: Path

    @property
    def url(self) -> str:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, port_retries: int = PORT_RETRIES):
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        cmd = self.command()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spawn(cmd, cwd=self._workdir)
        try:
            self.wait_until_ready()
        except PortTaken as taken:
            self.stop()
            choose_taken_ports_again(self, taken, self._chosen_ports, port_retries)
            return self.start(port_retries - 1)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self) -> None:
        from urllib.request import urlopen

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"{self.name} exited with code {self.process.returncode}:\n{self.start_log_tail()}"
                raise_if_port_taken(self.start_log(), GO_PORT_IN_USE, message, self.name)
                raise ServerError(message)
            # Only once this process listens on its port: before, whatever else holds the port (another
            # test's Prometheus, the system service on 9090) answers /-/ready while this one exits.
            if self.port in self.listening_ports():
                try:
                    with urlopen(f"{self.url}/-/ready", timeout=2) as response:
                        if response.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.2)
        raise ServerError(f"{self.name} not ready after {self.startup_timeout:.0f}s:\n{self.start_log_tail()}")

    def cleanup(self) -> None:
        """Stop, and remove the temporary folder (config, log, and the data unless ``data_dir`` was given)."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:  # __exit__ does not run: remove the temporary folder here (the error has the log)
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.cleanup()


class PrometheusServer(ConfiguredServer):
    """A Prometheus process of our own: its own config, rules and data folder (a temporary one unless
    given), listening on ``127.0.0.1`` on a free port, scraping ``targets`` (``{job: ["host:port", ...]}``,
    each at ``/metrics``). Not the system service: nothing is installed or left running; ``stop`` ends it.

        with PrometheusServer({"tritonserver": ["127.0.0.1:8002"]}, rule_files) as prom:
            prom.query("up")
    """

    name = "prometheus"
    stop_timeout = 20.0

    def __init__(
        self,
        targets: dict[str, list[str]],
        rule_files: list[str | Path] = (),
        port: int | None = None,
        scrape_interval: str = "15s",
        evaluation_interval: str = "15s",
        data_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        host: str = LOOPBACK,
        startup_timeout: float = 60.0,
        alertmanagers: list[str] = (),
    ):
        self.targets = {job: list(addresses) for job, addresses in targets.items()}
        self.rule_files = [Path(f).resolve() for f in rule_files]
        for path in self.rule_files:
            if not path.is_file():
                raise FileNotFoundError(f"rule file {path} does not exist")
        self.port = port or free_port()
        self._chosen_ports = [] if port else ["port"]  # a taken port chosen here is chosen again at start
        self.host = host
        self.alertmanagers = list(alertmanagers)  # "host:port" of each (deployment/alerting.py)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.startup_timeout = startup_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        # absolute: prometheus runs in the temporary folder, which cleanup removes with whatever lies in it
        self.data_dir = Path(data_dir).resolve() if data_dir else self._workdir / "data"
        self.log_path = Path(log_path) if log_path else self._workdir / "prometheus.log"
        self.config_path = self._workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://{host_port(LOOPBACK if self.host in WILDCARDS else self.host, self.port)}"

    def config(self) -> dict:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.evaluation_interval},
            "rule_files": [str(f) for f in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": addresses}]}
                for job, addresses in self.targets.items()
            ],
        }
        if self.alertmanagers:  # without one, a firing alert is only on Prometheus' /alerts page
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": self.alertmanagers}]}]}
        return config

    def command(self) -> list[str]:
        return [
            str(prometheus_binary()),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={host_port(self.host, self.port)}",
            "--storage.tsdb.retention.time=15d",
        ]

    def api(self, path: str, **params) -> dict | list:
        """``GET /api/v1/<path>``; the ``data`` of a successful answer, a ``RuntimeError`` otherwise."""
        import json
        from urllib.error import HTTPError
        from urllib.parse import urlencode
        from urllib.request import urlopen

        url = f"{self.url}/api/v1/{path}" + (f"?{urlencode(params)}" if params else "")
        try:
            with urlopen(url, timeout=30) as response:
                answer = json.loads(response.read())
        except HTTPError as err:  # a bad query: Prometheus says why in the body
            answer = json.loads(err.read() or b"{}")
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query: ``[{"metric": {labels}, "value": [time, "value"]}, ...]``."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def alerts(self) -> list[dict]:
        """Alerts now pending or firing: ``[{"labels", "annotations", "state", "activeAt", "value"}, ...]``."""
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]

    def active_targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def active_alertmanagers(self) -> list[str]:
        """The URLs of the Alertmanagers Prometheus sends to now."""
        return [a["url"] for a in self.api("alertmanagers")["activeAlertmanagers"]]
