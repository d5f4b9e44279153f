"""Export one registry version as a Triton model repository, atomically.

The stage definitions (``config.pbtxt`` and a thin ``model.py``) come from ``triton_repo/``; the
export puts each stage's artifacts from the registry version into ``<stage>/<version>/``, writes
each stage's batching (``serving.batching``: dynamic batcher, instance count) into its config, and
builds the online feature store. With ``serving.batching.fuse_stages`` the stages' folders go into
one model instead, ``fused_funnel/<version>/<stage>/`` (``serving/fused.py``), and the ensembles
call it as their one step. The repository is assembled in a temporary folder beside the target,
synced to disk (every file and folder in it) and renamed into place only when complete, the rename
synced too, so a server never sees a partial export, not even after a power cut right after the rename.

Exports into one folder take turns (``exclusive``: a lock on the folder holding the repository),
and so do the rollout's writers into the repository (``repository_lock``),
and each first removes what an export killed there left behind (its staging folder, the old
repository it was deleting): under the lock no other export is using them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

from models.heads import served_members
from models.registry import MANIFEST, ModelVersion, check_artifact_versions, lock_folder, sync_path, sync_tree
from serving.assignment import single_version
from serving.interface import (
    EXPERIMENT_FILE,
    FEEDBACK,
    FUNNEL,
    FUSED,
    METRICS_INTERVAL_PARAMETER,
    ROUTER,
    ensemble_name,
    stage_folder,
)
from serving.online_store import build_online_store
from workflows.local_parquet import read_parquet

log = logging.getLogger(__name__)

TRITON_REPO_SOURCE = Path(__file__).resolve().parents[1] / "triton_repo"
STAGE_ARTIFACTS = {
    "feature_lookup": [],  # the online store is built, not copied
    "query_tower": ["query_tower", "query_tower.json"],
    "retrieval": ["item_index.faiss", "item_index.json"],
    "filtering": ["item_features.parquet"],  # to map the request's excluded raw ids
    "light_ranker": ["light_ranker", "item_features.parquet"],
    "heavy_ranker": ["heavy_ranker", "item_features.parquet"],
    "ordering": ["item_features.parquet", "popularity.parquet"],
}
# Exported where the version has them (the manifest's ``item_affinity`` is not null).
AFFINITY_ARTIFACTS = {"ordering": ["item_affinity.npy", "item_affinity.json"]}
# The stages that read raw item ids from outside (live events; excluded ids; takedowns and excluded
# ids), where the version has the table (serving/item_aliases.py; versions trained before it do not).
ALIAS_ARTIFACTS = {stage: ["item_aliases.parquet"] for stage in ("feature_lookup", "filtering", "ordering")}


def stage_artifacts(manifest: dict) -> dict[str, list[str]]:
    """The artifacts each stage of this version's export holds."""
    out = {stage: list(names) for stage, names in STAGE_ARTIFACTS.items()}
    if manifest.get("item_affinity"):
        for stage, names in AFFINITY_ARTIFACTS.items():
            out[stage] += names
    if "item_aliases" in manifest:
        for stage, names in ALIAS_ARTIFACTS.items():
            out[stage] += names
    # The ensemble's further members, those it serves (a member the tuning step weighted 0 stays behind).
    served = [name for name, _ in served_members(manifest.get("heavy_ranker", {}))]
    out["heavy_ranker"] += [name for name in served if name != "heavy_ranker"]
    return out


def install_model_py(src: Path, version_dir: Path) -> Path:
    """Copy a thin ``model.py`` into a model version folder with its bytecode beside it.

    The Python backend's stub runs an isolated interpreter (environment variables ignored), so it
    would write ``__pycache__`` into the repository at the first load; Triton then sees a changed
    version folder and reloads that stage, for every version, the next time an ensemble that uses it
    is loaded (a rollout: 45 s of reloads measured; triton-inference-server/server#7489). Compiled
    here, the stub finds a valid cache and writes nothing."""
    import py_compile
    from importlib.util import cache_from_source

    target = version_dir / "model.py"
    shutil.copy2(src, target)
    py_compile.compile(str(target), cfile=cache_from_source(str(target)), doraise=True)
    return target


# tempfile.mkdtemp's random part: 8 of [a-z0-9_].
TEMP_SUFFIX = "[a-z0-9_]{8}"


def staging_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` with a name no other process uses (``tempfile.mkdtemp``), but the
    mode a plain ``mkdir`` gives (the umask's, not mkdtemp's 0700): it is renamed into place as the
    repository or a version of it, which a server running as another user (the image's) must read."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    probe = path / "mode"
    probe.mkdir()
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.rmdir()
    path.chmod(mode)
    return path


# How long a writer waits for another one's lock on the repository's folder (``exclusive``) before it
# gives up with ``RepositoryBusyError``: longer than any export or rollout (each load waits at most its
# ``timeout_s``, 300 s by default) should hold it.
LOCK_TIMEOUT_S = 3600.0
# The folders this thread holds ``exclusive`` on, with how many times: ``roll_out`` takes the
# repository's lock, then calls ``set_rollout``, which takes it again (a second flock from the same
# process on another descriptor would wait for itself).
_held = threading.local()


class RepositoryBusyError(TimeoutError):
    """Another writer held the lock on a repository's folder longer than ``LOCK_TIMEOUT_S``; nothing
    was changed."""


def lock_holder(path: Path) -> str | None:
    """Which process holds the flock on ``path``, from Linux's ``/proc/locks`` (pid and command line),
    for messages; None where that cannot be told (another system, a holder on another host)."""
    try:
        info = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != device:
            continue  # "->": a waiter, not the holder
        pid = fields[4]
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = ""
        return f"pid {pid}" + (f" ({command})" if command else "")
    return None


def _lock(parent: Path, timeout_s: float) -> int:
    """``lock_folder`` on ``parent``, waiting at most ``timeout_s`` (a warning naming the holder when
    it has to wait); ``RepositoryBusyError`` after that."""
    fd = lock_folder(parent)
    if fd is not None:
        return fd
    holder = lock_holder(parent)
    log.warning(
        "waiting for the lock on %s (held by %s): another export, add_version, roll_out, set_rollout, retire or "
        "follow_rollout of a repository in it is running",
        parent,
        holder or "another process",
    )
    deadline = time.monotonic() + timeout_s
    while (fd := lock_folder(parent)) is None:
        if time.monotonic() >= deadline:
            holder = lock_holder(parent) or holder
            raise RepositoryBusyError(
                f"{parent} stayed locked for {timeout_s:g} s by {holder or 'another process'} (an export, "
                "add_version, roll_out, set_rollout, retire or follow_rollout of a repository in it); nothing was "
                "changed: run this again once it has finished"
            )
        time.sleep(0.2)
    return fd


@contextlib.contextmanager
def exclusive(parent: Path, leftovers: str = "", timeout_s: float | None = None):
    """Hold an exclusive lock on folder ``parent`` (an flock on the folder itself: no lock file is
    left beside the repository), then remove the folders in it whose names fully match the regex
    ``leftovers``: temporary folders of an export that was killed (SIGKILL, out of memory) before
    its cleanup ran. Every export makes those only while it holds this lock, so none is in use.

    Every writer into a served repository holds this on the folder that holds the repository
    (``repository_lock``), which an export's swap leaves in place. Another holder is waited for, at
    most ``timeout_s`` (``LOCK_TIMEOUT_S``), then ``RepositoryBusyError`` names it. Reentrant within
    one thread (``roll_out`` calls ``set_rollout``); a nested hold removes no leftovers (the outer
    holder's temporary folders are in use)."""
    parent = Path(parent).resolve()
    held = _held.__dict__.setdefault("folders", {})
    if held.get(parent):
        held[parent] += 1
        try:
            yield
        finally:
            held[parent] -= 1
        return
    try:
        fd = _lock(parent, LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
    except OSError as err:  # no flock on this file system
        if isinstance(err, RepositoryBusyError):
            raise
        log.warning("no lock on %s (%s): exports into it do not take turns, leftovers stay", parent, err)
        yield
        return
    held[parent] = 1
    try:
        if leftovers:
            for path in parent.iterdir():
                if path.is_dir() and not path.is_symlink() and re.fullmatch(leftovers, path.name):
                    log.warning("removing %s, left by an export that did not finish", path)
                    shutil.rmtree(path, ignore_errors=True)
        yield
    finally:
        del held[parent]
        os.close(fd)  # releases the lock


def repository_lock(repo: str | Path, leftovers: str = ""):
    """The lock every writer into the served repository ``repo`` takes: ``exclusive`` on the folder
    holding it (an export's swap replaces ``repo`` itself, so a lock on it would not outlive the swap).
    Exports, ``add_version``, ``roll_out``, ``set_rollout`` and ``retire`` take turns under it: one
    swapped in during a rollout got the rollout's later writes in the new repository."""
    return exclusive(Path(repo).resolve().parent, leftovers)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def export_repository(
    model: ModelVersion,
    out_repo: str | Path,
    replace: bool = False,
    source: str | Path = TRITON_REPO_SOURCE,
    batching=None,
) -> Path:
    """Write the funnel for ``model`` to ``out_repo``; return its path.

    ``batching`` (``configs.BatchingConfig``) sets how the stages batch requests; by default the
    version's own ``serving.batching`` (the config's defaults for versions trained before it existed).

    ``replace=False`` refuses to overwrite an existing repository; ``replace=True`` swaps the new
    one in with one atomic exchange (``exchange``; two renames where the system lacks it), so the
    served path always holds one whole repository. Only an exported repository (one with
    ``export.json``) or an empty folder is replaced. The repository is on disk (synced) when this returns.
    """
    out_repo, source = Path(out_repo).resolve(), Path(source)
    manifest = model.manifest
    version = str(manifest["version"])
    batching = batching or batching_of(manifest)
    metrics_interval = metrics_interval_of(manifest)
    unknown = sorted(set(batching.stage_instances) - {*STAGE_ARTIFACTS, FUSED})
    if unknown:
        raise ValueError(
            f"serving.batching.stage_instances names {unknown}; the models are {[*STAGE_ARTIFACTS, FUSED]}"
        )
    warn_ignored_instances(batching)
    endpoints = endpoint_instances(batching)  # refused before the lock and the staging folder
    check_artifact_versions(model)  # never export a query tower with another run's item index
    out_repo.parent.mkdir(parents=True, exist_ok=True)
    with repository_lock(out_repo, rf"\.{re.escape(out_repo.name)}-(staging|old)-{TEMP_SUFFIX}"):
        # Checked under the lock: an export that waited for another one sees what that one wrote.
        if out_repo.exists() and not replace:
            raise FileExistsError(f"{out_repo} exists; pass replace=True (--replace) to swap in the new export")
        if out_repo.exists() and not out_repo.is_dir():
            raise NotADirectoryError(f"{out_repo} is a file, not an exported model repository")
        if out_repo.is_dir() and any(out_repo.iterdir()):
            exported_version(out_repo)  # replace only an export: never a folder named by mistake (the registry)
        _export(model, out_repo, manifest, version, source, batching, metrics_interval, endpoints)
    return out_repo


def _export(
    model, out_repo: Path, manifest: dict, version: str, source: Path, batching, metrics_interval, endpoints: dict
) -> None:
    staging = staging_folder(out_repo.parent, f".{out_repo.name}-staging-")
    try:
        # Fused: one model holding every stage's folder (serving/fused.py); else one model per stage.
        models = [FUSED] if batching.fuse_stages else list(STAGE_ARTIFACTS)
        for name in models:
            model_config = (source / name / "config.pbtxt").read_text()
            model_config = configure_batching(model_config, name, batching)
            model_config = with_metrics_interval(model_config, metrics_interval)
            (staging / name / version).mkdir(parents=True)
            (staging / name / "config.pbtxt").write_text(serve_all_versions(model_config))
            install_model_py(source / name / "1" / "model.py", staging / name / version)
            shutil.copy2(model.path / MANIFEST, staging / name / version / MANIFEST)
        for stage, artifacts in stage_artifacts(manifest).items():
            version_dir = stage_folder(staging, stage, version)
            version_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model.path / MANIFEST, version_dir / MANIFEST)
            for name in artifacts:
                _copy(model.path / name, version_dir / name)
        build_online_store(
            stage_folder(staging, "feature_lookup", version) / "online_store.sqlite",
            read_parquet(model.path / "user_features.parquet"),
            manifest["features"]["user_categorical"],
            manifest["features"]["user_continuous"],
            exported_history(model.path),
            read_parquet(model.path / "item_features.parquet"),
            # The windowed activity features count from these at request time (absent: none).
            read_parquet(recent) if (recent := model.path / "recent_events.parquet").exists() else None,
        )
        (staging / FUNNEL / version).mkdir(parents=True)
        ensemble = (source / FUNNEL / "config.pbtxt").read_text()
        if batching.fuse_stages:
            ensemble = fused_ensemble(ensemble)
        pinned = pin_ensemble(ensemble, int(version))
        (staging / FUNNEL / "config.pbtxt").write_text(pinned)
        write_version_ensemble(staging, pinned, int(version))
        # The A/B router (one arm, this version, until an experiment starts) and the feedback endpoint.
        for endpoint, count in endpoints.items():
            (staging / endpoint / "1").mkdir(parents=True)
            endpoint_config = with_metrics_interval((source / endpoint / "config.pbtxt").read_text(), metrics_interval)
            endpoint_config = with_instances(endpoint_config, count)
            (staging / endpoint / "config.pbtxt").write_text(endpoint_config)
            install_model_py(source / endpoint / "1" / "model.py", staging / endpoint / "1")
        (staging / ROUTER / "1" / EXPERIMENT_FILE).write_text(json.dumps(single_version(int(version)).to_dict()))
        check_complete(staging, version, manifest)
        (staging / "export.json").write_text(
            json.dumps({"version": int(version), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        )
        # On disk before the rename or exchange publishes it: after a power cut soon after, the rename
        # alone could reach the disk and leave a repository whose configs, export.json or artifacts
        # are empty or cut short, which check_complete (it checks that files exist) and Triton take.
        sync_tree(staging)
        if out_repo.exists() and exchange(staging, out_repo):
            # One atomic step: the served path never stands empty, even if this process is killed
            # right here (with two renames a kill between them left no repository to serve).
            sync_path(out_repo.parent, folder=True)  # the exchange on disk before the old one goes
            shutil.rmtree(staging, ignore_errors=True)  # the old repository, now
        elif out_repo.exists():  # no atomic exchange here (not Linux, or its filesystem lacks it)
            # A name no other export uses: one killed while it deleted its old copy leaves that behind,
            # and a fixed name (the process id, the same at each container start) was then taken.
            old = Path(tempfile.mkdtemp(prefix=f".{out_repo.name}-old-", dir=out_repo.parent))
            try:
                os.rename(out_repo, old)  # a folder replaces the empty one mkdtemp made
            except BaseException:
                old.rmdir()
                raise
            try:
                os.rename(staging, out_repo)
            except BaseException:
                os.rename(old, out_repo)  # the served repository goes back where it was, whole
                raise
            sync_path(out_repo.parent, folder=True)  # the renames on disk before the old one goes
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out_repo)
            sync_path(out_repo.parent, folder=True)  # and the rename itself
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def exported_history(version_dir: Path) -> pd.DataFrame:
    """``(user_id_raw, item_id_raw)`` the online store holds as seen items: the training history, plus
    that of the users ``workflow.active_users`` dropped (``fallback_history.parquet``, where the version
    has it), so the fallback serving them never returns what they already clicked."""
    history = read_parquet(version_dir / "user_history.parquet")
    dropped = version_dir / "fallback_history.parquet"
    if dropped.exists():
        history = pd.concat([history, read_parquet(dropped)[list(history.columns)]], ignore_index=True)
    return history


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False, with
    nothing changed, where the system or the filesystem does not offer it."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (macOS, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel, or a filesystem without it
        return False
    raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(code)}")


def batching_of(manifest: dict):
    """The ``serving.batching`` a version was trained with (``configs.BatchingConfig``)."""
    from configs import BatchingConfig, build_typed

    return build_typed(BatchingConfig, manifest["config"]["serving"].get("batching", {}), "serving.batching")


def metrics_interval_of(manifest: dict) -> float:
    """The ``serving.metrics_interval_s`` a version was trained with (the default for older ones)."""
    from configs import ServingConfig

    default = ServingConfig().metrics_interval_s
    return float(manifest["config"]["serving"].get("metrics_interval_s", default))


def edit_model_config(model_config: str, change) -> str:
    """``model_config`` (a ``config.pbtxt``) parsed into Triton's ``ModelConfig``, ``change(config)``
    applied, written back with its leading ``#`` comment lines kept."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    text_format.Parse(model_config, config)
    change(config)
    header = "".join(line + "\n" for line in model_config.splitlines() if line.startswith("#"))
    return header + text_format.MessageToString(config)


def with_metrics_interval(model_config: str, seconds: float) -> str:
    """``model_config`` (a ``config.pbtxt``) with the ``metrics_interval_s`` parameter its stub reads
    (``serving/triton_model.py``): how often it sends its queued metric updates to the server."""
    if not 0.0 <= float(seconds) <= 60.0:
        raise ValueError(f"metrics_interval_s must be in [0, 60], got {seconds}")

    def change(config) -> None:
        config.parameters[METRICS_INTERVAL_PARAMETER].string_value = repr(float(seconds))

    return edit_model_config(model_config, change)


def endpoint_instances(batching) -> dict[str, int]:
    """``{ab_router: n, feedback: m}``: the endpoints' instance counts (``serving.batching.router_instances``,
    ``feedback_instances``). ``BatchingConfig`` refuses a bad count when built; this refuses one set
    on it afterwards (a script's override) before anything is written."""
    counts = {ROUTER: batching.router_instances, FEEDBACK: batching.feedback_instances}
    for (endpoint, count), key in zip(counts.items(), ("router_instances", "feedback_instances")):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"serving.batching.{key} ({endpoint}'s instances) must be an integer >= 1, got {count!r}")
    return counts


def with_instances(model_config: str, count: int) -> str:
    """``model_config`` (a ``config.pbtxt``) with ``count`` instances in each of its instance groups
    (one CPU group where it declares none)."""
    return edit_model_config(model_config, lambda config: set_instance_count(config, count))


def set_instance_count(config, count: int) -> None:
    """``count`` instances in each of a parsed ``ModelConfig``'s instance groups (one CPU group where
    it declares none)."""
    from tritonclient.grpc import model_config_pb2

    if not config.instance_group:
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    for group in config.instance_group:
        group.count = int(count)


def warn_ignored_instances(batching) -> list[str]:
    """Warn about, and return, the ``stage_instances`` entries this export's layout has no model for:
    a stage's own count when the stages are fused into ``fused_funnel`` (``fuse_stages``), or
    ``fused_funnel``'s count when they are not. Not refused: ``scripts/export_triton.py --fuse-stages``
    and rollouts re-export a version laid out the other way than its config's counts were written for."""
    if batching.fuse_stages:
        ignored = sorted(set(batching.stage_instances) - {FUSED})
        why = (
            f"the stages are fused into {FUSED} (fuse_stages: true), which gets {batching.instances_of(FUSED)} "
            f"instance(s); set stage_instances.{FUSED} or instances"
        )
    else:
        ignored = [FUSED] if FUSED in batching.stage_instances else []
        why = "fuse_stages is false: each stage is its own model; set the stages' counts or instances"
    if ignored:
        log.warning("serving.batching.stage_instances %s ignored: %s", ignored, why)
    return ignored


def configure_batching(stage_config: str, stage: str, batching) -> str:
    """``stage_config`` (a stage's ``config.pbtxt``) with ``batching`` applied: Triton's dynamic
    batcher with its queue delay and ``max_batch_size``, or none (``max_batch_size: 0``), and the
    stage's instance count.

    Batched, every variable-length input (candidate lists, the user's history) allows ragged
    batches: the dynamic batcher otherwise only joins requests whose shapes are equal, and the
    stages serve each request's own tensors anyway (``serving/triton_model.py``). The ensemble
    stays unbatched (``max_batch_size: 0``): it adds the batch dimension of 1 a batching stage
    expects and strips it from the funnel's outputs, so clients send what they always sent."""

    def change(config) -> None:
        if batching.enabled:
            config.max_batch_size = int(batching.max_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = int(batching.max_queue_delay_us)
        else:
            config.max_batch_size = 0
            config.ClearField("dynamic_batching")
        for tensor in config.input:
            tensor.allow_ragged_batch = bool(batching.enabled and -1 in tensor.dims)
        set_instance_count(config, batching.instances_of(stage))

    return edit_model_config(stage_config, change)


def batching_settings(stage_config: str) -> dict:
    """What ``configure_batching`` wrote into ``stage_config``: max_batch_size, the queue delay (None
    without a dynamic batcher) and the instance count of each group."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    text_format.Parse(stage_config, config)
    delay = config.dynamic_batching.max_queue_delay_microseconds if config.HasField("dynamic_batching") else None
    return {
        "max_batch_size": int(config.max_batch_size),
        "max_queue_delay_us": delay,
        "instances": [int(group.count) for group in config.instance_group],
    }


def served_settings(model_config: str) -> dict:
    """What the export wrote into a model's ``config.pbtxt`` from the version's config: its batching
    (``batching_settings``) and ``metrics_interval_s`` (the default a stub uses where the config has
    none, an export from before the parameter)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from configs import ServingConfig

    config = model_config_pb2.ModelConfig()
    text_format.Parse(model_config, config)
    interval = config.parameters.get(METRICS_INTERVAL_PARAMETER)
    seconds = float(interval.string_value) if interval and interval.string_value else ServingConfig().metrics_interval_s
    return {**batching_settings(model_config), "metrics_interval_s": seconds}


def setting_keys(model: str, setting: str) -> str:
    """The config keys a ``served_settings`` entry of ``model`` comes from."""
    if setting == "metrics_interval_s":
        return "serving.metrics_interval_s"
    if setting == "instances":
        counts = {ROUTER: "router_instances", FEEDBACK: "feedback_instances"}
        key = counts.get(model, f"instances / stage_instances.{model}")
        return f"serving.batching.{key}"
    return f"serving.batching.enabled / {setting}"


def serve_all_versions(stage_config: str) -> str:
    """A stage serves every version on disk, so versions N and N+1 can run side by side while the
    ensemble switches from one to the other (``deployment/rollout.py``)."""
    if "version_policy" in stage_config:
        return stage_config
    return stage_config.rstrip("\n") + "\nversion_policy: { all { } }\n"


def fused_ensemble(ensemble_config: str) -> str:
    """The funnel ensemble with its steps replaced by one: the fused funnel (``serving/fused.py``),
    which takes the ensemble's inputs and gives its outputs under the same names. Clients, the A/B
    router and rollouts call ``funnel`` / ``funnel_v<N>`` whichever layout serves them."""

    def change(config) -> None:
        del config.ensemble_scheduling.step[:]
        step = config.ensemble_scheduling.step.add(model_name=FUSED, model_version=-1)
        for tensor in config.input:
            step.input_map[tensor.name] = tensor.name
        for tensor in config.output:
            step.output_map[tensor.name] = tensor.name

    return edit_model_config(ensemble_config, change)


def version_models(repo: str | Path, version: int | str) -> list[str]:
    """The models holding ``version``'s stages in ``repo``: the fused funnel, or the seven stages."""
    return [FUSED] if (Path(repo) / FUSED / str(version)).is_dir() else list(STAGE_ARTIFACTS)


def pin_ensemble(ensemble_config: str, version: int) -> str:
    """Every step of the ensemble calls exactly ``version`` of its stage: one request never mixes
    the query tower, ANN index and rankers of two exports."""
    pinned, count = re.subn(r"model_version:\s*-?\d+", f"model_version: {int(version)}", ensemble_config)
    if count == 0:
        raise ValueError("the ensemble config has no step with a model_version to pin")
    return pinned


def write_version_ensemble(repo: Path, pinned_config: str, version: int) -> Path:
    """``funnel_v<version>``: the funnel pinned to ``version`` under its own name, so the A/B router can
    call two versions side by side (``online/router.py``)."""
    name = ensemble_name(version)
    config = rename_ensemble(pinned_config, name)
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    return repo / name


def rename_ensemble(ensemble_config: str, name: str) -> str:
    """``ensemble_config`` (``funnel`` or a ``funnel_v<N>``) under the model name ``name``."""
    config, count = re.subn(r'^name:\s*"[^"]*"', f'name: "{name}"', ensemble_config, count=1, flags=re.M)
    if count != 1 or not re.match(rf"^{FUNNEL}(_v\d+)?$", name):
        raise ValueError(f"the ensemble config must name a model, and {name!r} must be {FUNNEL} or {FUNNEL}_v<N>")
    return config


def check_complete(repo: Path, version: str, manifest: dict | None = None) -> None:
    """Every stage has its config, its model.py, the run's manifest and its artifacts (those the
    manifest says the version has; read from the ordering stage's copy when not given)."""
    if manifest is None:
        path = stage_folder(repo, "ordering", version) / MANIFEST
        if not path.exists():
            raise RuntimeError(f"incomplete export: {path.relative_to(repo)} is missing")
        manifest = json.loads(path.read_text())
    for name in version_models(repo, version):
        for rel in ["config.pbtxt", f"{version}/model.py", f"{version}/{MANIFEST}"]:
            if not (repo / name / rel).exists():
                raise RuntimeError(f"incomplete export: {name}/{rel} is missing")
    for stage, artifacts in stage_artifacts(manifest).items():
        folder = stage_folder(repo, stage, version)
        for rel in [MANIFEST, *artifacts]:
            if not (folder / rel).exists():
                raise RuntimeError(f"incomplete export: {(folder / rel).relative_to(repo)} is missing")
    for ensemble in (FUNNEL, ensemble_name(version)):
        if not (repo / ensemble / "config.pbtxt").exists():
            raise RuntimeError(f"incomplete export: the ensemble config {ensemble}/config.pbtxt is missing")


def exported_version(repo: str | Path) -> int:
    """The model version ``repo``'s ``export.json`` records (what the repository serves)."""
    path = Path(repo) / "export.json"
    if not path.exists():
        raise FileNotFoundError(f"{repo} is not an exported model repository (no export.json)")
    return int(json.loads(path.read_text())["version"])
