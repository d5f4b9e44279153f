"""Prometheus, Alertmanager and PostgreSQL starts whose port another process took first, on the real
binaries (about a second per start).

Each server picks its port with ``free_port`` when constructed and binds it at ``start``, so another
process (a parallel test worker's server, a service beside ``scripts/monitor.py``) can take it in
between. Before, only ``TritonServer`` chose again: Prometheus and Alertmanager failed with their log's
tail, or, where the holder answered HTTP (another worker's Prometheus), the start returned with the
server dead and its URL on the other process; PostgreSQL failed with "Examine the log output." and the
log deleted. Now a port the server chose is chosen again (``choose_taken_ports_again``, as
``TritonServer``), and a port the caller gave fails the start at once, naming it (``PortTaken``)."""

import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployment.postgres import postgres_bin
from deployment.server import PortTaken

NEEDS = {
    "prometheus": shutil.which("prometheus"),
    "alertmanager": shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"),
    "postgres": postgres_bin(),
}
SERVERS = list(NEEDS)


def make(kind: str, tmp_path, port: int | None = None):
    if not NEEDS[kind]:
        pytest.skip(f"{kind} is not installed (`make services`)")
    if kind == "prometheus":
        from deployment.monitoring import PrometheusServer

        return PrometheusServer({}, port=port, log_path=tmp_path / "prometheus.log")
    if kind == "alertmanager":
        from deployment.alerting import Alertmanager

        return Alertmanager(["http://127.0.0.1:9/alerts"], port=port, log_path=tmp_path / "alertmanager.log")
    from deployment.postgres import PostgresServer

    return PostgresServer(port=port)


def cleanup(server) -> None:
    (server.cleanup if hasattr(server, "cleanup") else server.stop)()


class Ready(BaseHTTPRequestHandler):
    """Answers 200 to everything: what another worker's Prometheus says to ``GET /-/ready``."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(params=["socket", "http"])
def taken_port(request):
    """A port another process listens on: a bare listening socket, or one that answers HTTP 200."""
    if request.param == "socket":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            yield sock.getsockname()[1]
        return
    other = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        yield other.server_address[1]
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.parametrize("kind", SERVERS)
def test_a_port_it_chose_is_chosen_again(tmp_path, taken_port, kind):
    """Old code: Prometheus and Alertmanager raised ServerError on a held socket and, on a port that
    answered HTTP, returned with their own process dead (``server.process.poll()`` not None);
    PostgreSQL raised RuntimeError("pg_ctl failed ... Examine the log output.")."""
    server = make(kind, tmp_path)
    server.port = taken_port  # as if free_port had handed out the port taken since
    try:
        server.start()
        assert server.port != taken_port
        if kind == "postgres":
            import psycopg

            with psycopg.connect(server.url, connect_timeout=10) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        else:
            time.sleep(0.5)
            assert server.process.poll() is None, f"{kind} exited:\n{server.log_tail()}"
            assert server.port in server.listening_ports()
    finally:
        cleanup(server)


@pytest.mark.parametrize("kind", SERVERS)
def test_a_port_the_caller_gave_is_kept_and_named(tmp_path, taken_port, kind):
    """Old code: no PortTaken (a ServerError or RuntimeError without the port named for PostgreSQL),
    or, on a port that answered HTTP, no error at all."""
    server = make(kind, tmp_path, port=taken_port)
    started = time.monotonic()
    try:
        with pytest.raises(PortTaken, match=f"{kind} port {taken_port} already in use") as raised:
            server.start()
        assert raised.value.ports == [taken_port] and server.port == taken_port
        assert time.monotonic() - started < 30, "failed only after waiting out a timeout"
        if kind != "postgres":
            assert server.process is None  # stopped, not left running
    finally:
        cleanup(server)
