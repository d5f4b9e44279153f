"""Roll a new model version into a running server without dropping or mixing requests.

The repository holds numbered versions side by side: ``<stage>/<N>/`` for every stage. Stage
configs serve every version on disk (``version_policy: all``, added by the export) and the
``funnel`` ensemble pins each step to one version (``pin_ensemble``), so a request runs entirely on
one export. Rolling from N to N+1 (server in explicit model-control mode, see ``TritonServer``):

1. ``add_version``: export N+1 into a temporary repository beside the live one and move each
   stage's ``<N+1>/`` folder in with one rename; nothing loads it yet (explicit mode).
2. ``roll_out``: check that every stage of N+1 is complete, load each stage through Triton's load
   API (N stays loaded and keeps serving beside N+1), then write the ensemble config pinned to N+1
   with ``funnel/<N+1>/`` and load the ensemble: Triton swaps it in once it is ready, requests in
   flight finish on N, later ones run on N+1.
3. ``retire``: remove version N's folders and reload the stages, freeing their memory.

A failed step leaves the old version serving: the ensemble is only switched after every stage of the
new version reports ready, and an ensemble that then fails to load, or an A/B router that then fails
to follow it, gets its old config back on disk, so a restart serves the old version too. Every call
to the server has a deadline (``CALL_TIMEOUT_S``; loads ``timeout_s``): a server that stops answering
fails the step with ``security.ControlTimeout`` instead of holding the rollout forever. ``funnel``'s
config names the one version it serves, so rolling back to an older version works like rolling forward.

The A/B router (``online/router.py``) has versions of its own, one per rollout of users to model
versions (``serving/assignment.py``): ``current_rollout`` reads the one Triton serves and
``set_rollout`` writes and loads the next. Outside an experiment the router follows ``roll_out``.

Replicas sharing one repository (``docs/deployment.md``): the change is written once, through one
replica (``set_rollout``), and every other replica takes it with ``follow_rollout``, which loads
what is on disk (the router and ``funnel`` included) and writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from configs.cli import checked_timeout
from deployment.export import (
    STAGE_ARTIFACTS,
    TEMP_SUFFIX,
    check_complete,
    exclusive,
    export_repository,
    exported_version,
    install_model_py,
    pin_ensemble,
    rename_ensemble,
    repository_lock,
    served_settings,
    setting_keys,
    staging_folder,
    version_models,
)
from deployment.security import ControlClient
from models.registry import ModelVersion, sync_path, sync_tree
from serving.assignment import NO_EXPERIMENT, Rollout, single_version
from serving.interface import EXPERIMENT_FILE, FEEDBACK, FUNNEL, FUSED, ROUTER, ensemble_name

log = logging.getLogger(__name__)

# Every model that can hold a version's stages: the seven stages, or the fused funnel.
STAGES = [*STAGE_ARTIFACTS, FUSED]
# How long one control call that only reads (readiness, the repository index, a model's config) waits
# for the server's answer; loads and unloads wait the rollout's ``timeout_s`` (a real stage loads in
# tens of seconds). Without a deadline a server that took the call and never answered held the
# rollout forever: the ``timeout_s`` of ``wait_ready`` was only checked between calls.
CALL_TIMEOUT_S = 15.0


class RolloutError(RuntimeError):
    """A rollout step the server did not complete in time: a stage that never became ready, an old
    version still unloading. The old version keeps serving (the switch comes after every wait)."""


def _control(grpc_url: str, repo: Path, root_certificates, timeout_s: float) -> ControlClient:
    """The control client of one rollout step: every call bounded (``security.ControlTimeout``)."""
    return ControlClient(
        grpc_url, repo, root_certificates=root_certificates, timeout_s=CALL_TIMEOUT_S, load_timeout_s=timeout_s
    )


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole: written beside it, synced, then renamed over it, the rename synced. Not
    synced, a power cut soon after could leave ``funnel/config.pbtxt`` (what a restart serves) or
    ``export.json`` empty."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        sync_path(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the half-written file is not left beside the real one
        tmp.unlink(missing_ok=True)
        raise
    sync_path(path.parent, folder=True)


def served_version(repo: str | Path) -> int:
    return exported_version(repo)


def funnel_version(repo: str | Path) -> int:
    """The version ``funnel/config.pbtxt`` pins its steps to: what a server (re)loading the
    repository serves under ``funnel``, whatever ``export.json`` says."""
    versions = set(re.findall(r"model_version:\s*(\d+)", (Path(repo) / FUNNEL / "config.pbtxt").read_text()))
    if len(versions) != 1:
        raise ValueError(f"{FUNNEL}/config.pbtxt pins its steps to versions {sorted(versions)}, not one")
    return int(versions.pop())


def loaded_funnel_version(client) -> int | None:
    """The version the loaded ``funnel``'s steps call (None when they disagree)."""
    config = client.get_model_config(FUNNEL, as_json=True)["config"]
    versions = {int(step["model_version"]) for step in config["ensemble_scheduling"]["step"]}
    return versions.pop() if len(versions) == 1 else None


def serve_only(ensemble_config: str, version: int) -> str:
    """The ensemble config with a version policy serving exactly ``version`` (its folder)."""
    config = re.sub(r"\nversion_policy:.*\n", "\n", ensemble_config)
    return config.rstrip("\n") + f"\nversion_policy: {{ specific {{ versions: [{int(version)}] }} }}\n"


def add_version(model: ModelVersion, repo: str | Path, batching=None) -> int:
    """Put ``model``'s stages into the live repository as a new numbered version; return it.

    ``batching`` (``configs.BatchingConfig``) overrides the version's own ``serving.batching``, e.g.
    to roll a version in fused (``fuse_stages``) behind a server that serves the seven stage models:
    ``roll_out`` switches the ensemble to the fused funnel, and ``retire`` of the last staged version
    unloads the stage models. Each model the repository has keeps its ``config.pbtxt``: the version's
    own settings that differ are named in a warning, not applied (``warn_unapplied_settings``)."""
    repo = Path(repo).resolve()
    # Versions are added one at a time (and not during an export into the same folder, or a rollout:
    # ``repository_lock``); a killed add_version's staging folder is removed first.
    with repository_lock(repo, rf"\.{re.escape(repo.name)}-v\d+-{TEMP_SUFFIX}"):
        return _add_version(model, repo, batching)


def _add_version(model: ModelVersion, repo: Path, batching) -> int:
    version = int(model.version)
    clash = [s for s in STAGES if (repo / s / str(version)).exists()]
    if clash and not (repo / ensemble_name(version)).exists():
        # A killed add_version: its pinned ensemble moves in last, so without it the stage folders are
        # a half-added version nothing can load (roll_out checks completeness). Clear them and redo.
        for stage in clash:
            shutil.rmtree(repo / stage / str(version))
        clash = []
    if clash:
        raise FileExistsError(f"version {version} is already in {repo} (stages {clash})")
    staging_parent = Path(tempfile.mkdtemp(prefix=f".{repo.name}-v{version}-", dir=repo.parent))
    moved: list[Path] = []
    try:
        # Synced to disk by the export: every folder moved in below is whole before its rename, and each
        # rename is synced (the folder it lands in) before the next; the pinned ensemble, which marks the
        # version added, moves in last, so a power cut never leaves it beside empty or missing stage files.
        staged = export_repository(model, staging_parent / "repo", batching=batching)
        # One config.pbtxt serves every version of a model: the repository's settings stay, the
        # stages' and the endpoints' (which a rollout never reloads with a new config), and each
        # of the new version's own that differs is named.
        warn_unapplied_settings(staged, repo, version, [*version_models(staged, version), ROUTER, FEEDBACK])
        for stage in version_models(staged, version):
            if not (repo / stage).exists():  # a model the live repository lacks (e.g. the first fused export)
                os.rename(staged / stage, repo / stage)
                moved.append(repo / stage)
                sync_path(repo, folder=True)
                continue
            target = repo / stage / str(version)
            os.rename(staged / stage / str(version), target)
            moved.append(target)
            sync_path(repo / stage, folder=True)
        # This version's own pinned ensemble, for A/B tests that serve it beside the current one.
        target = repo / ensemble_name(version)
        os.rename(staged / ensemble_name(version), target)
        moved.append(target)
        sync_path(repo, folder=True)
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging_parent, ignore_errors=True)
    return version


def warn_unapplied_settings(staged: Path, repo: Path, version: int, models: list[str]) -> dict[str, dict]:
    """Warn about, and return (``{model: {setting: (the version's, the repository's)}}``), the settings
    of ``version``'s export (``staged``) that ``add_version`` does not apply: each model's
    ``config.pbtxt`` in ``repo`` serves every version of it (the stages' batching and instance counts,
    the router's and the feedback endpoint's counts, ``serving.metrics_interval_s``), and only the
    version's folders move in. Not applied on purpose: a changed ``config.pbtxt`` reloads every version
    of the model, the one serving too, where the rollout loads only the new version beside it
    (``load_version``), and the feedback endpoint is never reloaded by a rollout at all. A model the
    repository lacks (the first fused version's ``fused_funnel``) comes with its own config: not named."""
    unapplied = {}
    for name in models:
        if not (repo / name / "config.pbtxt").exists() or not (staged / name / "config.pbtxt").exists():
            continue
        ours, theirs = (served_settings((r / name / "config.pbtxt").read_text()) for r in (staged, repo))
        differ = {key: (ours[key], theirs[key]) for key in ours if ours[key] != theirs[key]}
        if not differ:
            continue
        unapplied[name] = differ
        log.warning(
            "version %d's %s settings %s are not applied (%s): the repository's %s/config.pbtxt (%s) serves every "
            "version of the model and stays; to change it, export the repository again "
            "(scripts/export_triton.py --replace) and restart the server (docs/serving.md#batching)",
            version,
            name,
            {key: new for key, (new, _) in differ.items()},
            ", ".join(setting_keys(name, key) for key in differ),
            name,
            {key: old for key, (_, old) in differ.items()},
        )
    return unapplied


def wait_ready(client, name: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.is_model_ready(name, str(version)):
            return
        time.sleep(0.2)
    raise RolloutError(f"{name} version {version} did not become ready within {timeout_s:g} s")


def wait_unloaded(client, name: str, keep: int, timeout_s: float) -> None:
    """Wait until no version of ``name`` but ``keep`` is loaded or unloading.

    Loading a new router version unloads the old one in the background; a request that reached the
    new version while the old one's stubs were shutting down was seen once to crash tritonserver
    2.51's python backend (SIGSEGV in execute, then a boost lock_exception). Returning only after
    the old versions are gone keeps traffic that follows a rollout away from that window."""
    deadline = time.monotonic() + timeout_s
    while True:
        index = client.get_model_repository_index(as_json=True).get("models", [])
        busy = [
            m.get("version")
            for m in index
            if m.get("name") == name
            and m.get("version") != str(keep)
            and m.get("state") in ("READY", "UNLOADING", "LOADING")
        ]
        if not busy:
            return
        if time.monotonic() >= deadline:
            raise RolloutError(f"{name} versions {busy} were still unloading after {timeout_s:g} s")
        time.sleep(0.2)


def load_version(client, repo: Path, version: int, timeout_s: float = 300.0) -> None:
    """Load every stage's ``version`` (the loaded ones keep serving) and its pinned ``funnel_v<N>``.

    A stage that already serves ``version`` is not reloaded: a reload restarts every version's stub
    and, with several ensembles depending on the stage, was seen to hang tritonserver 2.51's loader.
    """
    for stage in version_models(repo, version):
        if not client.is_model_ready(stage, str(version)):
            client.load_model(stage)
            wait_ready(client, stage, version, timeout_s)
    if not client.is_model_ready(ensemble_name(version), "1"):
        client.load_model(ensemble_name(version))
        wait_ready(client, ensemble_name(version), 1, timeout_s)


def roll_out(
    grpc_url: str, repo: str | Path, version: int, timeout_s: float = 300.0, root_certificates: str | Path | None = None
) -> None:
    """Switch the served funnel to ``version`` (already added to ``repo``) without downtime.
    ``root_certificates``: where the server's gRPC speaks TLS, the PEM file that signed its
    certificate (``ControlClient``); the same in every function here that talks to the server.
    ``timeout_s`` (a finite number of seconds > 0 and at most ``configs.cli.MAX_SECONDS``, else
    ``ValueError`` before anything changes: a longer gRPC deadline overflowed and every load failed at
    once) bounds each model load and each wait for a model to become ready, and every other
    call waits at most ``CALL_TIMEOUT_S``: a server that does not answer in time raises
    ``security.ControlTimeout``, naming the server and the call, as a refused load raises its error.

    Holds the repository's lock (``repository_lock``) from its first read to its last write: an export
    swapped in meanwhile (``--replace``) got the rest of the rollout's writes, and two rollouts at once
    interleaved theirs. A second writer waits for it."""
    timeout_s = checked_timeout(timeout_s)  # before the lock and any change
    repo = Path(repo).resolve()
    with repository_lock(repo):
        _roll_out(grpc_url, repo, version, timeout_s, root_certificates)


def _roll_out(grpc_url: str, repo: Path, version: int, timeout_s: float, root_certificates) -> None:
    check_complete(repo, str(version))
    # loading models needs the deployment's admin key
    client = _control(grpc_url, repo, root_certificates, timeout_s)
    try:
        load_version(client, repo, version, timeout_s)
        # The version's own pinned ensemble under the served name: its steps are that export's (the
        # seven stages or the fused funnel), whatever the version served before had. Its version
        # policy names the version: Triton would otherwise load the highest ``funnel/<N>`` folder,
        # and a roll back to an older version would never become ready.
        ensemble = repo / FUNNEL
        before = (ensemble / "config.pbtxt").read_text()
        created = not (ensemble / str(version)).exists()
        pinned = pin_ensemble((repo / ensemble_name(version) / "config.pbtxt").read_text(), version)
        routed = current_rollout(repo)
        router_before = router_versions(repo)[-1] if routed is not None else None
        try:
            # The folder first: a config pinned to a version with no folder is an ensemble Triton
            # cannot load, and a failed mkdir must reach the restore below like any other step.
            (ensemble / str(version)).mkdir(exist_ok=True)
            _write_atomic(ensemble / "config.pbtxt", serve_only(rename_ensemble(pinned, FUNNEL), version))
            client.load_model(FUNNEL)
            wait_ready(client, FUNNEL, version, timeout_s)
            # Outside an experiment the A/B router follows the served version; during one, its arms stay.
            if routed is not None and routed.experiment.name == NO_EXPERIMENT:
                set_rollout(grpc_url, repo, single_version(version), timeout_s, root_certificates)
        except BaseException:
            if routed is not None and router_versions(repo)[-1] != router_before:
                # The router switched (only the old router versions' unload timed out): every part
                # serves the new version, so export.json says so too.
                _record_rolled_out(repo, version)
                raise
            # Put the served ensemble back as it was, on disk too: a restart must not switch to a
            # version that failed to roll out. A router that failed to switch still routes to the
            # old version: ``funnel`` going back keeps the two, and export.json, on one version.
            _write_atomic(ensemble / "config.pbtxt", before)
            if created:
                shutil.rmtree(ensemble / str(version), ignore_errors=True)
            try:
                client.load_model(FUNNEL)
            except Exception:  # the original failure is the one to report
                pass
            raise
    finally:
        client.close()
    _record_rolled_out(repo, version)


def _record_rolled_out(repo: Path, version: int) -> None:
    export = json.loads((repo / "export.json").read_text())
    export.update(version=int(version), rolled_out_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_atomic(repo / "export.json", json.dumps(export))


def retire(
    grpc_url: str,
    repo: str | Path,
    version: int,
    root_certificates: str | Path | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Unload and delete an old version that the ensemble no longer calls (each reload or unload
    waits at most ``timeout_s``). Under the repository's lock (``repository_lock``), as ``roll_out``."""
    timeout_s = checked_timeout(timeout_s)  # before the lock and any change
    repo = Path(repo).resolve()
    with repository_lock(repo):
        _retire(grpc_url, repo, version, root_certificates, timeout_s)


def _retire(grpc_url: str, repo: Path, version: int, root_certificates, timeout_s: float) -> None:
    if int(version) in {served_version(repo), funnel_version(repo)}:
        raise ValueError(f"version {version} is the one being served; roll out another first")
    in_experiment = current_rollout(repo)
    if in_experiment is not None and int(version) in {*in_experiment.versions.values(), in_experiment.control_version}:
        raise ValueError(f"version {version} still serves an arm of experiment {in_experiment.experiment.name!r}")
    client = _control(grpc_url, repo, root_certificates, timeout_s)
    try:
        # A keyed call before anything is deleted: after an earlier retire that failed part-way (the
        # pinned ensemble already gone), the first keyed call came after the stage folders' deletion,
        # so a wrong key or an unreachable server was refused only once they were gone.
        client.get_model_repository_index()
        if (repo / ensemble_name(version)).exists():
            client.unload_model(ensemble_name(version))
            shutil.rmtree(repo / ensemble_name(version))
        for stage in [FUNNEL, *STAGES]:
            path = repo / stage / str(version)
            if path.exists():
                shutil.rmtree(path)
                if stage == FUNNEL:
                    continue
                if any(p.name.isdigit() for p in (repo / stage).iterdir()):
                    client.load_model(stage)
                else:  # its last version gone (the layout changed): the model goes too
                    client.unload_model(stage)
                    shutil.rmtree(repo / stage)
    finally:
        client.close()


# The A/B router's versions: each is one rollout (``serving/assignment.py``) of users to model versions.


# ``set_rollout``'s staging folders, ``.ab_router-<N>-<random>`` in the router's folder (Triton ignores
# them: not a number); a killed writer's stays until the next ``set_rollout`` takes the lock.
ROUTER_LEFTOVERS = rf"\.{re.escape(ROUTER)}-\d+-{TEMP_SUFFIX}"


def router_versions(repo: Path) -> list[int]:
    return sorted(int(p.name) for p in (repo / ROUTER).iterdir() if p.is_dir() and p.name.isdigit())


def current_rollout(repo: str | Path) -> Rollout | None:
    """The rollout of the newest router version (the one Triton serves); None without a router."""
    repo = Path(repo)
    versions = router_versions(repo) if (repo / ROUTER).is_dir() else []
    if not versions:
        return None
    return Rollout.from_dict(json.loads((repo / ROUTER / str(versions[-1]) / EXPERIMENT_FILE).read_text()))


def arm_versions(repo: Path, rollout: Rollout) -> list[int]:
    """The model versions ``rollout`` serves (its arms' and the control's), each checked to be
    complete in ``repo``."""
    versions = sorted({*rollout.versions.values(), rollout.control_version})
    for version in versions:
        if not (repo / ensemble_name(version)).is_dir():
            raise FileNotFoundError(
                f"model version {version} is not in {repo}; add it first (deployment.rollout.add_version)"
            )
        check_complete(repo, str(version))
    return versions


def set_rollout(
    grpc_url: str,
    repo: str | Path,
    rollout: Rollout,
    timeout_s: float = 300.0,
    root_certificates: str | Path | None = None,
) -> int:
    """Serve ``rollout`` from a new router version; return the router version. Under the repository's
    lock (``repository_lock``), as ``roll_out``, which calls it holding that lock already."""
    timeout_s = checked_timeout(timeout_s)  # before the lock and any change
    repo = Path(repo).resolve()
    with repository_lock(repo):
        return _set_rollout(grpc_url, repo, rollout, timeout_s, root_certificates)


def _set_rollout(grpc_url: str, repo: Path, rollout: Rollout, timeout_s: float, root_certificates) -> int:
    versions = arm_versions(repo, rollout)
    # loading models needs the deployment's admin key
    client = _control(grpc_url, repo, root_certificates, timeout_s)
    try:
        for version in versions:
            if not client.is_model_ready(ensemble_name(version)):
                load_version(client, repo, version, timeout_s)
        # One writer of router versions at a time (an flock on the router's folder), from picking the
        # version number to the old versions' unload: a second one waits instead of picking the same
        # number, or loading its version while this one waits for (or removes) its own. A writer killed
        # mid-write (SIGKILL, out of memory) left its staging folder; every one is made under this
        # lock, so those found on taking it are dead and removed.
        with exclusive(repo / ROUTER, ROUTER_LEFTOVERS):
            router_version = _write_router_version(client, repo, rollout, timeout_s)
    finally:
        client.close()
    return router_version


def _write_router_version(client, repo: Path, rollout: Rollout, timeout_s: float) -> int:
    """``set_rollout``'s part under the router's lock: write the next router version, load it, wait
    for the old ones to unload; a version that fails to load is removed again."""
    router_version = router_versions(repo)[-1] + 1
    staging = staging_folder(repo / ROUTER, f".{ROUTER}-{router_version}-")
    try:
        install_model_py(repo / ROUTER / str(router_version - 1) / "model.py", staging)
        (staging / EXPERIMENT_FILE).write_text(json.dumps(rollout.to_dict(), indent=2))
        sync_tree(staging)  # on disk before the rename: a power cut never leaves an empty rollout
        os.rename(staging, repo / ROUTER / str(router_version))  # Triton never sees half a version
        sync_path(repo / ROUTER, folder=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        client.load_model(ROUTER)
        wait_ready(client, ROUTER, router_version, timeout_s)
    except BaseException:
        # The newest folder is the rollout Triton serves after a restart and the one
        # ``current_rollout`` reads: a router version that failed to load must not stay.
        shutil.rmtree(repo / ROUTER / str(router_version), ignore_errors=True)
        try:
            client.load_model(ROUTER)  # back to the version still on disk
        except Exception:  # the original failure is the one to report
            pass
        raise
    wait_unloaded(client, ROUTER, router_version, timeout_s)
    return router_version


# How long ``follow_rollout`` waits before it reads a repository again that it found mid-write.
FOLLOW_RETRY_S = 1.0


def _written(repo: Path) -> tuple:
    """What ``follow_rollout`` follows, as on disk now: ``export.json``, ``funnel``'s config and the
    newest router version (number and rollout). Every writer changes one of them with each of its steps."""
    versions = router_versions(repo)
    newest = repo / ROUTER / str(versions[-1]) / EXPERIMENT_FILE if versions else None
    return (
        (repo / "export.json").read_text(),
        (repo / FUNNEL / "config.pbtxt").read_text(),
        versions[-1:],
        newest.read_text() if newest is not None else None,
    )


def follow_rollout(
    grpc_url: str, repo: str | Path, timeout_s: float = 300.0, root_certificates: str | Path | None = None
) -> int:
    """Make a replica serve the newest router version already in the shared ``repo`` (written by
    ``set_rollout`` through another replica): load the model versions its arms name, then the
    router. Writes nothing; returns the router version now served.

    Never loads a writer's half-done change: it holds the writers' lock (``repository_lock``), so a
    ``roll_out`` (``funnel``'s config, then the router, then ``export.json``) finishes before it reads
    or starts after it has loaded. Where the file system has no flock (NFS from another host), it
    reads again after loading and starts over when anything changed meanwhile (the server reads the
    repository at each load, not when this read it), and waits while ``funnel``'s config and
    ``export.json`` name different versions (a ``roll_out`` between its first and last write); at
    most ``timeout_s``, then ``RolloutError``."""
    timeout_s = checked_timeout(timeout_s)  # before the lock and any change
    repo = Path(repo).resolve()
    deadline = time.monotonic() + timeout_s
    with repository_lock(repo):
        while True:
            seen = _written(repo)
            if funnel_version(repo) == served_version(repo):
                try:
                    router_version = _follow(grpc_url, repo, timeout_s, root_certificates)
                except RolloutError:
                    if _written(repo) == seen:
                        raise
                else:
                    if _written(repo) == seen:
                        return router_version
            if time.monotonic() >= deadline:
                raise RolloutError(
                    f"{repo} kept changing or stayed mid-write for {timeout_s:g} s (funnel/config.pbtxt pins version "
                    f"{funnel_version(repo)}, export.json records {served_version(repo)}): a rollout still running, "
                    "or a roll_out killed mid-way (run it again); follow once it has finished"
                )
            log.info("%s is being written by a rollout; reading it again in %g s", repo, FOLLOW_RETRY_S)
            time.sleep(FOLLOW_RETRY_S)


def _follow(grpc_url: str, repo: Path, timeout_s: float, root_certificates) -> int:
    rollout = current_rollout(repo)
    if rollout is None:
        raise FileNotFoundError(f"{repo} has no {ROUTER} versions")
    router_version = router_versions(repo)[-1]
    versions = arm_versions(repo, rollout)
    pinned = funnel_version(repo)
    client = _control(grpc_url, repo, root_certificates, timeout_s)
    try:
        for version in sorted({*versions, pinned}):
            load_version(client, repo, version, timeout_s)
        # ``funnel`` too, as ``roll_out`` switched it through the other replica: left on the old
        # version, it would lose its stages when that version is retired from the shared disk.
        # Readiness is not enough: loading a stage reloads the ensembles that call it with the config
        # they were loaded with, so a ``funnel/<N>`` folder can be ready with the old steps.
        if not client.is_model_ready(FUNNEL, str(pinned)) or loaded_funnel_version(client) != pinned:
            client.load_model(FUNNEL)  # an explicit load reads the config on disk
            wait_ready(client, FUNNEL, pinned, timeout_s)
        if not client.is_model_ready(ROUTER, str(router_version)):
            client.load_model(ROUTER)
            wait_ready(client, ROUTER, router_version, timeout_s)
            wait_unloaded(client, ROUTER, router_version, timeout_s)
    finally:
        client.close()
    return router_version
