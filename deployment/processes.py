"""The server processes the project starts (tritonserver, Prometheus): starting one in its own
process group with its output in a log file, stopping it with everything it started, and the end of
its log."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


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
    ``stop`` reaches whatever it starts), its output appended to ``log_path``. Subclasses set
    ``log_path`` and ``stop_timeout`` (seconds ``stop`` waits before SIGKILL)."""

    log_path: Path
    stop_timeout: float = 30.0
    process: subprocess.Popen | None = None
    _log = None

    def spawn(self, cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        return self.process

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float | None = None) -> None:
        proc = self.process
        if proc is not None:
            stop_process_group(proc, self.stop_timeout if timeout is None else timeout)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
