import shutil
from pathlib import Path

import pytest

from deployment.export import STAGE_ARTIFACTS, export_repository, exported_version
from serving.interface import FUNNEL

# Tests that use the trained model (model_version, triton_repo) are marked slow by tests/conftest.py;
# those on the tiny stand-in version (tiny_version) are not.


def test_export_writes_every_stage_with_its_version(triton_repo, model_version):
    v = str(model_version.version)
    assert exported_version(triton_repo) == model_version.version
    for stage in STAGE_ARTIFACTS:
        assert (triton_repo / stage / "config.pbtxt").exists()
        assert (triton_repo / stage / v / "model.py").exists()
    assert 'platform: "ensemble"' in (triton_repo / FUNNEL / "config.pbtxt").read_text()
    assert (triton_repo / "feature_lookup" / v / "online_store.sqlite").exists()


def test_every_model_with_metrics_gets_the_configured_metrics_interval(triton_repo, model_version):
    import json

    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from configs import ServingConfig
    from deployment.export import with_metrics_interval
    from serving.interface import FEEDBACK, ROUTER
    from serving.triton_model import metrics_interval

    def as_json(text):  # what a stub's initialize() gets as args["model_config"]
        config = model_config_pb2.ModelConfig()
        text_format.Parse(text, config)
        return json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True))

    default = ServingConfig().metrics_interval_s
    for model in [*STAGE_ARTIFACTS, ROUTER, FEEDBACK]:
        text = (triton_repo / model / "config.pbtxt").read_text()
        assert metrics_interval(as_json(text)) == default, model
        assert metrics_interval(as_json(with_metrics_interval(text, 0.0))) == 0.0
        assert with_metrics_interval(text, 2.0).startswith("#")  # the header comment is kept
    assert metrics_interval({}) == default  # a repository exported before the parameter existed
    with pytest.raises(ValueError, match="metrics_interval_s"):
        with_metrics_interval(text, -1)


def test_existing_repository_is_not_overwritten_without_replace(triton_repo, model_version):
    with pytest.raises(FileExistsError, match="replace"):
        export_repository(model_version, triton_repo)


def test_failed_export_leaves_no_partial_repository(model_version, tmp_path):
    from models.registry import ModelVersion

    broken = tmp_path / "broken_version"
    shutil.copytree(model_version.path, broken)
    shutil.rmtree(broken / "heavy_ranker")  # an artifact the heavy ranker stage needs
    target = tmp_path / "repo"
    with pytest.raises(FileNotFoundError):
        export_repository(ModelVersion(broken), target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [broken]  # no staging folder left either


def test_replace_swaps_in_a_complete_repository(model_version, tmp_path):
    target = export_repository(model_version, tmp_path / "repo")
    (target / "marker").write_text("old")
    export_repository(model_version, target, replace=True)
    assert not (target / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.fixture
def tiny_version(tmp_path_factory, monkeypatch):
    """A stand-in registry version whose artifacts are placeholders: enough for the export's file
    handling (staging, swap, completeness), in well under a second. The online store is not built."""
    import json

    import pandas as pd

    from deployment import export
    from models.registry import MANIFEST, ModelVersion

    folder = tmp_path_factory.mktemp("registry") / "1"  # not in the test's tmp_path, which it may list
    folder.mkdir()
    manifest = {"version": 1, "config": {"serving": {}}, "features": {"user_categorical": [], "user_continuous": []}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    for name in ("query_tower.json", "item_index.json"):
        (folder / name).write_text(json.dumps({"version": 1}))
    for name in ("query_tower", "light_ranker", "heavy_ranker"):
        (folder / name).mkdir()
        (folder / name / "saved_model.pb").write_text("placeholder")
    (folder / "item_index.faiss").write_text("placeholder")
    for name in ("item_features", "popularity", "user_features", "user_history"):
        pd.DataFrame({"id": [1]}).to_parquet(folder / f"{name}.parquet")
    monkeypatch.setattr(export, "build_online_store", lambda path, *args: Path(path).write_text("placeholder"))
    return ModelVersion(folder)


def test_a_replace_after_an_export_killed_while_it_removed_the_old_repository(tiny_version, tmp_path):
    """An export killed while it deleted the repository it replaced leaves that folder's rest beside
    the target, named with its process id; a later export with the same id (a container's entry
    point) could not move the served repository aside ("Directory not empty") until someone deleted it."""
    import os

    target = export_repository(tiny_version, tmp_path / "repo")
    leftover = tmp_path / f".repo-old-{os.getpid()}"
    (leftover / "retrieval").mkdir(parents=True)
    (leftover / "retrieval" / "config.pbtxt").write_text("half deleted")
    export_repository(tiny_version, target, replace=True)
    assert exported_version(target) == 1
    assert (leftover / "retrieval" / "config.pbtxt").exists()  # not ours to delete


def test_replace_refuses_a_folder_that_is_no_exported_repository(tiny_version, tmp_path):
    """``--replace`` swaps out an export; pointed by mistake at another folder (the stage definitions in
    ``triton_repo/``, the registry), it used to move that folder aside and delete it."""
    folder = tmp_path / "triton_repo"
    (folder / "retrieval").mkdir(parents=True)
    (folder / "retrieval" / "config.pbtxt").write_text("the stage definition")
    with pytest.raises(FileNotFoundError, match="not an exported model repository"):
        export_repository(tiny_version, folder, replace=True)
    assert (folder / "retrieval" / "config.pbtxt").read_text() == "the stage definition"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["triton_repo"]  # no staging folder left


def test_a_replace_that_fails_at_the_swap_leaves_the_served_repository_in_place(tiny_version, tmp_path, monkeypatch):
    """Without an atomic exchange the old repository is moved aside before the new one is moved in: if
    that second rename fails (a full disk), the old one used to stay in a hidden folder with nothing at
    the served path."""
    import os

    from deployment import export

    target = export_repository(tiny_version, tmp_path / "repo")
    (target / "marker").write_text("old")
    rename, swaps = os.rename, []

    def flaky_rename(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".repo-staging-"):  # the new one moving in
            swaps.append(src)
            raise OSError(28, "No space left on device (simulated)")
        return rename(src, dst)

    monkeypatch.setattr(export, "exchange", lambda a, b: False)  # a system without renameat2
    monkeypatch.setattr(export.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        export_repository(tiny_version, target, replace=True)
    assert len(swaps) == 1  # it failed at the swap itself, after the old one was moved aside
    assert (target / "marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging or old copy left


def test_a_replace_never_leaves_the_served_path_empty(tiny_version, tmp_path, monkeypatch):
    """With two renames, a process killed between them (the old repository moved aside, the new one
    not yet in) left nothing at the served path, and the next server start failed. On Linux the swap
    is now one atomic exchange: no step of it leaves the path empty."""
    import os

    from deployment import export

    target = export_repository(tiny_version, tmp_path / "repo")
    (target / "marker").write_text("old")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    assert export.exchange(a, b) and (b / "x").read_text() == "a" and not (a / "x").exists()
    rename, empty = os.rename, []

    def watched_rename(src, dst):
        rename(src, dst)
        if not target.exists():
            empty.append((src, dst))

    monkeypatch.setattr(export.os, "rename", watched_rename)
    export_repository(tiny_version, target, replace=True)
    assert empty == [] and not (target / "marker").exists() and exported_version(target) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "repo"]  # the old one removed
    monkeypatch.setattr(export, "exchange", lambda a, b: False)  # what the two renames did
    export_repository(tiny_version, target, replace=True)
    assert len(empty) == 1


def test_an_export_removes_what_a_killed_export_left_beside_the_repository(tiny_version, tmp_path):
    """An export killed (SIGKILL, out of memory) before its cleanup leaves its staging folder, or the
    old repository it was deleting, beside the target: a full model's copy each, piling up with every
    such kill. The next export into that folder removes them (its own kind only, and only there)."""
    target = export_repository(tiny_version, tmp_path / "repo")
    left = [tmp_path / ".repo-staging-k1ll3d_0", tmp_path / ".repo-old-abcd_123"]
    kept = [tmp_path / ".other-staging-k1ll3d_0", tmp_path / ".repo-old-12345", tmp_path / "repo-staging-k1ll3d_0"]
    for folder in left + kept:
        (folder / "retrieval").mkdir(parents=True)
        (folder / "retrieval" / "config.pbtxt").write_text("half written")
    export_repository(tiny_version, target, replace=True)
    assert exported_version(target) == 1
    assert not any(folder.exists() for folder in left)
    assert all((folder / "retrieval" / "config.pbtxt").exists() for folder in kept)


def test_two_exports_into_one_path_take_turns(tiny_version, tmp_path, monkeypatch):
    """Two exports without ``replace`` into the same new path (a retraining run's and one by hand)
    both passed the 'exists' check before either had moved its repository in: the second then
    swapped its export in over the first, as if it had been asked to replace it. They now take
    turns, and the second is refused."""
    import threading

    from deployment import export

    check, started, release = export.check_complete, threading.Event(), threading.Event()

    def slow_first_check(*args):
        if not started.is_set():
            started.set()
            release.wait(10)
        return check(*args)

    monkeypatch.setattr(export, "check_complete", slow_first_check)
    target, outcomes = tmp_path / "repo", {}

    def run(name):
        try:
            export_repository(tiny_version, target)
            outcomes[name] = "exported"
        except FileExistsError:
            outcomes[name] = "refused"

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    second.join(1.0)  # it waits for the first instead of exporting meanwhile
    release.set()
    first.join(10)
    second.join(10)
    assert outcomes == {"first": "exported", "second": "refused"}
    assert exported_version(target) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_a_folder_that_cannot_be_locked_is_exported_into_as_before(tiny_version, tmp_path, monkeypatch, caplog):
    """NFS emulates flock with POSIX write locks, which a folder's read-only descriptor cannot take
    (EBADF): the export must still work there, only without taking turns or clearing leftovers."""
    import errno
    import fcntl

    def no_lock(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_lock)  # models.registry.lock_folder's, which the export takes
    left = tmp_path / ".repo-staging-k1ll3d_0"
    left.mkdir()
    with caplog.at_level("WARNING", logger="deployment.export"):
        target = export_repository(tiny_version, tmp_path / "repo")
    assert exported_version(target) == 1 and left.is_dir() and "no lock on" in caplog.text


def test_the_repository_folder_gets_the_mode_of_every_other_folder(tiny_version, tmp_path):
    """The repository is assembled in a ``tempfile.mkdtemp`` folder and renamed into place: it kept
    mkdtemp's mode 0700, so the image's server (another user, the repository mounted read-only) could
    not open it, while every folder and file inside was readable. It now gets what ``mkdir`` gives."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        target = export_repository(tiny_version, tmp_path / "repo")
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        export_repository(tiny_version, target, replace=True)
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_replace_refuses_a_file(tiny_version, tmp_path):
    """Only an exported repository or an empty folder is replaced: a file at the path (``--out`` naming
    an archive by mistake) was swapped out for the repository and left under a hidden staging name."""
    target = tmp_path / "repo"
    target.write_text("not a repository")
    with pytest.raises(NotADirectoryError, match="not an exported model repository"):
        export_repository(tiny_version, target, replace=True)
    assert target.read_text() == "not a repository"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize("how", ["new", "exchange", "two renames"])
def test_an_export_is_on_disk_before_its_rename_publishes_it(tiny_version, tmp_path, monkeypatch, how, request):
    """Nothing was synced: after a power cut soon after the rename (or the exchange of ``--replace``),
    the repository could hold empty or cut-short configs, export.json or artifacts (the rename's
    metadata reached the disk before the files' data), which check_complete (it checks that files
    exist) and Triton took. Every file and folder is now synced before, the parent folder after."""
    from deployment import export

    target = tmp_path / "repo"
    if how != "new":
        export_repository(tiny_version, target)
    if how == "two renames":
        monkeypatch.setattr(export, "exchange", lambda a, b: False)
    record = request.getfixturevalue("sync_recorder")  # from here on: the export's own renames
    export_repository(tiny_version, target, replace=True)
    monkeypatch.undo()
    assert len(record.published) == (2 if how == "two renames" else 1) and record.published[-1] == target
    assert len(list(target.rglob("*"))) > 20
    assert record.missed(target) == []
    assert record.parent_synced(target)


def test_an_added_version_is_on_disk_before_its_renames_publish_it(tiny_version, tmp_path, monkeypatch, request):
    """``add_version`` moves each stage's ``<N>/`` folder and then ``funnel_v<N>`` into the live
    repository with renames; nothing was synced, so after a power cut the version could be there with
    empty or cut-short files (and ``roll_out`` checks only that they exist). Each folder is now on disk
    before its rename, and each rename on disk (its new parent synced) before the next one."""
    import json

    from deployment.rollout import add_version
    from models.registry import ModelVersion
    from serving.interface import ensemble_name

    repo = export_repository(tiny_version, tmp_path / "repo")
    v2 = tmp_path / "registry" / "2"
    shutil.copytree(tiny_version.path, v2)
    for name in ("manifest.json", "query_tower.json", "item_index.json"):
        content = json.loads((v2 / name).read_text())
        (v2 / name).write_text(json.dumps({**content, "version": 2}))
    record = request.getfixturevalue("sync_recorder")
    assert add_version(ModelVersion(v2), repo) == 2
    monkeypatch.undo()
    moved = [p for p in record.published if p.parent == repo or p.parent.parent == repo]
    assert moved[-1] == repo / ensemble_name(2) and len(moved) == len(STAGE_ARTIFACTS) + 1
    for target in moved:
        assert record.missed(target) == [], target
        assert record.parent_synced(target), target


@pytest.mark.parametrize("fused", [True, False])
def test_instance_counts_the_layout_has_no_model_for_are_named_at_export(tiny_version, tmp_path, caplog, fused):
    """``stage_instances: {heavy_ranker: 4}`` under ``fuse_stages`` (or ``{fused_funnel: 4}`` without it)
    names a model the export does not write: the count was dropped without a word, and the user who
    asked for 4 heavy-ranker instances served with ``instances``. The export still runs (a version is
    re-exported fused with ``--fuse-stages``), and says which entries it ignored and what applies."""
    from configs import BatchingConfig
    from deployment.export import batching_settings
    from serving.interface import FUSED

    asked = {"heavy_ranker": 4, FUSED: 3}
    batching = BatchingConfig(fuse_stages=fused, instances=2, stage_instances=asked)
    with caplog.at_level("WARNING", logger="deployment.export"):
        repo = export_repository(tiny_version, tmp_path / "repo", batching=batching)
    warned = [r.getMessage() for r in caplog.records if "stage_instances" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    if fused:
        assert "['heavy_ranker'] ignored" in warned[0] and "fused into fused_funnel" in warned[0]
        assert batching_settings((repo / FUSED / "config.pbtxt").read_text())["instances"] == [3]
    else:
        assert f"['{FUSED}'] ignored" in warned[0] and "fuse_stages is false" in warned[0]
        assert batching_settings((repo / "heavy_ranker" / "config.pbtxt").read_text())["instances"] == [4]
    caplog.clear()
    staged_counts = BatchingConfig(fuse_stages=fused, stage_instances={FUSED: 3} if fused else {"heavy_ranker": 4})
    with caplog.at_level("WARNING", logger="deployment.export"):
        export_repository(tiny_version, tmp_path / "repo", replace=True, batching=staged_counts)
    assert "stage_instances" not in caplog.text  # counts the layout uses: no word


def test_the_router_and_feedback_instance_counts_come_from_the_config(tiny_version, tmp_path):
    """``ab_router`` had a fixed 2 instances (and ``feedback`` 1) whatever serving.batching said: the
    router's BLS call blocks its instance until the funnel answers, so a server routed two requests at
    a time however many instances the stages had. Now ``router_instances`` / ``feedback_instances``,
    validated as the stages' counts are; the defaults stay 2 and 1."""
    import json

    from configs import BatchingConfig
    from deployment.export import batching_settings
    from serving.interface import FEEDBACK, ROUTER

    def counts(repo):
        return [batching_settings((repo / m / "config.pbtxt").read_text())["instances"] for m in (ROUTER, FEEDBACK)]

    assert counts(export_repository(tiny_version, tmp_path / "default")) == [[2], [1]]
    configured = BatchingConfig(router_instances=6, feedback_instances=3)
    assert counts(export_repository(tiny_version, tmp_path / "configured", batching=configured)) == [[6], [3]]
    # The version's own serving.batching (the manifest's config) is what an export without batching= uses.
    manifest = json.loads((tiny_version.path / "manifest.json").read_text())
    manifest["config"]["serving"]["batching"] = {"router_instances": 4}
    (tiny_version.path / "manifest.json").write_text(json.dumps(manifest))
    assert counts(export_repository(tiny_version, tmp_path / "manifest")) == [[4], [1]]

    with pytest.raises(ValueError, match=r"instance counts must be integers >= 1, got \{'router_instances': 0\}"):
        BatchingConfig(router_instances=0)
    # A count set on a built config (a script's override) is refused by the export, before it writes.
    late = BatchingConfig()
    late.feedback_instances = 0
    with pytest.raises(ValueError, match=r"serving.batching.feedback_instances \(feedback's instances\) must be"):
        export_repository(tiny_version, tmp_path / "late", batching=late)
    assert not (tmp_path / "late").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "configured",
        "default",
        "manifest",
    ]


def test_add_version_names_every_setting_of_the_version_that_the_repository_does_not_take(
    tiny_version, tmp_path, caplog
):
    """A user raises ``serving.batching.router_instances`` (or ``feedback_instances``, or
    ``serving.metrics_interval_s``), trains a version and rolls it in with ``add_version``: only the
    version's folders move in, and the router's and feedback endpoint's ``config.pbtxt`` (one per model,
    serving every version) keep the exported counts. The stages' batching was named in a warning; these
    were dropped without a word. Each differing setting is now named with its config key, and the
    repository's configs stay as exported (a rollout reloads no model with a new config)."""
    import json

    from deployment.export import batching_settings
    from deployment.rollout import add_version
    from models.registry import ModelVersion
    from serving.interface import FEEDBACK, ROUTER

    repo = export_repository(tiny_version, tmp_path / "repo")
    before = {m: (repo / m / "config.pbtxt").read_text() for m in (ROUTER, FEEDBACK, "heavy_ranker")}

    def version(number, serving):
        folder = tmp_path / "registry" / str(number)
        shutil.copytree(tiny_version.path, folder)
        for name in ("manifest.json", "query_tower.json", "item_index.json"):
            content = json.loads((folder / name).read_text())
            if name == "manifest.json":
                content["config"]["serving"] = serving
            (folder / name).write_text(json.dumps({**content, "version": number}))
        return ModelVersion(folder)

    with caplog.at_level("WARNING", logger="deployment.rollout"):
        assert add_version(version(2, {}), repo) == 2  # the settings the repository was exported with
    assert "not applied" not in caplog.text
    changed = {"batching": {"router_instances": 5, "feedback_instances": 3}, "metrics_interval_s": 1.0}
    with caplog.at_level("WARNING", logger="deployment.rollout"):
        assert add_version(version(3, changed), repo) == 3
    warned = {r.getMessage().split()[2]: r.getMessage() for r in caplog.records if "not applied" in r.getMessage()}
    assert sorted(warned) == sorted([ROUTER, FEEDBACK, *STAGE_ARTIFACTS]), caplog.text
    assert "serving.batching.router_instances" in warned[ROUTER] and "[5]" in warned[ROUTER]
    assert "serving.batching.feedback_instances" in warned[FEEDBACK] and "[3]" in warned[FEEDBACK]
    assert "serving.metrics_interval_s" in warned["heavy_ranker"] and "instances" not in warned["heavy_ranker"]
    assert all("export_triton.py --replace" in message for message in warned.values())
    # What the user gets: the repository's configs, as exported, serve version 3 too.
    assert {m: (repo / m / "config.pbtxt").read_text() for m in before} == before
    assert batching_settings(before[ROUTER])["instances"] == [2]
    # A repository exported before the metrics interval was written serves the default: no warning for it.
    from deployment.export import TRITON_REPO_SOURCE, served_settings

    unset = (TRITON_REPO_SOURCE / ROUTER / "config.pbtxt").read_text()
    assert served_settings(unset)["metrics_interval_s"] == served_settings(before[ROUTER])["metrics_interval_s"]


def tiny_version_numbered(tiny_version, folder: Path, number: int):
    """A copy of ``tiny_version`` as registry version ``number`` (its stamps agree)."""
    import json

    from models.registry import ModelVersion

    shutil.copytree(tiny_version.path, folder)
    for name in ("manifest.json", "query_tower.json", "item_index.json"):
        content = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**content, "version": number}))
    return ModelVersion(folder)


class PausingControl:
    """The rollout's Triton control client on a server where every model loads and is ready; the first
    load of ``pause_at`` waits until the test lets it go on."""

    pause_at = None  # the model whose first load pauses the rollout
    paused = None  # threading.Event set when that load is reached
    go_on = None  # threading.Event the test sets to let the rollout continue

    def __init__(self, *args, **kwargs):
        pass

    def is_model_ready(self, name, version=""):
        return True

    def load_model(self, name):
        if name == PausingControl.pause_at and not PausingControl.paused.is_set():
            PausingControl.paused.set()
            assert PausingControl.go_on.wait(30), "the test never let the rollout go on"

    def get_model_repository_index(self, as_json=False):
        return {}

    def close(self):
        pass


def test_an_export_replace_waits_for_a_rollout_in_progress_instead_of_mixing_the_two(
    tiny_version, tmp_path, monkeypatch
):
    """``roll_out`` took no lock: an ``export_triton.py --replace`` that swapped the repository in while a
    rollout of version 2 loaded its stages got the rollout's later writes (``funnel/config.pbtxt`` pinned
    to 2, ``funnel/2/``, ``export.json`` naming 2, a router version routing to 2) in the new repository,
    which holds version 1 alone: a restart served a funnel whose stages are not there. Every writer into
    the served repository now takes the export's lock (on the folder holding it, which survives the swap),
    so the export waits for the rollout and then swaps in its whole repository."""
    import threading

    from deployment import rollout
    from serving.interface import FUNNEL, ROUTER

    repo = export_repository(tiny_version, tmp_path / "repo")
    assert rollout.add_version(tiny_version_numbered(tiny_version, tmp_path / "registry" / "2", 2), repo) == 2
    monkeypatch.setattr(rollout, "ControlClient", PausingControl)
    monkeypatch.setattr(rollout.time, "sleep", lambda s: None)
    # Paused loading its new router version: funnel/config.pbtxt and ab_router/2/ are written, export.json not yet.
    monkeypatch.setattr(PausingControl, "pause_at", ROUTER)
    monkeypatch.setattr(PausingControl, "paused", threading.Event())
    monkeypatch.setattr(PausingControl, "go_on", threading.Event())
    errors = []

    def run(target, *args, **kwargs):
        def body():
            try:
                target(*args, **kwargs)
            except BaseException as err:  # reported by the test, not lost in the thread
                errors.append(err)

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    rolling = run(rollout.roll_out, "127.0.0.1:1", repo, 2, timeout_s=5.0)
    assert PausingControl.paused.wait(30)  # the rollout has written part of version 2's switch
    exporting = run(export_repository, tiny_version, repo, replace=True)
    exporting.join(2.0)  # the old code swapped the repository in here, under the rollout
    PausingControl.go_on.set()
    rolling.join(30)
    exporting.join(30)
    assert not rolling.is_alive() and not exporting.is_alive() and errors == []
    # The export came last: the repository is its own, whole, serving version 1 alone.
    assert rollout.served_version(repo) == 1  # old code: 2, the rollout's export.json in the new repository
    assert rollout.funnel_version(repo) == 1
    assert not (repo / FUNNEL / "2").exists() and not (repo / "heavy_ranker" / "2").exists()
    assert rollout.router_versions(repo) == [1]


def test_a_writer_that_waits_too_long_for_the_repository_lock_names_its_holder(tiny_version, tmp_path, monkeypatch):
    """A second writer into a repository whose lock another one holds waits for it, at most
    ``LOCK_TIMEOUT_S``, then gives up with ``RepositoryBusyError`` naming the folder and, on Linux, the
    process holding the lock; it changed nothing."""
    import os
    import sys
    import threading

    from deployment import export, rollout

    repo = export_repository(tiny_version, tmp_path / "repo")
    monkeypatch.setattr(export, "LOCK_TIMEOUT_S", 0.5)
    errors = []

    def retire_elsewhere():  # another thread: its own flock, not the held one's re-entry
        try:
            rollout.retire("127.0.0.1:1", repo, 1)
        except BaseException as err:
            errors.append(err)

    with export.repository_lock(repo):
        thread = threading.Thread(target=retire_elsewhere)
        thread.start()
        thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], export.RepositoryBusyError), errors
    assert str(repo.parent) in str(errors[0]) and "nothing was changed" in str(errors[0])
    if sys.platform == "linux":
        assert f"pid {os.getpid()}" in str(errors[0])
    assert rollout.served_version(repo) == 1
