"""Start, roll out and end A/B experiments on a running server (explicit model control).

An experiment is an ``online.assignment.Rollout`` written as ``ab_router/<n>/experiment.json``; each
change is a new router version, so Triton swaps it in while requests keep flowing and the folder
history is the audit trail of what was served when. Every version an arm names must already be in
the repository (``serving.rollout.add_version``); it is loaded before the router starts sending users
to it, so no request reaches a version that is not ready.

    start_experiment(url, repo, rollout)   control and treatment side by side, plus the holdout
    roll_out_treatment(url, repo)          everyone but the holdout moves to the treatment's version
    current_rollout(repo)                  what the router serves now
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from online.assignment import Rollout
from serving.ab_router import EXPERIMENT_FILE, ROUTER, ensemble_name
from serving.export import _check_complete
from serving.security import ControlClient


def _router_versions(repo: Path) -> list[int]:
    return sorted(int(p.name) for p in (repo / ROUTER).iterdir() if p.is_dir() and p.name.isdigit())


def current_rollout(repo: str | Path) -> Rollout | None:
    """The rollout of the newest router version (the one Triton serves); None without a router."""
    repo = Path(repo)
    versions = _router_versions(repo) if (repo / ROUTER).is_dir() else []
    if not versions:
        return None
    return Rollout.from_dict(json.loads((repo / ROUTER / str(versions[-1]) / EXPERIMENT_FILE).read_text()))


def set_rollout(grpc_url: str, repo: str | Path, rollout: Rollout, timeout_s: float = 300.0) -> int:
    """Serve ``rollout`` from a new router version; return the router version."""
    from serving.rollout import _wait_ready, load_version

    repo = Path(repo).resolve()
    versions = sorted({*rollout.versions.values(), rollout.control_version})
    for version in versions:
        if not (repo / ensemble_name(version)).is_dir():
            raise FileNotFoundError(f"model version {version} is not in {repo}; add it first (serving.rollout.add_version)")
        _check_complete(repo, str(version))
    client = ControlClient(grpc_url, repo)  # loading models needs the deployment's admin key
    try:
        for version in versions:
            if not client.is_model_ready(ensemble_name(version)):
                load_version(client, version, timeout_s)
        router_version = _router_versions(repo)[-1] + 1
        staging = Path(tempfile.mkdtemp(prefix=f".{ROUTER}-{router_version}-", dir=repo / ROUTER))
        try:
            shutil.copy2(repo / ROUTER / str(router_version - 1) / "model.py", staging / "model.py")
            (staging / EXPERIMENT_FILE).write_text(json.dumps(rollout.to_dict(), indent=2))
            os.rename(staging, repo / ROUTER / str(router_version))  # Triton never sees half a version
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        client.load_model(ROUTER)
        _wait_ready(client, ROUTER, router_version, timeout_s)
    finally:
        client.close()
    return router_version


def start_experiment(grpc_url: str, repo: str | Path, rollout: Rollout, timeout_s: float = 300.0) -> int:
    """Begin an A/B test; ``rollout`` comes from ``online.assignment.ab_rollout``."""
    return set_rollout(grpc_url, repo, rollout, timeout_s)


def roll_out_treatment(grpc_url: str, repo: str | Path, arm: str = "treatment", timeout_s: float = 300.0) -> Rollout:
    """Ship ``arm``: the plain ``funnel`` ensemble switches to its version (``serving.rollout``) and
    every non-holdout user of the router gets it; the holdout stays on the control's version."""
    from serving.rollout import roll_out, served_version

    current = current_rollout(repo)
    if current is None or arm not in current.versions:
        raise ValueError(f"no running experiment has an arm {arm!r}")
    shipped = current.roll_out(arm)
    if served_version(repo) != current.versions[arm]:
        roll_out(grpc_url, repo, current.versions[arm], timeout_s)
    set_rollout(grpc_url, repo, shipped, timeout_s)
    return shipped
