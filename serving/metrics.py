"""Custom Prometheus metrics of the funnel's stages, published through Triton's metrics endpoint.

Triton already exports per-model request counts and queue/compute times at ``/metrics``. The stages
add what only they know, through the Python backend's ``pb_utils.MetricFamily`` (tritonserver 2.51
supports counters, gauges and histograms there):

    funnel_stage_latency_ms{stage, version}        histogram: time inside the stage per request
    funnel_stage_requests_total{stage, version}    counter: requests the stage answered or refused
    funnel_stage_errors_total{stage, version, kind} counter: kind = bad_request | internal
    funnel_stage_candidates{stage, version}        histogram: items the stage passed on
    funnel_fallback_total{version}                 counter: responses served by the popularity fallback

The histograms are ``CounterHistogram``s: a histogram's series (``_bucket{le}``, ``_sum``,
``_count``) kept as counters, so that many requests cost one update per series, not one each.

and every stub process (one per model instance) samples its own resources (``ProcessSampler``):

    funnel_process_resident_memory_bytes{process="stub", model, version, model_instance}  gauge
    funnel_process_cpu_seconds_total{process="stub", model, version, model_instance}      counter

The tritonserver process itself is measured from outside (``process_exposition``, served by the
monitoring sidecar of ``scripts/monitor.py``) under the same names with ``process="tritonserver"``:
Triton exports only the host's memory (``nv_cpu_memory_used_bytes``), not its own.

``monitoring/grafana/funnel-dashboard.json`` charts them; ``tests/test_triton_integration.py`` scrapes
them from a live server and ``tests/test_prometheus.py`` runs every dashboard query through a real
Prometheus. ``StageMetrics`` never lets a metrics failure fail a request; ``BackgroundRecorder`` and
``ProcessSampler`` keep the updates off the request path.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0]
CANDIDATE_BUCKETS = [0, 1, 10, 50, 100, 200, 300, 500, 1000, 5000]
# The key under which the fused funnel lists the stages a request skipped (``serving/fused.py``: a
# user the models never saw skips the candidate stages); those stages' metrics do not count it.
SKIPPED_STAGES = "skipped_stages"
ERROR_KINDS = ("bad_request", "internal")

# The output whose length is "the candidates this stage passed on". Stages not listed (feature
# lookup, query tower) pass on no item list; a new ranking stage is counted by its first output.
CANDIDATE_OUTPUT = {
    "retrieval": "candidate_ids",
    "filtering": "filtered_ids",
    "light_ranker": "light_ids",
    "heavy_ranker": "heavy_scores",
    "ordering": "item_ids",
}


def candidate_output(stage: str, output_names: list[str]) -> str | None:
    if stage in CANDIDATE_OUTPUT:
        return CANDIDATE_OUTPUT[stage]
    if stage.endswith("ranker") and output_names:
        return output_names[0]
    return None


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


class CounterHistogram:
    """A Prometheus histogram that takes many observations in one update.

    ``pb_utils``' own histogram takes one observation per call, and every call is a round trip from
    the stub process to the server process (two per stage and request; sending this one's series a
    few times a second instead cut the server's CPU per request by about a tenth,
    docs/measurements.md). This one counts in the stub and publishes the series a histogram
    exposes, ``<name>_bucket{le}`` (cumulative), ``<name>_sum`` and ``<name>_count``, as counters:
    a batch of any size costs one update per bucket it reaches plus two. PromQL reads them as it
    reads a histogram's (``histogram_quantile(0.99, rate(<name>_bucket[5m]))``, ``_sum / _count``);
    only the exposition's ``# TYPE`` line says counter.

    ``families`` are the three counter families of ``counter_histogram_families``; every series
    exists at 0 from the start (a counter first exported at 1 shows Prometheus no increase).
    """

    def __init__(self, families: tuple, labels: dict, buckets: list[float]):
        bucket_family, sum_family, count_family = families
        self.bounds = np.asarray([*buckets, math.inf], dtype=float)
        self.buckets = [bucket_family.Metric(labels={**labels, "le": _le(b)}) for b in self.bounds]
        self.sum = sum_family.Metric(labels=labels)
        self.count = count_family.Metric(labels=labels)

    def observe_many(self, values) -> None:
        """Add ``values`` (each >= 0); the count goes last, so a reader who sees it sees the rest."""
        values = np.asarray(values, dtype=float).reshape(-1)
        if not values.size:
            return
        cumulative = np.searchsorted(np.sort(values), self.bounds, side="right")
        for metric, n in zip(self.buckets, cumulative):
            if n:
                metric.increment(float(n))
        if values.sum():
            self.sum.increment(float(values.sum()))
        self.count.increment(float(values.size))


def counter_histogram_families(family, name: str, doc: str) -> tuple:
    """The ``_bucket``, ``_sum`` and ``_count`` counter families of a ``CounterHistogram`` ``name``."""
    return (
        family(f"{name}_bucket", f"{doc}: observations <= le (cumulative histogram bucket)", family.COUNTER),
        family(f"{name}_sum", f"{doc}: sum of observations", family.COUNTER),
        family(f"{name}_count", f"{doc}: number of observations", family.COUNTER),
    )


def stage_families(pb_utils) -> dict:
    """The metric families every stage publishes into (one set per process, shared by its stages)."""
    family = pb_utils.MetricFamily
    return {
        "latency": counter_histogram_families(
            family, "funnel_stage_latency_ms", "Time spent inside a funnel stage per request (ms)"
        ),
        "requests": family("funnel_stage_requests_total", "Requests a funnel stage handled", family.COUNTER),
        "errors": family("funnel_stage_errors_total", "Requests a funnel stage refused, by kind", family.COUNTER),
        "candidates": counter_histogram_families(
            family, "funnel_stage_candidates", "Items a funnel stage passed on per request"
        ),
        "fallback": family("funnel_fallback_total", "Responses served by the popularity fallback", family.COUNTER),
    }


class StageMetrics:
    """The metric objects of one stage instance (one stub process)."""

    def __init__(self, pb_utils, stage: str, version: int | str, output_names: list[str], families: dict | None = None):
        labels = {"stage": stage, "version": str(version)}
        # Keep the families referenced: a Metric must not outlive its MetricFamily.
        self._families = families or stage_families(pb_utils)
        f = self._families
        self.latency = CounterHistogram(f["latency"], labels, LATENCY_BUCKETS_MS)
        self.requests = f["requests"].Metric(labels=labels)
        self.errors = {kind: f["errors"].Metric(labels={**labels, "kind": kind}) for kind in ERROR_KINDS}
        self.counted = candidate_output(stage, output_names)
        self.candidates = CounterHistogram(f["candidates"], labels, CANDIDATE_BUCKETS) if self.counted else None
        self.fallback = f["fallback"].Metric(labels={"version": str(version)}) if stage == "ordering" else None

    def facts(self, seconds: float, result: dict | None, error_kind: str | None = None) -> tuple:
        """What one request contributes: ``(ms, error kind, candidates or None, fallback?)``."""
        if error_kind is not None:
            return seconds * 1000.0, error_kind, None, False
        candidates = None
        if self.candidates is not None and self.counted in result:
            candidates = float(np.asarray(result[self.counted]).size)
        fallback = False
        if self.fallback is not None:
            served_by = np.asarray(result.get("served_by", [b""])).reshape(-1)[0]
            fallback = served_by in (b"fallback", "fallback")
        return seconds * 1000.0, error_kind, candidates, fallback

    def record(self, batch: list[tuple]) -> None:
        """Apply the ``facts`` of one or more requests: one update per series, whatever the batch.

        The latency histogram goes last: once its count includes a request, so does every other
        metric (what a reader waiting on the count relies on)."""
        self.requests.increment(len(batch))
        errors = {kind: 0 for kind in ERROR_KINDS}
        fallbacks, candidates = 0, []
        for _, error_kind, passed_on, fallback in batch:
            if error_kind is not None:
                errors[error_kind] += 1
            if passed_on is not None:
                candidates.append(passed_on)
            fallbacks += fallback
        for kind, n in errors.items():
            if n:
                self.errors[kind].increment(n)
        if candidates:
            self.candidates.observe_many(candidates)
        if fallbacks:
            self.fallback.increment(fallbacks)
        self.latency.observe_many([ms for ms, *_ in batch])

    def observe(self, seconds: float, result: dict | None, error_kind: str | None = None) -> None:
        self.record([self.facts(seconds, result, error_kind)])


class FusedMetrics:
    """The stage metrics of the fused funnel (``serving/fused.py``): every stage inside it publishes
    the series it publishes as a model of its own (same names and ``stage`` labels, so the dashboard
    and the alerts read a fused server as they read the ensemble). ``facts`` takes the seconds each
    stage took (``FusedFunnel.timings``) and the request's tensors, which hold every stage's outputs.
    A refused request is counted once, under ``stage="fused_funnel"``: the model that refused it."""

    def __init__(self, pb_utils, name: str, version: int | str, stage_outputs: dict[str, list[str]]):
        families = stage_families(pb_utils)
        self.stages = {
            stage: StageMetrics(pb_utils, stage, version, outputs, families) for stage, outputs in stage_outputs.items()
        }
        self.name = name
        self.own = StageMetrics(pb_utils, name, version, [], families)

    def facts(self, seconds, result: dict | None, error_kind: str | None = None) -> list[tuple]:
        """``[(stage, StageMetrics.facts), ...]`` for one request; ``seconds`` is ``{stage: s}``
        when it was served, the fused model's own seconds when it was refused."""
        if error_kind is not None:
            return [(self.name, self.own.facts(seconds, None, error_kind))]
        skipped = result.get(SKIPPED_STAGES, ())
        return [(stage, self.stages[stage].facts(s, result)) for stage, s in seconds.items() if stage not in skipped]

    def record(self, batch: list[list[tuple]]) -> None:
        by_stage: dict[str, list] = {}
        for request in batch:
            for stage, facts in request:
                by_stage.setdefault(stage, []).append(facts)
        for stage, facts in by_stage.items():
            (self.own if stage == self.name else self.stages[stage]).record(facts)

    def observe(self, seconds, result: dict | None, error_kind: str | None = None) -> None:
        self.record([self.facts(seconds, result, error_kind)])


class BackgroundRecorder:
    """Records a ``StageMetrics``' (or ``OnlineMetrics``') observations on a thread of its own, off
    the request path, at most once per ``interval_s``.

    Every metric update is a round trip from the stub process to the server process; done inline
    that was ~17 round trips per funnel request before its response could leave a stage. The
    request thread only queues a small tuple. The recorder applies what has queued up with one
    update per series (``CounterHistogram``): at once when it has been idle for ``interval_s``,
    else when ``interval_s`` has passed since its last update. So a quiet server's metrics are
    current, and a busy one's round trips per second stay bounded however many requests arrive
    (its metrics lag by up to ``interval_s``; 0 records every request at once). The served stages
    take ``serving.metrics_interval_s``. ``flush`` records what is queued now and waits for it.
    """

    def __init__(self, metrics: StageMetrics, on_error=None, interval_s: float = 0.0):
        import queue

        self.metrics = metrics
        self.interval_s = interval_s
        self._on_error = on_error or (lambda err: None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._hurry = threading.Event()  # set by flush/close: record now, do not wait out the interval
        self._thread = threading.Thread(target=self._run, name="stage-metrics", daemon=True)
        self._thread.start()

    def observe(self, seconds: float, result: dict | None, error_kind: str | None = None) -> None:
        # facts first: one that raises is never queued, so it must not be counted pending (flush waits on it)
        facts = self.metrics.facts(seconds, result, error_kind)
        with self._idle:
            self._pending += 1
        self._queue.put(facts)

    def _run(self) -> None:
        import queue

        last = -math.inf
        while True:
            batch = [self._queue.get()]
            wait = last + self.interval_s - time.monotonic()
            if wait > 0:  # updated less than an interval ago: let more requests queue up
                self._hurry.wait(wait)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            batch = [b for b in batch if b is not None]
            if batch:
                try:
                    self.metrics.record(batch)
                except Exception as err:  # never let metrics take the stage down
                    self._on_error(err)
            last = time.monotonic()
            with self._idle:
                self._pending -= len(batch)
                self._idle.notify_all()
            if stop:
                return

    def flush(self, timeout: float = 5.0) -> bool:
        self._hurry.set()
        try:
            with self._idle:
                return self._idle.wait_for(lambda: self._pending == 0, timeout)
        finally:
            self._hurry.clear()

    def close(self, timeout: float = 5.0) -> None:
        self._hurry.set()
        self._queue.put(None)
        self._thread.join(timeout)


# Per-process resources, the same names for the stubs (published through Triton) and the server
# (published by the monitoring sidecar).
PROCESS_MEMORY = "funnel_process_resident_memory_bytes"
PROCESS_CPU = "funnel_process_cpu_seconds_total"
PROCESS_SAMPLE_S = 5.0  # a stub's sampling period: two round trips to the server each time


def read_process(pid: int | str = "self") -> tuple[float, float]:
    """Resident memory (bytes) and CPU time used so far (user + system, seconds) of a process, read
    from ``/proc`` (Linux; psutil is not a dependency)."""
    with open(f"/proc/{pid}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name, which may hold spaces: utime and stime are fields 14 and 15.
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb * 1024.0, (int(fields[11]) + int(fields[12])) / ticks


class ProcessSampler:
    """Publishes this stub process's resident memory and CPU time through Triton's metrics endpoint,
    every ``interval_s`` on a thread of its own (never on the request path). ``labels`` name the
    model, version and instance."""

    def __init__(self, pb_utils, labels: dict, interval_s: float = PROCESS_SAMPLE_S, on_error=None):
        family = pb_utils.MetricFamily
        labels = {"process": "stub", **{k: str(v) for k, v in labels.items()}}
        # Keep the families referenced: a Metric must not outlive its MetricFamily.
        self._families = (
            family(PROCESS_MEMORY, "Resident memory of a process (bytes)", family.GAUGE),
            family(PROCESS_CPU, "CPU time a process used, user + system (seconds)", family.COUNTER),
        )
        self.memory = self._families[0].Metric(labels=labels)
        self.cpu = self._families[1].Metric(labels=labels)
        self.interval_s = interval_s
        self._on_error = on_error or (lambda err: None)
        self._counted = 0.0
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-metrics", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        rss, cpu = read_process()
        self.memory.set(rss)
        if cpu > self._counted:  # a counter only goes up: add what was used since the last sample
            self.cpu.increment(cpu - self._counted)
            self._counted = cpu

    def _run(self) -> None:
        while True:
            try:
                self.sample()
                self._failing = False
            except Exception as err:  # never let metrics take the stage down; say so once per outage
                if not self._failing:
                    self._on_error(err)
                self._failing = True
            if self._stop.wait(self.interval_s):
                return

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def render_metrics(families: list[tuple[str, str, str, list[tuple[dict, float]]]]) -> str:
    """Prometheus text exposition of ``[(name, type, help, [(labels, value), ...]), ...]``."""

    def label_value(value) -> str:
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    def number(value) -> str:
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)

    lines = []
    for name, kind, doc, samples in families:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            inner = ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {number(value)}" if inner else f"{name} {number(value)}")
    return "\n".join(lines) + "\n"


def process_exposition(pid: int, labels: dict) -> str:
    """``PROCESS_MEMORY`` and ``PROCESS_CPU`` of another process (the tritonserver), as text; nothing
    for a process that is gone."""
    try:
        rss, cpu = read_process(pid)
    except (OSError, StopIteration, IndexError, ValueError):
        return ""
    return render_metrics(
        [
            (PROCESS_MEMORY, "gauge", "Resident memory of a process (bytes)", [(labels, rss)]),
            (PROCESS_CPU, "counter", "CPU time a process used, user + system (seconds)", [(labels, cpu)]),
        ]
    )


class BackgroundHTTPServer:
    """A ``ThreadingHTTPServer`` answering from a daemon thread: ``start``, ``stop``, or ``with``.
    Subclasses build their handler and call ``_listen``; ``port=0`` picks a free port."""

    thread_name = "http-server"

    def _listen(self, handler, host: str, port: int) -> None:
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MetricsExporter(BackgroundHTTPServer):
    """A small HTTP server that answers ``GET /metrics`` with whatever ``collectors`` render now
    (each returns Prometheus text). Listens on loopback unless told otherwise; ``port=0`` picks a free
    port. A collector that fails is logged and left out; the others are still served. A connection
    that sends nothing for ``idle_timeout_s`` is closed: each holds a thread, and a client that
    opened many and went quiet kept them all."""

    thread_name = "metrics-exporter"

    def __init__(
        self,
        collectors: list[Callable[[], str]],
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout_s: float = 10.0,
    ):
        from http.server import BaseHTTPRequestHandler

        exporter = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout_s  # the socket's timeout for each read (http.server's own knob)

            def do_GET(self):  # noqa: N802 (the http.server API)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics exporter: " + fmt, *args)

        self.collectors = list(collectors)
        self._listen(Handler, host, port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def render(self) -> str:
        parts = []
        for collect in self.collectors:
            try:
                parts.append(collect())
            except Exception:
                log.exception("metrics collector %r failed", collect)
        return "".join(parts)


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_LABEL_ESCAPE = re.compile(r"\\(.)")


def _unescape(match: re.Match) -> str:
    return "\n" if match.group(1) == "n" else match.group(1)


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """``/metrics`` text -> {metric name: [(labels, value), ...]} (enough for tests and the notebook)."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        if "{" in name_labels:
            name, _, rest = name_labels.partition("{")
            # quoted values may hold , = } and the escapes \\ \" \n: read each whole, then unescape
            labels = {k: _LABEL_ESCAPE.sub(_unescape, v) for k, v in _LABEL.findall(rest)}
        else:
            name, labels = name_labels, {}
        out.setdefault(name, []).append((labels, float(value)))
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, list[tuple[dict, float]]]:
    """Fetch and parse a Prometheus endpoint, e.g. ``TritonServer.metrics_url``."""
    from urllib.request import urlopen

    with urlopen(url, timeout=timeout) as response:
        return parse_prometheus(response.read().decode())


# The online metrics of an A/B test, per arm, counted where they happen: the router counts what it
# served, the feedback endpoint counts what users did with it. CTR per arm is
# rate(online_clicks_total) / rate(online_impressions_total) (monitoring/grafana/funnel-dashboard.json).
FEEDBACK_COUNTERS = {
    "click": ("online_clicks_total", "Clicks on served items, per arm"),
    "watch_seconds": ("online_watch_seconds_total", "Seconds watched of served items, per arm"),
    "like": ("online_likes_total", "Likes of served items, per arm"),
    "share": ("online_shares_total", "Shares of served items, per arm"),
    # Counts churn reports (one per response, at most), not distinct users: a user who churns after two
    # responses counts 2. Distinct users would need a set per replica that Prometheus cannot merge; the
    # A/B report's retention (users who never churned) counts users, from the log. The name is kept for
    # the dashboards and alerts that read it; its help says what it counts.
    "churn": (
        "online_churned_users_total",
        "Churn reports: responses after which the user did not come back (not distinct users), per arm",
    ),
}


class OnlineMetrics:
    """Per-arm counters of the ``ab_router`` (role ``router``) or ``feedback`` (role ``feedback``) model.

    Like ``StageMetrics`` it splits a request into ``facts`` (cheap, on the request thread) and
    ``record`` (the round trips to the server, on a ``BackgroundRecorder``). Each role counts one
    metric last in a batch, ``online_request_latency_ms`` (router) or ``online_feedback_total``
    (feedback): once that includes a request, every other counter does (``online_settled`` relies on it).
    The router passes its rollout's ``arms`` (arm -> model version), whose series start at 0, and
    its experiment's ``design_shares`` (arm -> share of the traffic outside the holdout), exported as
    the gauge ``online_arm_design_share`` that the sample-ratio alert compares the traffic with.
    """

    def __init__(
        self,
        pb_utils,
        role: str,
        arms: dict[str, int] | None = None,
        design_shares: dict[str, float] | None = None,
    ):
        if role not in ("router", "feedback"):
            raise ValueError(f"role must be router or feedback, got {role!r}")
        family = pb_utils.MetricFamily
        self.role = role
        specs = {
            "errors": (
                "online_errors_total",
                "Requests the router or feedback endpoint refused, by kind",
                family.COUNTER,
            )
        }
        if role == "router":
            specs.update(
                {
                    "requests": (
                        "online_requests_total",
                        "Responses served, per experiment arm and model version",
                        family.COUNTER,
                    ),
                    "impressions": (
                        "online_impressions_total",
                        "Items shown, per experiment arm and model version",
                        family.COUNTER,
                    ),
                    "fallback": (
                        "online_fallback_total",
                        "Responses served by the popularity fallback, per arm",
                        family.COUNTER,
                    ),
                }
            )
        else:
            specs.update({event: (name, doc, family.COUNTER) for event, (name, doc) in FEEDBACK_COUNTERS.items()})
            specs["feedback"] = ("online_feedback_total", "Feedback requests accepted, per arm", family.COUNTER)
        self._families = {key: family(name, doc, kind) for key, (name, doc, kind) in specs.items()}
        if role == "router":
            self._families["latency"] = counter_histogram_families(
                family, "online_request_latency_ms", "Router-to-response time per request and arm (ms)"
            )
        self._metrics: dict = {}
        # Error counters exist at 0 from the start: a counter first exported at 1 shows Prometheus no
        # increase, so the first refused requests would never appear in rate().
        for kind in ERROR_KINDS:
            self._metric("errors", {"endpoint": role, "kind": kind})
        # The router's per-arm series too (``arms``: arm -> version, the router's rollout). Created
        # at an arm's first response they would be born counting it, and rate() over a window that
        # starts before then would drop that arm's first requests, per bucket unevenly: a p99 read
        # from them landed a bucket above the requests' own.
        if role == "router":
            for arm, version in (arms or {}).items():
                labels = {"arm": arm, "version": str(version)}
                for key in ("requests", "impressions", "fallback"):
                    self._metric(key, labels)
                self._metric("latency", {"arm": arm})
            if design_shares:  # an experiment of any split (10/90, say), not only 50/50
                self._families["design_share"] = family(
                    "online_arm_design_share",
                    "Each arm's share of the traffic outside the holdout, by the experiment's design",
                    family.GAUGE,
                )
                for arm, share in design_shares.items():
                    self._metric("design_share", {"arm": arm}).set(float(share))

    def series(self) -> dict:
        """Every series this endpoint exports so far: ``{(key, sorted label pairs): metric}``."""
        return dict(self._metrics)

    def _metric(self, key: str, labels: dict):
        cache_key = (key, tuple(sorted(labels.items())))
        if cache_key not in self._metrics:
            if key == "latency":
                self._metrics[cache_key] = CounterHistogram(self._families[key], labels, LATENCY_BUCKETS_MS)
            else:
                self._metrics[cache_key] = self._families[key].Metric(labels=labels)
        return self._metrics[cache_key]

    def facts(self, seconds: float, result: dict | None, error_kind: str | None = None) -> tuple:
        """What one request contributes, as plain values: ``(kind, ms, labels, payload)``."""
        if error_kind is not None:
            return "error", seconds * 1000.0, {"endpoint": self.role, "kind": error_kind}, None
        arm = _first_text(result["arm"])
        if self.role == "router":
            labels = {"arm": arm, "version": _first_text(result["model_version"])}
            payload = (float(np.asarray(result["item_ids"]).size), _first_text(result["served_by"]) == "fallback")
            return "served", seconds * 1000.0, labels, payload
        labels = {"arm": arm, "version": str(result["_version"])}
        return "feedback", seconds * 1000.0, labels, [(event, float(value)) for event, value in result["_events"]]

    def record(self, batch: list[tuple]) -> None:
        """Apply the ``facts`` of one or more requests: one increment per counter and label set."""
        from collections import Counter

        counts: Counter = Counter()
        last: Counter = Counter()
        latencies: dict[str, list[float]] = {}
        for kind, ms, labels, payload in batch:
            key = tuple(sorted(labels.items()))
            if kind == "error":
                counts["errors", key] += 1
            elif kind == "served":
                impressions, fallback = payload
                counts["requests", key] += 1
                counts["impressions", key] += impressions
                counts["fallback", key] += fallback
                latencies.setdefault(labels["arm"], []).append(ms)
            else:
                for event, value in payload:
                    counts[event, key] += value
                last["feedback", key] += 1
        for (name, key), value in counts.items():
            if value or name == "impressions":  # a zero-item response still creates its series
                self._metric(name, dict(key)).increment(value)
        for (name, key), value in last.items():
            self._metric(name, dict(key)).increment(value)
        for arm, values in latencies.items():
            self._metric("latency", {"arm": arm}).observe_many(values)

    def observe(self, seconds: float, result: dict | None, error_kind: str | None = None) -> None:
        self.record([self.facts(seconds, result, error_kind)])


def online_settled(metrics: dict[str, list[tuple[dict, float]]], requests: int = 0, feedback: int = 0) -> bool:
    """Whether a scrape holds everything the router and feedback endpoint were asked: at least
    ``requests`` responses and ``feedback`` accepted feedback requests recorded in full (the router
    counts requests first and latencies last, so a scrape between the two shows them unequal)."""

    def total(name):
        return sum(value for _, value in metrics.get(name, []))

    served, timed = total("online_requests_total"), total("online_request_latency_ms_count")
    return served == timed and timed >= requests and total("online_feedback_total") >= feedback


def _first_text(value) -> str:
    first = np.asarray(value).reshape(-1)[0]
    return first.decode() if isinstance(first, bytes) else str(first)
