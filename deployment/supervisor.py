"""Keep a served funnel answering: probe it, and restart the server when it stops.

A stage's Python stub can die (out of memory, a crash in native code, a kill). The supervisor
notices because a probe request through the whole ``funnel`` ensemble fails (or the server process
is gone) ``failures`` times in a row, and then restarts the server on the same ports, so clients
reconnect without any manual step. A server that keeps failing soon after each restart (a stage
that crashes on every request, a model that no longer loads) is restarted with an exponential
backoff, as Kubernetes backs off a crash-looping container: every restart loads every stage's
model again, and restarting in a tight loop would take the machine's CPU from everything else. The
backoff resets once the server has answered for ``stable_s`` after its last restart.

Besides the funnel request, each probe checks that every instance of every loaded Python-backend model
still has its stub process (``stub_probe``): Triton 2.51 (the pytriton 0.7.0 wheel) never restarts a
dead stub. After ``kill -9`` of an ``ab_router`` stub, every request that instance got failed with
``INTERNAL: Stub process 'ab_router_0_0' is not healthy.`` (measured for 30 s; the model stays READY,
and the log says nothing); with one of its two instances dead, every second request failed, which a
probe request, failing one time in two, would never see fail twice in a row. The check sends no
request: nothing is written to the feedback log and no counter moves. ``tests/test_triton_integration.py``
kills a stage's stub with SIGKILL and checks that the funnel answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from deployment.security import AdminKeyError
from deployment.server import RunningServer, ServerError, TritonServer

log = logging.getLogger(__name__)


def funnel_probe(url: str, root_certificates: str | None = None) -> None:
    """One request through every stage (an unknown user still passes all of them); raises on failure."""
    from serving.client import FunnelClient

    with FunnelClient(url, timeout_s=10.0, root_certificates=root_certificates) as client:
        client.recommend(user_id=0, k=1)


def funnel_probe_http(url: str) -> None:
    """``funnel_probe`` over Triton's HTTP endpoint (plain HTTP on the server's own host): for a server
    whose gRPC speaks TLS, where a gRPC probe on loopback fails the certificate's name check unless
    the certificate names 127.0.0.1, and would have the supervisor restart a healthy server forever."""
    import numpy as np
    import tritonclient.http as httpclient

    from serving.interface import FUNNEL

    client = httpclient.InferenceServerClient(url, connection_timeout=10.0, network_timeout=10.0)
    try:
        user = httpclient.InferInput("user_id", [1], "INT64")
        user.set_data_from_numpy(np.array([0], dtype=np.int64))
        top_k = httpclient.InferInput("k", [1], "INT32")
        top_k.set_data_from_numpy(np.array([1], dtype=np.int32))
        result = client.infer(FUNNEL, [user, top_k], outputs=[httpclient.InferRequestedOutput("item_ids")])
        result.as_numpy("item_ids")
    finally:
        client.close()


def python_instances(server: TritonServer | RunningServer, timeout_s: float = 10.0) -> dict[tuple[str, str], int]:
    """``{(model, version): instances}`` of every READY Python-backend model version of ``server``, from
    its control plane over HTTP (with the admin key; plain HTTP on the server's own host, as
    ``funnel_probe_http``). A model with other than CPU instance groups is left out: its stub count
    depends on the GPUs."""
    import tritonclient.http as httpclient

    from deployment.security import http_headers

    headers = http_headers(server.admin_key)
    client = httpclient.InferenceServerClient(server.http_url, connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        found = {}
        for entry in client.get_model_repository_index(headers=headers):
            if entry.get("state") != "READY":
                continue
            name, version = entry["name"], str(entry["version"])
            config = client.get_model_config(name, version, headers=headers)
            groups = config.get("instance_group") or []
            if config.get("backend") != "python" or not all(g.get("kind") == "KIND_CPU" for g in groups):
                continue
            found[(name, version)] = sum(int(g.get("count", 1)) for g in groups) or 1
        return found
    finally:
        client.close()


def stub_probe(server: TritonServer | RunningServer, timeout_s: float = 10.0) -> int:
    """Raise unless every instance of every READY Python-backend model version has a stub process; else
    return how many instances were checked. A killed stub is not restarted by Triton 2.51: the requests
    its instance gets fail from then on. Used by the supervisor (a ``TritonServer`` it started) and by
    ``scripts/probe.py`` (a ``RunningServer`` found in the probe's PID namespace)."""
    expected = python_instances(server, timeout_s=timeout_s)
    live = server.stub_pids_by_version()
    gone = [
        f"{model} v{version} ({len(live.get((model, version), []))} of {count} alive)"
        for (model, version), count in sorted(expected.items())
        if len(live.get((model, version), [])) < count
    ]
    if gone:
        raise RuntimeError(f"python backend stub process gone: {', '.join(gone)}")
    return sum(expected.values())


# The control plane's answer takes milliseconds; with the funnel request's 10 s this stays inside
# the Kubernetes manifests' 15 s probe timeout in all but a hung server's case (which fails either way).
STUB_CHECK_TIMEOUT_S = 4.0


class CannotCheck(Exception):
    """The stub check cannot run here: no admin key, or the server's process is not visible."""


def stub_check(url: str, http_url: str | None = None, timeout_s: float = STUB_CHECK_TIMEOUT_S) -> int:
    """``stub_probe`` of the tritonserver serving ``url``'s gRPC port, found among the processes this
    one can see (``RunningServer``; ``scripts/probe.py``'s check); the instances it checked.
    ``CannotCheck`` where it cannot run here: no such server visible, or no admin key."""
    port = int(url.rsplit(":", 1)[-1])
    try:
        server = RunningServer.by_grpc_port(port, http_url)
    except ServerError as err:
        raise CannotCheck(str(err)) from None
    if server is None:
        raise CannotCheck(f"no tritonserver serving gRPC port {port} among the processes this probe can see")
    try:
        server.admin_key  # noqa: B018 -- read once here: a missing key is no failure of the server
    except AdminKeyError as err:
        raise CannotCheck(str(err)) from None
    return stub_probe(server, timeout_s=timeout_s)


# Doublings of ``backoff_s`` past which the backoff no longer grows (``max_backoff_s`` caps it long before).
MAX_DOUBLINGS = 64


class Supervisor:
    def __init__(
        self,
        server: TritonServer,
        probe: Callable[[str], None] | None = None,
        interval_s: float = 1.0,
        failures: int = 2,
        backoff_s: float = 5.0,
        max_backoff_s: float = 300.0,
        stable_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.server = server
        # The funnel probe over gRPC; over HTTP where gRPC speaks TLS (funnel_probe_http); then the
        # stub check (stub_probe), which also sees an ab_router or feedback stub gone, and one of a
        # model's several instances. ``probe`` is given the server's gRPC URL.
        self.probe = probe or self._default_probe
        self.interval_s, self.failures = interval_s, failures
        # A restart before the server answered for stable_s after the previous one waits backoff_s
        # after it, the next one twice that, ... up to max_backoff_s.
        self.backoff_s, self.max_backoff_s, self.stable_s, self.clock = backoff_s, max_backoff_s, stable_s, clock
        self.restarts = 0
        self.quick_restarts = 0  # restarts in a row, each before the server answered stable_s after the one before
        self._last_restart: float | None = None
        self._last_answer: float | None = None  # when a probe last succeeded
        self.last_error: str | None = None
        self._failed = 0
        self._stop = threading.Event()
        self._cancel = threading.Event()  # stop(cancel_restart=True): a restart in progress gives up
        self._thread: threading.Thread | None = None

    def _default_probe(self, url: str) -> None:
        if self.server.tls_cert:
            funnel_probe_http(self.server.http_url)
        else:
            funnel_probe(url)
        stub_probe(self.server)

    def check_once(self) -> bool:
        """Probe once; restart the server after ``failures`` failed probes in a row. True if it answered."""
        try:
            if self.server.process is None or self.server.process.poll() is not None:
                raise RuntimeError("tritonserver process is not running")
            self.probe(self.server.grpc_url)
            self._failed = 0
            self._last_answer = self.clock()
            return True
        except Exception as err:
            self._failed += 1
            self.last_error = f"{type(err).__name__}: {err}"
            if self._failed >= self.failures and not self._stop.is_set():  # stopping: no restart to stop
                wait = self.restart_delay()
                if wait > 0:
                    self.last_error += f" (restart in {wait:.0f} s: not yet stable after a restart)"
                    return False
                self._failed = 0
                self._restart()
            return False

    def restart_delay(self) -> float:
        """Seconds left before the next restart may start: 0 unless the server keeps failing soon
        after its restarts (then ``backoff_s``, doubling per quick restart, at most ``max_backoff_s``)."""
        if self._stable():
            return 0.0
        # The exponent is capped: 2**1024 and more is no float, and a server that never came back for
        # 1024 quick restarts (3.5 days at 300 s each) raised OverflowError here, out of check_once,
        # and ended the supervising thread.
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** min(self.quick_restarts, MAX_DOUBLINGS))
        return max(0.0, backoff - (self.clock() - self._last_restart))

    def _stable(self) -> bool:
        """Not restarted yet, or answered ``stable_s`` or more after the last restart (a server that
        never answered since is not stable, however long ago that restart was)."""
        if self._last_restart is None:
            return True
        return self._last_answer is not None and self._last_answer - self._last_restart >= self.stable_s

    def _restart(self) -> None:
        if not self._stable():
            self.quick_restarts += 1
        else:
            self.quick_restarts = 0
        log.warning("restarting tritonserver after %d failed probes: %s", self.failures, self.last_error)
        try:
            # stop(cancel_restart=True) while the restarted server loads (minutes) ends the restart
            # and stops that server: serve.py's Ctrl-C or SIGTERM, which stops the server anyway,
            # waited up to the start's timeout (420 s) plus 30 s. A plain stop() lets it finish.
            self.server.restart(cancelled=self._cancel.is_set)
            self.restarts += 1
        except Exception as restart_err:  # keep supervising: the next probe tries again
            self.last_error = f"restart failed: {type(restart_err).__name__}: {restart_err}"
            log.error("tritonserver %s", self.last_error)
        finally:
            self._last_restart = self.clock()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception as err:  # a bug here must not end supervision: log it and probe again
                self.last_error = f"supervisor error: {type(err).__name__}: {err}"
                log.exception("tritonserver supervisor: check failed; supervising on")

    def start(self) -> Supervisor:
        self._stop.clear()
        self._cancel.clear()
        self._thread = threading.Thread(target=self._loop, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, cancel_restart: bool = False) -> None:
        """Stop supervising. A restart in progress finishes first, and the server it started keeps
        serving; with ``cancel_restart`` (the caller stops the server next) it is cancelled instead,
        its server stopped at once."""
        if cancel_restart:
            self._cancel.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.server.startup_timeout + 30)
            self._thread = None

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
