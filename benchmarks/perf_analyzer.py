"""Triton's own load generator, ``perf_analyzer``, against a running funnel.

``benchmarks/loadgen.py`` drives the server from Python (tritonclient's gRPC async API): right for
the tests, which check every response, but on a 2-core machine its own CPU (measured 0.39-0.47 ms
per request at 32 in flight) comes off the cores the server has. ``perf_analyzer`` is the C++
client Triton's own performance figures come from; the ``tritonclient`` wheel ships it
(``.venv/bin/perf_analyzer``), needing two shared libraries the wheel does not bring:

* ``libcudart.so.12``, from the ``nvidia-cuda-runtime-cu12`` wheel (in the lock; it is loaded, and
  no GPU is needed unless CUDA shared memory is asked for);
* ``libb64.so.0d``, from Debian's ``libb64-0d`` (``make services`` installs it).

It sends the same kind of request as the Python load generator (known users, ``k``) over HTTP:
``perf_analyzer`` first reads the model's configuration and metadata, which the deployment locks
behind its admin key (``deployment/security.py``), and it adds headers (``-H``) to HTTP requests
only. ``run`` returns requests/s and latency percentiles as ``perf_analyzer`` measured them, once
throughput is stable over three consecutive windows.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deployment.security import ADMIN_HEADER


def binary() -> Path | None:
    """The ``perf_analyzer`` the tritonclient wheel installed beside this Python, else on ``PATH``."""
    beside = Path(sys.prefix) / "bin" / "perf_analyzer"
    if beside.is_file():
        return beside
    found = shutil.which("perf_analyzer")
    return Path(found) if found else None


def library_path() -> str:
    """``LD_LIBRARY_PATH`` with the CUDA runtime of the ``nvidia-cuda-runtime-cu12`` wheel in front."""
    paths = []
    try:
        import nvidia.cuda_runtime

        paths = [str(Path(p) / "lib") for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    return os.pathsep.join([*paths, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])


def unavailable() -> str | None:
    """Why ``perf_analyzer`` cannot run here (a missing binary or shared library), or ``None``."""
    exe = binary()
    if exe is None:
        return "perf_analyzer is not installed (it comes with the tritonclient wheel)"
    if shutil.which("ldd") is None:
        return "ldd is not installed, so perf_analyzer's shared libraries cannot be checked"
    ldd = subprocess.run(
        ["ldd", str(exe)], capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": library_path()}
    )
    missing = sorted({line.split("=>")[0].strip() for line in ldd.stdout.splitlines() if "not found" in line})
    if missing:
        hints = {"libb64.so.0d": "Debian package libb64-0d", "libcudart.so.12": "pip nvidia-cuda-runtime-cu12"}
        return "perf_analyzer needs " + ", ".join(f"{lib} ({hints.get(lib, 'not packaged here')})" for lib in missing)
    return None


def run(
    http_url: str,
    admin_key: str,
    user_ids,
    concurrency: int,
    k: int = 10,
    model: str = "funnel",
    window_requests: int = 2000,
    max_trials: int = 10,
    stability_percent: int = 25,
    timeout_s: float = 600.0,
) -> dict:
    """Measure ``model`` at ``concurrency`` requests in flight (asynchronous HTTP), the requests
    cycling through ``user_ids``: each measurement window holds ``window_requests`` requests, and
    ``perf_analyzer`` stops once three windows agree within ``stability_percent`` on throughput
    and p99 latency (at most ``max_trials`` windows). A failed request, or no stable measurement,
    raises ``RuntimeError`` with ``perf_analyzer``'s own message."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        data = Path(tmp) / "input.json"
        data.write_text(json.dumps({"data": [{"user_id": [int(u)], "k": [int(k)]} for u in user_ids]}))
        report = Path(tmp) / "report.csv"
        command = [
            str(binary()),
            "-m",
            model,
            "-i",
            "http",
            "-u",
            http_url,
            "-H",
            f"{ADMIN_HEADER}:{admin_key}",
            "--async",
            "--concurrency-range",
            str(concurrency),
            "--input-data",
            str(data),
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            str(window_requests),
            "-r",
            str(max_trials),
            "-s",
            str(stability_percent),
            "--percentile",
            "99",
            "-f",
            str(report),
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env={**os.environ, "LD_LIBRARY_PATH": library_path()},
            )
        except subprocess.TimeoutExpired:
            # Not re-raised: its message is the whole command line, the admin key's header included.
            raise RuntimeError(f"perf_analyzer did not finish within {timeout_s} s") from None
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(f"perf_analyzer exited {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}")
        with report.open() as f:
            row = next(csv.DictReader(f))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "client": "perf_analyzer (C++, async HTTP)",
        "concurrency": concurrency,
        "requests_per_s": round(float(row["Inferences/Second"]), 1),
        **{f"p{q}_ms": round(float(row[f"p{q} latency"]) / 1000, 3) for q in (50, 90, 95, 99)},
        # the client's own share of the machine, over its whole run (warm-up and unstable windows too)
        "client_cores_busy": round(cpu / wall, 3),
        "seconds": round(wall, 1),
    }
