"""A throwaway PostgreSQL server on loopback, for tests, benchmarks and trying the networked live
store on one box (``workflows/live_store.py``; ``docs/live-features.md``).

    with PostgresServer() as pg:
        store = LiveStore(pg.url)

``initdb`` into a temporary folder, ``postgres`` on 127.0.0.1 and a free port (its unix socket in
the same folder), stopped and deleted on exit. TCP connections need the cluster's random password
(in ``url``): the store holds the takedowns and what users did, which trust on 127.0.0.1 let every
local user read and change. PostgreSQL refuses to run as root: as root the
cluster is owned by and run as the ``postgres`` system user (``runuser``), which the Debian package
creates. The binaries come from the ``postgresql`` Debian package (``make services``) or
``$FUNNEL_PG_BIN``.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from deployment.server import (
    LOOPBACK,
    PORT_RETRIES,
    PortTaken,
    child_pids,
    choose_taken_ports_again,
    free_port,
    process_cpu_seconds,
    raise_if_port_taken,
)

PG_BIN_ENV = "FUNNEL_PG_BIN"
# The postmaster's hint, after 'could not bind IPv4 address "127.0.0.1": Address already in use', before
# it exits with "could not create any TCP/IP sockets" (English: the server is started with lc_messages=C).
PG_PORT_IN_USE = re.compile(r"Is another postmaster already running on port (?P<port>\d+)\?")


def shared_memory_of(postmaster: int) -> list[Path]:
    """The PostgreSQL dynamic shared memory segments (``/dev/shm/PostgreSQL.*``) that ``postmaster``
    and its children map (the control segment is the postmaster's; the statistics area a child's)."""
    found = set()
    for pid in [postmaster, *child_pids(postmaster)]:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:  # gone while we looked
            continue
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/PostgreSQL."):
                found.add(Path(fields[5].removesuffix(" (deleted)")))
    return sorted(found)


def postgres_bin() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None if not installed."""
    candidates = [os.environ.get(PG_BIN_ENV, "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("initdb")
    candidates += [str(Path(which).parent)] if which else []
    for folder in filter(None, candidates):
        if all((Path(folder) / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


class PostgresServer:
    """One PostgreSQL cluster on loopback only, database ``funnel``: a password on TCP, trust on the
    unix socket in its private folder."""

    def __init__(self, port: int | None = None, bin_dir: str | Path | None = None):
        found = Path(bin_dir) if bin_dir else postgres_bin()
        if found is None:
            raise FileNotFoundError(
                f"PostgreSQL is not installed (no initdb/pg_ctl/postgres in /usr/lib/postgresql/*/bin, "
                f"on PATH or in ${PG_BIN_ENV}); install the postgresql package (make services)"
            )
        self.bin = found
        self.port = port or free_port()
        self._chosen_ports = [] if port else ["port"]  # a taken port chosen here is chosen again at start
        self.root = Path(tempfile.mkdtemp(prefix="funnel-pg-"))
        self.data = self.root / "data"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.password = secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.password}@{LOOPBACK}:{self.port}/funnel"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def start(self, port_retries: int = PORT_RETRIES) -> PostgresServer:
        """``initdb``, then start the postmaster (``_start_postmaster``: a port it chose and found taken is
        chosen again, up to ``port_retries`` times; a port the caller gave fails the start, named)."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            shutil.chown(self.root, user="postgres")
            shutil.chown(pwfile, user="postgres")
        # Trust only on the unix socket, whose folder (mkdtemp: 0700) only the cluster's owner enters;
        # TCP, open to every local user, takes the password. --no-sync: the cluster is thrown away;
        # commits are still fsynced while it runs.
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "--auth-local=trust", "--auth-host=scram-sha-256"]
        try:
            try:
                self._run(*initdb, f"--pwfile={pwfile}", "-U", "postgres", "--no-sync")
            finally:
                pwfile.unlink()
            self._start_postmaster(port_retries)
            createdb = [str(self.bin / "createdb"), "-h", str(self.root), "-p", str(self.port), "-U", "postgres"]
            self._run(*createdb, "funnel")
        except BaseException:  # a failed start leaves no server and no folder (called without ``with`` too)
            self.stop()
            raise
        return self

    def _start_postmaster(self, port_retries: int) -> None:
        """``pg_ctl start``. Its failure says only "could not start server. Examine the log output.",
        and a failed start removes the folder the log is in: the error carries this start's log lines,
        and ``PortTaken`` where the port was in use (another process bound it after ``free_port``)."""
        log = self.root / "log"
        offset = log.stat().st_size if log.exists() else 0
        try:
            self._pg_ctl("start")
        except RuntimeError as failed:
            lines = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
            tail = "\n".join(lines.splitlines()[-20:])
            try:
                raise_if_port_taken(lines, PG_PORT_IN_USE, f"{failed}\n{tail}", "postgres")
            except PortTaken as taken:
                choose_taken_ports_again(self, taken, self._chosen_ports, port_retries)
                self._start_postmaster(port_retries - 1)
                return
            raise RuntimeError(f"{failed}\n{tail}") from None

    def restart(self) -> None:
        """Stop the cluster (``-m fast``: clients are disconnected, as by an operator's restart) and
        start it again on the same data, port and options; returns once it accepts connections. The
        tests use it to check that clients reconnect."""
        self._pg_ctl("restart", "-m", "fast")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        # pg_ctl hands the options to a shell: the socket folder quoted, or a TMPDIR with a space splits it.
        # lc_messages=C: the log in English whatever the locale, for PG_PORT_IN_USE.
        options = f"-c listen_addresses={LOOPBACK} -c lc_messages=C -p {self.port} -k {shlex.quote(str(self.root))}"
        self._run(
            str(self.bin / "pg_ctl"),
            action,
            *extra,
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
        )

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the cluster has used so far, in seconds: the postmaster, its live
        processes (a backend per connection, the WAL writer, ...) and those it has reaped (Linux
        ``/proc``); 0 when it is not running. What a benchmark on the same cores pays for the database."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return 0.0
        own = process_cpu_seconds(postmaster, reaped_children=True)
        return own + sum(process_cpu_seconds(child) for child in child_pids(postmaster))

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """SIGKILL a postmaster that ``pg_ctl stop`` could not stop (stuck, stopped), rather than leave
        it running on a deleted folder, holding its port; its processes exit once it is gone."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            if str(self.data).encode() + b"\0" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return  # not ours: the id was reused
            segments = shared_memory_of(pid)
            os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            return
        # A killed postmaster cannot remove its dynamic shared memory (about 1 MB in /dev/shm), and
        # only a restart of this cluster, whose folder goes next, would: removed here.
        for segment in segments:
            segment.unlink(missing_ok=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return
            except (OSError, IndexError):
                return
            time.sleep(0.1)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
