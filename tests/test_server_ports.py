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


@pytest.mark.parametrize("host", ["::1", "[::1]", "::", "fe80::1%eth0"])
def test_an_ipv6_host_is_refused_naming_it(host):
    """Triton's HTTP and metrics services bind numeric IPv4 only: given an IPv6 address they listened on
    255.255.255.255 (gRPC on '::1' failed outright), and the start waited out its timeout as "not ready"."""
    from deployment.server import bind_address

    with pytest.raises(ValueError, match="IPv6 address: .*IPv4 addresses only"):
        bind_address(host)


def test_a_host_name_binds_the_ipv4_address_it_resolves_to(tmp_path):
    """``--host localhost`` (or the machine's name) was passed to Triton as it was: HTTP and metrics
    listened on 255.255.255.255 and the start failed after its whole timeout with no model loading.
    An empty repository: the real server starts in about a second."""
    import urllib.request

    from deployment.server import bind_address

    assert bind_address("0.0.0.0") == "0.0.0.0" and bind_address("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="'no-such-host.invalid' is neither an IPv4 address nor a name with one"):
        bind_address("no-such-host.invalid")
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=60, host="localhost")
    try:
        assert server.host == "127.0.0.1" and "--http-address=127.0.0.1" in server.command()
        server.start()
        assert urllib.request.urlopen(server.metrics_url, timeout=5).status == 200
        assert server.healthy()
    finally:
        server.cleanup()


STARTER = """
import sys, time
from deployment.server import TritonServer
server = TritonServer(sys.argv[1], startup_timeout=60).start()
print(server.process.pid, server.log_path.parent, flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # without stop()
time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["exit", "SIGTERM", "SIGKILL"])
def test_a_server_does_not_outlive_the_process_that_started_it(tmp_path, ending):
    """The server runs in its own process group, so a script that exited without ``stop`` or a
    process ended by a signal (a killed notebook kernel or worker) left tritonserver running on its
    ports, with its scratch folder in /tmp: measured on the real binary before the watchdog."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = tmp_path / "repo"
    repo.mkdir()
    root = Path(__file__).resolve().parents[1]
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(repo), ending],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    pid, workdir = starter.stdout.readline().split()
    pid = int(pid)
    try:
        assert Path(workdir, "backends").is_dir()
        if ending != "exit":
            starter.send_signal(getattr(signal, ending))
        starter.wait(timeout=60)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists(), f"tritonserver {pid} outlived its starter ({ending})"
        # The log lives in the scratch folder here, so the backend's copy goes and the log stays.
        while Path(workdir, "backends").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(workdir, "backends").exists(), "the scratch folder's backend copy was left behind"
        assert Path(workdir, "tritonserver.log").exists()
    finally:
        if Path(f"/proc/{pid}").exists():
            os.killpg(pid, signal.SIGKILL)
        starter.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_stop_also_ends_the_watchdog(tmp_path):
    import psutil

    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=60).start()
    try:
        watchdogs = [p for p in psutil.Process().children() if "-I" in p.cmdline() and p.pid != server.process.pid]
        assert len(watchdogs) == 1
    finally:
        server.stop()
    assert not psutil.pid_exists(watchdogs[0].pid) or watchdogs[0].status() == psutil.STATUS_ZOMBIE


def test_a_released_watchdog_leaves_whatever_holds_the_group_id_alone(tmp_path):
    """``stop`` releases the watchdog once the group is stopped. A release used to read as the starter's
    death: the watchdog SIGTERMed the group id and removed its leftovers, so an id reused by then
    (another session's group) was killed. Here a group that is not ours holds the id."""
    import os
    import signal
    import subprocess
    import time

    from deployment.processes import end_watchdog, start_watchdog

    spawned = subprocess.run(
        ["sh", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    )
    stranger = int(spawned.stdout)
    leftover = tmp_path / "not_ours"
    leftover.touch()
    try:
        deadline = time.monotonic() + 10
        while os.getpgid(stranger) != stranger and time.monotonic() < deadline:
            time.sleep(0.05)
        watchdog = start_watchdog(stranger, 1.0, [str(leftover)])
        time.sleep(0.5)  # watching
        end_watchdog(watchdog)
        time.sleep(0.5)
        os.kill(stranger, 0)  # ProcessLookupError on the old code: the release SIGTERMed it
        assert leftover.exists()
    finally:
        try:
            os.kill(stranger, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_starter_killed_after_its_server_crashed_still_has_the_leftovers_removed(tmp_path):
    """A server that crashed (its starter reaped it: the supervisor's poll, serve.py's loop) leaves
    its shared-memory regions and scratch folder for ``stop``. The watchdog saw the group gone and
    exited, so a starter SIGKILLed before that ``stop`` (during a restart's backoff, up to 300 s) left
    them behind for good. Here the pipe's write end is closed as the kernel closes it at that kill."""
    import subprocess
    import time

    from deployment.processes import start_watchdog

    leftover = tmp_path / "funnel_1_2_abc_region"
    leftover.touch()
    server = subprocess.Popen(["sleep", "60"], start_new_session=True)
    watchdog = start_watchdog(server.pid, 1.0, [str(tmp_path / "funnel_1_2_abc_*")])
    try:
        time.sleep(0.5)  # watching
        server.kill()  # the crash
        server.wait()  # reaped: the group is gone
        time.sleep(2.5)  # the watchdog polls each second
        watchdog.stdin.close()  # the starter's SIGKILL
        watchdog.wait(timeout=10)
        assert not leftover.exists(), "the crashed start's leftovers outlived its killed starter"
    finally:
        if watchdog.poll() is None:
            watchdog.kill()
            watchdog.wait()


def test_a_start_whose_watchdog_cannot_start_leaves_no_server_running(tmp_path, monkeypatch):
    """``spawn`` started the server, then its watchdog: a watchdog that failed to start (out of
    processes or descriptors) raised with the server still running, unwatched and unstopped (the
    caller holds no object to stop), and the log file open."""
    import time

    import psutil

    from deployment import processes

    class Sleeper(processes.LoggedProcess):
        log_path = tmp_path / "sleeper.log"
        stop_timeout = 5.0

    def no_watchdog(*args, **kwargs):
        raise OSError(24, "Too many open files")

    started = []
    popen = processes.subprocess.Popen

    def remember(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(processes, "start_watchdog", no_watchdog)
    monkeypatch.setattr(processes.subprocess, "Popen", remember)
    sleeper = Sleeper()
    try:
        with pytest.raises(OSError, match="Too many open files"):
            sleeper.spawn(["sleep", "60"], cwd=tmp_path)
        (proc,) = started
        time.sleep(0.2)
        assert proc.poll() is not None, "the server runs on without its watchdog"
        assert sleeper._log is None or sleeper._log.closed
    finally:
        for proc in started:
            if psutil.pid_exists(proc.pid) and proc.poll() is None:
                proc.kill()
