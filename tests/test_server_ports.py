"""A tritonserver start whose port was taken while it loaded, on the real binary with an empty
repository (about a second per start).

Triton binds gRPC, HTTP and metrics only after its models have loaded, seconds after
``free_port`` chose the ports, so another process can take one in between. Here a listening socket
takes it first."""

import socket

import pytest

from deployment.server import PortTaken, TritonServer

SERVICES = {"grpc_port": "GRPC", "http_port": "HTTP", "metrics_port": "Metrics"}


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("which", ["grpc_port", "metrics_port"])
def test_a_port_it_chose_is_chosen_again(tmp_path, taken_port, which):
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=60)
    setattr(server, which, taken_port)  # as if free_port had handed out the port taken since
    try:
        server.start()
        ports = {server.grpc_port, server.http_port, server.metrics_port}
        assert getattr(server, which) != taken_port and taken_port not in ports
        assert ports <= server.listening_ports()
        assert f"{SERVICES[which]} service: Unavailable - Socket '127.0.0.1:{taken_port}' already in use" in (
            server.log_path.read_text()
        )
    finally:
        server.cleanup()


@pytest.mark.parametrize("which", ["http_port", "metrics_port"])
def test_a_port_the_caller_gave_is_kept_and_named(tmp_path, taken_port, which):
    """Metrics included: Triton serves on without them, so the start is failed on its behalf
    rather than pointing the metrics URL at whichever process holds the port."""
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=60, **{which: taken_port})
    try:
        with pytest.raises(PortTaken, match=f"{SERVICES[which]} port {taken_port} already in use") as raised:
            server.start()
        assert raised.value.ports == [taken_port] and getattr(server, which) == taken_port
        assert server.process is None  # stopped, not left serving without the port
    finally:
        server.cleanup()


def test_chosen_ports_lie_below_the_kernels_ephemeral_range():
    """``bind(0)`` chose ports from the ephemeral range, where every outgoing connection and every
    other ``bind(0)`` (another test's server, a kernel) takes ports too: a supervised restart, which
    must bind the same ports again, found its HTTP port taken in a full test run and never came back.
    Ports are now drawn at random below that range, and each one drawn is free to bind."""
    import socket

    from deployment.server import free_port, listen_port_range

    low, high = listen_port_range()
    ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert high == ephemeral_low and high - low == 12000
    ports = [free_port() for _ in range(200)]
    assert all(low <= p < high for p in ports), sorted(p for p in ports if not low <= p < high)[:5]
    assert len(set(ports)) > 150  # drawn at random, not the kernel's sequence
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
