"""Start and roll out A/B experiments on a running server (explicit model control).

An experiment is an ``serving.assignment.Rollout`` written as ``ab_router/<n>/experiment.json``; each
change is a new router version, so Triton swaps it in while requests keep flowing and the folder
history is the audit trail of what was served when. Every version an arm names must already be in
the repository (``deployment.rollout.add_version``); it is loaded before the router starts sending users
to it, so no request reaches a version that is not ready.

    start_experiment(url, repo, rollout)   control and treatment side by side, plus the holdout
    roll_out_treatment(url, repo)          everyone but the holdout moves to the treatment's version

To end one (the holdout too on one version): ``set_rollout(url, repo, serving.assignment.single_version(v))``.

What the router serves now is ``deployment.rollout.current_rollout(repo)``; a new router version is
written and loaded by ``deployment.rollout.set_rollout``.
"""

from __future__ import annotations

from pathlib import Path

from deployment.export import repository_lock
from deployment.rollout import current_rollout, roll_out, served_version, set_rollout
from serving.assignment import Rollout


def start_experiment(
    grpc_url: str,
    repo: str | Path,
    rollout: Rollout,
    timeout_s: float = 300.0,
    root_certificates: str | Path | None = None,
) -> int:
    """Begin an A/B test; ``rollout`` comes from ``serving.assignment.ab_rollout``.
    ``root_certificates``: for a server whose gRPC speaks TLS (``deployment.security.ControlClient``)."""
    return set_rollout(grpc_url, repo, rollout, timeout_s, root_certificates)


def roll_out_treatment(
    grpc_url: str,
    repo: str | Path,
    arm: str = "treatment",
    timeout_s: float = 300.0,
    root_certificates: str | Path | None = None,
) -> Rollout:
    """Ship ``arm``: the plain ``funnel`` ensemble switches to its version (``deployment.rollout``) and
    every non-holdout user of the router gets it; the holdout stays on its version (``control_version``).
    The experiment keeps its name and arms, so its log then holds the control arm on two versions, which
    ``online.ab_report.analyze`` refuses: analyse the rows logged before the rollout. Both steps under
    the repository's lock (``deployment.export.repository_lock``): no other writer comes between them."""
    with repository_lock(repo):
        current = current_rollout(repo)
        if current is None or arm not in current.versions:
            raise ValueError(f"no running experiment has an arm {arm!r}")
        shipped = current.roll_out(arm)
        if served_version(repo) != current.versions[arm]:
            roll_out(grpc_url, repo, current.versions[arm], timeout_s, root_certificates)
        set_rollout(grpc_url, repo, shipped, timeout_s, root_certificates)
    return shipped
