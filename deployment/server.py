"""Start and stop the real tritonserver that ships inside the ``nvidia-pytriton`` wheel.

What it takes to run that binary on our own model repository (see ENVIRONMENT-NOTES):

* a backend folder holding the Python backend plus the ``triton_python_backend_stub`` built for this
  interpreter's version (the wheel keeps one stub per Python version);
* ``LD_LIBRARY_PATH`` with the wheel's bundled libraries and this interpreter's own ``LIBDIR``, so the
  stub loads the right libpython;
* this environment's ``bin`` first on ``PATH``, because the stub runs the first ``python3`` it finds
  and must see this environment's packages (TensorFlow, Merlin, faiss, this project).

``TritonServer`` does all of that, picks free ports, waits until the server is ready and on ``stop``
terminates the whole process group, so no server or stub process outlives it. Secure by default
(``deployment/security.py``, ``docs/security.md``): gRPC, HTTP and metrics listen on ``127.0.0.1``
unless ``host`` says otherwise, and the control plane (model load/unload, configuration, ...) takes
only requests that carry the deployment's admin key.
"""

from __future__ import annotations

import errno
import filecmp
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from functools import partial
from glob import escape as glob_escape
from pathlib import Path

from deployment import security
from deployment.processes import LoggedProcess

LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


# A start that shows no progress this long (nothing logged, under 5% of a core used) has stalled: on
# loaded cores a stub's TensorFlow import takes a minute of CPU, which counts as progress.
STALL_S = 120.0


class ServerStalled(ServerError):
    """Models were still loading and nothing moved for ``STALL_S``."""

    def __init__(self, loading: list[str], message: str):
        super().__init__(message)
        self.loading = loading


class ServerAborted(ServerError):
    """The server aborted while loading, in the python backend's shared-memory IPC
    (``boost::interprocess::lock_exception``, SIGABRT). Intermittent upstream
    (triton-inference-server/server#5949, #8882); seen here in a full test suite on 2026-12-05, as
    two versions of one model initialised their stubs, the server's shared-memory prefix its own."""


class StartCancelled(ServerError):
    """The caller's ``cancelled`` turned true while the server loaded (a supervisor asked to stop
    during a restart); the start stopped what it started."""


# What the python backend's shared-memory crash leaves in the log.
IPC_ABORT = "boost::interprocess"
# An abort is retried this many times, after a pause of ABORT_PAUSE_S times the retry's number: twice
# in a row, 8 s apart, at the same stub's start, while two other test workers loaded the machine
# (2026-12-07); the first retry had come at once.
ABORT_RETRIES = 2
ABORT_PAUSE_S = 10.0
# How often a pause before a retry asks the caller's ``cancelled``.
CANCEL_POLL_S = 0.2


def pause_unless_cancelled(seconds: float, cancelled: Callable[[], bool] | None) -> bool:
    """Sleep ``seconds``, asking ``cancelled`` (when given) every ``CANCEL_POLL_S``; False as soon as
    it returns true. Without ``cancelled`` one plain sleep."""
    if cancelled is None:
        time.sleep(seconds)
        return True
    deadline = time.monotonic() + seconds
    while not cancelled():
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, CANCEL_POLL_S))
    return False


class PortTaken(ServerError):
    """A port the server was to listen on was in use when it came to bind it (``ports``).

    Triton binds its endpoints only after every model has loaded, seconds after ``free_port``
    chose them, so another process (a parallel test's server or Jupyter kernel, a client's outgoing
    connection) can take one meanwhile. For gRPC or HTTP Triton exits; for metrics it logs the
    error and serves on without them, while the metrics URL reaches the other process."""

    def __init__(self, ports: list[int], message: str):
        super().__init__(message)
        self.ports = ports


# Triton's log line for an endpoint it could not bind, e.g. "failed to start GRPC service:
# Unavailable - Socket '127.0.0.1:60579' already in use".
PORT_IN_USE = re.compile(r"failed to start (?P<service>\w+) service: .*?Socket '[^']*:(?P<port>\d+)' already in use")
# How many times a start finding a port it chose taken chooses again (choose_taken_ports_again).
PORT_RETRIES = 2


def raise_if_port_taken(log: str, pattern: re.Pattern[str], context: str = "", service: str = "") -> None:
    """Raise ``PortTaken`` if ``log`` (one start's lines) holds ``pattern``'s line for a port the server
    could not bind: each match's ``port`` group, named by its ``service`` group or else ``service``.
    Every server we start writes such a line: tritonserver (``PORT_IN_USE``), Prometheus and
    Alertmanager (``deployment.monitoring.GO_PORT_IN_USE``), PostgreSQL (``deployment.postgres``)."""
    found = [(m.groupdict().get("service") or service, int(m["port"])) for m in pattern.finditer(log)]
    if found:
        taken = ", ".join(f"{name} port {port}" for name, port in found)
        raise PortTaken([port for _, port in found], f"{taken} already in use. {context}".strip())


def choose_taken_ports_again(
    server: object,
    taken: PortTaken,
    chosen: list[str],
    retries: int,
    before_retry: Callable[[], None] | None = None,
) -> None:
    """After a start of ``server`` failed with ``taken``: give each attribute of ``chosen`` (the port
    attributes ``server`` filled with ``free_port``, not its caller) that holds a taken port a newly
    chosen one, so that the caller starts it again. Raises ``taken`` where the taken port is one the
    caller gave (never changed: fail at once, naming it) or no ``retries`` are left. ``before_retry``
    runs (and may raise) before any port changes."""
    mine = [name for name in chosen if getattr(server, name) in taken.ports]
    if not mine or retries <= 0:
        raise taken
    if before_retry is not None:
        before_retry()
    for name in mine:
        setattr(server, name, free_port())
    again = [getattr(server, name) for name in mine]
    print(f"{type(server).__name__}: port(s) {taken.ports} taken; starting it again on {again}", file=sys.stderr)


def pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    path = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not path.exists():
        raise FileNotFoundError(f"tritonserver not found at {path}; is nvidia-pytriton installed?")
    return path


# The python backend starts each stub through ``bash -c "exec <stub> <model path> ..."`` without
# quoting (libtriton_python.so), so a space or shell character in the repository or backend path
# splits or mangles the stub's arguments: the stub died ("terminate called ... stol") and the server
# waited the whole stub timeout for it. Paths of only these characters pass through bash unchanged.
SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def bind_address(host: str) -> str:
    """The IPv4 address tritonserver is told to bind for ``host``: an IPv4 address as it is, a host name
    resolved to its (first) IPv4 address.

    Triton's gRPC service binds names and IPv6 addresses, but its HTTP and metrics services (libevhtp)
    take a numeric IPv4 address only: given ``localhost``, a machine's name or ``::1`` they listened on
    255.255.255.255, the start waited out its whole timeout and failed as "not ready" with no model
    loading. An IPv6 address is refused; a name becomes the address it resolves to."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        ipaddress.IPv6Address(host.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(
            f"host {host!r} is an IPv6 address: tritonserver's HTTP and metrics services bind IPv4 addresses only; "
            "give an IPv4 address (127.0.0.1 for this machine, 0.0.0.0 for every interface)"
        )
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"host {host!r} is neither an IPv4 address nor a name with one ({err})") from None


WILDCARDS = ("0.0.0.0", "::", "[::]", "")  # a listen address on every interface: a client dials loopback


def host_port(host: str, port: int | str) -> str:
    """``host:port`` for a listen flag, a client or a Prometheus target, with an IPv6 address in brackets
    (``[::1]:9090``): written bare (``::1:9090``) Prometheus and Alertmanager exited at start ("address
    ::1:9090: too many colons in address"), a scrape target failed the same way and a URL did not parse."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def free_port() -> int:
    """A free port on loopback, drawn at random below the kernel's ephemeral range.

    Triton binds seconds after the choice (and a restart binds the same ports again), so the port
    must not be one the kernel hands out meanwhile: ``bind(0)`` chose from the ephemeral range, where
    every client's outgoing connection and every other ``bind(0)`` (a parallel test's server, a
    Jupyter kernel) takes ports too. A supervised restart lost its HTTP port that way in a full test
    run (``PortTaken``, and the server did not come back)."""
    low, high = listen_port_range()
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken (or in TIME_WAIT): another draw
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports_in_use(host: str, ports: list[int]) -> list[int]:
    """Those of ``ports`` another socket already listens on at ``host`` (an IPv4 address; a wildcard
    listener counts for every address). ``SO_REUSEADDR`` as servers bind: a port whose connections
    linger in TIME_WAIT is free. A check before a start: Triton itself binds only after every model
    has loaded, minutes later, and then fails (``PortTaken``)."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    taken.append(port)
    return taken


def listen_port_range() -> tuple[int, int]:
    """``[low, high)``: the 12,000 ports below the kernel's ephemeral range (Linux's
    ``ip_local_port_range``; 32768 where it cannot be read)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = max(ephemeral_low, 2048)
    return max(1024, high - 12000), high


def prepare_backend_dir(target: Path) -> Path:
    """Copy the Python backend and this interpreter's stub into ``target/python``."""
    root = pytriton_root() / "tritonserver"
    python_dir = target / "python"
    shutil.copytree(root / "backends" / "python", python_dir, dirs_exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"no Python backend stub for Python {version} in {stub.parent.parent}")
    install_executable(stub, python_dir / "triton_python_backend_stub")
    return target


def install_executable(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` without ever writing into ``dst`` in place: a stub of the server being
    replaced (a retried start) may still be executing it, and Linux refuses to open a running binary
    for writing ("Text file busy"). Left alone when identical; otherwise copied beside it and renamed
    over it (processes still running it keep the old file)."""
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = pytriton_root().parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(libs), libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def process_cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``); 0 once it has gone.
    ``reaped_children``: plus those of its children that have exited and been waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    used = fields[11:15] if reaped_children else fields[11:13]  # utime, stime (, cutime, cstime)
    return sum(int(f) for f in used) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux ``/proc``)."""
    pids = [int(proc.name) for proc in Path("/proc").iterdir() if proc.name.isdigit()]
    return [child for child in pids if parent_pid(child) == pid]


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (Linux ``/proc``); None once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def process_argv(pid: int) -> list[str]:
    """The command line of process ``pid`` (Linux ``/proc``); [] once it has gone or is not readable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")] if raw else []


def stub_pids_by_version(server_pid: int) -> dict[tuple[str, str], list[int]]:
    """``{(model name, version): [pid, ...]}`` of the Python backend stub processes of the tritonserver
    process ``server_pid``: those in its process group (``TritonServer`` starts it in a session of its
    own) or descended from it, among the processes this one can see (its PID namespace)."""
    pids: dict[tuple[str, str], list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        pid = int(proc.name)
        argv = process_argv(pid)
        if len(argv) < 2 or not argv[0].endswith("triton_python_backend_stub"):
            continue
        try:
            ours = os.getpgid(pid) == server_pid
        except (OSError, ProcessLookupError):
            continue  # gone while we looked
        ancestor, seen = pid, set()
        while not ours and ancestor not in (None, 0, 1) and ancestor not in seen:
            seen.add(ancestor)
            ancestor = parent_pid(ancestor)
            ours = ancestor == server_pid
        if ours:
            # argv[1] is <repository>/<model>/<version>/model.py
            version = Path(argv[1]).parent
            pids.setdefault((version.parent.name, version.name), []).append(pid)
    return pids


def triton_option(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value of tritonserver's ``--name=value`` (or ``--name value``) in ``argv``; the first one
    where it is given more than once, ``default`` where it is not."""
    flag = f"--{name}"
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return default


class RunningServer:
    """A tritonserver process found among those this process can see (its PID namespace: inside the
    server's container, an exec probe's), by the gRPC port it serves: what ``scripts/probe.py`` checks.

    It offers what ``deployment.supervisor.stub_probe`` asks of a ``TritonServer``: ``http_url`` (from
    its ``--http-address``/``--http-port``; plain HTTP, also where gRPC speaks TLS), ``admin_key``
    (``$FUNNEL_ADMIN_KEY``, else the key file beside its ``--model-repository``) and
    ``stub_pids_by_version``. ``http_url``: where to reach its HTTP endpoint instead."""

    # tritonserver's own defaults, for a server started without the flag
    DEFAULTS = {"grpc-port": "8001", "http-port": "8000", "http-address": "0.0.0.0"}

    def __init__(self, pid: int, argv: list[str], http_url: str | None = None):
        self.pid, self.argv, self._http_url = pid, argv, http_url

    def option(self, name: str) -> str | None:
        return triton_option(self.argv[1:], name, self.DEFAULTS.get(name))

    @classmethod
    def by_grpc_port(cls, port: int, http_url: str | None = None) -> RunningServer | None:
        """The tritonserver serving gRPC on ``port``; None where none is visible. Raises ``ServerError``
        where several are (servers in other network namespaces, seen from a host's PID namespace)."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                argv = process_argv(int(proc.name))
                if argv and Path(argv[0]).name == "tritonserver":
                    server = cls(int(proc.name), argv, http_url)
                    if server.option("grpc-port") == str(port):
                        found.append(server)
        if len(found) > 1:
            raise ServerError(f"several tritonserver processes serve gRPC port {port}: pids {[s.pid for s in found]}")
        return found[0] if found else None

    @property
    def http_url(self) -> str:
        if self._http_url:
            return self._http_url
        host = self.option("http-address")
        return f"{LOOPBACK if host == '0.0.0.0' else host}:{self.option('http-port')}"

    @property
    def model_repository(self) -> Path | None:
        repository = self.option("model-repository")
        return Path(repository) if repository else None

    @property
    def admin_key(self) -> str:
        """Raises ``security.AdminKeyError`` where there is none (no ``$FUNNEL_ADMIN_KEY``, no key file)."""
        if self.model_repository is None and not os.environ.get(security.ADMIN_KEY_ENV):
            raise security.AdminKeyError(f"no admin key: ${security.ADMIN_KEY_ENV} is not set")
        return security.read_admin_key(self.model_repository or ".")

    def stub_pids_by_version(self) -> dict[tuple[str, str], list[int]]:
        return stub_pids_by_version(self.pid)


def remove_shm_regions(prefix: str | None, root: Path = Path("/dev/shm")) -> list[Path]:
    """Remove the shared-memory regions named ``prefix*`` (one server start's; see ``command``)
    and return them. Only for a server that is no longer running."""
    if not prefix or not root.is_dir():
        return []
    removed = []
    for region in root.glob(f"{glob_escape(prefix)}*"):
        region.unlink(missing_ok=True)
        removed.append(region)
    return removed


class TritonServer(LoggedProcess):
    """A tritonserver process serving ``model_repository`` on free local ports.

    Use as a context manager::

        with TritonServer("build/triton_repo") as server:
            client = FunnelClient(server.grpc_url)

    Each start runs in a scratch folder of its own (a copy of the Python backend, Triton's cache),
    which ``stop`` removes. The log goes to ``log_path`` when given, and stays there; otherwise it
    lives in that folder and goes with it, unless the server failed (a start that raised or was
    retried, a restart, a process that exited on its own): then the log stays for reading, its path
    in the error, and ``cleanup`` removes it.
    """

    def __init__(
        self,
        model_repository: str | Path,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        # Every stage stub imports TensorFlow and loads its SavedModel at start: measured 20 s on a
        # quiet 2-core machine, over 180 s on a slow one while another job trained models.
        startup_timeout: float = 420.0,
        log_verbose: int = 0,
        model_control: str = "explicit",
        host: str = LOOPBACK,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        # How long Triton waits for a Python stub's handshake at load (python backend's
        # stub-timeout-seconds, default 30 s). A stub imports TensorFlow first; with training jobs
        # on the same 2 cores that took over 30 s, the load failed and the server was left waiting
        # for a stub that had given up (seen in the full test suite: a restart hung, then died
        # with boost::interprocess::lock_exception). Triton's own CI uses 120 s.
        stub_timeout_s: int = 300,
    ):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        # The ports chosen here, not by the caller: a start may choose them again (PortTaken).
        self._chosen_ports = [
            name
            for name, given in (("grpc_port", grpc_port), ("http_port", http_port), ("metrics_port", metrics_port))
            if not given
        ]
        self.startup_timeout = startup_timeout
        self.stub_timeout_s = int(stub_timeout_s)
        self.shm_prefix: str | None = None  # the python backend's region names, fresh per start (command())
        self.log_verbose = log_verbose
        if model_control not in ("explicit", "none"):
            raise ValueError(f"model_control must be 'explicit' or 'none', got {model_control!r}")
        # explicit: every model loads at start (--load-model=*) and new versions are rolled in
        # through the load API (deployment/rollout.py) instead of the server polling the folder.
        self.model_control = model_control
        # Where gRPC, HTTP and metrics listen: loopback unless the caller deliberately exposes them.
        self.host = bind_address(host)
        # gRPC over TLS (Triton's --grpc-use-ssl): PEM certificate and key files, both or neither.
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        self.tls_cert = Path(tls_cert).resolve() if tls_cert else None
        self.tls_key = Path(tls_key).resolve() if tls_key else None
        for path in filter(None, (self.tls_cert, self.tls_key)):
            if not path.is_file():
                raise FileNotFoundError(f"TLS file {path} does not exist")
        self._workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        # Set once the server has failed: a log in the scratch folder then outlives stop().
        self.keep_log = False

    @property
    def scratch_dir(self) -> Path:
        """This server's scratch folder: the copied backend, the cache, and the log unless one was given."""
        return self._workdir

    @property
    def _connect_host(self) -> str:
        """Where a client on this machine reaches the server (a wildcard bind answers on loopback)."""
        return LOOPBACK if self.host == "0.0.0.0" else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self._connect_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._connect_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._connect_host}:{self.metrics_port}/metrics"

    @property
    def admin_key(self) -> str:
        """The key the control plane of this server expects (``deployment/security.py``)."""
        return security.read_admin_key(self.model_repository)

    def listening(self) -> str:
        """What the server really listens on, for startup messages."""
        return (
            f"grpc{'+tls' if self.tls_cert else ''} {self.host}:{self.grpc_port}  http {self.host}:{self.http_port}  "
            f"metrics {self.host}:{self.metrics_port}  (control plane locked; admin key: "
            f"{security.key_location(self.model_repository)})"
        )

    def served_repository(self) -> Path:
        """The repository path Triton is given: ``model_repository`` itself, or, where that path holds a
        character bash would split or interpret (``SHELL_SAFE``), a link to it in the scratch folder."""
        if SHELL_SAFE.fullmatch(str(self.model_repository)):
            return self.model_repository
        link = self._workdir / "repository"
        if not link.is_symlink():
            link.symlink_to(self.model_repository, target_is_directory=True)
        return link

    def command(self) -> list[str]:
        if not SHELL_SAFE.fullmatch(str(self._workdir)):
            raise ServerError(
                f"the scratch folder {self._workdir} holds a character the python backend's stub launch "
                "(bash -c) would split or interpret; point TMPDIR at a path of letters, digits and ./_-"
            )
        backends = prepare_backend_dir(self._workdir / "backends")
        cache = self._workdir / "cache"
        cache.mkdir(exist_ok=True)
        key = security.ensure_admin_key(self.model_repository)
        # A fresh prefix per start: a restart never meets the regions a killed process left behind.
        self.shm_prefix = f"funnel_{os.getpid()}_{self.grpc_port}_{secrets.token_hex(3)}_"
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.served_repository()}",
            f"--backend-directory={backends}",
            f"--cache-directory={cache}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            *security.server_flags(key),
            *(
                ["--grpc-use-ssl=true", f"--grpc-server-cert={self.tls_cert}", f"--grpc-server-key={self.tls_key}"]
                if self.tls_cert
                else []
            ),
            "--allow-metrics=true",
            f"--backend-config=python,stub-timeout-seconds={self.stub_timeout_s}",
            # The python backend names its shared-memory regions from a prefix that defaults to the
            # same value in every server: two servers on one machine (replicas, parallel tests)
            # then share regions, which crashed a starting server with boost's lock_exception or
            # left a model loading forever. One prefix per server, as pytriton does.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true",
            # The export writes every config in full; Triton's auto-complete would start one more stub
            # per Python model just to ask it for a config (about 2 s of CPU and 1.5 s per start).
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ] + (["--model-control-mode=explicit", "--load-model=*"] if self.model_control == "explicit" else [])

    def start(
        self,
        retry_stalled: bool = True,
        port_retries: int = PORT_RETRIES,
        cancelled: Callable[[], bool] | None = None,
        abort_retries: int = ABORT_RETRIES,
    ) -> TritonServer:
        """Start the server and wait until every model is ready and it listens on its three ports.
        A start that stalls (nothing logged and no CPU used for ``STALL_S`` while models are still
        loading) is retried once, and one that aborts in the python backend's shared-memory IPC
        (``ServerAborted``) up to ``abort_retries`` times after a pause, each in a fresh process with
        a fresh shared-memory prefix. A start that finds one of the
        ports this object chose taken (``PortTaken``) is retried on newly chosen ones, up to
        ``port_retries`` times; a port the caller gave is never changed. Any other failure, or one
        more than these, is raised. ``cancelled``, asked while the models load and during the pause
        before an abort's retry, ends the start (``StartCancelled``) once it returns true."""
        cmd = self.command()
        self._workdir.mkdir(exist_ok=True)  # a clean stop removed it (command() may not have made it again)
        # Its own process group: stop() reaches every stub; so does the watchdog when this process
        # ends without stop(), which then also removes what stop() would.
        self.spawn(cmd, cwd=self._workdir, env=server_env(), leftovers=self._leftovers())
        try:
            self.wait_until_ready(cancelled)
        except PortTaken as taken:
            self.keep_log = True
            self.stop()
            choose_taken_ports_again(
                self,
                taken,
                self._chosen_ports,
                port_retries,
                partial(self.raise_if_cancelled, cancelled, "before it started again on other ports", taken),
            )
            return self.start(retry_stalled, port_retries - 1, cancelled, abort_retries)
        except ServerStalled as failed:
            # Stalls were seen about once per full test suite before each server got its own
            # shared-memory prefix (command()): one stage version loading forever, its stubs idle.
            # A fresh process has always loaded after a stall.
            self.keep_log = True
            self.stop()
            if retry_stalled:
                self.raise_if_cancelled(cancelled, "before it started again after a stall", failed)
                print(
                    f"tritonserver stalled ({failed.loading}) while loading; starting it again (log {self.log_path})",
                    file=sys.stderr,
                )
                return self.start(False, port_retries, cancelled, abort_retries)
            failed.add_note(f"tritonserver log: {self.log_path}")
            raise
        except ServerAborted as failed:
            # An intermittent upstream crash of the python backend while stubs initialise, more
            # likely on a loaded machine: a pause lets the load that made it fail pass.
            self.keep_log = True
            self.stop()
            if abort_retries > 0:
                pause = ABORT_PAUSE_S * (ABORT_RETRIES - abort_retries + 1)
                again = f"starting it again in {pause:.0f} s (log {self.log_path})"
                print(f"tritonserver aborted (IPC) while loading; {again}", file=sys.stderr)
                if not pause_unless_cancelled(pause, cancelled):
                    # The supervisor's stop(cancel_restart=True) waited out the whole pause (up to 20 s).
                    cancel = StartCancelled("tritonserver start cancelled while it waited to retry an IPC abort")
                    cancel.add_note(f"tritonserver log: {self.log_path}")
                    raise cancel from failed
                return self.start(retry_stalled, port_retries, cancelled, abort_retries - 1)
            failed.add_note(f"tritonserver log: {self.log_path}")
            raise
        except BaseException as failed:
            self.keep_log = True
            self.stop()
            failed.add_note(f"tritonserver log: {self.log_path}")
            raise
        return self

    def raise_if_cancelled(
        self, cancelled: Callable[[], bool] | None, when: str, cause: BaseException | None = None
    ) -> None:
        """Raise ``StartCancelled`` (from ``cause``) if ``cancelled`` returns true: asked before a retry
        or a restart starts a fresh process, which the first poll would only stop again (its stop
        waiting up to ``stop_timeout`` for a server that was loading)."""
        if cancelled is not None and cancelled():
            cancel = StartCancelled(f"tritonserver start cancelled {when}")
            cancel.add_note(f"tritonserver log: {self.log_path}")
            raise cancel from cause

    def wait_until_ready(self, cancelled: Callable[[], bool] | None = None) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + self.startup_timeout
        # Asked over HTTP, which answers the same whether or not gRPC speaks TLS. A short timeout: a
        # process that took the HTTP port while Triton loaded may accept and never answer, and the
        # client's default 60 s would hide Triton's exit that long.
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0, network_timeout=5.0)
        progress, since = None, time.monotonic()
        try:
            while time.monotonic() < deadline:
                if cancelled is not None and cancelled():
                    raise StartCancelled("tritonserver start cancelled while it loaded")
                if self.process.poll() is not None:
                    code, tail = self.process.returncode, self.start_log_tail()
                    message = f"tritonserver exited with code {code}:\n{tail}"
                    self.raise_if_port_taken(message)
                    raise (ServerAborted if code == -signal.SIGABRT and IPC_ABORT in tail else ServerError)(message)
                try:
                    # Only once this process listens on the HTTP port: before, whatever holds the port (a
                    # server already running on the ports given) answers, while this one still loads.
                    ready = self.http_port in self.listening_ports() and client.is_server_ready()
                except Exception:
                    ready = False
                if ready:
                    self.wait_until_listening(cancelled=cancelled)
                    return
                time.sleep(0.5)
                # Progress: the log grew, or the server and its stubs used CPU (idle stubs' metric
                # threads use far less than 5% of a core).
                now_progress = (self.log_path.stat().st_size if self.log_path.exists() else 0, self.cpu_seconds())
                busy = progress is not None and now_progress[1] - progress[1] >= 0.05 * STALL_S
                if progress is None or now_progress[0] != progress[0] or busy:
                    progress, since = now_progress, time.monotonic()
                elif time.monotonic() - since > STALL_S:
                    loading = self.dump_stub_stacks(cancelled=cancelled)
                    raise ServerStalled(
                        loading, f"tritonserver made no progress for {STALL_S:.0f}s; models still loading: {loading}"
                    )
        finally:
            client.close()
        loading = self.dump_stub_stacks(cancelled=cancelled)
        raise ServerError(
            f"tritonserver not ready after {self.startup_timeout:.0f}s; models still loading: {loading}\n"
            f"{self.start_log_tail(200)}"
        )

    def raise_if_port_taken(self, context: str = "") -> None:
        """Raise ``PortTaken`` if this start's log says an endpoint could not bind its port."""
        raise_if_port_taken(self.start_log(), PORT_IN_USE, context)

    def wait_until_listening(self, timeout: float = 10.0, cancelled: Callable[[], bool] | None = None) -> None:
        """Once ready (HTTP answers), wait until gRPC and metrics listen too: Triton starts metrics
        after HTTP, and a metrics port found taken does not stop it (``PortTaken``). ``cancelled``
        (the start's) ends the wait (``StartCancelled``): it ignored it, and a stop asked for here
        waited out the whole ``timeout`` (10 s)."""
        wanted = {self.grpc_port, self.http_port, self.metrics_port}
        deadline = time.monotonic() + timeout
        while True:
            if cancelled is not None and cancelled():
                raise StartCancelled("tritonserver start cancelled while it waited for its ports")
            self.raise_if_port_taken()
            missing = wanted - self.listening_ports()
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver is ready but does not listen on port(s) {sorted(missing)}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by tritonserver and its stubs."""
        return sum(self.cpu_seconds_by_process().values())

    def cpu_seconds_by_process(self) -> dict[str, float]:
        """CPU time (user + system) used so far: ``tritonserver`` itself and each model's stubs
        (``{"tritonserver": s, model name: s, ...}``); a process that has gone counts 0."""
        if self.process is None:
            return {}
        groups = {"tritonserver": [self.process.pid], **self.stub_pids()}
        return {name: sum(process_cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}

    def dump_stub_stacks(self, wait_s: float = 2.0, cancelled: Callable[[], bool] | None = None) -> list[str]:
        """Ask the stubs of models that did not load to print their threads' stacks into the log
        (``serving/triton_model.py`` registers the handler); return those models' names. The wait
        for the stacks ends early once ``cancelled`` (the start's) returns true."""
        loaded = set(re.findall(r"successfully loaded '([^']+)'", self.start_log()))
        loading = sorted(set(self.stub_pids()) - loaded)
        for model in loading:
            for pid in self.stub_pids().get(model, []):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        if loading:
            pause_unless_cancelled(wait_s, cancelled)
        return loading

    def restart(self, stop_timeout: float = 10.0, cancelled: Callable[[], bool] | None = None) -> TritonServer:
        """Stop whatever is left of the server and start it again on the same ports.

        A server with a dead stub may wait for it on shutdown; after ``stop_timeout`` the process
        group is killed. A restarted server failed, so its log is kept (``keep_log``). ``cancelled``:
        as ``start``'s."""
        self.keep_log = True
        self.stop(timeout=stop_timeout)
        self.raise_if_cancelled(cancelled, "before the restart started it again")
        return self.start(port_retries=0, cancelled=cancelled)  # clients know these ports: a taken one is an error

    def healthy(self, timeout: float = 5.0) -> bool:
        """The process runs and the server and every model report ready (strict readiness)."""
        import tritonclient.http as httpclient

        if self.process is None or self.process.poll() is not None:
            return False
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=timeout, network_timeout=timeout)
        try:
            return bool(client.is_server_ready())
        except Exception:
            return False
        finally:
            client.close()

    def stub_pids(self) -> dict[str, list[int]]:
        """``{model name: [pid, ...]}`` of the Python backend stub processes of this server."""
        pids: dict[str, list[int]] = {}
        for (model, _), found in self.stub_pids_by_version().items():
            pids.setdefault(model, []).extend(found)
        return pids

    def stub_pids_by_version(self) -> dict[tuple[str, str], list[int]]:
        """``{(model name, version): [pid, ...]}`` of the Python backend stub processes of this server."""
        return stub_pids_by_version(self.process.pid) if self.process is not None else {}

    def _leftovers(self) -> list[str]:
        """What ``stop`` removes after a clean run, for the watchdog: this start's shared-memory
        regions and the scratch folder (the backend copy and cache only, where the log lives in it)."""
        regions = [str(Path("/dev/shm") / f"{glob_escape(self.shm_prefix)}*")] if self.shm_prefix else []
        if self.log_path.parent == self._workdir:
            return regions + [str(self._workdir / "backends"), str(self._workdir / "cache")]
        return regions + [str(self._workdir)]

    def stop(self, timeout: float | None = None) -> None:
        if self.process is not None and self.process.poll() is not None:
            self.keep_log = True  # it exited on its own: its log says why
        super().stop(timeout)
        # The python backend unlinks its shared-memory regions only when it shuts down cleanly; a
        # server killed after the stop timeout (a dead stub, a test's SIGKILL) left one 1 MiB file
        # per stub in /dev/shm, about 50 MiB per full test suite, until the machine rebooted.
        remove_shm_regions(self.shm_prefix)
        # Every start copies the backend again (command()); left behind, the scratch folders took
        # 2.8 MB per server start, 1.2 GB in /tmp after a day of test runs.
        if self.log_path.parent == self._workdir and self.keep_log:
            for sub in ("backends", "cache"):
                shutil.rmtree(self._workdir / sub, ignore_errors=True)
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def cleanup(self) -> None:
        """Stop, and remove the scratch folder even where a failed server's log was kept in it."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
