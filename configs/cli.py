"""Argument types for the scripts' command lines: a bad value is an argparse error naming the flag
(exit 2), before any work starts or anything is deleted."""

from __future__ import annotations

import argparse
import math
import numbers
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from configs import load_config


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: users, days, requests, concurrency, k)."""
    value = int_of(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    value = int_of(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    value = int_of(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1-65535, got {value}")
    return value


def port_or_zero(text: str) -> int:
    """A TCP port, or 0 for a free one."""
    value = int_of(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 1-65535 or 0 (a free one), got {value}")
    return value


# Prometheus' duration syntax (its model.ParseDuration): units from years to milliseconds, largest first.
PROMETHEUS_DURATION = re.compile(r"0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")


def prometheus_duration(text: str) -> str:
    """A duration Prometheus' config takes (15s, 1m30s): anything else made Prometheus exit at start,
    which scripts/monitor.py raised as a ServerError traceback, exit status 1."""
    if not text or not PROMETHEUS_DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a Prometheus duration (e.g. 15s, 1m30s): {text!r}")
    return text


# The longest timeout taken (about 31 years): gRPC's deadline, now + timeout in nanoseconds, overflows
# int64 from about 7e9 s on, and every call then failed at once with 'Deadline Exceeded', as with inf.
MAX_SECONDS = 1e9


def positive_seconds(text: str, alternative: str = "") -> float:
    """A finite number of seconds > 0 and at most ``MAX_SECONDS`` (a timeout); ``alternative`` names
    what else the option takes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds{alternative}, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0{alternative}, got {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:g} seconds{alternative}, got {text!r}")
    return value


def checked_timeout(value, name: str = "timeout_s", none: bool = False) -> float | None:
    """``value``, a library function's timeout that becomes a gRPC deadline, if it is a finite number
    of seconds > 0 and at most ``MAX_SECONDS`` (``None`` too where ``none``: no deadline); otherwise
    ``ValueError`` naming ``name``, raised before anything is done. ``positive_seconds`` is the
    command line's check: ``roll_out(..., timeout_s=float('inf'))`` passed it by, and every model load
    failed at once with 'Deadline Exceeded' (``retire``: after the version's stage folders were gone)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value) and value <= MAX_SECONDS):
        raise ValueError(f"{name} must be a finite number of seconds > 0 and at most {MAX_SECONDS:g}, got {value!r}")
    return float(value)


# gRPC's own target schemes (its naming doc): a target written with one is passed on as it is
GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})")


def grpc_address(url: str) -> str:
    """``url`` if gRPC can dial it: ``host:port`` (``127.0.0.1:8001``, ``[::1]:8001``) or a target
    in one of gRPC's schemes (``dns:///host:port``, ``unix:/path``, ``ipv4:``, ...); otherwise
    ``ValueError`` naming it. Without a port (``localhost``, ``::1``) gRPC dialed port 443 or 0 and
    failed on the first call with "failed to connect to all addresses ... :0", naming neither the
    address given nor what was missing; ``http://host:8001`` failed in DNS."""
    if not isinstance(url, str):
        raise ValueError(f"the server's address must be a string host:port, got {url!r}")
    if url.lower().startswith(GRPC_SCHEMES):
        return url
    match = HOST_PORT.fullmatch(url)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(
            f"{url!r} is not a gRPC address: expected host:port with a port in 1-65535 (e.g. 127.0.0.1:8001, "
            "[::1]:8001; tritonserver's gRPC port is 8001 by default), or dns:///host:port or unix:/path"
        )
    return url


def grpc_url(text: str) -> str:
    """``--url``: a gRPC address a client can dial (``grpc_address``), else an argument error naming it."""
    try:
        return grpc_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def seconds_or_none(text: str) -> float | None:
    """A finite number of seconds > 0, or ``none`` (None)."""
    if text.strip().lower() == "none":
        return None
    return positive_seconds(text, " (or 'none')")


def webhook_url(text: str) -> str:
    """An http(s) URL: Alertmanager refuses anything else at start, after Prometheus is up."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text


def output_folder(text: str) -> str:
    """A folder the script writes into, made if missing (``--out``, ``--registry``, ``--cache``): a
    path that is a file, or lies under one, is refused here, not by ``mkdir``'s FileExistsError or
    NotADirectoryError traceback after the work (a training run) is done."""
    blocked = _file_in_the_way(Path(text))
    if blocked is not None:
        where = text if blocked == Path(text) else f"{text}: {blocked}"
        raise argparse.ArgumentTypeError(f"{where} is a file, not a folder")
    return text


def output_file(text: str) -> str:
    """A file the script writes (``--alert-log``), its folders made if missing: a folder, or a path
    under a file, is refused here, not by an IsADirectoryError or mkdir's FileExistsError traceback
    once the script has started."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    blocked = _file_in_the_way(path.parent)
    if blocked is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocked} is a file, not a folder")
    return text


def _file_in_the_way(path: Path) -> Path | None:
    """The path, or the nearest existing folder above it, where that is not a folder."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


WORKDIR_MARK = ".workdir"  # written into a --workdir by the scripts that start it from nothing


def fresh_workdir(parser: argparse.ArgumentParser, path: str | Path, option: str = "workdir") -> Path:
    """``--workdir`` emptied for a run that always starts from nothing (demo, A/B test, retention
    weights). Only a folder such a run made is deleted: one with the mark this writes, or the
    script's own default folder under ``build/`` (runs from before the mark). Any other non-empty
    folder (``--workdir ~``, a folder of trained models, a typo for a data folder) is refused with
    exit status 2, not deleted. ``option``: the argument's name (``out`` for the feedback loop)."""
    work = Path(path)
    blocked = _file_in_the_way(work)
    if blocked is not None and blocked != work:  # mkdir's NotADirectoryError, a traceback
        parser.error(f"argument --{option}: {path}: {blocked} is a file, not a folder")
    if work.exists():
        if not work.is_dir():
            parser.error(f"argument --{option}: {path} is a file, not a folder")
        default = parser.get_default(option)
        ours = (work / WORKDIR_MARK).exists() or (default is not None and work.resolve() == Path(default).resolve())
        if not ours and any(work.iterdir()):
            parser.error(
                f"argument --{option}: {path} holds files no earlier run wrote; it would be deleted, "
                "so name a new or empty folder"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORKDIR_MARK).write_text("made by a script that deletes and rebuilds this folder on every run\n")
    return work


def config_file(text: str) -> str:
    """A YAML config that loads and validates (``configs.load_config``): a missing file, broken YAML,
    an unknown key or a wrong type is one line naming the flag and the key, not a traceback after the
    imports. The script loads it again with its own overrides."""
    try:
        load_config(text)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"no such file: {text}") from None
    except OSError as e:  # a folder, no permission: still one line, not a traceback
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror or e}") from None
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    return text


def int64(text: str) -> int:
    """An integer a request's INT64 tensor can carry (a user or item id)."""
    value = int_of(text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must fit a 64-bit integer (an INT64 id), got {value}")
    return value


def int_of(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
