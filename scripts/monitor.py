#!/usr/bin/env python
"""Watch a running server: start Prometheus with the project's rules against it; Ctrl-C stops it.

Starts two things on this machine, both on 127.0.0.1:

* the monitoring sidecar, a small exporter of what the server's own endpoint cannot say: the
  tritonserver process's resident memory and CPU (read from /proc; the stubs export their own) and
  the live-vs-holdout comparison of the feedback log (online/ab_report.py: HoldoutMonitor), which
  the LiveBelowHoldout alert watches;
* Prometheus (Debian's package, `make services`; its own config and data folder, not the system
  service), scraping the server's metrics endpoint (job "tritonserver") and the sidecar (job
  "funnel-monitor"), evaluating monitoring/prometheus/funnel-alerts.yml;
* Alertmanager (Debian's prometheus-alertmanager), which delivers the alerts that fire, and when they
  resolve, to the alert log (--alert-log, one JSON line per alert) and to each --alert-webhook.

Then point Grafana at the printed Prometheus URL and import monitoring/grafana/funnel-dashboard.json
(docs/monitoring.md). Run it on the server's machine: the sidecar reads the server's /proc entry and
its feedback log. --check starts everything, waits until both targets answer and the rules are
loaded, prints them and stops (a smoke test).

    .venv/bin/python scripts/serve.py --model-repository build/triton_repo      # in one terminal
    .venv/bin/python scripts/monitor.py --model-repository build/triton_repo    # in another
"""

import argparse
import math
import signal
import sys
import threading
from pathlib import Path

from configs.cli import (
    output_file,
    output_folder,
    port,
    port_or_zero,
    prometheus_duration,
    seconds_or_none,
    webhook_url,
)
from deployment.alerting import AlertLog, Alertmanager, alertmanager_installed, check_ready
from deployment.monitoring import PrometheusServer, find_tritonserver
from deployment.server import ServerError, host_port
from online.ab_report import HOLDOUT_STALE_S, MONITOR_EFFECT, RETIRED_AFTER_S, HoldoutMonitor
from online.router import feedback_log_path
from serving.metrics import MetricsExporter, process_exposition
from workflows.live_store import describe

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "prometheus" / "funnel-alerts.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "funnel-dashboard.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-port", type=port, default=8002, help="the server's metrics port (scripts/serve.py)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="where the server's metrics endpoint listens")
    parser.add_argument(
        "--model-repository", default="build/triton_repo", help="the served repository: its feedback log lies beside it"
    )
    parser.add_argument(
        "--feedback-log",
        help="the feedback log: a file or the postgresql:// DSN replicas share (default: beside --model-repository)",
    )
    parser.add_argument("--port", type=port_or_zero, default=9090, help="Prometheus' port on 127.0.0.1 (0: a free one)")
    parser.add_argument(
        "--exporter-port", type=port_or_zero, default=0, help="the sidecar's port on 127.0.0.1 (0: a free one)"
    )
    parser.add_argument("--scrape-interval", type=prometheus_duration, default="15s", help="a Prometheus duration")
    parser.add_argument("--evaluation-interval", type=prometheus_duration, default="15s", help="a Prometheus duration")
    parser.add_argument("--rules", nargs="+", default=[str(RULES)], help="rule files (default: the project's)")
    parser.add_argument(
        "--holdout-interval", type=float, default=60.0, help="seconds between live-vs-holdout computations"
    )
    parser.add_argument(
        "--holdout-window-days", type=float, help="compare only the last so many days of the log (default: all)"
    )
    parser.add_argument(
        "--holdout-effect",
        type=float,
        default=MONITOR_EFFECT,
        help="relative gap the alert's sequential test is tuned to find soonest (docs/monitoring.md)",
    )
    parser.add_argument(
        "--holdout-retired-after",
        type=seconds_or_none,
        default=RETIRED_AFTER_S,
        help="seconds: a version whose last live response is so much older than the log's latest drops out of "
        f"the comparison (default {RETIRED_AFTER_S:g}; 'none' keeps every version)",
    )
    parser.add_argument(
        "--data-dir",
        type=output_folder,
        default="build/monitor/prometheus",
        help="Prometheus' data (kept between runs)",
    )
    parser.add_argument(
        "--alertmanager-port", type=port_or_zero, default=9093, help="Alertmanager's port on 127.0.0.1 (0: a free one)"
    )
    parser.add_argument(
        "--alert-log",
        type=output_file,
        default="build/monitor/alerts.jsonl",
        help="where delivered alerts are appended (JSON lines)",
    )
    parser.add_argument(
        "--alert-webhook",
        type=webhook_url,
        action="append",
        default=[],
        help="also send every alert to this URL (Alertmanager's webhook JSON); may be given more than once",
    )
    parser.add_argument(
        "--alertmanager-data-dir",
        type=output_folder,
        default="build/monitor/alertmanager",
        help="Alertmanager's silences and notification log (kept between runs: no repeat after a restart)",
    )
    parser.add_argument(
        "--no-alertmanager", action="store_true", help="evaluate the rules only: firing alerts go nowhere"
    )
    parser.add_argument("--check", action="store_true", help="start, wait until targets and rules are up, stop")
    args = parser.parse_args()
    if args.no_alertmanager and args.alert_webhook:  # nothing delivers to it: was dropped without a word
        parser.error("argument --alert-webhook: not allowed with --no-alertmanager (no Alertmanager delivers to it)")
    # NaN or inf made every sequential p-value NaN, and a window of 0 or fewer days compared the whole
    # log (0) or none of it (a start in the future): either way LiveBelowHoldout could never fire.
    if not (args.holdout_effect > 0 and math.isfinite(args.holdout_effect)):
        parser.error(f"argument --holdout-effect: must be a finite number > 0, got {args.holdout_effect}")
    if args.holdout_window_days is not None and not args.holdout_window_days > 0:
        parser.error(f"argument --holdout-window-days: must be > 0, got {args.holdout_window_days:g}")
    if not 0 < args.holdout_interval < HOLDOUT_STALE_S:
        parser.error(
            f"argument --holdout-interval: must be in (0, {HOLDOUT_STALE_S}) seconds (HoldoutMonitorDown fires "
            f"when the comparison is older than {HOLDOUT_STALE_S} s), got {args.holdout_interval:g}"
        )

    for rules in args.rules:  # before the sidecar starts: PrometheusServer raised it as a traceback
        if not Path(rules).is_file():
            parser.error(f"argument --rules: no such file: {rules}")
    deliver = not args.no_alertmanager
    if deliver and not alertmanager_installed():
        if args.alert_webhook:  # asked for explicitly: not silently dropped
            parser.error("argument --alert-webhook: alertmanager is not installed (make services)")
        print("alertmanager is not installed (make services): firing alerts are only on Prometheus' /alerts page")
        deliver = False

    log_path = args.feedback_log or feedback_log_path(args.model_repository)  # a file or a postgresql:// DSN
    holdout = HoldoutMonitor(
        log_path,
        window_s=args.holdout_window_days * 86400 if args.holdout_window_days else None,
        interval_s=args.holdout_interval,
        effect=args.holdout_effect,
        retired_after_s=args.holdout_retired_after,
    )
    pid = find_tritonserver(args.metrics_port)
    if pid is None:
        print(f"no local tritonserver with --metrics-port={args.metrics_port} yet: its memory and CPU follow once up")

    def server_process() -> str:
        # looked up on every scrape: a supervised server restarts as a new process
        found = find_tritonserver(args.metrics_port)
        return process_exposition(found, {"process": "tritonserver"}) if found else ""

    collectors = [server_process, holdout.exposition]

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    exporter = MetricsExporter(collectors, port=args.exporter_port).start()
    sink = alertmanager = None
    if deliver:
        sink = AlertLog(args.alert_log).start()
        alertmanager = Alertmanager(
            [sink.url, *args.alert_webhook], port=args.alertmanager_port or None, data_dir=args.alertmanager_data_dir
        )
    prometheus = PrometheusServer(
        {
            "tritonserver": [host_port(args.metrics_host, args.metrics_port)],
            "funnel-monitor": [f"127.0.0.1:{exporter.port}"],
        },
        args.rules,
        port=args.port or None,
        scrape_interval=args.scrape_interval,
        evaluation_interval=args.evaluation_interval,
        data_dir=args.data_dir,
        alertmanagers=[alertmanager.address] if alertmanager else [],
    )
    died = False
    try:
        try:
            if alertmanager:
                alertmanager.start()
                # where it listens now: a port it chose and found taken was chosen again at start
                prometheus.alertmanagers = [alertmanager.address]
            prometheus.start()
        except ServerError as err:  # a port in use, a bad config: its log's tail, not a traceback
            print(f"could not start: {err}")
            sys.exit(1)
        print(f"prometheus  {prometheus.url}  (config {prometheus.config_path}, data {prometheus.data_dir})")
        # describe: a postgresql:// DSN may carry a password, which a terminal or a service log keeps
        print(f"sidecar     {exporter.url}  (tritonserver pid {pid}, feedback log {describe(log_path)})")
        print(f"rules       {', '.join(args.rules)}")
        if alertmanager:
            to = ", ".join([str(sink.path), *args.alert_webhook])
            print(f"alerts      {alertmanager.url}  (delivers firing and resolved alerts to {to})")
        print(f"grafana     add a Prometheus data source with URL {prometheus.url}, then import {DASHBOARD}")
        if args.check:
            sys.exit(check_ready(prometheus, alertmanager))
        print("Ctrl-C stops Prometheus, Alertmanager and the sidecar", flush=True)
        while not stop.wait(1.0):
            for name, process in (("prometheus", prometheus), ("alertmanager", alertmanager)):
                if process is not None and process.process.poll() is not None:
                    print(f"{name} exited:\n{process.log_tail()}")
                    died = True  # a crash, not a stop: exit status 1
            if died:
                break
    finally:
        prometheus.cleanup()  # its config and log; the data folder is kept
        if alertmanager is not None:
            alertmanager.cleanup()
        if sink is not None:
            sink.stop()
        exporter.stop()
    print("prometheus stopped")
    if died:
        sys.exit(1)


if __name__ == "__main__":
    main()
