"""The server processes the project starts (tritonserver, Prometheus): starting one in its own
process group with its output in a log file, stopping it with everything it started, and the end of
its log.

A server in its own process group outlives the Python process that started it: a script that exits
without ``stop``, a notebook kernel restarted or killed, a worker ended by SIGTERM or SIGKILL. Each
server therefore gets a watchdog, a tiny process that holds the read end of a pipe whose write end
only the starting process holds. The kernel closes that end however the process ends, so the
watchdog sees end-of-file and stops the server's group as ``stop`` would (SIGTERM, then SIGKILL),
then removes what the caller named (a scratch folder, shared-memory regions). A server that ended on
its own (a crash) is no longer signalled, but its watchdog waits on until ``stop`` releases it, so a
starter killed between the crash and its ``stop`` still has those leftovers removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# The watchdog's whole program, run as ``python -I -c``: only the standard library, so it starts in
# milliseconds. argv: the server's process group, the seconds between SIGTERM and SIGKILL, then
# paths or glob patterns to remove once the group is gone.
WATCHDOG = r"""
import glob, os, select, shutil, signal, sys, time

pgid, grace, leftovers = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]


def alive():
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a group of another user's: the id was reused, ours is gone
        return False
    return True


watching = alive()
while True:
    # The pipe turns readable at end-of-file, when the process that started the server is gone, or
    # with the one byte ``end_watchdog`` writes once ``stop`` has stopped the group: whatever holds its
    # id by then is not ours. A group that ended on its own (a crash the starter has reaped) is no
    # longer signalled (its id may be reused), but the wait goes on: a starter killed before its
    # ``stop`` leaves the crashed start's leftovers to this process.
    if select.select([0], [], [], 1.0 if watching else None)[0]:
        if os.read(0, 1):
            break
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)) if watching else ():
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + wait
            while alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        for pattern in leftovers:
            for path in glob.glob(pattern):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        break
    watching = watching and alive()
"""


def start_watchdog(pgid: int, grace_s: float, leftovers: list[str] | None = None) -> subprocess.Popen:
    """Start the watchdog of process group ``pgid`` (see the module docstring). Keep the returned
    process (its ``stdin`` is the pipe's write end) until the group is stopped, then ``end_watchdog``."""
    return subprocess.Popen(
        [sys.executable, "-I", "-c", WATCHDOG, str(pgid), str(grace_s), *(leftovers or [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        # Its own session: a Ctrl-C to the terminal's foreground group must not end it first.
        start_new_session=True,
    )


def end_watchdog(watchdog: subprocess.Popen) -> None:
    """Release a watchdog whose group was stopped: told so through the pipe, it exits without
    signalling the group's id (which may already be another group's) or removing anything."""
    if watchdog.stdin is not None:
        try:
            watchdog.stdin.write(b"x")
            watchdog.stdin.close()
        except BrokenPipeError:  # it had already exited (killed, or it stopped the group itself)
            pass
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc``'s process group, wait up to ``timeout`` s, then SIGKILL whatever is left of
    it (tritonserver's Python stubs that ignored the shutdown). ``proc`` was started with
    ``start_new_session=True``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" when it does not exist yet)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class LoggedProcess:
    """What the servers we start share: ``spawn`` runs a command in its own process group (so
    ``stop`` reaches whatever it starts), its output appended to ``log_path``, and a watchdog that
    stops the group when the starting process ends without ``stop``. Subclasses set ``log_path`` and
    ``stop_timeout`` (seconds ``stop`` waits before SIGKILL)."""

    log_path: Path
    stop_timeout: float = 30.0
    process: subprocess.Popen | None = None
    _log = None
    _log_offset = 0  # where the log's lines of the current (or last) start begin (spawn)
    _watchdog: subprocess.Popen | None = None

    def spawn(
        self, cmd: list[str], cwd: Path, env: dict | None = None, leftovers: list[str] | None = None
    ) -> subprocess.Popen:
        """Start ``cmd``; ``leftovers`` (paths or glob patterns) are what the watchdog removes after
        stopping a server whose starter is gone."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The log is appended to across starts: this start's lines begin here.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
            self._watchdog = start_watchdog(self.process.pid, self.stop_timeout, leftovers)
        except BaseException:  # no watchdog (out of processes or descriptors): no server running unwatched
            self.stop()
            raise
        return self.process

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def start_log(self) -> str:
        """The log's lines of the current (or last) start: a log is appended to across starts (a retry,
        a restart, a ``log_path`` a previous run wrote), and an earlier start's lines are not this one's."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def start_log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of ``start_log``."""
        return "\n".join(self.start_log().splitlines()[-lines:])

    def listening_ports(self) -> set[int]:
        """The TCP ports the process itself listens on (none when it is not running): not whatever else
        answers on its port (a process that took the port first)."""
        import psutil

        if self.process is None:
            return set()
        try:
            sockets = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            return set()
        return {c.laddr.port for c in sockets if c.status == psutil.CONN_LISTEN}

    def stop(self, timeout: float | None = None) -> None:
        proc = self.process
        if proc is not None:
            stop_process_group(proc, self.stop_timeout if timeout is None else timeout)
            self.process = None
        if self._watchdog is not None:
            end_watchdog(self._watchdog)
            self._watchdog = None
        if self._log is not None:
            self._log.close()
            self._log = None
